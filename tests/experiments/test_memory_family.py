"""labcore.experiments.memory_family: the family's sizing, the parameter checks and the tables, on
hand-built inputs whose answers are known."""

import math

import numpy as np
import pandas as pd
import pytest

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
    (dict(ratio=100.0), "ratio"),
])
def test_bad_parameters_name_themselves(bad, message):
    with pytest.raises(ConfigError, match=message):
        MemoryFamilyParams(**bad)


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
    C = mf.context_len(E)
    assert C == 5  # BOS, 3 subject symbols, relation word (the answer is the target)
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
    C = mf.context_len(E)
    f0 = model_budget(fam["dense"], context_len=C).flops_per_token
    for arch in ("pkm", "ultramem"):
        sizes = [mf.memory_size(caps[(arch, 2.5)]), mf.memory_size(fam[arch]), mf.memory_size(caps[(arch, 40.0)])]
        assert sizes == sorted(sizes) and sizes[2] > 10 * sizes[0]
        for cfg in (caps[(arch, 2.5)], caps[(arch, 40.0)]):
            assert abs(model_budget(cfg, context_len=C).flops_per_token / f0 - 1) <= 0.02


def _table() -> pd.DataFrame:
    rows = []
    stored = {"dense": [1.0, 1.2, 1.1], "moe": [1.5, 1.4, 1.6], "pkm": [2.0, 2.3, 2.1]}
    for v, xs in stored.items():
        for s, x in enumerate(xs):
            rows.append({"variant": v, "arch": v, "ratio": 0.0 if v == "dense" else 10.0, "seed": s,
                         "stored_kbit": x, "answer_accuracy": x / 4, "answer_loss": 4 - x,
                         "total_params": 100 if v == "dense" else 1100, "flops_per_token": 50,
                         "n_values": 400 if v == "pkm" else 0})
    return pd.DataFrame(rows)


def test_headline_table_means_intervals_and_paired_differences():
    h = mf.headline_table(_table(), ["dense", "moe", "pkm"]).set_index("architecture")
    assert h.at["pkm", "stored_kbit"] == pytest.approx(6.4 / 3)
    sd = np.std([2.0, 2.3, 2.1], ddof=1)
    assert h.at["pkm", "stored_kbit_ci95"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-4)  # t table 4.303
    d = np.array([2.0, 2.3, 2.1]) - np.array([1.0, 1.2, 1.1])
    assert h.at["pkm", "d_stored_kbit_vs_dense"] == pytest.approx(d.mean())
    half = 4.302653 * d.std(ddof=1) / math.sqrt(3)
    assert h.at["pkm", "d_ci_low"] == pytest.approx(d.mean() - half, rel=1e-5)
    assert h.at["pkm", "verdict"].startswith("resolved: pkm better than dense")
    assert h.at["dense", "verdict"] == "reference" and h.at["dense", "seeds"] == 3


def test_capacity_table_groups_by_arch_and_ratio():
    cap = mf.capacity_table(_table())
    assert cap[["arch", "ratio"]].values.tolist() == [["dense", 0.0], ["moe", 10.0], ["pkm", 10.0]]
    assert cap.loc[cap["arch"] == "moe", "stored_kbit_mean"].item() == pytest.approx(1.5)


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
    ult = t[t["variant"] == "pkm"].assign(variant="ultramem", arch="ultramem")
    t = pd.concat([t, ult], ignore_index=True)
    inf = pd.concat([_inference(), _inference().query("model == 'pkm'").assign(model="ultramem")])
    claims = mf.claims_table(t, inf, ["dense", "moe", "pkm", "ultramem"]).set_index("architecture")
    assert list(claims.index) == ["moe", "pkm", "ultramem"]
    assert "4.00x at B=1, 4.00x at B=64" in claims.at["ultramem", "lab"]
    assert claims.at["pkm", "lab"].startswith("Δ stored_kbit vs dense = +1.03")
    assert "2411.12364" in claims.at["ultramem", "source"]


def test_train_cell_row(tmp_path):
    E = MemoryFamilyParams(smoke=True, device="cpu").effective()
    cfg = mf.family(E)["pkm"]
    logged = []
    row = mf.train_cell("pkm", "pkm", cfg, E, 0, ratio=E.ratio, log=logged.append)
    load = E.n_facts * math.log2(E.n_objects)
    assert row["variant"] == "pkm" and row["seed"] == 0 and row["n_values"] == cfg.plan.memory.n_keys ** 2
    assert 0.0 <= row["stored_bits"] <= load and 0.0 <= row["answer_accuracy"] <= 1.0
    assert row["exposures_per_fact"] == E.steps * E.batch_size / E.n_facts
    assert logged[-1]["kind"] == "final" and all(r["variant"] == "pkm" for r in logged)
