"""Per-operator profile of a callable as a tidy pandas table (a thin torch.profiler wrapper).

``torch.profiler`` records every ATen operator call. Its ``key_averages()`` groups them by name (and,
here, by input shapes) and reports, per group, *self* time (time in the operator itself, children
excluded) and *total* time (children included). The tidy table has one row per (operator, input
shapes) with columns:

====================  ===================================================================
op                    operator name, e.g. ``aten::mm``, ``aten::embedding_bag``
input_shapes          the input shapes of that group, as a string, e.g. ``[[64, 256], [256, 512]]``
calls                 number of calls over all profiled repeats
self_cpu_us           self CPU time, microseconds, summed over calls
cpu_total_us          CPU time including children, microseconds
self_cuda_us          self device (CUDA) time, microseconds (only when CUDA was profiled)
cuda_total_us         device time including children, microseconds (only when CUDA was profiled)
self_cpu_frac         self_cpu_us / sum(self_cpu_us): each row's share of the CPU self time
====================  ===================================================================

Rows are sorted by self device time on GPU, else self CPU time, largest first. Self times sum to the
profiled time without double counting, so ``self_cpu_frac`` answers "where does the time go?".

The profiled callable runs ``warmup`` times un-profiled first (the first call of an operator pays
one-time costs) and then ``repeats`` times under the profiler. A Chrome trace (open in
``chrome://tracing`` or https://ui.perfetto.dev) is written atomically when ``trace_path`` is given.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from labcore.config import check_int
from labcore.profiling.timer import resolve_device, synchronize

COLUMNS = ["op", "input_shapes", "calls", "self_cpu_us", "cpu_total_us", "self_cpu_frac"]
CUDA_COLUMNS = ["self_cuda_us", "cuda_total_us"]


def profile_ops(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 1,
                device: torch.device | str | None = "cpu", record_shapes: bool = True,
                trace_path: str | os.PathLike | None = None, row_limit: int | None = None) -> pd.DataFrame:
    """Profile ``repeats`` calls of ``fn`` (after ``warmup`` plain calls); one row per operator group."""
    check_int("profile_ops", "warmup", warmup, min_value=0)
    check_int("profile_ops", "repeats", repeats, min_value=1)
    if row_limit is not None:
        check_int("profile_ops", "row_limit", row_limit, min_value=1)
    if not callable(fn):
        raise TypeError(f"profile_ops: fn={fn!r} is not callable")
    dev = resolve_device(device)
    use_cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])

    for _ in range(warmup):
        fn()
    synchronize(dev)
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(repeats):
            fn()
        synchronize(dev)

    rows = []
    for evt in prof.key_averages(group_by_input_shape=record_shapes):
        row = {
            "op": evt.key,
            "input_shapes": str(evt.input_shapes) if record_shapes else "",
            "calls": int(evt.count),
            "self_cpu_us": float(evt.self_cpu_time_total),
            "cpu_total_us": float(evt.cpu_time_total),
        }
        if use_cuda:
            row["self_cuda_us"] = float(getattr(evt, "self_device_time_total", 0.0))
            row["cuda_total_us"] = float(getattr(evt, "device_time_total", 0.0))
        rows.append(row)
    columns = COLUMNS + (CUDA_COLUMNS if use_cuda else [])
    table = pd.DataFrame(rows, columns=[c for c in columns if c != "self_cpu_frac"])
    total = table["self_cpu_us"].sum()
    table["self_cpu_frac"] = table["self_cpu_us"] / total if total > 0 else 0.0
    sort_key = "self_cuda_us" if use_cuda else "self_cpu_us"
    table = table.sort_values(sort_key, ascending=False, kind="stable").reset_index(drop=True)
    table = table[columns]
    if row_limit is not None:
        table = table.head(row_limit)

    if trace_path is not None:
        export_trace(prof, trace_path)
    return table


def export_trace(prof: profile, path: str | os.PathLike) -> Path:
    """Write the profiler's Chrome trace to ``path`` atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
