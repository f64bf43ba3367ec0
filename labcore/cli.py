"""The ``labcore`` command.

::

    labcore sweep SWEEP.yaml [--jobs N] [--timeout S] [--cluster local:N | --scheduler tcp://HOST:PORT]
                  [--retries K] [--results-root DIR] [--reports-root DIR] [--gpus 0,1]
                  [--dry-run] [--no-report] [--no-progress]
    labcore report SWEEP_DIR [--out DIR]       regenerate a sweep's report from its run directories
    labcore findings SWEEP_DIR [--out docs]    write the published findings (docs/findings.md, its CSVs
                                               and figures) of a finished sweep; --check / --rerender
    labcore train ...                          labcore.lm.train.cli.cli_main(argv)
    labcore bench ...                          labcore.bench.cli_main(argv)
    labcore lab [--dry-run]                    start JupyterLab on notebooks/ (127.0.0.1)

Exit codes of ``sweep``: 0 every run done, 1 some run failed, 2 invalid input (nothing ran),
3 interrupted (scheduler lost, Ctrl-C; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from labcore.results import run_status
from labcore.sweep.dask_exec import DaskBackend, DaskUnavailable
from labcore.sweep.executors import LocalPoolBackend, detect_local_gpus, local_cores, parse_gpus
from labcore.sweep.runner import SweepLocked, run_sweep
from labcore.sweep.spec import SweepError, load_sweep
from labcore.viz.findings import check_findings, rerender, write_findings
from labcore.viz.report import write_report

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3
DELEGATES = {"train": "labcore.lm.train.cli", "bench": "labcore.bench"}  # command -> module with cli_main


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, with a message naming the value otherwise."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} is not allowed: must be >= {minimum}")
        return v
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v} is not allowed: must be > 0 seconds")
    return v


def _local_cluster(text: str) -> int:
    kind, _, n = text.partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: must be local:N with N >= 1 (e.g. local:4)")
    return int(n)


def _scheduler(text: str) -> str:
    if "://" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: must be an address like tcp://HOST:8786")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labcore", description="UltraMem Lab command line")
    sub = p.add_subparsers(dest="command", metavar="{sweep,report,findings,train,bench,lab}")

    s = sub.add_parser("sweep", help="run a sweep file's notebooks (parallel, resumable)",
                       description="Validate a sweep file, run every notebook x parameters x seed not "
                                   "finished yet, collect results.parquet and write the report.")
    s.add_argument("sweep_file", type=Path, help="the sweep YAML file")
    s.add_argument("--jobs", "-j", type=_positive_int, default=None,
                   help="runs in parallel in the local process pool (default: cores // 2, at least 1)")
    s.add_argument("--timeout", type=_positive_float, default=None,
                   help="wall-clock seconds per run, overriding the sweep file")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--cluster", type=_local_cluster, default=None, metavar="local:N",
                       help="start a dask LocalCluster of N process workers")
    where.add_argument("--scheduler", type=_scheduler, default=None, metavar="tcp://HOST:PORT",
                       help="use a running dask scheduler (results root must be on a shared filesystem)")
    s.add_argument("--retries", type=_non_negative_int, default=2,
                   help="re-executions of a run whose worker died (default 2)")
    s.add_argument("--results-root", type=Path, default=Path("results"), help="default: ./results")
    s.add_argument("--reports-root", type=Path, default=Path("reports"), help="default: ./reports")
    s.add_argument("--gpus", default=None,
                   help="GPU ids for local runs marked gpu: true, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES "
                        "or nvidia-smi)")
    s.add_argument("--dry-run", action="store_true", help="validate and list the runs; run nothing")
    s.add_argument("--no-report", action="store_true", help="skip the HTML report")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("report", help="(re)write the HTML report of a sweep directory")
    r.add_argument("sweep_dir", type=Path, help="<results root>/<sweep name>")
    r.add_argument("--out", type=Path, default=None, help="default: reports/<sweep name>")

    f = sub.add_parser("findings", help="write the lab's published findings (findings.md) from a finished sweep",
                       description="Read a finished sweep's run directories and write <out>/findings.md, with each "
                                   "notebook's headline table (CSV) and figure (PNG) under <out>/findings/.")
    f.add_argument("sweep_dir", type=Path, nargs="?", help="<results root>/<sweep name>, e.g. runs/standard")
    f.add_argument("--out", type=Path, default=Path("docs"), help="default: docs")
    mode = f.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="check <out>/findings.md against its CSVs (exit 1 on a mismatch); reads no sweep")
    mode.add_argument("--rerender", action="store_true",
                      help="rewrite <out>/findings.md from its snapshot.json and CSVs; reads no sweep")

    for name, module in DELEGATES.items():
        t = sub.add_parser(name, help=f"{module}.cli_main(...) (arguments passed through)", add_help=False)
        t.add_argument("rest", nargs=argparse.REMAINDER)

    lab = sub.add_parser("lab", help="start JupyterLab on notebooks/ (127.0.0.1)")
    lab.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    lab.add_argument("--notebook-dir", type=Path, default=Path("notebooks"))
    lab.add_argument("--port", type=int, default=None)
    return p


def _delegate(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            print(f"labcore: {module} is not available in this installation ({e})", file=sys.stderr)
            return EXIT_USAGE
        raise
    fn = getattr(mod, "cli_main", None)
    if fn is None:
        print(f"labcore: {module} has no cli_main(argv)", file=sys.stderr)
        return EXIT_USAGE
    rc = fn(argv)
    return int(rc or 0)


def _cmd_sweep(args: argparse.Namespace) -> int:

    try:
        spec = load_sweep(args.sweep_file)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout is not None:
        spec = spec.with_timeout(args.timeout)
    if args.dry_run:
        root = args.results_root.resolve() / spec.name
        for r in spec.runs:
            done = run_status(root / r.run_id) == "done"
            print(f"{r.run_id}  {'done   ' if done else 'to run '} {r.describe()}"
                  + (" gpu" if r.gpu else ""))
        print(f"sweep {spec.name}: {len(spec.runs)} runs" +
              (f" ({spec.duplicates} duplicate parameter sets merged)" if spec.duplicates else ""))
        return EXIT_OK

    gpus = parse_gpus(args.gpus) if args.gpus is not None else detect_local_gpus()
    if args.cluster is not None or args.scheduler is not None:
        try:
            backend = (DaskBackend.local(args.cluster, retries=args.retries, gpus=gpus) if args.cluster
                       else DaskBackend.remote(args.scheduler, retries=args.retries))
        except DaskUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
    else:
        jobs = args.jobs or max(1, local_cores() // 2)
        backend = LocalPoolBackend(jobs, gpus=gpus)
    def _terminate(signum, frame):  # SIGTERM (kill, timeout, a batch system): stop like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_sweep(spec, args.results_root, backend, retries=args.retries,
                           progress=not args.no_progress,
                           report_root=None if args.no_report else args.reports_root)
    except SweepLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)
        backend.close()
    return result.exit_code


def _cmd_report(args: argparse.Namespace) -> int:
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory {args.sweep_dir} does not exist", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or Path("reports") / args.sweep_dir.resolve().name
    path = write_report(args.sweep_dir, out)
    print(f"report: {path}")
    return EXIT_OK


def _cmd_findings(args: argparse.Namespace) -> int:
    if args.check or args.rerender:
        if args.sweep_dir is not None:
            print("error: --check and --rerender read <out> only; give no SWEEP_DIR", file=sys.stderr)
            return EXIT_USAGE
        if not (args.out / "findings" / "snapshot.json").exists():
            print(f"error: {args.out}/findings/snapshot.json does not exist: generate the findings first "
                  "(labcore findings SWEEP_DIR --out DIR)", file=sys.stderr)
            return EXIT_USAGE
        if args.rerender:
            print(f"findings: {rerender(args.out)}")
            return EXIT_OK
        problems = check_findings(args.out)
        for p in problems:
            print(f"mismatch: {p}", file=sys.stderr)
        print(f"findings: {args.out / 'findings.md'} " + ("matches its CSVs" if not problems
                                                          else f"has {len(problems)} problem(s)"))
        return EXIT_FAILED if problems else EXIT_OK
    if args.sweep_dir is None:
        print("error: SWEEP_DIR is required (e.g. labcore findings runs/standard --out docs)", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = write_findings(args.sweep_dir, args.out)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"findings: {path}")
    return EXIT_OK


def _cmd_lab(args: argparse.Namespace) -> int:
    cmd = ["jupyter", "lab", "--ip", "127.0.0.1", "--notebook-dir", str(args.notebook_dir)]
    if args.port:
        cmd += ["--port", str(args.port)]
    if args.dry_run:
        print(" ".join(cmd))
        return EXIT_OK
    exe = shutil.which("jupyter") or str(Path(sys.executable).with_name("jupyter"))
    if not Path(exe).exists():
        print("error: jupyter is not installed here; install the project (pip install -e .) and run:\n  "
              + " ".join(cmd), file=sys.stderr)
        return EXIT_USAGE
    print("starting: " + " ".join(cmd), flush=True)
    os.execv(exe, [exe, *cmd[1:]])
    return EXIT_OK  # pragma: no cover - execv does not return


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATES:  # pass everything through untouched, --help included
        return _delegate(DELEGATES[argv[0]], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return {"sweep": _cmd_sweep, "report": _cmd_report, "findings": _cmd_findings,
            "lab": _cmd_lab}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
