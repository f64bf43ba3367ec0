"""The sweep runner: execute parameterized notebooks many times, in parallel, resumably.

Pieces, in the order data flows through them:

* :mod:`.spec`      sweep files (YAML) -> validated :class:`RunSpec` list; content-hash run ids
* :mod:`.task`      one run on a worker: papermill into an attempt directory, watchdog, atomic publish
* :mod:`.executors` the ``concurrent.futures.Executor`` seam; the local process pool
* :mod:`.dask_exec` the same seam over dask.distributed (LocalCluster or a running scheduler)
* :mod:`.runner`    the driver: skip finished runs, submit, retry, collect, report

Command line: ``labcore sweep SWEEP.yaml [--jobs N] [--cluster local:N | --scheduler tcp://H:P]``
(see :mod:`labcore.cli`). The runner executes notebooks and owns nothing else: what a run computes
is the notebook's business, how its results are stored is :mod:`labcore.results`'.
"""

from labcore.sweep.executors import LocalPoolBackend
from labcore.sweep.runner import SweepResult, run_sweep
from labcore.sweep.spec import RunSpec, SweepError, SweepSpec, load_sweep, make_run_id, notebook_fingerprint
from labcore.sweep.task import RunOutcome, RunTask, run_task

__all__ = ["load_sweep", "SweepSpec", "RunSpec", "SweepError", "make_run_id", "notebook_fingerprint",
           "run_sweep", "SweepResult", "LocalPoolBackend", "RunTask", "RunOutcome", "run_task"]
