"""Peak memory of a piece of work, on GPU and on CPU, and the memory still available.

* **GPU**: the CUDA caching allocator keeps a high-water mark of allocated bytes. We reset it
  (``torch.cuda.reset_peak_memory_stats``), run the work, synchronise, and read
  ``torch.cuda.max_memory_allocated``. ``peak_bytes`` is that mark; ``delta_bytes`` is the mark minus
  what was allocated before the work started (what the work itself added at its peak).
* **CPU**: the process resident set size (RSS). The kernel's own high-water mark (``ru_maxrss`` of
  ``resource.getrusage``, kilobytes on Linux, bytes on macOS) cannot be reset, so it only tells us the
  peak when the work *raised* it; a background thread therefore also samples the RSS with psutil every
  ``interval_s`` seconds. ``peak_bytes = max(sampled RSS, ru_maxrss if the work raised it)``; short
  spikes between samples can be missed when the work did not set a new process-wide record.

Use :class:`MemoryTracker` as a context manager, or :func:`measure_peak_memory` on a callable.
:func:`available_memory_bytes` is what benchmarks compare their size estimates with before
allocating anything.
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from labcore.config import check_float
from labcore.profiling.timer import resolve_device, synchronize


@dataclass(frozen=True)
class MemoryUsage:
    """peak_bytes: high-water mark during the work (CUDA allocated bytes, or process RSS on CPU).
    baseline_bytes: the same quantity just before the work. delta_bytes = peak - baseline.
    method: how it was measured ("cuda_max_allocated", "rss_sampled", "rss_sampled+ru_maxrss")."""

    peak_bytes: int
    baseline_bytes: int
    device: str
    method: str

    @property
    def delta_bytes(self) -> int:
        return max(self.peak_bytes - self.baseline_bytes, 0)


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # Linux reports kilobytes


class MemoryTracker:
    """``with MemoryTracker(device) as mt: work()`` then ``mt.usage`` is a :class:`MemoryUsage`."""

    def __init__(self, device: torch.device | str | None = "cpu", interval_s: float = 0.002):
        check_float("MemoryTracker", "interval_s", interval_s, min_value=0.0, min_inclusive=False)
        self.device = resolve_device(device)
        self.interval_s = interval_s
        self.usage: MemoryUsage | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_peak = 0

    # -- CPU sampling thread ------------------------------------------------------------------
    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryTracker:
        synchronize(self.device)
        if self.device.type == "cuda":
            self._baseline = int(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._baseline = int(psutil.Process().memory_info().rss)
            self._maxrss_before = _ru_maxrss_bytes()
            self._sampled_peak = self._baseline
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="labcore-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            peak, method = int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._sampled_peak = max(self._sampled_peak, psutil.Process().memory_info().rss)
            peak, method = self._sampled_peak, "rss_sampled"
            maxrss_after = _ru_maxrss_bytes()
            if maxrss_after > self._maxrss_before:  # the work set a new process record: exact peak
                peak, method = max(peak, maxrss_after), "rss_sampled+ru_maxrss"
        self.usage = MemoryUsage(peak_bytes=int(peak), baseline_bytes=self._baseline,
                                 device=str(self.device), method=method)


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str | None = "cpu",
                        interval_s: float = 0.002) -> tuple[Any, MemoryUsage]:
    """Run ``fn`` once under a :class:`MemoryTracker`; return ``(fn's result, usage)``."""
    if not callable(fn):
        raise TypeError(f"measure_peak_memory: fn={fn!r} is not callable")
    with MemoryTracker(device, interval_s=interval_s) as mt:
        out = fn()
    assert mt.usage is not None
    return out, mt.usage


def available_memory_bytes(device: torch.device | str | None = "cpu") -> int:
    """Free memory a new allocation can use: ``cudaMemGetInfo`` free bytes on GPU (plus what the
    caching allocator holds but does not use), ``psutil.virtual_memory().available`` on CPU."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        cached_unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + cached_unused)
    return int(psutil.virtual_memory().available)
