"""Wall-clock timing of PyTorch work that is honest about asynchronous devices.

Timing a GPU kernel with ``time.perf_counter`` alone measures how long it took to *launch* it: CUDA
calls return before the work is done. labcore times in two ways:

* **GPU** (``device`` is a CUDA device): a pair of CUDA events is recorded around each call on the
  current stream, the device is synchronised, and ``start.elapsed_time(end)`` (milliseconds, measured by
  the GPU itself) is the sample.
* **CPU** (or any device with an injected clock): the device is synchronised, ``clock()`` is read,
  the call runs, the device is synchronised again, and the difference is the sample.

Every measurement is ``warmup`` untimed calls (allocator warm-up, kernel autotuning, caches), then
``repeats`` timed calls. The summary is robust to the outliers a shared machine produces:

    median_s = median(samples)                      (the reported time)
    iqr_s    = Q3(samples) - Q1(samples)            (spread; linear interpolation between order statistics)

Use :func:`time_fn` for a callable, or :class:`Timer` as a reusable context manager::

    timing = time_fn(lambda: layer(x), warmup=3, repeats=10, device="cpu")
    timer = Timer(device="cpu")
    for _ in range(10):
        with timer:
            layer(x)
    timer.timing().median_s

Tests inject ``clock`` (any zero-argument callable returning seconds) to check the statistics
without real timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from labcore.config import check_int

Clock = Callable[[], float]


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings. ``samples`` are seconds, in the order they were taken."""

    median_s: float
    iqr_s: float
    samples: tuple[float, ...]

    @property
    def min_s(self) -> float:
        return min(self.samples)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.samples)

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms (IQR {self.iqr_s * 1e3:.3f} ms, n={len(self.samples)})"


def quantile(sorted_x: Sequence[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's default method)."""
    pos = q * (len(sorted_x) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_x) - 1)
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> Timing:
    """Median and interquartile range of ``samples`` (seconds)."""
    if len(samples) == 0:
        raise ValueError("summarize: samples is empty; need at least one timing sample")
    s = sorted(float(x) for x in samples)
    return Timing(median_s=statistics.median(s), iqr_s=quantile(s, 0.75) - quantile(s, 0.25),
                  samples=tuple(float(x) for x in samples))


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> the default CUDA device if available else CPU; strings -> torch.device."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def synchronize(device: torch.device | str | None) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timer:
    """Reusable context manager; each ``with`` block adds one sample.

    On a CUDA device without an injected clock, samples come from CUDA events recorded on the
    current stream; otherwise from ``clock`` (default ``time.perf_counter``) with the device
    synchronised before and after the block.
    """

    def __init__(self, device: torch.device | str | None = "cpu", clock: Clock | None = None):
        self.device = resolve_device(device)
        self._use_events = self.device.type == "cuda" and clock is None
        self.clock: Clock = clock if clock is not None else time.perf_counter
        self.samples: list[float] = []
        self._start: object = None

    def __enter__(self) -> Timer:
        if self._use_events:
            with torch.cuda.device(self.device):
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            self._start = start
        else:
            synchronize(self.device)
            self._start = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        if self._use_events:
            with torch.cuda.device(self.device):
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            torch.cuda.synchronize(self.device)
            self.samples.append(self._start.elapsed_time(end) / 1e3)  # ms -> s
        else:
            synchronize(self.device)
            self.samples.append(self.clock() - self._start)

    @property
    def elapsed_s(self) -> float:
        """The last sample (seconds)."""
        if not self.samples:
            raise RuntimeError("Timer.elapsed_s: no sample yet; use the timer in a `with` block first")
        return self.samples[-1]

    def timing(self, skip: int = 0) -> Timing:
        """Summary of the samples, ignoring the first ``skip`` (warm-up) samples."""
        check_int("Timer", "skip", skip, min_value=0, max_value=max(len(self.samples) - 1, 0))
        return summarize(self.samples[skip:])

    def reset(self) -> None:
        self.samples.clear()


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10,
            device: torch.device | str | None = "cpu", clock: Clock | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return median and IQR."""
    check_int("time_fn", "warmup", warmup, min_value=0)
    check_int("time_fn", "repeats", repeats, min_value=1)
    if not callable(fn):
        raise TypeError(f"time_fn: fn={fn!r} is not callable")
    timer = Timer(device=device, clock=clock)
    for _ in range(warmup):
        fn()
    synchronize(timer.device)
    for _ in range(repeats):
        with timer:
            fn()
    return timer.timing()
