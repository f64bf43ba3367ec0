"""Machine ceilings: the copy bandwidth and matmul throughput this machine actually reaches.

A roofline needs two numbers per machine and dtype:

* **copy bandwidth** (bytes/s): ``dst.copy_(src)`` of a tensor much larger than the caches; the
  traffic is counted as bytes read + bytes written, ``2 * src.nbytes`` per copy. This is the
  practical ceiling for any memory-bound kernel (a gather cannot stream faster than a copy).
* **matmul throughput** (FLOP/s): ``a @ b`` of two square ``n x n`` matrices in the dtype used,
  ``2 n^3`` FLOPs per product (one multiply-add = 2 FLOPs, as everywhere in labcore).

Both are medians over repeats after a warm-up. They are measured once per machine and cached as JSON
in ``$LABCORE_CACHE/ceilings.json`` (default ``~/.cache/labcore``), keyed by a *fingerprint*: CPU
model, logical cores, torch threads, torch version, device name and dtype. Anything that changes the
numbers changes the key, so a stale value is never reused. ``force=True`` re-measures. On CPU the
defaults (64 MiB copies, 1024^2 matmuls) take a second or two.

Measured ceilings are what the machine *does*, not the vendor's spec sheet; the bandwidth of a
2-thread CPU process is far below the socket's peak, and that is the relevant number for a benchmark
that runs with 2 threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from labcore.config import check_int
from labcore.profiling.timer import resolve_device, time_fn
from labcore.results import write_atomic

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float32`` or ``"float32"`` -> ``"float32"``; anything else raises ValueError."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed: must be one of {sorted(DTYPES)}")
    return name


def cache_dir() -> Path:
    """``$LABCORE_CACHE`` if set, else ``~/.cache/labcore``."""
    return Path(os.environ.get("LABCORE_CACHE", Path.home() / ".cache" / "labcore"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint(device: torch.device | str | None = "cpu",
                        dtype: torch.dtype | str = torch.float32) -> dict[str, str | int]:
    """What the ceilings depend on. Two machines (or thread settings) with different values here
    get separate cache entries."""
    dev = resolve_device(device)
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype_name(dtype),
    }


def fingerprint_key(fp: dict[str, str | int]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Ceilings:
    """copy_bytes_per_s: bytes read + written per second by a large tensor copy.
    matmul_flops_per_s: FLOP/s of a square matmul in ``dtype``. fingerprint: see machine_fingerprint."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float
    dtype: str
    device: str
    fingerprint: dict
    copy_bytes: int
    matmul_n: int
    measured_at: float

    def roofline_s(self, n_bytes: float, flops: float) -> float:
        """Time bound of a step moving ``n_bytes`` and doing ``flops``: max of the two limits."""
        return max(n_bytes / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)


def measure_copy_bandwidth(device: torch.device | str | None = "cpu", dtype: torch.dtype | str = torch.float32,
                           n_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes read + written per second by ``dst.copy_(src)``; ``n_bytes`` per tensor (default 64 MiB on
    CPU, 1 GiB on GPU, both far larger than the last-level cache)."""
    dev = resolve_device(device)
    dt = DTYPES[dtype_name(dtype)]
    n_bytes = n_bytes if n_bytes is not None else (1 << 30 if dev.type == "cuda" else 64 << 20)
    check_int("measure_copy_bandwidth", "n_bytes", n_bytes, min_value=1 << 12)
    numel = n_bytes // torch.tensor([], dtype=dt).element_size()
    src = torch.ones(numel, dtype=dt, device=dev)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=dev)
    return 2 * src.nbytes / t.median_s  # read src + write dst


def measure_matmul_flops(device: torch.device | str | None = "cpu", dtype: torch.dtype | str = torch.float32,
                         n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matmul: 2 n^3 FLOPs each (default n = 1024 CPU, 8192 GPU)."""
    dev = resolve_device(device)
    dt = DTYPES[dtype_name(dtype)]
    n = n if n is not None else (8192 if dev.type == "cuda" else 1024)
    check_int("measure_matmul_flops", "n", n, min_value=8)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dt)
    out = torch.empty(n, n, dtype=dt, device=dev)
    t = time_fn(lambda: torch.matmul(a, b, out=out), warmup=2, repeats=repeats, device=dev)
    return 2 * n**3 / t.median_s


def _read_cache(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def get_ceilings(device: torch.device | str | None = "cpu", dtype: torch.dtype | str = torch.float32, *,
                 force: bool = False, cache: bool = True, copy_bytes: int | None = None,
                 matmul_n: int | None = None) -> Ceilings:
    """The machine's ceilings for ``(device, dtype)``: from the cache when the fingerprint matches
    (and ``force`` is False), else measured now and stored (when ``cache``)."""
    dev = resolve_device(device)
    fp = machine_fingerprint(dev, dtype)
    key = fingerprint_key(fp)
    path = cache_dir() / "ceilings.json"
    if cache and not force:
        entry = _read_cache(path).get(key)
        if entry is not None and entry.get("fingerprint") == fp:
            try:
                return Ceilings(**entry)
            except TypeError:
                pass  # written by an older layout: re-measure
    copy_bytes = copy_bytes if copy_bytes is not None else (1 << 30 if dev.type == "cuda" else 64 << 20)
    matmul_n = matmul_n if matmul_n is not None else (8192 if dev.type == "cuda" else 1024)
    ceilings = Ceilings(
        copy_bytes_per_s=measure_copy_bandwidth(dev, dtype, n_bytes=copy_bytes),
        matmul_flops_per_s=measure_matmul_flops(dev, dtype, n=matmul_n),
        dtype=dtype_name(dtype), device=str(dev), fingerprint=fp, copy_bytes=copy_bytes,
        matmul_n=matmul_n, measured_at=time.time(),
    )
    if cache:
        data = _read_cache(path)
        data[key] = dataclasses.asdict(ceilings)
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True))
    return ceilings
