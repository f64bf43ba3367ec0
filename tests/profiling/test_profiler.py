"""profile_ops: the per-operator table counts what ran, and the Chrome trace is valid JSON."""

import json

import pytest
import torch

from labcore.config import ConfigError
from labcore.profiling.profiler import COLUMNS, profile_ops


def test_profile_table_counts_operators(tmp_path):
    a, b = torch.randn(16, 32), torch.randn(32, 8)

    def work():
        return torch.relu(a @ b)

    trace = tmp_path / "sub" / "trace.json"
    table = profile_ops(work, warmup=1, repeats=3, device="cpu", trace_path=trace)
    assert list(table.columns) == COLUMNS
    mm = table[table["op"] == "aten::mm"]
    assert int(mm["calls"].sum()) == 3
    assert "[16, 32]" in mm["input_shapes"].iloc[0] and "[32, 8]" in mm["input_shapes"].iloc[0]
    assert int(table.loc[table["op"] == "aten::relu", "calls"].sum()) == 3
    assert table["self_cpu_frac"].sum() == pytest.approx(1.0)
    assert (table["self_cpu_us"].diff().dropna() <= 0).all()  # sorted, largest first
    assert (table["cpu_total_us"] >= table["self_cpu_us"] - 1e-6).all()
    data = json.loads(trace.read_text())
    names = {e.get("name") for e in data["traceEvents"]}
    assert "aten::mm" in names
    assert not list(trace.parent.glob("*.tmp"))  # atomic write leaves no temp file


def test_profile_ops_bad_input():
    with pytest.raises(ConfigError, match="repeats"):
        profile_ops(lambda: None, repeats=0)
    with pytest.raises(TypeError, match="not callable"):
        profile_ops(None)


@pytest.mark.gpu
def test_profile_table_has_cuda_columns():
    x = torch.randn(256, 256, device="cuda")
    table = profile_ops(lambda: x @ x, repeats=2, device="cuda")
    assert "self_cuda_us" in table.columns
    assert table["self_cuda_us"].sum() > 0
