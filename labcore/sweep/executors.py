"""Where runs execute: one seam, the ``concurrent.futures.Executor`` interface.

The sweep driver only ever calls ``backend.executor_for(run).submit(run_task, task)`` and waits on
the returned ``concurrent.futures.Future``. Three backends provide that executor:

(a) :class:`LocalPoolBackend` (default, ``--jobs N``): a ``ProcessPoolExecutor`` of N spawned
    worker processes on this machine; each run may use ``cores // N`` threads. When the sweep has
    runs marked ``gpu: true``, each takes a GPU slot from ``--gpus`` (default: this machine's GPUs)
    for its whole run (``CUDA_VISIBLE_DEVICES=<slot>``) and the other runs get
    ``CUDA_VISIBLE_DEVICES=""``; with no GPU slots GPU runs run like CPU runs. A worker process that dies breaks the pool: the driver rebuilds it and resubmits the
    runs that were in flight, up to ``--retries`` times.
(b) ``--cluster local:N``: a dask ``LocalCluster`` of N single-threaded process workers
    (:mod:`labcore.sweep.dask_exec`).
(c) ``--scheduler tcp://HOST:PORT``: a running dask cluster (several machines; see
    docs/distributed.md). Runs that need a GPU are submitted with ``resources={"GPU": 1}``.

A backend also tells the driver how many runs to keep in flight (``max_in_flight``; None: submit
all and let the scheduler queue them), which failures it may retry by resubmission, and whether its
scheduler is gone (:meth:`lost`).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Protocol

from labcore.sweep.spec import RunSpec
from labcore.sweep.task import RunTask, kill_tree

__all__ = ["Backend", "LocalPoolBackend", "local_cores", "detect_local_gpus", "parse_gpus"]


class Backend(Protocol):
    kind: str
    max_in_flight: int | None     # None: submit everything at once
    gpu_slots: list[str] | None   # driver-side GPU slots (local pool); None: the scheduler decides

    def executor_for(self, run: RunSpec) -> Executor: ...
    def prepare(self, task: RunTask) -> RunTask: ...
    def retryable(self, exc: BaseException) -> bool: ...
    def recover(self) -> None: ...
    def lost(self) -> str | None: ...
    def describe(self) -> str: ...
    def close(self, cancel: bool = False) -> None: ...


def local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_gpus(text: str | None) -> list[str]:
    """``"0,1"`` -> ["0", "1"]; "" or None -> []."""
    return [g.strip() for g in (text or "").split(",") if g.strip()]


def detect_local_gpus() -> list[str]:
    """GPU ids of this machine without importing torch: ``CUDA_VISIBLE_DEVICES`` if set, else the
    lines of ``nvidia-smi -L``; [] when neither says anything."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return parse_gpus(os.environ["CUDA_VISIBLE_DEVICES"])
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


class LocalPoolBackend:
    """(a) A process pool on this machine (see the module docstring)."""

    kind = "local"

    def __init__(self, jobs: int, gpus: Sequence[str] = ()):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs={jobs!r} is not allowed: must be an integer >= 1")
        self.jobs = jobs
        self.max_in_flight: int | None = jobs
        self.gpu_slots: list[str] | None = list(gpus)
        self.threads_per_run = max(1, local_cores() // jobs)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the driver has threads (tqdm, ...) and forking those is unsafe.
        return ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"))

    def executor_for(self, run: RunSpec) -> Executor:
        return self._pool

    def prepare(self, task: RunTask) -> RunTask:
        return replace(task, threads=self.threads_per_run, driver_pid=os.getpid())

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, BrokenProcessPool)

    def recover(self) -> None:
        """Replace a broken pool (a worker process died) with a fresh one."""
        if getattr(self._pool, "_broken", False):
            self._kill_workers()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    def lost(self) -> str | None:
        return None

    def describe(self) -> str:
        gpus = f", GPU slots {','.join(self.gpu_slots)}" if self.gpu_slots else ""
        return f"local process pool: {self.jobs} jobs x {self.threads_per_run} threads{gpus}"

    def worker_pids(self) -> list[int]:
        return [p.pid for p in list((getattr(self._pool, "_processes", None) or {}).values()) if p.pid]

    def _kill_workers(self) -> None:
        for pid in self.worker_pids():
            kill_tree(pid)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._kill_workers()  # and their kernels
        self._pool.shutdown(wait=not cancel, cancel_futures=True)
