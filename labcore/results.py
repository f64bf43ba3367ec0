"""Run directories and the tables derived from them.

A *run directory* is the unit of results: one notebook execution with one parameter set and one
seed, written by one process::

    <run dir>/
      run.json          identity and status: params, notebook, seed, versions, git commit, device,
                        timings; "status" is "running" -> "done" (or "failed")
      history.jsonl     one JSON object per logged row (training curves, ...), appended
      summary.parquet   the run's final table (one or more rows: metrics by name, by layer, ...)
      figures/          <name>.html (interactive, plotly.js beside it), <name>.json (the figure),
                        <name>.png (static, via kaleido; optional)
      executed.ipynb    the executed notebook (written by the sweep runner)

The completion rule: a run is complete **only** when ``run.json`` says ``"status": "done"``.
``run.json`` is written first with ``"running"`` and rewritten *last* (after every other file) by
:meth:`RunDir.finish`, atomically (temp file + ``os.replace``), so a reader never sees "done" next to
half-written outputs, and a crash at any point leaves a run that is visibly not done.

Tables are derived, never edited: :func:`collect` walks a results root and builds one tidy table
(one row per summary row of every finished run, with the run id, notebook, seed and parameters
flattened as ``param_<name>`` columns); :func:`runs_table` lists every run directory whatever its
status; :func:`duckdb_connect` exposes them to SQL (``runs``, ``summary``, ``results``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.io as pio

__all__ = [
    "RunDir",
    "RUN_JSON",
    "write_atomic",
    "write_json_atomic",
    "read_run_json",
    "run_status",
    "find_run_dirs",
    "collect",
    "runs_table",
    "duckdb_connect",
    "PARAM_PREFIX",
]

RUN_JSON = "run.json"
HISTORY = "history.jsonl"
SUMMARY = "summary.parquet"
FIGURES = "figures"
TABLES = "tables"
SCHEMA_VERSION = 1
PARAM_PREFIX = "param_"
_FIGURE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


# ----------------------------------------------------------------------------------------------
# Atomic writes and JSON-safe values.
# ----------------------------------------------------------------------------------------------


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(jsonable(obj), indent=2, sort_keys=False, allow_nan=True) + "\n")


def jsonable(v: Any) -> Any:
    """Plain JSON types from dataclasses, paths, tuples, numpy/torch scalars and arrays."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set | frozenset):
        return [jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if hasattr(v, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(v.tolist())
    if hasattr(v, "item"):
        return v.item()
    return repr(v)


def read_run_json(run_dir: str | Path) -> dict | None:
    """The parsed run.json of ``run_dir``, or None if absent or unreadable (a torn file cannot
    happen with atomic writes, but a foreign file might be malformed)."""
    try:
        return json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def run_status(run_dir: str | Path) -> str | None:
    """"done", "running", "failed", or None when there is no (readable) run.json."""
    rj = read_run_json(run_dir)
    return rj.get("status") if rj else None


# ----------------------------------------------------------------------------------------------
# Environment facts recorded in run.json.
# ----------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _git_commit() -> dict | None:
    """Commit of the labcore source tree (and whether it has uncommitted changes), if in git."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _device_info() -> dict:
    """The compute device as the run sees it. torch is only asked if the notebook imported it."""
    info: dict[str, Any] = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is None:
        info["device"] = "unknown (torch not imported)"
        return info
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["device"] = "cpu"
    return info


def _now() -> tuple[str, float]:
    t = time.time()
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="milliseconds"), t


# ----------------------------------------------------------------------------------------------
# The run directory.
# ----------------------------------------------------------------------------------------------


class RunDir:
    """Writer (and reader) of one run directory; see the module docstring for the layout.

    Typical notebook use::

        run = RunDir(P.out_dir).start(P, notebook="01_tdqkr.ipynb", seed=P.seed)
        for step ...: run.log({"step": step, "loss": loss})
        run.write_summary(df); run.save_figure(fig, "loss_curve")
        run.finish()
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._record: dict | None = None
        self._figure_errors: dict[str, str] = {}
        self._figures: list[str] = []
        self._kaleido_started = False

    # paths
    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES

    # reading
    def read(self) -> dict | None:
        return read_run_json(self.path)

    @property
    def status(self) -> str | None:
        return run_status(self.path)

    def is_done(self) -> bool:
        return self.status == "done"

    # writing
    def start(self, params: Any, notebook: str, seed: int, device: str | None = None) -> RunDir:
        """Create the directory and write run.json with status "running". Outputs of an earlier,
        unfinished run in the same directory (history, summary, figures) are removed.

        ``params``: the validated params dataclass (or a mapping). The run id is the sweep
        runner's (``LABCORE_RUN_ID`` in the kernel environment) or the directory name.
        """
        if self.is_done():
            raise FileExistsError(f"{self.path} already holds a finished run (run.json status done); "
                                  "use a fresh out_dir")
        self.path.mkdir(parents=True, exist_ok=True)
        # A crashed or failed run here before: its outputs are stale, never mixed into this run.
        self.history_path.unlink(missing_ok=True)
        self.summary_path.unlink(missing_ok=True)
        shutil.rmtree(self.figures_dir, ignore_errors=True)
        started_iso, started = _now()
        dev = _device_info()
        if device is not None:
            dev["device"] = device
        self._record = {
            "schema": SCHEMA_VERSION,
            "status": "running",
            "run_id": os.environ.get("LABCORE_RUN_ID") or self.path.name,
            "sweep": os.environ.get("LABCORE_SWEEP"),
            "attempt": os.environ.get("LABCORE_ATTEMPT"),
            "worker": os.environ.get("LABCORE_WORKER"),
            "notebook": notebook,
            "seed": seed,
            "params": jsonable(params),
            "versions": {"python": platform.python_version(), "torch": _version("torch"),
                         "labcore": _version("labcore"), "numpy": _version("numpy")},
            "git": _git_commit(),
            "device": dev,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "timings": {"started": started_iso, "started_unix": started},
        }
        write_json_atomic(self.run_json, self._record)
        return self

    def _require_started(self) -> dict:
        if self._record is None:
            rec = self.read()
            if rec is None:
                raise RuntimeError(f"RunDir({self.path}): call start() first")
            self._record = rec
        return self._record

    def log(self, row: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append one row (a mapping and/or keyword fields) to history.jsonl."""
        self._require_started()
        data = {**(dict(row) if row else {}), **fields}
        with open(self.history_path, "a") as f:
            f.write(json.dumps(jsonable(data), allow_nan=True) + "\n")
            f.flush()

    def history(self) -> pd.DataFrame:
        """history.jsonl as a DataFrame (empty if nothing was logged)."""
        if not self.history_path.exists():
            return pd.DataFrame()
        return pd.read_json(self.history_path, lines=True)

    def write_summary(self, table: pd.DataFrame | Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> Path:
        """Write the run's summary table (a DataFrame, one row as a dict, or a list of dicts)."""
        self._require_started()
        if isinstance(table, pd.DataFrame):
            df = table
        elif isinstance(table, Mapping):
            df = pd.DataFrame([dict(table)])
        else:
            df = pd.DataFrame([dict(r) for r in table])
        return write_table(df.reset_index(drop=True), self.summary_path)

    def write_key_table(self, name: str, table: pd.DataFrame) -> Path:
        """Write a headline table (e.g. means with confidence intervals, paired deltas) to
        ``tables/<name>.parquet``; the sweep report shows these first for each run."""
        self._require_started()
        if not name or not set(name) <= _FIGURE_NAME_CHARS:
            raise ValueError(f"write_key_table: name={name!r} is not allowed: must be non-empty and use "
                             "only letters, digits, '_', '.', '-'")
        return write_table(table.reset_index(drop=True), self.path / TABLES / f"{name}.parquet")

    def key_tables(self) -> dict[str, pd.DataFrame]:
        """The run's headline tables by name (see :meth:`write_key_table`), in name order."""
        d = self.path / TABLES
        return {f.stem: pd.read_parquet(f) for f in sorted(d.glob("*.parquet"))} if d.is_dir() else {}

    def summary(self) -> pd.DataFrame:
        return pd.read_parquet(self.summary_path) if self.summary_path.exists() else pd.DataFrame()

    def save_figure(self, fig: Any, name: str, *, png: bool = True, strict: bool = False,
                    width: int = 800, height: int = 500, scale: float = 1.0) -> dict[str, Path]:
        """Save a plotly figure as figures/<name>.html (always; plotly.js written once beside it so
        the file opens offline), <name>.json and, if ``png``, <name>.png via kaleido.

        A PNG failure (no Chrome, kaleido error) is recorded in run.json ("figure_errors") and
        warned about, not raised, unless ``strict``. MathJax is disabled for kaleido (no network).
        """
        self._require_started()
        if not name or not set(name) <= _FIGURE_NAME_CHARS:
            raise ValueError(f"save_figure: name={name!r} is not allowed: must be non-empty and use "
                             "only letters, digits, '_', '.', '-'")
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        out = {"html": self.figures_dir / f"{name}.html", "json": self.figures_dir / f"{name}.json"}
        fig.write_html(str(out["html"]), include_plotlyjs="directory", full_html=True)
        write_atomic(out["json"], fig.to_json())
        self._figures.append(name)
        if png:
            out_png = self.figures_dir / f"{name}.png"
            try:
                self._write_png(fig, out_png, width=width, height=height, scale=scale)
                out["png"] = out_png
            except Exception as e:  # noqa: BLE001 - recorded, optionally re-raised
                msg = f"{type(e).__name__}: {e}".strip()
                self._figure_errors[name] = msg[:2000]
                if strict:
                    raise
                warnings.warn(f"save_figure({name!r}): PNG export failed ({msg[:300]}); HTML saved",
                              RuntimeWarning, stacklevel=2)
        return out

    def _write_png(self, fig: Any, path: Path, **kw: Any) -> None:
        pio.defaults.mathjax = None
        if not self._kaleido_started:  # one headless browser for all figures of this run
            try:
                import kaleido  # starts a headless browser stack: only when a PNG is written

                kaleido.start_sync_server(silence_warnings=True)
                self._kaleido_started = True
            except Exception:  # noqa: BLE001 - fall back to one browser per figure
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = pio.to_image(fig, format="png", **kw)
        write_atomic(path, img)

    def _stop_kaleido(self) -> None:
        if self._kaleido_started:
            try:
                import kaleido  # see _write_png

                kaleido.stop_sync_server(silence_warnings=True)
            except Exception:  # noqa: BLE001
                pass
            self._kaleido_started = False

    def _close(self, status: str, extra: Mapping[str, Any]) -> None:
        rec = dict(self._require_started())
        finished_iso, finished = _now()
        timings = dict(rec.get("timings", {}))
        timings.update({"finished": finished_iso, "finished_unix": finished})
        if "started_unix" in timings:
            timings["duration_s"] = finished - timings["started_unix"]
        rec.update({"status": status, "timings": timings, "figures": sorted(set(self._figures)),
                    "figure_errors": dict(self._figure_errors)})
        rec.update(jsonable(dict(extra)))
        self._stop_kaleido()
        write_json_atomic(self.run_json, rec)  # last write of the run, atomic
        self._record = rec

    def finish(self, **extra: Any) -> None:
        """Mark the run done: rewrite run.json with status "done", LAST and atomically. Extra
        keyword fields (JSON-able) are stored in run.json too."""
        self._close("done", extra)

    def fail(self, error: BaseException | str | Mapping[str, Any], **extra: Any) -> None:
        """Mark the run failed with an error record {"ename", "evalue", ...}."""
        if isinstance(error, BaseException):
            err = {"ename": type(error).__name__, "evalue": str(error),
                   "traceback": "".join(traceback.format_exception(error))[-8000:]}
        elif isinstance(error, Mapping):
            err = dict(error)
        else:
            err = {"ename": "Error", "evalue": str(error)}
        self._close("failed", {"error": err, **extra})

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, status={self.status!r})"


def repo_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones against the repository root (the folder holding
    labcore/ and pyproject.toml) when labcore runs from a checkout, else against the working
    directory. Notebooks run with notebooks/ as working directory; "runs/tour" still means
    <repo>/runs/tour there."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    root = Path(__file__).resolve().parents[1]
    return root / p if (root / "pyproject.toml").exists() else Path.cwd() / p


def free_run_dir(path: str | Path) -> Path:
    """``path`` if it does not hold a finished run, else the first of ``<path>-2``, ``-3``, ... that
    does not: interactive re-runs of a notebook never overwrite (or trip over) an earlier result."""
    base = Path(path)
    candidate, i = base, 1
    while RunDir(candidate).is_done():
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


# ----------------------------------------------------------------------------------------------
# Derived tables.
# ----------------------------------------------------------------------------------------------


def find_run_dirs(root: str | Path) -> list[Path]:
    """Run directories under ``root`` (``root`` itself if it is one), skipping hidden folders
    (``.attempts`` holds unfinished attempts of the sweep runner)."""
    root = Path(root)
    if (root / RUN_JSON).exists():
        return [root]
    out = []
    for rj in sorted(root.rglob(RUN_JSON)):
        rel = rj.parent.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        out.append(rj.parent)
    return out


def _flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``param_<name>`` columns: scalars as they are, lists/dicts as JSON text (parquet-safe when
    notebooks disagree on a name's type)."""
    out = {}
    for k, v in (params or {}).items():
        if k == "out_dir":
            continue
        out[PARAM_PREFIX + k] = json.dumps(v) if isinstance(v, list | dict) else v
    return out


def _run_meta(run_dir: Path, rj: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(rj.get("params") or {})
    params.pop("seed", None)
    timings = rj.get("timings") or {}
    return {"run_id": run_dir.name, "sweep": rj.get("sweep") or run_dir.parent.name,
            "notebook": rj.get("notebook"), "seed": rj.get("seed"),
            **_flat_params(params), "_duration_s": timings.get("duration_s")}


def _select(run_dirs: list[Path], run_ids: Iterable[str] | None) -> list[Path]:
    if run_ids is None:
        return run_dirs
    keep = set(run_ids)
    return [d for d in run_dirs if d.name in keep]


def runs_table(root: str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per run directory under ``root`` (any status): identity, status, timings, error,
    flattened params and the path. ``run_ids`` restricts to those runs (e.g. one sweep file's)."""
    rows = []
    for d in _select(find_run_dirs(root), run_ids):
        rj = read_run_json(d)
        if rj is None:
            continue
        meta = _run_meta(d, rj)
        meta.pop("_duration_s")
        err = rj.get("error") or {}
        t = rj.get("timings") or {}
        rows.append({**meta, "status": rj.get("status"), "duration_s": t.get("duration_s"),
                     "started": t.get("started"), "finished": t.get("finished"),
                     "started_unix": t.get("started_unix"), "finished_unix": t.get("finished_unix"),
                     "worker": rj.get("worker"), "attempt": rj.get("attempt"),
                     "error_name": err.get("ename"), "error_message": err.get("evalue"),
                     "error_cell": err.get("cell_index"),
                     "params": json.dumps(jsonable(rj.get("params") or {}), sort_keys=True), "path": str(d)})
    if not rows:
        return pd.DataFrame(columns=["run_id", "sweep", "notebook", "seed", "status", "duration_s", "path"])
    return _ordered(pd.DataFrame(rows), rows)


def collect(root: str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The tidy results table: one row per summary row of every *finished* run under ``root``.

    Columns: run_id, sweep, notebook, seed, param_<name>..., then the summary columns (a summary
    column that collides with those is renamed ``summary_<name>``). A finished run without a
    summary contributes one row of identity columns only. Unfinished runs are ignored.
    """
    frames, metas = [], []
    for d in _select(find_run_dirs(root), run_ids):
        rj = read_run_json(d)
        if not rj or rj.get("status") != "done":
            continue
        meta = _run_meta(d, rj)
        meta["duration_s"] = meta.pop("_duration_s")
        metas.append(meta)
        summary = pd.read_parquet(d / SUMMARY) if (d / SUMMARY).exists() else pd.DataFrame()
        summary = summary.rename(columns={c: f"summary_{c}" for c in summary.columns if c in meta})
        if len(summary) == 0:
            frames.append(pd.DataFrame([meta]))
            continue
        ident = pd.DataFrame([meta] * len(summary))
        frames.append(pd.concat([ident, summary.reset_index(drop=True)], axis=1))
    if not frames:
        return pd.DataFrame(columns=["run_id", "sweep", "notebook", "seed"])
    return _ordered(pd.concat(frames, ignore_index=True, sort=False), metas)


def _ordered(df: pd.DataFrame, metas: list[dict] | None = None) -> pd.DataFrame:
    """Identity columns first, then params. ``metas`` (the per-run identity dicts) restores integer
    params that pandas turned into floats because another notebook's runs lack them."""
    if df.empty:
        return df
    for c in df.columns:
        if metas and (c.startswith(PARAM_PREFIX) or c == "seed") and df[c].dtype.kind == "f":
            vals = [m[c] for m in metas if m.get(c) is not None]
            if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                df[c] = df[c].astype("Int64")
    first = [c for c in ("run_id", "sweep", "notebook", "seed") if c in df.columns]
    params = sorted(c for c in df.columns if c.startswith(PARAM_PREFIX))
    rest = [c for c in df.columns if c not in first and c not in params]
    return df[first + params + rest]


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a derived table to parquet atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as f:
        tmp = Path(f.name)
    try:
        _parquet_safe(df).to_parquet(tmp, index=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns with mixed scalar types (a param that is an int in one notebook and a
    string in another) become strings, so pyarrow can write them."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1 and not kinds <= {int, float}:
                df[c] = [None if v is None else str(v) for v in df[c]]
    return df


def duckdb_connect(root: str | Path, database: str = ":memory:"):
    """A DuckDB connection with three relations over ``root``'s run directories:

    ``runs`` (every run, any status; :func:`runs_table`), ``results`` (the tidy table;
    :func:`collect`) and ``summary`` (a view over the finished runs' summary.parquet files via
    ``read_parquet``, with a ``run_id`` column taken from the file's directory).
    """
    import duckdb  # optional query engine: only for duckdb_connect

    con = duckdb.connect(database)
    runs = runs_table(root)
    con.register("runs", runs)
    con.register("results", collect(root))
    done = [str(Path(p) / SUMMARY) for p, s in zip(runs.get("path", []), runs.get("status", []))
            if s == "done" and (Path(p) / SUMMARY).exists()]
    if done:
        files = ", ".join("'" + f.replace("'", "''") + "'" for f in done)
        con.execute(
            "CREATE VIEW summary AS SELECT regexp_extract(filename, '([^/\\\\]+)[/\\\\]summary\\.parquet$', 1)"
            f" AS run_id, * EXCLUDE (filename) FROM read_parquet([{files}], union_by_name = true, "
            "filename = true)")
    else:
        con.execute("CREATE VIEW summary AS SELECT NULL::VARCHAR AS run_id WHERE false")
    return con
