"""``labcore train CONFIG.yaml --out DIR [--device D] [--no-progress] [--fresh] [--cache-dir DIR]``.

Trains the run file's model (:mod:`labcore.lm.train.run_config`) inside a
:class:`~labcore.results.RunDir` (``run.json`` status running -> done, ``summary.parquet``); a
finished run directory is left alone unless ``--fresh``. Exit code 2 for an invalid config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labcore.config import ConfigError
from labcore.data.cache import generator_for
from labcore.lm.train.device import resolve_device
from labcore.lm.train.loop import train
from labcore.lm.train.run_config import load_run_config
from labcore.results import RunDir


def generator_name(data_cfg: Any) -> str:
    """The ``kind`` of a data config (``"knowledge"``, ``"recall"``, ``"text"``)."""
    return generator_for(data_cfg).name


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``labcore train CONFIG.yaml --out DIR [--device D] [--no-progress] [--fresh]``."""
    ap = argparse.ArgumentParser(prog="labcore train", description="Train a labcore LM from a YAML config "
                                 "with sections model, plan, data, train.")
    ap.add_argument("config", help="YAML file")
    ap.add_argument("--out", required=True, help="run directory (resumed if it has checkpoints)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override train.device")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--fresh", action="store_true", help="ignore checkpoints in --out and start over")
    ap.add_argument("--cache-dir", help="dataset cache directory (default data/cache)")
    args = ap.parse_args(argv)
    try:
        mcfg, tcfg, dcfg = load_run_config(args.config)
        over = {}
        if args.device:
            over["device"] = args.device
        if args.no_progress:
            over["progress"] = False
        if over:
            tcfg = dataclasses.replace(tcfg, **over)
    except ConfigError as e:
        print(f"labcore train: invalid config: {e}", file=sys.stderr)
        return 2
    run = RunDir(args.out)
    if args.fresh:
        run.run_json.unlink(missing_ok=True)
    elif run.is_done():
        print(f"labcore train: {args.out} already holds a finished run (run.json status done); "
              "use --fresh to train it again", file=sys.stderr)
        return 0
    params = {"model": mcfg.to_dict(), "data": {"kind": generator_name(dcfg), **dataclasses.asdict(dcfg)},
              "train": tcfg.to_dict(), "config_file": str(Path(args.config).resolve())}
    run.start(params, notebook="labcore train", seed=tcfg.seed, device=str(resolve_device(tcfg)))
    try:
        res = train(mcfg, tcfg, dcfg, args.out, resume=not args.fresh, cache_dir=args.cache_dir)
    except BaseException as e:
        run.fail(e)
        raise
    scalars = {k: v for k, v in res.final.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    run.write_summary(scalars)
    run.finish(final=scalars, resumed_from=res.resumed_from)
    shown = {k: v for k, v in scalars.items() if "/" not in k}
    print(json.dumps({"run_dir": str(res.run_dir), "steps": res.steps, **shown}, indent=1))
    return 0
