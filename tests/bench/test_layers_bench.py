"""The layer benchmark (labcore layers vs their PyPI peers): timing protocol on stubs, output columns and
byte counts on a tiny run."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import labcore.bench.layers as lb
from labcore.config import ConfigError
from labcore.layers.moe import MoE
from labcore.profiling.timer import summarize


def test_time_pair_warms_up_then_alternates_rounds():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = lb.time_pair(fns, warmup=2, repeats=3, rounds=2)
    assert calls == ["a"] * 2 + ["b"] * 2 + (["a"] * 3 + ["b"] * 3) * 2
    assert len(t["a"].samples) == 6 and len(t["b"].samples) == 6


def test_paired_ratio_pairs_each_round():
    """A machine that gets 2x slower after round 1: per-round ratios stay 2, the ratio of the
    overall medians does not."""
    peer = summarize([2.0, 2.0, 2.2, 8.0, 8.0, 8.8, 8.0, 8.0, 8.8])  # rounds of repeats=3
    ours = summarize([1.0, 1.0, 1.1, 4.0, 4.0, 4.4, 4.4, 4.0, 4.0])
    med, q1, q3 = lb.paired_ratio(peer, ours, repeats=3)
    assert (med, q1, q3) == pytest.approx((2.0, 2.0, 2.0))
    peer2 = summarize([3.0, 3.0, 3.0, 1.0, 1.0, 1.0])
    ours2 = summarize([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert lb.paired_ratio(peer2, ours2, repeats=3) == pytest.approx((2.0, 1.5, 2.5))  # rounds: 3, 1
    with pytest.raises(ValueError, match="repeats=4"):
        lb.paired_ratio(peer2, ours2, repeats=4)


def test_bad_input():
    with pytest.raises(ConfigError, match="pairs='nope'"):
        lb.run_layer_bench(["nope"], log=None)
    with pytest.raises(ConfigError, match="batch=0"):
        lb.run_layer_bench(["gather"], batch=0, log=None)
    with pytest.raises(ConfigError, match="d_model=255"):
        lb.run_layer_bench(["gather"], d_model=255, log=None)
    with pytest.raises(ConfigError, match="moe_impl='triton'"):
        lb.run_layer_bench(["moe8"], moe_impl="triton", log=None)


def test_moe_impl_reaches_the_layer(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("padded_bmm path used")

    monkeypatch.setattr(MoE, "padded_experts", refuse)
    kw = dict(batch=1, seq=8, warmup=0, repeats=1, rounds=1, threads=1, log=None)
    df = lb.run_layer_bench(["moe8"], moe_impl="grouped_mm", **kw)
    assert "grouped_mm" in df["labcore"].iloc[0] and df["max_abs_diff"].iloc[0] < 1e-5
    with pytest.raises(AssertionError, match="padded_bmm path used"):  # auto: the padded path in inference
        lb.run_layer_bench(["moe8"], **kw)


def test_missing_peer_is_skipped_with_message_and_labcore_keeps_its_row(monkeypatch):
    def missing(module, package):
        raise lb.PeerMissing(f"peer '{module}' is not installed; pip install -e .[bench] ({package})")

    monkeypatch.setattr(lb, "_need", missing)
    msgs = []
    df = lb.run_layer_bench(["pkm", "peer"], batch=1, seq=4, warmup=0, repeats=1, rounds=1, threads=None,
                            log=msgs.append)
    assert list(df["pair"]) == ["pkm", "peer"]
    assert (df["labcore_ms"] > 0).all() and df["peer_ms"].isna().all() and df["speedup"].isna().all()
    assert df["meets_target"].isna().all() and (df["peer"] == "-").all()
    assert any("skipped" in m and "product_key_memory" in m and "pip install" in m for m in msgs)
    assert any("skipped" in m and "PEER_pytorch" in m for m in msgs)
    peer = df.iloc[1]
    assert peer["read_ms"] > 0 and peer["gbytes_per_s"] > 0  # the value read needs no peer
    assert "pkm" in lb.format_table(df)


def test_tiny_run_rows_and_bytes(tmp_path):
    old = torch.get_num_threads()
    df = lb.run_layer_bench(["pkm", "moe8", "gather"], batch=1, seq=8, warmup=0, repeats=1, rounds=1,
                            threads=1, log=None)
    assert torch.get_num_threads() == old  # restored
    assert list(df["pair"]) == ["pkm", "moe8", "gather", "gather", "gather"]
    assert [w.split(":")[0] for w in df["labcore"][2:]] == ["PKM value gather", "UltraMem value gather",
                                                            "UltraMem read"]
    pairs = df[df["pair"] != "gather"]
    assert (pairs["labcore_ms"] > 0).all() and (pairs["peer_ms"] > 0).all()
    assert pairs["speedup"].to_numpy() == pytest.approx((pairs["peer_ms"] / pairs["labcore_ms"]).to_numpy())
    moe = df[df["pair"] == "moe8"].iloc[0]
    assert moe["max_abs_diff"] < 1e-5  # same weights through labcore.interop: same outputs
    assert bool(moe["meets_target"]) == (moe["speedup"] >= 1.0)
    g = df[df["pair"] == "gather"].iloc[0]
    n_tok, S, Dv = 8, 4 * 32, 256
    assert g["bytes"] == n_tok * S * Dv * 4 + n_tok * Dv * 4 + n_tok * S * 12
    assert g["gbytes_per_s"] == pytest.approx(g["bytes"] / (g["labcore_ms"] / 1e3) / 1e9)
    assert g["frac_of_copy"] == pytest.approx(g["gbytes_per_s"] / g["copy_gbytes_per_s"])
    for _, r in df[df["pair"] == "gather"].iterrows():
        assert r["gbytes_per_s"] == pytest.approx(r["bytes"] / (r["labcore_ms"] / 1e3) / 1e9)
    ug = df.iloc[3]                                          # UltraMem gather: 8 tokens x 64 rows x 256 floats
    assert ug["bytes"] >= 8 * 64 * 256 * 4 + 8 * 4 * 256 * 4
    text = lb.format_table(df)
    assert "ratio" in text and "pkm" in text and "gather" in text


def test_memory_family_rows_time_the_layer_and_its_value_read():
    """PEER against PEER-pytorch on copied weights (outputs agree), UltraMemV2 and Memory+ alone; each
    with the bytes/s of its value read replayed alone, next to the copy ceiling."""
    pytest.importorskip("PEER_pytorch", reason="PyPI PEER-pytorch (bench extra) is not installed")
    df = lb.run_layer_bench(["peer", "ultramem_v2", "memory_plus"], batch=1, seq=8, warmup=0, repeats=2, rounds=2,
                            threads=1, log=None)
    assert list(df["pair"]) == ["peer", "ultramem_v2", "memory_plus"]
    peer = df.iloc[0]
    assert peer["max_abs_diff"] < 1e-5  # same layer, same weights: same outputs before timing
    assert peer["peer_ms"] > 0 and peer["speedup"] > 0 and peer["speedup_q1"] <= peer["speedup"] <= peer["speedup_q3"]
    assert peer["target"] is None or pd.isna(peer["target"])
    for _, solo in df.iloc[1:].iterrows():
        assert solo["peer"] == "none on PyPI" and pd.isna(solo["peer_ms"]) and pd.isna(solo["speedup"])
    for _, r in df.iterrows():
        assert r["labcore_ms"] > 0 and r["read_ms"] > 0 and r["copy_gbytes_per_s"] > 0
        assert r["gbytes_per_s"] == pytest.approx(r["bytes"] / (r["read_ms"] / 1e3) / 1e9)
        assert r["frac_of_copy"] == pytest.approx(r["gbytes_per_s"] / r["copy_gbytes_per_s"])
    n_tok, D = 8, 256
    # bytes by hand: PEER 2 rows (u_i, v_i) per selected expert, H*K = 8*16, + input/output, indices
    # twice, three per-expert floats (h, weight, product); Memory+ the PKM gather (4*32 rows of D)
    S = 8 * 16
    assert df.iloc[0]["bytes"] == 2 * n_tok * S * D * 4 + 2 * n_tok * D * 4 + 2 * n_tok * S * 8 + 3 * n_tok * S * 4
    S = 4 * 32
    assert df.iloc[2]["bytes"] == n_tok * S * D * 4 + n_tok * D * 4 + n_tok * S * 12
    # UltraMemV2: at least the value and pre-value rows of its H*K = 2*32 slots
    assert df.iloc[1]["bytes"] >= n_tok * 64 * (256 + 64) * 4
    text = lb.format_table(df)
    assert "read ms" in text and "ultramem_v2" in text and "none on PyPI" in text


def test_peer_pytorch_state_gives_the_same_layer():
    lucid = pytest.importorskip("PEER_pytorch", reason="PyPI PEER-pytorch (bench extra) is not installed")
    torch.manual_seed(0)
    ours = lb.PEER(lb.PEERConfig(d_model=16, n_keys=6, heads=3, top_k=4, k_dim=8, query_norm="none",
                                 query_bias=False)).double().eval()
    theirs = lucid.PEER(16, heads=3, num_experts=36, num_experts_per_head=4, dim_key=4,
                        non_competing_scores=False).double().eval()
    theirs.load_state_dict(lb.peer_pytorch_state(ours))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], theirs(x), atol=1e-12, rtol=0)


def test_main_writes_json_and_csv(tmp_path, capsys):
    j, c = tmp_path / "o" / "layers.json", tmp_path / "o" / "layers.csv"
    rc = lb.main(["--only", "gather", "--batch", "1", "--seq", "4", "--warmup", "0", "--repeats", "1",
                  "--rounds", "1", "--threads", "1", "--json", str(j), "--csv", str(c)])
    assert rc == 0
    rows = json.loads(j.read_text())
    assert [r["pair"] for r in rows] == ["gather", "gather", "gather"]
    assert c.read_text().splitlines()[0].startswith("pair,")
    assert "labcore bench layers" in capsys.readouterr().out


def test_memory_layers_timed_without_slot_wide_diagnostics(monkeypatch):
    seen = []

    def record(module, flag):
        seen.append((type(module).__name__, flag))
        return 1

    monkeypatch.setattr(lb, "set_detailed_aux", record)
    lb.run_layer_bench(["pkm"], batch=1, seq=4, warmup=0, repeats=1, rounds=1, threads=1, log=None)
    assert seen == [("PKM", False)]


@pytest.mark.slow
def test_all_pairs_small():
    df = lb.run_layer_bench(lb.ROWS, batch=1, seq=16, warmup=1, repeats=1, rounds=1, log=None)
    assert set(df["pair"]) == set(lb.ROWS)
    assert (df.loc[df["pair"].isin(["moe8", "moe64", "peer"]), "max_abs_diff"] < 1e-5).all()
    with_peer = df[df["pair"].isin(lb.PAIRS) & df["peer_ms"].notna()]  # peers that are installed
    assert np.isfinite(with_peer["speedup"].to_numpy(dtype=float)).all() and (with_peer["speedup"] > 0).all()
    assert (df.loc[df["pair"].isin(lb.SOLO), "peer"] == "none on PyPI").all()
