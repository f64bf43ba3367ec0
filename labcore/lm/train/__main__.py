"""``python -m labcore.lm.train CONFIG.yaml --out DIR``: the same as ``labcore train``."""

from labcore.lm.train.cli import cli_main

raise SystemExit(cli_main())
