"""labcore.experiments.memory_family: the family's sizing, the arms and what they hold equal, the
parameter checks, the tables, the teaching forward pass and the interpretation, on hand-built inputs
whose answers are known."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from labcore.config import ConfigError
from labcore.experiments import memory_family as mf
from labcore.experiments.params import MEMORY_FAMILY, MemoryFamilyParams
from labcore.lm.budget import memory_family_names, model_budget


def test_family_names_agree_with_the_registry():
    assert MEMORY_FAMILY == memory_family_names()


@pytest.mark.parametrize("bad, message", [
    (dict(architectures=["moe", "dense"]), "must start with 'dense'"),
    (dict(architectures=["dense", "pkm", "pkm"]), "distinct names"),
    (dict(architectures=["dense", "lram"]), "distinct names"),
    (dict(n_facts=802), "multiple of 4"),
    (dict(capacity_archs=["moe"]), "capacity_archs"),
    (dict(capacity_ratios=[]), "capacity_ratios"),
    (dict(capacity_ratios=[0.1]), "capacity_ratios"),
    (dict(capacity_ratios=[True]), "capacity_ratios"),
    (dict(batch_sizes=[0]), "batch_sizes"),
    (dict(value_lr_multiplier=0.0), "value_lr_multiplier"),
    (dict(calibrate_init="yes"), "calibrate_init"),
    (dict(ratio=100.0), "ratio"),
])
def test_bad_parameters_name_themselves(bad, message):
    with pytest.raises(ConfigError, match=message):
        MemoryFamilyParams(**bad)


def test_parameters_are_the_facts_schema():
    names = {f for f in MemoryFamilyParams.__dataclass_fields__}
    assert {"n_facts", "n_objects", "value_lr_multiplier", "calibrate_init", "d_model", "n_layers"} <= names
    assert not {"seq_len", "n_people"} & names
    P = MemoryFamilyParams()
    assert P.calibrate_init is True and P.value_lr_multiplier == 10.0
    t = P.train_config()
    assert t.weight_decay == 0.0 and t.value_lr_multiplier == 10.0 and t.seq_len == P.context_len == 5


def test_smoke_shrinks_sizes():
    E = MemoryFamilyParams(smoke=True, capacity_ratios=[40.0, 2.5, 10.0], batch_sizes=[1, 64, 512]).effective()
    assert (E.steps, E.n_seeds, E.n_facts, E.batch_size) == (12, 2, 200, 64)
    assert E.capacity_ratios == [2.5, 10.0] and E.batch_sizes == [1, 8]
    P = MemoryFamilyParams()
    assert P.effective() is P


def test_family_is_at_equal_budget():
    E = MemoryFamilyParams()
    fam = mf.family(E)
    assert list(fam) == list(MEMORY_FAMILY)
    C = E.context_len
    dense = model_budget(fam["dense"], context_len=C)
    for name, cfg in fam.items():
        b = model_budget(cfg, context_len=C)
        assert abs(b.flops_per_token / dense.flops_per_token - 1) <= 0.02, name
        if name != "dense":
            assert abs(b.total_params / ((1 + E.ratio) * dense.total_params) - 1) <= 0.02, name
    assert fam["memory_plus"].plan.shared_values and len(fam["memory_plus"].plan.placements) == 2
    assert fam["ultramem"].plan.memory.expansion == 1


def test_memory_size_counts_value_rows():
    fam = mf.family(MemoryFamilyParams())
    assert mf.memory_size(fam["dense"]) == 0 and mf.memory_size(fam["moe"]) == 0
    assert mf.memory_size(fam["pkm"]) == fam["pkm"].plan.memory.n_keys ** 2
    # Memory+: two memories, one shared pool counted once; UltraMemV2: one table per block
    assert mf.memory_size(fam["memory_plus"]) == fam["memory_plus"].plan.memory.n_keys ** 2
    v2 = fam["ultramem_v2"]
    assert mf.memory_size(v2) == len(v2.plan.placements) * v2.plan.memory.n_keys ** 2


def test_capacity_models_grow_the_memory_at_equal_flops():
    E = MemoryFamilyParams(capacity_ratios=[2.5, 10.0, 40.0])
    caps = mf.capacity_models(E)
    assert sorted(caps) == [("pkm", 2.5), ("pkm", 40.0), ("ultramem", 2.5), ("ultramem", 40.0)]  # 10 = family
    fam = mf.family(E)
    C = E.context_len
    f0 = model_budget(fam["dense"], context_len=C).flops_per_token
    for arch in ("pkm", "ultramem"):
        sizes = [mf.memory_size(caps[(arch, 2.5)]), mf.memory_size(fam[arch]), mf.memory_size(caps[(arch, 40.0)])]
        assert sizes == sorted(sizes) and sizes[2] > 10 * sizes[0]
        # the same reads per token at every size: a larger table, not more activation
        reads = {mf.memory_reads(c)[1] for c in (caps[(arch, 2.5)], fam[arch], caps[(arch, 40.0)])}
        assert len(reads) == 1
        for cfg in (caps[(arch, 2.5)], caps[(arch, 40.0)]):
            assert abs(model_budget(cfg, context_len=C).flops_per_token / f0 - 1) <= 0.02


def test_variants_tag_the_arms_and_hold_flops_equal():
    E = MemoryFamilyParams()
    arms = mf.variants(E)
    names = [v.name for v in arms]
    assert names == [*MEMORY_FAMILY, "pkm x2.5", "pkm x40", "ultramem x2.5", "ultramem x40"]
    by = {v.name: v for v in arms}
    assert by["dense"].tags == {"arch": "dense", "ratio": 0.0, "role": "family"}
    assert by["pkm x40"].tags == {"arch": "pkm", "ratio": 40.0, "role": "capacity"}
    # every arm trains with the shared config (value LR, no decay) and is calibrated, PEER included
    assert all(not v.train_overrides for v in arms)
    assert mf.UNCALIBRATED == {} and all(v.calibrate is None for v in arms)
    f0 = model_budget(by["dense"].model, context_len=E.context_len).flops_per_token
    for v in arms:
        assert abs(model_budget(v.model, context_len=E.context_len).flops_per_token / f0 - 1) <= 0.02, v.name


# ----------------------------------------------------------------------------------------------
# Tables on a hand-built run table.
# ----------------------------------------------------------------------------------------------

ACC = {"dense": [0.20, 0.25, 0.22], "moe": [0.30, 0.33, 0.31], "pkm": [0.80, 0.86, 0.83],
       "ultramem": [0.60, 0.64, 0.61]}


def _table() -> pd.DataFrame:
    rows = []
    for v, xs in ACC.items():
        for s, x in enumerate(xs):
            mem = v in ("pkm", "ultramem")
            rows.append({"variant": v, "arch": v, "ratio": 0.0 if v == "dense" else 10.0, "role": "family",
                         "seed": s, "answer_accuracy": x, "answer_loss": 5 - 4 * x, "stored_kbit": 6 * x,
                         "total_params": 100 if v == "dense" else 1100, "flops_per_token": 50,
                         "n_values": 400 if mem else 0, "coverage": 0.5 if mem else np.nan,
                         "kl_uniform": 1.0 if mem else np.nan, "output_std": 0.1 if mem else np.nan,
                         "init_std": 0.001 if mem else np.nan, "init_std_before": 0.05 if mem else np.nan,
                         "init_target": 0.001 if mem else np.nan,
                         "train_reads_per_row": 300.0 if mem else np.nan})
    return pd.DataFrame(rows)


def test_family_deltas_are_paired_by_seed():
    t = _table()
    order = list(ACC)
    d = mf.family_deltas(t, order).set_index("variant")
    assert list(d.index) == ["moe", "pkm", "ultramem"] and set(d["reference"]) == {"dense"}
    diff = np.array(ACC["pkm"]) - np.array(ACC["dense"])
    assert d.at["pkm", "delta_mean"] == pytest.approx(diff.mean())
    half = 4.302653 * diff.std(ddof=1) / math.sqrt(3)          # t(0.975, 2) = 4.303
    assert d.at["pkm", "ci_low"] == pytest.approx(diff.mean() - half, rel=1e-5)
    assert d.at["pkm", "verdict"].startswith("resolved: pkm better than dense")
    assert np.isfinite(d["resolution"]).all() and (d["resolution"] > 0).all()
    vs_moe = mf.family_deltas(t, order, baseline="moe")
    assert vs_moe["variant"].tolist() == ["pkm", "ultramem"] and set(vs_moe["reference"]) == {"moe"}
    loss = mf.family_deltas(t, order, "answer_loss").set_index("variant")
    assert loss.at["pkm", "delta_mean"] == pytest.approx(-4 * diff.mean())
    assert loss.at["pkm", "verdict"].startswith("resolved: pkm better")   # lower loss is better
    with pytest.raises(ConfigError, match="baseline"):
        mf.family_deltas(t, ["dense", "pkm"], baseline="moe")


def test_family_and_init_tables(monkeypatch):
    monkeypatch.setattr(mf, "UNCALIBRATED", {"peer": "a memory the calibration could not rescale"})
    t = _table()
    fam = mf.family_table(t, list(ACC)).set_index("architecture")
    assert fam.at["pkm", "answer_accuracy"] == pytest.approx(np.mean(ACC["pkm"]))
    assert fam.at["pkm", "seeds"] == 3 and fam.at["pkm", "n_values"] == 400
    peer = t[t["variant"] == "pkm"].assign(variant="peer", arch="peer", init_std=0.05)
    init = mf.init_table(pd.concat([t, peer], ignore_index=True)).set_index("variant")
    assert list(init.index) == ["pkm", "ultramem", "peer"]               # memories only
    assert init.at["pkm", "step0_over_target"] == pytest.approx(1.0) and init.at["pkm", "calibrated"]
    assert init.at["peer", "step0_over_target"] == pytest.approx(50.0) and not init.at["peer", "calibrated"]


def _curve(slope: float, noise: float) -> pd.DataFrame:
    """PKM at N = 100, 400, 1600 (log2 steps of 2): stored = 1 + slope * log2(N / 100) + seed noise."""
    rows = []
    for s in range(3):
        for i, n in enumerate((100, 400, 1600)):
            rows.append({"variant": f"pkm x{i}", "arch": "pkm", "ratio": float(i), "seed": s, "n_values": n,
                         "stored_kbit": 1 + slope * 2 * i + noise * (s - 1) * (i - 1),
                         "answer_accuracy": 0.3 + 0.1 * i, "coverage": 0.9 / (i + 1), "kl_uniform": 1.0 + i,
                         "output_std": 0.1, "init_std": 0.001, "train_reads_per_row": 1000 / 4 ** i})
    return pd.DataFrame(rows)


def test_capacity_slopes_fit_per_seed():
    s = mf.capacity_slopes(_curve(0.5, 0.0), ["pkm"]).iloc[0]
    assert s["slope_per_doubling"] == pytest.approx(0.5) and s["verdict"] == "grows"
    assert (s["n_min"], s["n_max"], s["seeds"], s["n_sizes"]) == (100, 1600, 3, 3)
    assert s["coverage_at_max"] == pytest.approx(0.3) and s["reads_per_row_at_max"] == pytest.approx(1000 / 16)
    flat = mf.capacity_slopes(_curve(0.0, 0.3), ["pkm"]).iloc[0]
    assert flat["slope_per_doubling"] == pytest.approx(0.0, abs=1e-9) and flat["verdict"] == "not resolved"
    assert mf.capacity_slopes(_curve(0.5, 0.0), ["ultramem"]).empty     # no sizes of that memory


def test_capacity_table_marks_the_references():
    t = pd.concat([_table(), _curve(0.5, 0.0).assign(answer_loss=1.0)], ignore_index=True)
    cap = mf.capacity_table(t, ["pkm"])
    refs = cap[cap["reference"]]
    assert refs["arch"].tolist() == ["dense", "moe"]
    mem = cap[~cap["reference"]]
    assert mem["n_values"].tolist() == sorted(mem["n_values"]) and len(mem) == 4   # 3 curve points + family
    assert cap.loc[cap["arch"] == "moe", "stored_kbit_mean"].item() == pytest.approx(6 * np.mean(ACC["moe"]))


def _inference() -> pd.DataFrame:
    return pd.DataFrame({"model": ["moe", "moe", "pkm", "pkm"], "scope": "layer", "batch": [1, 64, 1, 64],
                         "latency_s": [4e-3, 8e-3, 1e-3, 2e-3], "bytes_accessed": [1000.0, 6400.0, 300.0, 3200.0],
                         "bytes_predicted": [1000.0, 6000.0, 300.0, 3000.0]})


def test_inference_table_divides_by_the_batch():
    c = mf.inference_table(_inference())
    assert c["bytes_per_token"].tolist() == [1000.0, 100.0, 300.0, 50.0]
    assert c["latency_ms"].tolist() == pytest.approx([4.0, 8.0, 1.0, 2.0])
    assert c["us_per_token"].tolist() == pytest.approx([4000.0, 125.0, 1000.0, 31.25])


def test_claims_table_reads_the_run():
    t = _table()
    inf = pd.concat([_inference(), _inference().query("model == 'pkm'").assign(model="ultramem")])
    claims = mf.claims_table(t, inf, ["dense", "moe", "pkm", "ultramem"]).set_index("architecture")
    assert list(claims.index) == ["moe", "pkm", "ultramem"]
    assert "4.00x at B=1, 4.00x at B=64" in claims.at["ultramem", "lab"]
    d = 6 * (np.mean(ACC["pkm"]) - np.mean(ACC["dense"]))
    assert claims.at["pkm", "lab"].startswith(f"Δ stored_kbit vs dense = {d:+.3g}")
    assert "2411.12364" in claims.at["ultramem", "source"]


# ----------------------------------------------------------------------------------------------
# Teaching.
# ----------------------------------------------------------------------------------------------


def test_tiny_forward_is_the_layer_written_out():
    df = mf.tiny_forward(seed=3)
    steps = df.set_index("tensor")
    assert steps.at["x", "shape"] == (1, 8)
    assert steps.at["q", "shape"] == (1, 1, 2, 2)                # H = 1, two halves of D_k / 2 = 2
    assert steps.at["s_row, s_col", "shape"] == (1, 1, 2, 4)     # n = 4 sub-keys per side
    assert steps.at["I", "shape"] == (1, 1, 2) and steps.at["V[I]", "shape"] == (2, 8)
    # the hand-written weighted sum equals the layer's own forward
    assert df["values"].iloc[-2] == df["values"].iloc[-1]
    slots = [int(x) for x in steps.at["I", "values"].strip("[]").split(",")]
    assert all(0 <= s < 16 for s in slots) and len(set(slots)) == 2
    torch.manual_seed(0)
    assert mf.tiny_forward(seed=3).equals(df)                    # seeded: the same every time


def _result(deltas_acc: dict, slope: float, acc_min: float, cov: tuple[float, float]) -> mf.MemoryFamilyResult:
    t = _table()
    for v, x in deltas_acc.items():
        t.loc[t["variant"] == v, "answer_accuracy"] = np.array(ACC["dense"]) + x + np.array([0.0, 0.01, -0.01])
    order = list(ACC)
    curve = _curve(slope, 0.2 if slope == 0 else 0.0)
    curve["answer_accuracy"] = [acc_min + 0.01 * i for i in range(len(curve))]
    curve["coverage"] = np.tile([cov[0], (cov[0] + cov[1]) / 2, cov[1]], 3)
    return mf.MemoryFamilyResult(table=t, deltas=mf.family_deltas(t, order),
                                 deltas_vs_moe=mf.family_deltas(t, order, baseline="moe"),
                                 family=mf.family_table(t, order), slopes=mf.capacity_slopes(curve, ["pkm"]))


def test_interpret_reads_the_numbers():
    r = _result({"pkm": 0.6, "ultramem": 0.4, "moe": 0.0}, slope=0.5, acc_min=0.5, cov=(0.9, 0.8))
    text = mf.interpret(r)
    pkm = r.deltas.set_index("variant").loc["pkm"]
    assert f"pkm {pkm['delta_mean']:+.3f}" in text and f"resolution {pkm['resolution']:.3f}" in text
    assert "2 of 3 sparse models are resolved above dense (pkm, ultramem)" in text
    assert "moe inside seed noise" in text
    assert "+0.5 kbit per doubling of N" in text and "speed as much as capacity" in text
    assert "direction only" in text


def test_interpret_explains_a_flat_curve():
    r = _result({"pkm": 0.78, "ultramem": 0.4, "moe": 0.1}, slope=0.0, acc_min=0.5, cov=(0.9, 0.2))
    text = mf.interpret(r)
    assert "not resolved" in text and "coverage 0.90 -> 0.20" in text
    assert "never read" in text                                   # coverage fell by more than half
    assert "pkm answer(s) nearly every fact" in text              # 0.22 + 0.78 = 1.0: the ceiling is named
    r = _result({"pkm": 0.6, "ultramem": 0.4, "moe": 0.1}, slope=0.0, acc_min=0.97, cov=(0.9, 0.8))
    assert "the task, not the memory, is the limit" in mf.interpret(r)
