"""The inference-cost benchmark: bad input fails before work, a tiny end-to-end run gives a table whose
byte counts agree with direct counts, and the Figure-1 figure has the expected traces and axes."""

import dataclasses

import pandas as pd
import pytest
import torch

import labcore.bench.inference as inf
import labcore.bench.inference_cli as inference_cli
from labcore.config import ConfigError
from labcore.layers.moe import MoEConfig
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.registry import get
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.lm.budget import model_budget, small_base_config
from labcore.lm.model import ModelConfig, SparsePlan
from labcore.profiling.ceilings import Ceilings
from labcore.viz.bench import X_TITLE, inference_figure

CEIL = Ceilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e10, dtype="float32", device="cpu", fingerprint={},
                copy_bytes=1, matmul_n=1, measured_at=0.0)


def tiny_configs():
    base = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64, max_seq_len=8)
    moe = MoEConfig(d_model=32, d_expert=32, n_experts=8, top_k=2, expert_impl="loop")
    pkm = PKMConfig(d_model=32, n_keys=16, heads=2, k_dim=16, top_k=4)
    um = UltraMemConfig(d_model=32, n_keys=16, heads=2, k_dim=8, top_k=4, d_value=16)
    return {
        "dense": base,
        "moe": dataclasses.replace(base, plan=SparsePlan(kind="moe", moe=moe)),
        "pkm": dataclasses.replace(base, d_ff=48, plan=SparsePlan(kind="memory", memory=pkm, placements=("1:1",))),
        "ultramem": dataclasses.replace(base, d_ff=48,
                                        plan=SparsePlan(kind="memory", memory=um, placements=("0:2",))),
    }


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference")
    df = inf.run_inference_bench([1, 4], configs=tiny_configs(), warmup=0, repeats=1, ceilings=CEIL,
                                 out_dir=out, log=None)
    return df, out


def _no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before the input was validated")
    monkeypatch.setattr(inf, "get_ceilings", boom)
    monkeypatch.setattr(inf, "_bench_one", boom)


def test_bad_input_fails_before_work(monkeypatch):
    _no_work(monkeypatch)
    cfgs = tiny_configs()
    with pytest.raises(ConfigError, match="batch_sizes=0"):
        inf.run_inference_bench([1, 0], configs=cfgs, log=None)
    with pytest.raises(ConfigError, match="batch_sizes=-4"):
        inf.run_inference_bench([-4], configs=cfgs, log=None)
    with pytest.raises(ConfigError, match="models='mlp'"):
        inf.run_inference_bench([1], models=("dense", "mlp"), configs=cfgs, log=None)
    with pytest.raises(ConfigError, match="dtype='int8'"):
        inf.run_inference_bench([1], configs=cfgs, dtype="int8", log=None)
    with pytest.raises(ConfigError, match="models=.mlp. is not allowed"):
        inf.run_inference_bench([1], configs={"mlp": cfgs["dense"]}, log=None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            inf.run_inference_bench([1], configs=cfgs, device="cuda", log=None)


def test_config_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    _no_work(monkeypatch)
    monkeypatch.setattr(inf, "available_memory_bytes", lambda device: 10 * 2**20)  # 10 MiB free
    big = dataclasses.replace(tiny_configs()["dense"], vocab_size=50_000, d_model=512, n_heads=4, d_ff=2048)
    with pytest.raises(ConfigError, match=r"model 'dense' needs about .* GiB at batch 4096 .* free on cpu"):
        inf.run_inference_bench([1, 4096], configs={"dense": big}, log=None)


def test_estimate_covers_parameters_and_grows_with_batch():
    cfg = tiny_configs()["moe"]

    p = model_budget(cfg, context_len=1).total_params
    assert inf.estimate_bytes(cfg, 1, 4) > 4 * p
    assert inf.estimate_bytes(cfg, 1024, 4) > inf.estimate_bytes(cfg, 1, 4)


def test_table_columns_and_values(result):
    df, _ = result
    assert list(df.columns) == inf.COLUMNS
    assert len(df) == 4 * 2 * 2  # models x scopes x batch sizes
    for col in ("latency_s", "predicted_s", "flops", "bytes_accessed", "bytes_predicted", "bytes_streamed",
                "achieved_bytes_per_s", "total_params"):
        assert (df[col] > 0).all(), col
    assert df["overlap_frac"].isna().all()  # CPU: not measured
    mem_layers = df[(df["scope"] == "layer") & df["model"].isin(["pkm", "ultramem"])]
    assert (mem_layers["read_s"] > 0).all() and (mem_layers["read_frac"] > 0).all()
    assert (mem_layers["gather_s"] > 0).all()
    assert mem_layers["gather_frac_copy"].to_numpy() == pytest.approx(
        (mem_layers["gather_bytes_per_s"] / CEIL.copy_bytes_per_s).to_numpy())
    # same value bytes for read and gather: bytes/s scale inversely with the times
    assert (mem_layers["gather_bytes_per_s"] * mem_layers["gather_s"]).to_numpy() == pytest.approx(
        (mem_layers["read_bytes_per_s"] * mem_layers["read_s"]).to_numpy())
    assert df.loc[df["scope"] == "model", "gather_s"].isna().all()
    # roofline with the given ceilings
    expect = [max(b / CEIL.copy_bytes_per_s, f / CEIL.matmul_flops_per_s)
              for b, f in zip(df["bytes_predicted"], df["flops"])]
    assert df["predicted_s"].to_numpy() == pytest.approx(expect)
    assert df["frac_copy"].to_numpy() == pytest.approx((df["achieved_bytes_per_s"] / 1e9).to_numpy())


def test_bytes_match_direct_counts(result):
    df, _ = result
    cfgs = tiny_configs()
    row = df.set_index(["model", "scope", "batch"])
    # dense FFN reads all its weights once, whatever B
    ffn_params = 3 * 32 * 64
    for B in (1, 4):
        assert row.loc[("dense", "layer", B), "bytes_accessed"] == 4 * ffn_params
        assert row.loc[("dense", "layer", B), "bytes_predicted"] == 4 * ffn_params
    # one token picks exactly K = 2 distinct experts: router + 2 experts, and the model expects the same
    unit = 3 * 32 * 32
    assert row.loc[("moe", "layer", 1), "bytes_accessed"] == 4 * (8 * 32 + 2 * unit)
    assert row.loc[("moe", "layer", 1), "bytes_predicted"] == pytest.approx(4 * (8 * 32 + 2 * unit))
    # whole dense model at B=1: every parameter once (tied embedding = head)
    assert row.loc[("dense", "model", 1), "bytes_accessed"] == 4 * model_budget(cfgs["dense"]).total_params
    # touched bytes never exceed reading everything, and the model scope includes the layer
    for m in inf.model_names():
        for B in (1, 4):
            assert row.loc[(m, "model", B), "bytes_accessed"] >= row.loc[(m, "layer", B), "bytes_accessed"]
            assert row.loc[(m, "model", B), "bytes_accessed"] <= 4 * row.loc[(m, "model", B), "total_params"]
    # memory layers at B=1: at most H*K rows, equal unless heads collide
    pkm = cfgs["pkm"].plan.memory.cost()
    acc = row.loc[("pkm", "layer", 1), "bytes_accessed"]
    assert 4 * (pkm.dense_params + pkm.unit_params) <= acc <= 4 * pkm.active_params_per_token


def test_outputs_written(result):
    df, out = result
    back = pd.read_parquet(out / "inference.parquet")
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    html = (out / "inference.html").read_text()
    assert "Plotly.newPlot" in html and "MoE \\u002f UltraMem latency" in html  # plotly escapes "/"
    assert not list(out.glob("*.tmp"))


def test_figure_traces_and_axes(result):
    df, _ = result
    fig = inference_figure(df, inf.moe_ultramem_ratio(df))
    names = [t.name for t in fig.data]
    for label in ("Dense", "MoE", "PKM", "UltraMem", "Dense (roofline)", "UltraMem memory access (cost model)",
                  "MoE / UltraMem latency"):
        assert label in names, label
    lay = fig.layout
    assert lay.xaxis.title.text == X_TITLE and lay.xaxis.type == "log"
    assert lay.yaxis.title.text == "latency per decode step (ms)" and lay.yaxis.type == "log"
    assert lay.yaxis2.title.text == "memory accessed per step (MB)" and lay.yaxis2.type == "log"
    assert "MoE / UltraMem" in lay.yaxis3.title.text
    lat = next(t for t in fig.data if t.name == "MoE")
    moe_model = df[(df["model"] == "moe") & (df["scope"] == "model")].sort_values("batch")
    assert list(lat.y) == pytest.approx(list(moe_model["latency_s"] * 1e3))


def test_memory_layers_run_without_slot_wide_diagnostics(monkeypatch):
    seen = []
    real = inf.set_detailed_aux

    def record(module, flag):
        seen.append(flag)
        return real(module, flag)

    monkeypatch.setattr(inf, "set_detailed_aux", record)
    cfgs = tiny_configs()
    inf.run_inference_bench([2], configs={"pkm": cfgs["pkm"]}, scopes=("layer",), warmup=0, repeats=1,
                            ceilings=CEIL, log=None)
    assert seen == [False]


def test_value_read_hooks_replay_the_read_and_its_gather():
    """The registered value_read hooks: the timed read is the layer's read() with the forward's slots
    and scores; the timed gather is the embedding_bag inside it: for PKM it equals read(); for
    UltraMem, projecting its pooled output gives read()."""
    cfgs = tiny_configs()
    torch.manual_seed(0)
    pkm = PKM(cfgs["pkm"].plan.memory).eval()
    um = UltraMem(cfgs["ultramem"].plan.memory).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        _, aux = pkm(x)
        read, gather = get("pkm").value_read(pkm, aux)
        torch.testing.assert_close(read(), pkm.read(aux.indices, aux.scores))
        torch.testing.assert_close(gather(), pkm.read(aux.indices, aux.scores))
        _, aux = um(x)
        read, gather = get("ultramem").value_read(um, aux)
        torch.testing.assert_close(read(), um.read(aux.indices, aux.core_scores))
        pooled = gather().view(5, -1)                                         # (N_tok, h*E*D_v/h)
        torch.testing.assert_close(pooled @ um._proj_weight().T, um.read(aux.indices, aux.core_scores))


def test_ratio_table_on_synthetic_rows():
    df = pd.DataFrame({"model": ["moe", "ultramem", "moe", "ultramem"], "scope": ["model"] * 4,
                       "batch": [1, 1, 8, 8], "latency_s": [6.0, 2.0, 9.0, 3.0],
                       "bytes_accessed": [10.0, 5.0, 40.0, 4.0]})
    r = inf.moe_ultramem_ratio(df)
    assert list(r["batch"]) == [1, 8]
    assert list(r["latency_ratio"]) == [3.0, 3.0] and list(r["bytes_ratio"]) == [2.0, 10.0]


def test_cli_rejects_bad_batch(capsys):
    with pytest.raises(SystemExit) as e:
        inference_cli.main(["--batch-sizes", "1,0", "--models", "dense", "--d-model", "32", "--n-layers", "2",
                  "--d-ff", "64", "--vocab-size", "64"])
    assert e.value.code == 2
    assert "batch_sizes=0" in capsys.readouterr().err


def test_default_family_wiring():
    base = small_base_config(d_model=64, n_layers=5, n_heads=2, d_ff=128, vocab_size=64, max_seq_len=8)
    cfgs = inf.default_configs(base, ratio=4.0, tol=0.05)
    assert list(cfgs) == list(inf.model_names()) == ["dense", "moe", "pkm", "ultramem"]
    assert cfgs["dense"] == base
    assert cfgs["moe"].plan.kind == "moe" and cfgs["ultramem"].plan.memory_type == "ultramem"


@pytest.mark.gpu
def test_tiny_end_to_end_on_gpu(tmp_path):
    df = inf.run_inference_bench([1, 4], configs=tiny_configs(), device="cuda", dtype="float32", warmup=1,
                                 repeats=2, out_dir=tmp_path, log=None)
    assert (df["latency_s"] > 0).all() and df["device"].str.startswith("cuda").all()
    ov = df[(df["model"] == "ultramem") & (df["scope"] == "model")]
    assert ov["overlap_both_s"].notna().all() and (ov["overlap_mem_s"] > 0).all()
    assert df.loc[df["model"] != "ultramem", "overlap_frac"].isna().all()
    assert (tmp_path / "inference.html").exists()


def test_model_scope_sees_distinct_inputs_beyond_the_vocabulary():
    # 512 sequences over a 64-token vocabulary: without the per-sequence context vector a token's hidden
    # state depends on its id alone, so the memory could touch at most 64 * H*K = 512 rows.
    base = tiny_configs()["dense"]
    pkm = PKMConfig(d_model=32, n_keys=32, heads=2, k_dim=16, top_k=4)  # N = 1024 rows, H*K = 8
    cfg = dataclasses.replace(base, d_ff=48, plan=SparsePlan(kind="memory", memory=pkm, placements=("1:1",)))
    df = inf.run_inference_bench([512], configs={"pkm": cfg}, warmup=0, repeats=1, ceilings=CEIL, log=None)
    row = df.set_index("scope")
    dense_model = 4 * (row.loc["model", "total_params"] - pkm.cost().params["values"])
    rows_model = (row.loc["model", "bytes_accessed"] - dense_model) / (4 * 32)
    rows_layer = (row.loc["layer", "bytes_accessed"] - 4 * pkm.cost().dense_params) / (4 * 32)
    assert rows_model > 64 * 8
    assert rows_model == pytest.approx(rows_layer, rel=0.15)  # like B independent random inputs
