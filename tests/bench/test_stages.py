"""The stage breakdown (labcore.bench.stages): every layer's plan runs on the real layer and leaves it
untouched, exclusive times of nested calls add up exactly (fake clock), the tidy table's shares sum
to 1 with the unattributed remainder, the bound is the roofline of the counted FLOPs and bytes, and
bad input fails before any work."""

import dataclasses
import math

import pandas as pd
import pytest
import torch
from torch import nn

import labcore.bench.inference_cli as inference_cli
import labcore.bench.stages as stages
from labcore.config import ConfigError
from labcore.layers.base import set_detailed_aux
from labcore.layers.fast import compiled, search
from labcore.layers.ffn import FFNConfig
from labcore.layers.memory_plus import MemoryPlusConfig
from labcore.layers.moe import MoEConfig
from labcore.layers.peer import PEERConfig
from labcore.layers.pkm import PKMConfig
from labcore.layers.registry import build
from labcore.layers.ultramem import UltraMemConfig
from labcore.layers.ultramem_v2 import UltraMemV2Config
from labcore.lm.model import ModelConfig, SparsePlan
from labcore.profiling.ceilings import Ceilings


def _ceil(copy: float, flops: float) -> Ceilings:
    return Ceilings(copy_bytes_per_s=copy, matmul_flops_per_s=flops, dtype="float32", device="cpu",
                    fingerprint={}, copy_bytes=1, matmul_n=1, measured_at=0.0)


# Far above anything a CPU reaches (1 TB/s copy, 10 TFLOP/s): no layer can run faster than this bound.
FAST_CEIL = _ceil(1e12, 1e13)

D = 32
TINY_LAYERS = {
    "dense": FFNConfig(d_model=D, d_hidden=64),
    "moe": MoEConfig(d_model=D, d_expert=32, n_experts=8, top_k=2),
    "pkm": PKMConfig(d_model=D, n_keys=16, heads=2, k_dim=16, top_k=4),
    "ultramem": UltraMemConfig(d_model=D, n_keys=16, heads=2, k_dim=8, top_k=4, d_value=16),
    "ultramem_v2": UltraMemV2Config(d_model=D, n_keys=16, k_dim=8, top_k=4, d_value=16, d_pre=8),
    "memory_plus": MemoryPlusConfig(d_model=D, n_keys=16, heads=2, k_dim=16, top_k=4),
    "peer": PEERConfig(d_model=D, n_keys=8, heads=2, top_k=4, k_dim=16),
}
# The stages each tiny layer must show (those its configuration uses).
EXPECTED = {
    "dense": {"gate proj", "up proj", "SwiGLU", "down proj"},
    "moe": {"router", "top-k routing", "experts"},
    "pkm": ({"query", "fused search", "softmax + slot ids", "gather", "aux"} if compiled.available() else
            {"query", "side search", "softmax + slot ids", "candidate grid", "top-k", "gather", "aux"}),
    # inference with the compiled extension runs UltraMem's search as one pass (fast.search.fused_tucker_search)
    "ultramem": ({"query", "fused search", "value bags", "gather", "projection", "aux"} if compiled.available() else
                 {"query", "side scores", "MCS scores", "candidate grid", "top-k", "value bags", "gather",
                  "projection", "aux"}),
    "ultramem_v2": {"query", "side scores", "MCS scores", "candidate grid", "top-k", "pre-values", "value bags",
                    "gather", "projection", "aux"},
    "memory_plus": ({"query", "fused search", "softmax + slot ids", "gather", "aux", "gate"} if compiled.available()
                    else {"query", "side search", "softmax + slot ids", "candidate grid", "top-k", "gather", "aux",
                          "gate"}),
    "peer": ({"query", "fused search", "side scores", "expert down", "expert up", "aux"} if compiled.available() else
             {"query", "side scores", "candidate grid", "top-k", "expert down", "expert up", "aux"}),
}


def _layer(name: str) -> nn.Module:
    torch.manual_seed(0)
    layer = build(TINY_LAYERS[name]).eval()
    set_detailed_aux(layer, False)
    return layer


def test_every_registered_memory_moe_and_dense_have_a_plan():
    assert set(stages.STAGE_PLANS) == set(stages.stage_model_names()) == set(TINY_LAYERS)


@pytest.mark.parametrize("name", sorted(TINY_LAYERS))
def test_plan_runs_on_the_real_layer_and_leaves_it_as_it_was(name):
    layer = _layer(name)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    functions = {p.target: p.target.rpartition(".") for p in stages.STAGE_PLANS[name] if not p.target.startswith("self.")}
    originals = {t: getattr(__import__(m, fromlist=[f]), f) for t, (m, _, f) in functions.items()}
    with torch.inference_mode():
        y_plain, _ = layer(x)
        st = stages.time_stages(name, layer, x, warmup=0, repeats=2)
        y_after, _ = layer(x)
        recorder = stages.StageRecorder(stages.STAGE_PLANS[name], x.device)
        with stages.instrument(layer, recorder):
            y_staged, _ = layer(x)
    assert set(st.stages) == EXPECTED[name]                      # the stages this config uses, no others
    assert all(st.calls[s] >= 1 for s in st.stages)
    assert all(t >= 0 for t in st.stages.values())
    assert st.time_s > 0 and st.staged_s > 0
    assert math.isclose(st.unattributed_s + sum(st.stages.values()), st.time_s, rel_tol=1e-12)
    torch.testing.assert_close(y_staged, y_plain, rtol=0, atol=0)  # the wrappers change nothing ...
    torch.testing.assert_close(y_after, y_plain, rtol=0, atol=0)
    for t, (m, _, f) in functions.items():                         # ... and are all taken off again
        assert getattr(__import__(m, fromlist=[f]), f) is originals[t]
    modules = [layer, *layer.modules()]
    assert not any("forward" in vars(mod) or any(callable(v) and hasattr(v, "__wrapped__") for v in vars(mod).values())
                   for mod in modules)


def test_functions_are_timed_wherever_they_were_imported():
    # PKM's readable search (with a graph to record: no fused search) reaches exact_topk only through
    # labcore.layers.fast.search (side_search, pruned_pair_topk): the wrapper must be installed there,
    # not only in labcore.layers.fast.topk.
    layer = _layer("pkm")
    probe = stages.Probe("top-k", "labcore.layers.fast.topk.exact_topk")
    rec = stages.StageRecorder([probe], torch.device("cpu"))
    original = search.exact_topk
    with stages.instrument(layer, rec):
        assert search.exact_topk is not original
        layer(torch.randn(3, D))
    assert search.exact_topk is original
    assert rec.calls[0] >= 1


class _Nested(nn.Module):
    """forward: 8 ticks, then a(): 1 tick, b() (4 ticks), 2 ticks; then b() again."""

    def __init__(self, now: list[float]):
        super().__init__()
        self.now = now

    def a(self):
        self.now[0] += 1
        self.b()
        self.now[0] += 2

    def b(self):
        self.now[0] += 4

    def forward(self, x):
        self.now[0] += 8
        self.a()
        self.b()
        return x


def test_exclusive_times_of_nested_calls_add_up_exactly():
    now = [0.0]
    layer = _Nested(now)
    rec = stages.StageRecorder([stages.Probe("A", "self.a"), stages.Probe("B", "self.b")], torch.device("cpu"))
    rec.clock = lambda: now[0]
    with stages.instrument(layer, rec):
        layer(None)
    assert rec.stage_times() == {"A": (3.0, 1), "B": (8.0, 2)}   # a without its nested b; b twice
    assert now[0] == 8 + 3 + 8                                     # forward's own 8 ticks are the remainder


def test_stale_plans_fail_loudly():
    layer = _layer("ultramem")
    x = torch.randn(2, D)
    with pytest.raises(ConfigError, match=r"'self.no_such_step'.*update STAGE_PLANS"):
        stages.time_stages("ultramem", layer, x, warmup=0, repeats=1,
                           probes=[stages.Probe("x", "self.no_such_step")])
    with torch.inference_mode(), pytest.raises(ConfigError, match=r"'self.search_recall'.*never ran"):
        stages.time_stages("ultramem", layer, x, warmup=0, repeats=1,
                           probes=[stages.Probe("x", "self.search_recall")])   # a method the forward never calls
    # an optional attribute that is absent (PKM without a value projection) is simply not a stage
    assert _layer("pkm").value_proj is None


def test_within_tolerance():
    assert stages.within_tolerance(1.0, 1.1) and not stages.within_tolerance(1.0, 1.2)
    assert stages.within_tolerance(1e-4, 1.15e-4)                   # 15 us: inside the absolute floor
    assert not stages.within_tolerance(1e-4, 1.3e-4)


# ----------------------------------------------------------------------------------------------
# The run: tiny models, as the inference bench's tests.
# ----------------------------------------------------------------------------------------------


def tiny_configs():
    base = ModelConfig(vocab_size=64, d_model=D, n_layers=3, n_heads=2, d_ff=64, max_seq_len=8)
    return {
        "dense": base,
        "moe": dataclasses.replace(base, plan=SparsePlan(kind="moe", moe=TINY_LAYERS["moe"])),
        "pkm": dataclasses.replace(base, d_ff=48, plan=SparsePlan(kind="memory", memory=TINY_LAYERS["pkm"],
                                                                  placements=("1:1",))),
        "ultramem": dataclasses.replace(base, d_ff=48, plan=SparsePlan(kind="memory", memory=TINY_LAYERS["ultramem"],
                                                                       placements=("0:2",))),
    }


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    df = stages.run_stage_bench([1, 16], configs=tiny_configs(), warmup=1, repeats=3, ceilings=FAST_CEIL,
                                out_dir=out, log=None)
    return df, out


def test_table_has_every_stage_and_shares_sum_to_one(result):
    df, _ = result
    assert list(df.columns) == stages.COLUMNS
    assert set(df["model"]) == {"dense", "moe", "pkm", "ultramem"}
    for (model, _batch), g in df.groupby(["model", "batch"]):
        assert set(g["stage"]) == EXPECTED[model] | {stages.UNATTRIBUTED}
        assert g["stage"].iloc[-1] == stages.UNATTRIBUTED
        assert g["share"].sum() == pytest.approx(1.0, abs=1e-9)
        assert (g["stage_ms"] / g["time_ms"]).to_numpy() == pytest.approx(g["share"].to_numpy())
        assert g["threads"].iloc[0] == stages.DEFAULT_THREADS
        assert g["load_1m"].iloc[0] >= 0
    assert set(df["batch"]) == {1, 16}


def test_bound_is_the_roofline_of_the_counted_flops_and_bytes(result):
    df, _ = result
    rows = df.drop_duplicates(["model", "batch"])
    for r in rows.itertuples():
        t_mem, t_flop = r.bytes / FAST_CEIL.copy_bytes_per_s, r.flops / FAST_CEIL.matmul_flops_per_s
        assert r.bound_ms == pytest.approx(max(t_mem, t_flop) * 1e3)
        assert r.bound == ("memory" if t_mem >= t_flop else "compute")
        assert r.flops == r.batch * TINY_LAYERS[r.model].cost().flops_per_token
        assert r.bytes >= 2 * r.batch * D * 4                        # at least the input and output activations
        # with ceilings beyond the machine, nothing runs faster than the bound: a sanity floor
        assert math.isfinite(r.time_over_bound) and r.time_over_bound >= 1.0
    dense = rows[rows["model"] == "dense"].set_index("batch")
    params = TINY_LAYERS["dense"].cost().total_params
    assert dense.loc[1, "bytes"] == 4 * (params + 2 * D)             # weights once + x and y of one token


def test_outputs_are_written_and_read_back(result):
    df, out = result
    pd.testing.assert_frame_equal(pd.read_parquet(out / "stages.parquet"), df)
    csv = pd.read_csv(out / "stages.csv")
    assert list(csv.columns) == stages.COLUMNS and len(csv) == len(df)
    assert not list(out.glob("*.tmp"))
    text = stages.format_stage_table(df)
    for label in ("Dense", "MoE", "PKM", "UltraMem"):
        assert label in text
    assert "unattributed" in text and "t/bound" in text


def _no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before the input was validated")
    monkeypatch.setattr(stages, "ceilings_for", boom)
    monkeypatch.setattr(stages, "_stages_one", boom)


def test_bad_input_fails_before_work(monkeypatch):
    _no_work(monkeypatch)
    cfgs = tiny_configs()
    for kwargs, match in [({"batch_sizes": [1, 0]}, r"run_stage_bench.batch_sizes=0"),
                          ({"batch_sizes": []}, r"batch_sizes=\(\) is not allowed"),
                          ({"models": ("pkm", "mlp")}, r"run_stage_bench.models='mlp'"),
                          ({"threads": 0}, r"run_stage_bench.threads=0"),
                          ({"repeats": 0}, r"run_stage_bench.repeats=0"),
                          ({"dtype": "int8"}, r"run_stage_bench.dtype='int8'"),
                          ({"models": ("peer",)}, r"configs lacks \['peer'\]")]:
        with pytest.raises(ConfigError, match=match):
            stages.run_stage_bench(**{"batch_sizes": [1], "configs": cfgs, "log": None, **kwargs})


def test_cli_runs_stages_and_rejects_options_that_do_not_apply(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        inference_cli.main(["--stages", "--scopes", "layer"])
    assert e.value.code == 2
    assert "--scopes not allowed with --stages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inference_cli.main(["--stages", "--context-len", "8", "--no-overlap"])
    assert "--context-len, --no-overlap not allowed with --stages" in capsys.readouterr().err
    _no_work(monkeypatch)
    with pytest.raises(SystemExit):
        inference_cli.main(["--stages", "--threads", "0"])
    assert "threads=0" in capsys.readouterr().err
    monkeypatch.undo()

    seen, real_run = {}, stages.run_stage_bench

    def fake_run(batch_sizes, models, **kw):
        seen.update(batch_sizes=tuple(batch_sizes), models=models, threads=kw["threads"])
        return real_run([1], configs={"dense": tiny_configs()["dense"]}, warmup=0, repeats=1,
                                      threads=kw["threads"], ceilings=FAST_CEIL, out_dir=kw["out_dir"], log=None)

    monkeypatch.setattr(stages, "run_stage_bench", fake_run)
    assert inference_cli.main(["--stages", "--out", str(tmp_path)]) == 0
    assert seen == {"batch_sizes": (1, 64, 512, 4096), "models": None, "threads": 2}   # the defaults
    printed = capsys.readouterr().out
    assert "Dense (dense)" in printed and "stages.csv" in printed
    assert (tmp_path / "stages.parquet").exists()
