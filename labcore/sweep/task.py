"""The papermill task: execute one run on a worker and publish its run directory atomically.

``run_task(RunTask) -> RunOutcome`` is the only function the executors ship to workers (a local
process pool or dask). It is idempotent and safe to run twice for the same run id:

1. If ``<root>/<sweep>/<run_id>/run.json`` already says done, return "skipped".
2. Execute the notebook with papermill into a fresh *attempt directory*
   ``<root>/<sweep>/.attempts/<run_id>.<random>/`` (the notebook's ``out_dir``), with ``seed``, and the
   executed notebook saved there as ``executed.ipynb`` after every cell. The kernel gets its own
   environment (below); its stdout/stderr go to ``kernel.log``.
3. Two clocks bound the run: papermill's per-cell ``execution_timeout`` and a watchdog thread that
   kills the kernel process tree ``timeout + 10 s`` after the start (kernel start-up included). The
   same watchdog kills the kernel and exits if the process that submitted the task (the local
   sweep driver) disappears, so a ``kill -9`` of ``labcore sweep`` leaves no orphan kernels.
4. A failure (a cell raised, timeout, dead kernel, or the notebook ended without
   ``RunDir.finish()``) is written into run.json as ``status: failed`` with the failing cell (its
   index in the *source* notebook and in executed.ipynb), the error name and message.
5. Publish: ``os.rename(attempt, <run_id>)``, atomic on one filesystem. If the final directory
   exists: a finished run there wins (the attempt is discarded: never two results for one run);
   an unfinished/failed one is moved aside and replaced. Attempts of a worker that died are never
   renamed, so a half-written directory never takes a finished run's name.

Kernel environment: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/
``LABCORE_NUM_THREADS`` = the threads this run may use (torch takes its intra-op thread count from
``OMP_NUM_THREADS``); ``LABCORE_SWEEP_DIR`` = this sweep's results directory (what a results
explorer inside the sweep reads); ``LABCORE_RUN_ID``, ``LABCORE_SWEEP``, ``LABCORE_ATTEMPT``, ``LABCORE_WORKER``
(read by :class:`labcore.results.RunDir`); and ``CUDA_VISIBLE_DEVICES`` decided as follows:

* local process pool: the GPU slot the driver assigned (``--gpus``), if any;
* dask worker, run needs a GPU: the worker's ``LABCORE_GPU`` environment variable, else a trailing
  ``gpu<k>`` in the worker's name (``--name node3-gpu1`` -> ``1``), else the worker's own
  ``CUDA_VISIBLE_DEVICES`` (start one worker per GPU with it set);
* a run that does not need a GPU, on a worker that declares a GPU resource or assignment, gets
  ``CUDA_VISIBLE_DEVICES=""`` so it cannot disturb the GPU run next to it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from labcore.results import RUN_JSON, read_run_json, run_status, write_json_atomic
from labcore.sweep.spec import RunSpec

__all__ = ["RunTask", "RunOutcome", "run_task", "ATTEMPTS_DIR", "publish", "record_failure",
           "kill_tree", "worker_identity"]

ATTEMPTS_DIR = ".attempts"
EXECUTED = "executed.ipynb"
KERNEL_LOG = "kernel.log"
WATCHDOG_GRACE_S = 10.0
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS", "LABCORE_NUM_THREADS")


@dataclass(frozen=True)
class RunTask:
    """What a worker needs to execute one run (picklable).

    threads: threads per run (None: the worker decides: ``LABCORE_THREADS`` or cores // slots).
    cuda_visible_devices: set by the local driver from its GPU slots; None lets the worker decide.
    driver_pid: the local driver's pid; the run is killed if the worker's parent changes from it.
    """

    run: RunSpec
    results_root: str
    attempt: int = 1
    threads: int | None = None
    cuda_visible_devices: str | None = None
    driver_pid: int | None = None


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str              # "done" | "failed" | "skipped" (already done before this attempt)
    attempt: int
    worker: str
    started_unix: float
    finished_unix: float
    error: dict[str, Any] | None = None
    published: str = ""      # "published" | "duplicate" (another attempt had finished) | ""

    @property
    def duration_s(self) -> float:
        return self.finished_unix - self.started_unix


# ----------------------------------------------------------------------------------------------
# Worker facts.
# ----------------------------------------------------------------------------------------------


def _dask_worker():
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker  # heavy import (seconds): only when needed

        return get_worker()
    except (ImportError, ValueError):
        return None


def worker_identity() -> str:
    w = _dask_worker()
    if w is not None:
        return f"dask:{w.name}@{socket.gethostname()}"
    return f"local:{socket.gethostname()}:{os.getpid()}"


def _threads_for(task: RunTask) -> int:
    if task.threads:
        return max(1, int(task.threads))
    if os.environ.get("LABCORE_THREADS"):
        return max(1, int(os.environ["LABCORE_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    w = _dask_worker()
    slots = w.state.nthreads if w is not None else 1
    return max(1, cores // max(1, slots))


def _cuda_devices_for(task: RunTask) -> str | None:
    """CUDA_VISIBLE_DEVICES for the kernel, or None to inherit (see the module docstring)."""
    if task.cuda_visible_devices is not None:
        return task.cuda_visible_devices
    w = _dask_worker()
    assigned = os.environ.get("LABCORE_GPU")
    if assigned is None and w is not None:
        m = re.search(r"gpu(\d+)$", str(w.name))
        assigned = m.group(1) if m else None
    declares = assigned is not None or (w is not None and w.state.total_resources.get("GPU", 0) > 0)
    if task.run.gpu:
        return assigned
    return "" if declares else None


def _kernel_env(task: RunTask, worker: str) -> dict[str, str]:
    threads = str(_threads_for(task))
    env = {k: threads for k in THREAD_ENV}
    env.update({"LABCORE_RUN_ID": task.run.run_id, "LABCORE_SWEEP": task.run.sweep,
                "LABCORE_SWEEP_DIR": str(Path(task.results_root).resolve() / task.run.sweep),
                "LABCORE_ATTEMPT": str(task.attempt), "LABCORE_WORKER": worker,
                "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    cuda = _cuda_devices_for(task)
    if cuda is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda
    return env


# ----------------------------------------------------------------------------------------------
# Kernel with our environment, and the watchdog.
# ----------------------------------------------------------------------------------------------


def kill_tree(pid: int, create_time: float | None = None) -> None:
    """SIGKILL a process and all its descendants (a kernel may have DataLoader workers).
    With ``create_time``, only if ``pid`` is still that process (pids are reused)."""

    try:
        root = psutil.Process(pid)
        if create_time is not None and abs(root.create_time() - create_time) > 1e-3:
            return
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


class _Kernel:
    """Holds the pid of the kernel papermill starts, so the watchdog can kill it."""

    def __init__(self):
        self.pid: int | None = None
        self.create_time: float | None = None
        self.lock = threading.Lock()

    def started(self, pid: int | None) -> None:

        with self.lock:
            self.pid = pid
            try:
                self.create_time = psutil.Process(pid).create_time() if pid else None
            except psutil.NoSuchProcess:
                self.pid = None

    def kill(self) -> None:
        with self.lock:
            if self.pid is not None and self.create_time is not None:
                kill_tree(self.pid, self.create_time)


def _kernel_manager_class(env: dict[str, str], kernel: _Kernel, log_path: Path):
    """An AsyncKernelManager subclass that launches the kernel with ``env`` (whole environment
    given explicitly: safe with several runs per worker process) and records its pid."""
    from jupyter_client.manager import AsyncKernelManager  # heavy import (seconds): only when needed

    class LabcoreKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw["env"] = {**os.environ, **kw.get("env", {}), **env}
            log = open(log_path, "ab")  # noqa: SIM115 - the kernel process holds it open
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            try:
                result = await super().start_kernel(**kw)
            finally:
                log.close()  # the child has its own copy of the descriptor
            kernel.started(getattr(self.provisioner, "pid", None))
            return result

    return LabcoreKernelManager


class _Watchdog(threading.Thread):
    """Kill the kernel at the deadline, or (local pool) when the driver process disappears."""

    def __init__(self, kernel: _Kernel, deadline: float, driver_pid: int | None):
        super().__init__(daemon=True, name="labcore-watchdog")
        self.kernel, self.deadline, self.driver_pid = kernel, deadline, driver_pid
        self.fired: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.25):
            if self.driver_pid is not None and os.getppid() != self.driver_pid:
                self.fired = "driver"
                self.kernel.kill()
                os._exit(3)  # the sweep driver is gone: nobody will read our result
            if time.time() > self.deadline:
                self.fired = "timeout"
                self.kernel.kill()
                return

    def stop(self) -> None:
        self._stop_event.set()


# ----------------------------------------------------------------------------------------------
# Execution, failure records, publication.
# ----------------------------------------------------------------------------------------------


def _failed_cell(executed: Path) -> dict[str, Any]:
    """Where a run stopped: the cell papermill marked as raising or, when the kernel was stopped
    from outside (timeout, dead kernel), the last cell that started. Its index in the *source*
    notebook (papermill's injected and error-marker cells skipped) and in executed.ipynb, and its
    execution count."""
    import nbformat  # heavy import (seconds): only when needed

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:  # noqa: BLE001 - no executed notebook: nothing to point at
        return {}
    found, last_started, src_index = None, None, 0
    for i, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags or "papermill-error-cell-tag" in tags:
            continue
        pm_meta = cell.get("metadata", {}).get("papermill", {})
        where = {"cell_index": src_index, "executed_cell_index": i, "exec_count": cell.get("execution_count")}
        if pm_meta.get("exception"):
            found = where
            break
        if pm_meta.get("start_time"):
            last_started = where
        src_index += 1
    return found or last_started or {}


def _execute(task: RunTask, attempt_dir: Path, env: dict[str, str]) -> dict[str, Any] | None:
    """Run the notebook; None on success, else an error record."""
    import papermill as pm  # heavy import (seconds): only when needed
    from papermill.exceptions import PapermillExecutionError

    run = task.run
    kernel = _Kernel()
    km_class = _kernel_manager_class(env, kernel, attempt_dir / KERNEL_LOG)
    watchdog = _Watchdog(kernel, time.time() + run.timeout_s + WATCHDOG_GRACE_S, task.driver_pid)
    watchdog.start()
    executed = attempt_dir / EXECUTED
    try:
        pm.execute_notebook(
            run.notebook, str(executed), parameters=run.papermill_parameters(attempt_dir),
            progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            execution_timeout=int(max(1, run.timeout_s)), start_timeout=int(min(120, max(10, run.timeout_s))),
            cwd=str(Path(run.notebook).parent), kernel_manager_class=km_class)
        return None
    except PapermillExecutionError as e:
        return {"ename": e.ename, "evalue": e.evalue, **_failed_cell(executed),
                "traceback": "\n".join(e.traceback)[-8000:] if e.traceback else None}
    except BaseException as e:  # noqa: BLE001 - any failure of one run is recorded, not raised
        if watchdog.fired == "timeout":
            return {"ename": "RunTimeout", **_failed_cell(executed),
                    "evalue": f"the run exceeded its wall-clock limit of {run.timeout_s:g} s "
                              f"(+{WATCHDOG_GRACE_S:g} s grace); kernel killed ({type(e).__name__})"}
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        return {"ename": type(e).__name__, "evalue": str(e)[:4000], **_failed_cell(executed)}
    finally:
        watchdog.stop()
        kernel.kill()  # normally already shut down by papermill; never leave a kernel behind


def record_failure(run_dir: Path, run: RunSpec, error: dict[str, Any], *, attempt: int, worker: str,
                   started: float) -> None:
    """Write run.json status "failed" with ``error`` into ``run_dir``, keeping what the notebook
    wrote (params, versions, timings) when it got that far."""
    rec = read_run_json(run_dir) or {
        "schema": 1, "run_id": run.run_id, "sweep": run.sweep, "notebook": Path(run.notebook_name).name,
        "seed": run.seed, "params": {**run.params, "seed": run.seed},
        "timings": {"started_unix": started}}
    now = time.time()
    timings = dict(rec.get("timings") or {})
    timings.setdefault("started_unix", started)
    timings.update({"finished_unix": now, "duration_s": now - timings["started_unix"]})
    rec.update({"status": "failed", "error": error, "attempt": str(attempt), "worker": worker,
                "run_id": run.run_id, "sweep": run.sweep, "timings": timings})
    write_json_atomic(Path(run_dir) / RUN_JSON, rec)


def publish(attempt_dir: Path, final_dir: Path) -> str:
    """Atomically give ``attempt_dir`` the run's final name. Returns "published", or "duplicate"
    when a finished run already holds the name (the attempt is then deleted)."""
    trash_root = final_dir.parent / ATTEMPTS_DIR
    for _ in range(20):
        try:
            os.rename(attempt_dir, final_dir)
            return "published"
        except OSError:
            if not final_dir.exists():
                continue  # removed meanwhile: try again
        if run_status(final_dir) == "done":
            shutil.rmtree(attempt_dir, ignore_errors=True)
            return "duplicate"
        aside = trash_root / f"{final_dir.name}.replaced.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final_dir, aside)
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not publish {attempt_dir} as {final_dir}")


def run_task(task: RunTask) -> RunOutcome:
    """Execute one run (see the module docstring). Never raises for a notebook's failure."""
    run = task.run
    worker = worker_identity()
    started = time.time()
    sweep_dir = Path(task.results_root) / run.sweep
    final_dir = sweep_dir / run.run_id
    if run_status(final_dir) == "done":
        return RunOutcome(run.run_id, "skipped", task.attempt, worker, started, time.time())

    attempt_dir = sweep_dir / ATTEMPTS_DIR / f"{run.run_id}.{uuid.uuid4().hex[:8]}"
    attempt_dir.mkdir(parents=True)
    error = _execute(task, attempt_dir, _kernel_env(task, worker))
    if error is None and run_status(attempt_dir) != "done":
        rec = read_run_json(attempt_dir)
        error = {"ename": "IncompleteRun",
                 "evalue": "the notebook ran to the end but run.json does not say done "
                           f"(status {rec.get('status') if rec else 'missing'}): a run is complete only "
                           "after RunDir(out_dir).finish()"}
    if error is not None:
        record_failure(attempt_dir, run, error, attempt=task.attempt, worker=worker, started=started)
    published = publish(attempt_dir, final_dir)
    if published == "duplicate":
        rec = read_run_json(final_dir) or {}
        t = rec.get("timings") or {}
        return RunOutcome(run.run_id, "done", task.attempt, worker, t.get("started_unix", started),
                          t.get("finished_unix", time.time()), None, published)
    return RunOutcome(run.run_id, "failed" if error else "done", task.attempt, worker, started, time.time(),
                      error, published)
