"""The dask.distributed backend: a LocalCluster (``--cluster local:N``) or a running cluster
(``--scheduler tcp://HOST:PORT``), driven through ``Client.get_executor`` -- the same
``concurrent.futures.Executor`` seam as the local process pool.

GPU runs: a run whose sweep entry says ``gpu: true`` is submitted with ``resources={"GPU": 1}``; dask
then runs it only on workers started with ``--resources GPU=1``, at most one at a time per worker
(the resource is held for the whole run). Which physical GPU the run sees is decided on the worker
(:mod:`labcore.sweep.task`: ``LABCORE_GPU`` env, ``...gpu<k>`` worker name, or the worker's own
``CUDA_VISIBLE_DEVICES``). CPU runs on a GPU worker get ``CUDA_VISIBLE_DEVICES=""``.

Faults:

* a worker killed mid-run: the scheduler reschedules the run on another worker (up to
  ``distributed.scheduler.allowed-failures`` deaths per run -- ``--retries`` sets it for a
  LocalCluster; for a remote scheduler it is the scheduler's own setting), and the run starts over
  in a fresh attempt directory. Exceptions raised by the task itself are retried ``retries`` times
  (``Client.submit(retries=)``). The dead attempt is never published (see task.py), so no finished
  result is lost or duplicated.
* the scheduler going away: the client's futures are cancelled; :meth:`DaskBackend.lost` reports
  it, the driver stops with a clear message and a later run of the same command resumes (finished
  runs are skipped by their run.json).

Workers must import the same ``labcore`` (install it on every machine) and see the results root at
the same path (a shared filesystem) -- the attempt directory is written by the worker and renamed
into place there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import replace

from labcore.sweep.executors import local_cores
from labcore.sweep.spec import RunSpec
from labcore.sweep.task import RunTask

__all__ = ["DaskBackend", "start_local_cluster", "connect_scheduler", "DaskUnavailable"]


class DaskUnavailable(RuntimeError):
    """The dask scheduler cannot be reached (or dask is not installed)."""


def start_local_cluster(n_workers: int, *, threads_per_worker: int = 1, gpus: Sequence[str] = (),
                        allowed_failures: int = 2, silence_logs: int | bool = 40):
    """A LocalCluster of ``n_workers`` process workers (with nannies, so a killed worker is
    restarted). The first ``len(gpus)`` workers declare ``resources={"GPU": 1}`` and get
    ``LABCORE_GPU=<id>`` in their environment. Returns ``(cluster, client)``."""
    import dask  # heavy import (seconds): only when needed
    from distributed import Client, LocalCluster

    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers={n_workers!r} is not allowed: must be an integer >= 1")
    with dask.config.set({"distributed.scheduler.allowed-failures": int(allowed_failures)}):
        cluster = LocalCluster(n_workers=0, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None, memory_limit=0, silence_logs=silence_logs)
        template = cluster.new_spec
        for k in range(n_workers):
            options = dict(template["options"])
            if k < len(gpus):
                options["resources"] = {"GPU": 1}
                options["env"] = {**options.get("env", {}), "LABCORE_GPU": str(gpus[k])}
            cluster.worker_spec[f"local-{k}"] = {"cls": template["cls"], "options": options}
        cluster.scale(n_workers)
        client = Client(cluster, set_as_default=False)
        client.wait_for_workers(n_workers, timeout=120)
    return cluster, client


def connect_scheduler(address: str, timeout: float = 20.0):
    """A Client connected to a running scheduler, or DaskUnavailable with the reason."""
    try:
        from distributed import Client  # heavy import (seconds): only when needed
    except ImportError as e:  # pragma: no cover - dask is a dependency
        raise DaskUnavailable(f"dask.distributed is not installed: {e}") from None
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise DaskUnavailable(f"cannot reach the dask scheduler at {address} within {timeout:g} s: "
                              f"{type(e).__name__}: {e}") from None


class DaskBackend:
    """(b)/(c) Runs on dask workers through ``Client.get_executor`` (see the module docstring)."""

    kind = "dask"
    max_in_flight = None
    gpu_slots = None

    def __init__(self, client, *, retries: int = 2, cluster=None, threads_per_run: int | None = None):
        self.client, self.cluster, self.threads_per_run = client, cluster, threads_per_run
        self.address = client.scheduler.address if client.scheduler else "?"
        self._cpu = client.get_executor(pure=False, retries=retries)
        self._gpu = client.get_executor(pure=False, retries=retries, resources={"GPU": 1})

    @classmethod
    def local(cls, n_workers: int, *, retries: int = 2, gpus: Sequence[str] = (),
              threads_per_worker: int = 1) -> DaskBackend:
        cluster, client = start_local_cluster(n_workers, threads_per_worker=threads_per_worker, gpus=gpus,
                                              allowed_failures=retries)
        threads = max(1, local_cores() // (n_workers * threads_per_worker))
        return cls(client, retries=retries, cluster=cluster, threads_per_run=threads)

    @classmethod
    def remote(cls, address: str, *, retries: int = 2, timeout: float = 20.0) -> DaskBackend:
        return cls(connect_scheduler(address, timeout), retries=retries)

    def executor_for(self, run: RunSpec) -> Executor:
        return self._gpu if run.gpu else self._cpu

    def prepare(self, task: RunTask) -> RunTask:
        return replace(task, threads=self.threads_per_run)

    def retryable(self, exc: BaseException) -> bool:
        return False  # dask has already retried (allowed-failures, retries=)

    def recover(self) -> None:
        pass

    def workers(self) -> dict:
        try:
            return self.client.scheduler_info(n_workers=-1).get("workers", {})
        except TypeError:  # older distributed without n_workers
            return self.client.scheduler_info().get("workers", {})

    def gpu_worker_count(self) -> int:
        return sum(1 for w in self.workers().values() if (w.get("resources") or {}).get("GPU", 0) >= 1)

    def lost(self) -> str | None:
        status = getattr(self.client, "status", "running")
        if status in ("running", "newly-created"):
            return None
        return (f"lost the dask scheduler at {self.address} (client status: {status}). Finished runs are "
                "kept; run the same command again to resume once the scheduler is back.")

    def describe(self) -> str:
        n = len(self.workers())
        what = "dask LocalCluster" if self.cluster is not None else f"dask scheduler {self.address}"
        return f"{what}: {n} workers ({self.gpu_worker_count()} with GPU=1)"

    def close(self, cancel: bool = False) -> None:
        if self.lost():  # the client's reconnect attempts would log tracebacks while closing
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
        for ex in (self._cpu, self._gpu):
            try:
                ex.shutdown(wait=False)
            except Exception:  # noqa: BLE001 - closing after a lost scheduler may fail
                pass
        try:
            self.client.close(timeout=10)
        except Exception:  # noqa: BLE001
            pass
        if self.cluster is not None:
            try:
                self.cluster.close(timeout=20)
            except Exception:  # noqa: BLE001
                pass
