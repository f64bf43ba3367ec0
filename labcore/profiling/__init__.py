"""Profiling: timers, operator tables, peak memory, machine ceilings and the decode-step cost model.

=================  ====================================================================
timer.py           :func:`time_fn`, :class:`Timer`, :class:`Timing` (median and IQR; CUDA events on GPU)
profiler.py        :func:`profile_ops`: torch.profiler as a per-operator pandas table (+ Chrome trace)
memory.py          :class:`MemoryTracker`, :func:`measure_peak_memory`, :func:`available_memory_bytes`
ceilings.py        :func:`get_ceilings`: measured copy bandwidth and matmul FLOP/s, cached per machine
cost_model.py      :func:`layer_step_cost`, :func:`model_step_cost`: bytes/FLOPs/roofline of a decode step
=================  ====================================================================
"""

from labcore.profiling.ceilings import (
    Ceilings,
    get_ceilings,
    machine_fingerprint,
    measure_copy_bandwidth,
    measure_matmul_flops,
)
from labcore.profiling.cost_model import (
    StepCost,
    embedding_cost,
    expected_distinct,
    kv_cache_bytes,
    layer_step_cost,
    model_step_cost,
    roofline,
    touched_bytes,
)
from labcore.profiling.memory import MemoryTracker, MemoryUsage, available_memory_bytes, measure_peak_memory
from labcore.profiling.profiler import profile_ops
from labcore.profiling.timer import Timer, Timing, summarize, synchronize, time_fn

__all__ = [
    "Ceilings", "MemoryTracker", "MemoryUsage", "StepCost", "Timer", "Timing", "available_memory_bytes",
    "embedding_cost", "expected_distinct", "get_ceilings", "kv_cache_bytes", "layer_step_cost",
    "machine_fingerprint", "measure_copy_bandwidth", "measure_matmul_flops", "measure_peak_memory",
    "model_step_cost", "profile_ops", "roofline", "summarize", "synchronize", "time_fn", "touched_bytes",
]
