"""Peak memory: the tracker sees a known allocation on CPU (RSS) and on GPU (allocator)."""

import mmap
import time

import pytest
import torch

from labcore.config import ConfigError
from labcore.profiling.memory import MemoryTracker, available_memory_bytes, measure_peak_memory

MiB = 1 << 20


def _allocate(n_bytes):
    # A fresh anonymous mapping with every page written: its pages are new to the process whatever
    # the allocator kept from earlier tests (a torch tensor could reuse resident heap pages).
    def fn():
        m = mmap.mmap(-1, n_bytes)
        for i in range(0, n_bytes, mmap.PAGESIZE):
            m[i] = 1
        time.sleep(0.03)              # several sampling intervals while it is alive
        out = float(m[n_bytes - mmap.PAGESIZE])
        m.close()
        return out
    return fn


def test_cpu_peak_sees_allocation():
    out, usage = measure_peak_memory(_allocate(48 * MiB), device="cpu", interval_s=0.002)
    assert out == 1.0
    assert usage.device == "cpu" and usage.method.startswith("rss_sampled")
    assert 0.8 * 48 * MiB <= usage.delta_bytes <= 3 * 48 * MiB
    assert usage.peak_bytes >= usage.baseline_bytes


def test_cpu_tracker_small_work_small_delta():
    with MemoryTracker("cpu") as mt:
        torch.ones(16).sum()
    assert mt.usage is not None and mt.usage.delta_bytes < 16 * MiB


def test_bad_input_and_available():
    with pytest.raises(ConfigError, match="interval_s"):
        MemoryTracker("cpu", interval_s=0)
    with pytest.raises(TypeError, match="not callable"):
        measure_peak_memory(1)
    assert available_memory_bytes("cpu") > 0


@pytest.mark.gpu
def test_cuda_peak_is_allocator_high_water_mark():
    dev = torch.device("cuda")
    keep = torch.empty(8 * MiB, dtype=torch.uint8, device=dev)  # baseline allocation
    _, usage = measure_peak_memory(lambda: torch.ones(64 * MiB // 4, device=dev).sum().item(), device=dev)
    assert usage.method == "cuda_max_allocated"
    assert usage.baseline_bytes >= keep.numel()
    assert 64 * MiB <= usage.delta_bytes <= 64 * MiB + 4 * MiB
    assert available_memory_bytes(dev) > 0
