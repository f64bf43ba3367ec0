"""The sweep driver: from a validated sweep to finished run directories, a table and a report.

``run_sweep(spec, results_root, backend)``:

1. Lock ``<root>/<sweep>/.lock`` (one driver per sweep directory; released by the OS if the driver
   dies) and write ``sweep.json`` (the expanded runs: id, notebook, params, seed).
2. Skip every run whose ``<root>/<sweep>/<run_id>/run.json`` says done. Anything else -- no
   directory, a failed run, a directory a crash left behind -- is run (again); leftovers of
   attempts that were never published are removed.
3. Submit the rest through the backend's ``concurrent.futures.Executor`` (:mod:`.executors`),
   keeping at most ``backend.max_in_flight`` in flight and GPU runs within the GPU slots, with one
   tqdm bar. A run's failure is recorded by the task and the others go on. An infrastructure
   failure (a broken pool, a killed dask worker beyond its retries) is resubmitted if the backend
   allows, else recorded as a failed run directory.
4. Derive ``results.parquet`` (:func:`labcore.results.collect`: one tidy row per summary row of each
   finished run of this sweep) and ``runs.parquet`` (every run and its status, error, cell), write
   the report (:mod:`labcore.viz.report`) and print a summary table.

Exit code (:attr:`SweepResult.exit_code`): 0 all runs done, 1 some failed, 3 interrupted (the
dask scheduler went away, or Ctrl-C) -- rerun the same command to resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import pandas as pd
from tqdm.auto import tqdm

from labcore.results import collect, run_status, runs_table, write_json_atomic, write_table
from labcore.sweep.executors import Backend
from labcore.sweep.spec import SweepSpec
from labcore.sweep.task import ATTEMPTS_DIR, RunOutcome, RunTask, publish, record_failure, run_task

__all__ = ["run_sweep", "SweepResult", "SweepLocked", "summary_table"]


class SweepLocked(RuntimeError):
    """Another driver is running the same sweep directory."""


class SchedulerLost(RuntimeError):
    pass


@dataclass
class SweepResult:
    spec: SweepSpec
    sweep_dir: Path
    outcomes: dict[str, RunOutcome] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    interrupted: str | None = None
    results_path: Path | None = None
    runs_path: Path | None = None
    report_path: Path | None = None
    wall_s: float = 0.0

    @property
    def n_failed(self) -> int:
        return sum(1 for o in self.outcomes.values() if o.status == "failed")

    @property
    def n_done(self) -> int:
        return len(self.skipped) + sum(1 for o in self.outcomes.values() if o.status in ("done", "skipped"))

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 3
        return 1 if self.n_failed else 0


@contextlib.contextmanager
def _sweep_lock(sweep_dir: Path):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    f = open(sweep_dir / ".lock", "a+")  # noqa: SIM115 - held for the whole sweep
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise SweepLocked(f"another labcore sweep is running on {sweep_dir} ({f.read().strip()}); "
                              "wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _clean_attempts(sweep_dir: Path, older_than_s: float | None) -> None:
    """Remove attempt directories never published (a dead worker's, a killed driver's)."""
    root = sweep_dir / ATTEMPTS_DIR
    if not root.is_dir():
        return
    now = time.time()
    for d in root.iterdir():
        try:
            if older_than_s is None or now - d.stat().st_mtime > older_than_s:
                shutil.rmtree(d, ignore_errors=True)
        except FileNotFoundError:
            continue
    with contextlib.suppress(OSError):
        root.rmdir()


def _write_sweep_json(spec: SweepSpec, sweep_dir: Path, backend: Backend) -> None:
    write_json_atomic(sweep_dir / "sweep.json", {
        "name": spec.name, "source": spec.source, "description": spec.description,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "executor": backend.describe(),
        "runs": [{"run_id": r.run_id, "notebook": Path(r.notebook_name).name, "notebook_path": r.notebook,
                  "entry": r.entry, "params": r.params, "seed": r.seed, "timeout_s": r.timeout_s,
                  "gpu": r.gpu} for r in spec.runs]})


def _progress(total: int, initial: int, name: str, enabled: bool):

    return tqdm(total=total, initial=initial, desc=f"sweep {name}", unit="run", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, smoothing=0)


def run_sweep(spec: SweepSpec, results_root: str | Path, backend: Backend, *, retries: int = 2,
              progress: bool = True, report_root: str | Path | None = "reports",
              out: TextIO | None = None) -> SweepResult:
    """Run a validated sweep (see the module docstring). ``report_root=None`` skips the report."""
    out = out or sys.stdout
    t_start = time.time()
    results_root = Path(results_root).resolve()
    sweep_dir = results_root / spec.name
    result = SweepResult(spec=spec, sweep_dir=sweep_dir)
    with _sweep_lock(sweep_dir):
        _write_sweep_json(spec, sweep_dir, backend)
        todo = []
        for r in spec.runs:
            if run_status(sweep_dir / r.run_id) == "done":
                result.skipped.append(r.run_id)
            else:
                todo.append(r)
        _clean_attempts(sweep_dir, older_than_s=max((r.timeout_s for r in spec.runs), default=0) + 60)
        print(f"sweep {spec.name}: {len(spec.runs)} runs ({len(result.skipped)} already done, "
              f"{len(todo)} to run) on {backend.describe()}; results in {sweep_dir}", file=out, flush=True)
        if spec.needs_gpu and backend.gpu_slots is not None and not backend.gpu_slots:
            print("note: runs marked gpu: true run without a GPU slot (no --gpus and no GPU found)",
                  file=out, flush=True)
        if todo and hasattr(backend, "workers") and not backend.workers():
            print("warning: the dask scheduler has no workers yet; runs wait until workers join",
                  file=out, flush=True)
        elif spec.needs_gpu and hasattr(backend, "gpu_worker_count") and backend.gpu_worker_count() == 0:
            print("warning: runs need a GPU but no dask worker declares resources GPU=1 yet; they wait "
                  "until one joins", file=out, flush=True)

        bar = _progress(len(spec.runs), len(result.skipped), spec.name, progress)
        try:
            _drive(todo, results_root, backend, retries, result, bar)
        except SchedulerLost as e:
            result.interrupted = str(e)
        except KeyboardInterrupt:
            result.interrupted = "interrupted (Ctrl-C); finished runs are kept, rerun to resume"
            backend.close(cancel=True)
        finally:
            bar.close()

        if not result.interrupted:
            _clean_attempts(sweep_dir, older_than_s=None)
        ids = [r.run_id for r in spec.runs]
        result.results_path = write_table(collect(sweep_dir, run_ids=ids), sweep_dir / "results.parquet")
        result.runs_path = write_table(runs_table(sweep_dir, run_ids=ids), sweep_dir / "runs.parquet")
        if report_root is not None:
            from labcore.viz.report import write_report  # nbconvert/plotly: seconds, only with a report

            result.report_path = write_report(sweep_dir, Path(report_root) / spec.name)
    result.wall_s = time.time() - t_start
    _print_summary(result, out)
    return result


def _drive(todo, results_root: Path, backend: Backend, retries: int, result: SweepResult, bar) -> None:
    pending: deque[RunTask] = deque(RunTask(run=r, results_root=str(results_root)) for r in todo)
    in_flight: dict[Future, RunTask] = {}
    # Local GPU slots matter only when some run asks for a GPU: then GPU runs get one slot each and
    # the other runs are kept off the GPUs. Without GPU runs the environment is left alone.
    free_gpus = list(backend.gpu_slots or [])
    use_slots = bool(free_gpus) and any(r.gpu for r in todo)

    def submit_what_fits() -> None:
        waiting: deque[RunTask] = deque()
        while pending:
            task = pending.popleft()
            if backend.max_in_flight is not None and len(in_flight) >= backend.max_in_flight:
                waiting.append(task)
                continue
            if task.run.gpu and use_slots:
                if not free_gpus:
                    waiting.append(task)
                    continue
                task = replace(task, cuda_visible_devices=free_gpus.pop(0))
            elif use_slots:
                task = replace(task, cuda_visible_devices="")  # keep CPU runs off the GPUs
            task = backend.prepare(task)
            in_flight[backend.executor_for(task.run).submit(run_task, task)] = task
        pending.extend(waiting)

    submit_what_fits()
    while in_flight:
        done, _ = wait(list(in_flight), timeout=1.0, return_when=FIRST_COMPLETED)
        if not done:
            lost = backend.lost()
            if lost:
                raise SchedulerLost(lost)
            continue
        for fut in done:
            task = in_flight.pop(fut)
            if task.run.gpu and use_slots and task.cuda_visible_devices:
                free_gpus.append(task.cuda_visible_devices)
            try:
                outcome = fut.result()
            except CancelledError:
                lost = backend.lost()
                raise SchedulerLost(lost or "the executor cancelled the runs (scheduler gone?); "
                                    "rerun the same command to resume") from None
            except BaseException as exc:  # noqa: BLE001 - infrastructure failure of one run
                lost = backend.lost()
                if lost:
                    raise SchedulerLost(lost) from None
                if backend.retryable(exc) and task.attempt <= retries:
                    backend.recover()
                    pending.appendleft(replace(task, attempt=task.attempt + 1))
                    continue
                outcome = _infrastructure_failure(task, exc)
            result.outcomes[task.run.run_id] = outcome
            bar.update(1)
            if result.n_failed:
                bar.set_postfix(failed=result.n_failed)
        submit_what_fits()


def _infrastructure_failure(task: RunTask, exc: BaseException) -> RunOutcome:
    """Record a run that could not be executed at all (its worker died too often, ...) as a failed
    run directory, so the failure shows in runs.parquet and the report like any other."""
    run = task.run
    final = Path(task.results_root) / run.sweep / run.run_id
    now = time.time()
    error = {"ename": type(exc).__name__, "evalue": f"{exc} (after {task.attempt} attempt(s))"[:4000]}
    if run_status(final) != "done":
        tmp = Path(task.results_root) / run.sweep / ATTEMPTS_DIR / f"{run.run_id}.infra"
        tmp.mkdir(parents=True, exist_ok=True)
        record_failure(tmp, run, error, attempt=task.attempt, worker="-", started=now)
        publish(tmp, final)
    return RunOutcome(run.run_id, "failed", task.attempt, "-", now, now, error)


def summary_table(result: SweepResult) -> pd.DataFrame:
    rows = []
    for r in result.spec.runs:
        o = result.outcomes.get(r.run_id)
        if o is None:
            status = "done (earlier)" if r.run_id in result.skipped else "not run"
        else:
            status = {"skipped": "done (earlier)"}.get(o.status, o.status)
        err = ""
        if o is not None and o.error:
            cell = o.error.get("cell_index")
            err = (f"cell {cell}: " if cell is not None else "") + f"{o.error.get('ename')}: {o.error.get('evalue')}"
        params = " ".join(f"{k}={v}" for k, v in r.params.items())
        rows.append({"run_id": r.run_id, "notebook": Path(r.notebook_name).name, "seed": r.seed,
                     "params": params[:40] + ("..." if len(params) > 40 else ""), "status": status,
                     "time_s": round(o.duration_s, 1) if o is not None and o.status != "skipped" else None,
                     "error": err[:70]})
    return pd.DataFrame(rows)


def _print_summary(result: SweepResult, out: TextIO) -> None:
    table = summary_table(result)
    if not table.empty:
        print(table.to_string(index=False, na_rep=""), file=out)
    n = len(result.spec.runs)
    line = (f"sweep {result.spec.name}: {result.n_done}/{n} done, {result.n_failed} failed, "
            f"{len(result.skipped)} skipped (done earlier); {result.wall_s:.1f} s")
    print(line, file=out)
    if result.results_path:
        print(f"results: {result.results_path}", file=out)
    if result.report_path:
        print(f"report:  {result.report_path}", file=out)
    if result.interrupted:
        print(f"STOPPED: {result.interrupted}", file=out)
    out.flush()
