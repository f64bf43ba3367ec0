"""Experiment-test setup: the shared helpers in ``experimenthelpers.py`` (beside this file) are
importable from the test files (``--import-mode=importlib`` puts no test folder on ``sys.path``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))     # experimenthelpers: beside this file
