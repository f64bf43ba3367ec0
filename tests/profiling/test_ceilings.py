"""Ceilings: formulas on a stubbed timer, caching by fingerprint, force re-measure, atomic cache."""

import json

import pytest
import torch

import labcore.profiling.ceilings as ceil
from labcore.profiling.timer import Timing


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCORE_CACHE", str(tmp_path))
    return tmp_path


def _fixed_timing(seconds):
    def fake_time_fn(fn, **kw):
        fn()
        return Timing(median_s=seconds, iqr_s=0.0, samples=(seconds,))
    return fake_time_fn


def test_formulas_on_stubbed_timer(monkeypatch):
    monkeypatch.setattr(ceil, "time_fn", _fixed_timing(0.5))
    # copy: 1 MiB read + 1 MiB written in 0.5 s
    assert ceil.measure_copy_bandwidth("cpu", torch.float32, n_bytes=1 << 20) == pytest.approx(2 * (1 << 20) / 0.5)
    # matmul: 2 n^3 FLOPs in 0.5 s
    assert ceil.measure_matmul_flops("cpu", "float32", n=64) == pytest.approx(2 * 64**3 / 0.5)


def test_cache_roundtrip_and_force(cache):
    c1 = ceil.get_ceilings("cpu", torch.float32, copy_bytes=1 << 20, matmul_n=64)
    assert c1.copy_bytes_per_s > 0 and c1.matmul_flops_per_s > 0
    c2 = ceil.get_ceilings("cpu", torch.float32, copy_bytes=1 << 20, matmul_n=64)
    assert c2 == c1  # served from the cache (same measured_at)
    c3 = ceil.get_ceilings("cpu", torch.float32, force=True, copy_bytes=1 << 20, matmul_n=64)
    assert c3.measured_at > c1.measured_at
    data = json.loads((cache / "ceilings.json").read_text())
    key = ceil.fingerprint_key(ceil.machine_fingerprint("cpu", torch.float32))
    assert data[key]["measured_at"] == c3.measured_at
    assert not list(cache.glob("*.tmp"))


def test_fingerprint_separates_dtype_and_threads(cache, monkeypatch):
    fp32 = ceil.machine_fingerprint("cpu", torch.float32)
    fp64 = ceil.machine_fingerprint("cpu", "float64")
    assert fp32["dtype"] == "float32" and fp64["dtype"] == "float64"
    assert ceil.fingerprint_key(fp32) != ceil.fingerprint_key(fp64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fp1 = ceil.machine_fingerprint("cpu", torch.float32)
    finally:
        torch.set_num_threads(old)
    assert fp1["torch_threads"] == 1
    assert ceil.fingerprint_key(fp1) != ceil.fingerprint_key(fp32) or old == 1


def test_corrupt_cache_is_remeasured(cache):
    (cache / "ceilings.json").write_text("{not json")
    c = ceil.get_ceilings("cpu", torch.float32, copy_bytes=1 << 20, matmul_n=64)
    assert c.copy_bytes_per_s > 0
    assert json.loads((cache / "ceilings.json").read_text())  # rewritten as valid JSON


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype='int8'"):
        ceil.machine_fingerprint("cpu", "int8")


def test_roofline_method():
    c = ceil.Ceilings(copy_bytes_per_s=10.0, matmul_flops_per_s=100.0, dtype="float32", device="cpu",
                      fingerprint={}, copy_bytes=1, matmul_n=1, measured_at=0.0)
    assert c.roofline_s(50.0, 100.0) == pytest.approx(5.0)   # memory bound
    assert c.roofline_s(5.0, 1000.0) == pytest.approx(10.0)  # compute bound


@pytest.mark.gpu
def test_gpu_ceilings_small(cache):
    c = ceil.get_ceilings("cuda", torch.bfloat16, copy_bytes=64 << 20, matmul_n=1024)
    assert c.device.startswith("cuda") and c.copy_bytes_per_s > 0 and c.matmul_flops_per_s > 0
