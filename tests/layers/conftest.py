"""Layer-test setup: the shared helpers in ``layerhelpers.py`` (beside this file) are importable from
the test files (``--import-mode=importlib`` puts no test folder on ``sys.path``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))     # layerhelpers: beside this file
