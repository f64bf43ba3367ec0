"""04_architectures on the facts task: what the arms hold equal, the tiny forward, interpret(),
the exercises and a smoke run."""

import json

import numpy as np
import pandas as pd
import pytest

from labcore import exercises
from labcore.config import ConfigError
from labcore.experiments import architectures as A
from labcore.experiments.params import ArchitecturesParams
from labcore.lm.budget import model_budget
from labcore.lm.model import LM
from labcore.profiling.cost_model import expected_distinct, layer_step_cost


@pytest.fixture(scope="module")
def fam():
    return A.family(ArchitecturesParams())


def test_params_defaults_and_bad_values():
    P = ArchitecturesParams()
    assert (P.ratio, P.n_facts, P.steps, P.value_lr_multiplier, P.calibrate_init) == (10.0, 1000, 300, 10.0, True)
    with pytest.raises(ConfigError, match=r"ArchitecturesParams.ratio=0.1 is not allowed: must be a finite number in \[0.5"):
        ArchitecturesParams(ratio=0.1)
    with pytest.raises(ConfigError, match=r"ArchitecturesParams.batch_sizes=\[0\] is not allowed"):
        ArchitecturesParams(batch_sizes=[0])
    with pytest.raises(ConfigError, match="n_facts=1001 is not allowed: must be a multiple of 4"):
        ArchitecturesParams(n_facts=1001)


def test_arms_are_at_equal_activated_flops_and_equal_total_params(fam):
    P = ArchitecturesParams()
    assert list(fam) == list(A.ARMS)
    b = {k: model_budget(c, context_len=P.context_len) for k, c in fam.items()}
    dense = b["dense"]
    for name in A.ARMS:
        assert abs(b[name].flops_per_token / dense.flops_per_token - 1) <= 0.02, name
    target = (1 + P.ratio) * dense.total_params
    for name in A.ARMS[1:]:
        assert abs(b[name].total_params / target - 1) <= 0.02, name
    # the two PKM placements have exactly the same parameters (the search moves the freed FFN into the other block)
    assert abs(b["pkm_replaces_ffn"].total_params / b["pkm"].total_params - 1) <= 0.02


def test_pkm_replacing_ffn_removes_the_ffn_of_its_block(fam):
    rep, par = fam["pkm_replaces_ffn"], fam["pkm"]
    assert rep.plan.memory_replaces_ffn and not par.plan.memory_replaces_ffn
    assert rep.plan.placements == par.plan.placements == ("1:1",)
    blocks = LM(rep).blocks
    assert blocks[1].ffn is None and blocks[0].ffn is not None
    assert rep.d_ff > par.d_ff   # the freed FLOPs widen the remaining FFN


def test_confound_switches_in_every_arm(fam):
    assert fam["moe"].plan.moe_aux_reduction == "mean"
    um = fam["ultramem"].plan.memory
    assert (um.scoring, um.rank, um.n_cores, um.expansion, um.value_proj) == ("tucker", 2, 2, 1, False)
    vs = A.arm_variants(fam)
    assert [v.name for v in vs] == list(A.ARMS)
    assert all(not v.train_overrides and v.calibrate is None for v in vs)  # one shared train config
    cfg = ArchitecturesParams().train_config()
    assert cfg.value_lr_multiplier == 10.0 and cfg.weight_decay == 0.0


def test_budget_table_reports_what_is_equal(fam):
    t = A.budget_table(fam, ArchitecturesParams().context_len).set_index("architecture")
    assert t["flops_vs_dense"].between(0.98, 1.02).all()
    assert t.loc["dense", "n_values"] == 0 and t.loc["pkm", "n_values"] == fam["pkm"].plan.memory.n_keys ** 2
    assert t.loc["pkm", "value_rows_read_per_token"] == fam["pkm"].plan.memory.heads * fam["pkm"].plan.memory.top_k
    assert t.loc["pkm_replaces_ffn", "placement"] == "1:1 (replaces FFN)" and t.loc["moe", "moe_aux_reduction"] == "mean"


def test_tiny_forward_shapes():
    t = A.tiny_forward(seed=3, d_model=8, tokens=3)
    shapes = {(r.layer, r.step): r.shape for r in t.itertuples()}
    assert shapes[("MoE", "router logits x W_r^T")] == (3, 4)
    assert shapes[("PKM", "grid s_row[i] + s_col[j]")] == (3, 16)
    assert shapes[("PKM", "rows read V[slots]")] == (3, 2, 8)
    assert shapes[("PKM", "y = sum_k w_k V[slot_k]")] == (3, 8)


def _synthetic():
    rng = np.random.default_rng(0)
    means = {"dense": 0.30, "moe": 0.50, "pkm": 0.99, "pkm_replaces_ffn": 0.995, "ultramem": 0.99}
    rows = [{"variant": v, "seed": s, "answer_accuracy": m + 0.01 * rng.standard_normal() if m < 0.9 else m,
             "stored_kbit": 10 * m} for v, m in means.items() for s in range(3)]
    table = pd.DataFrame(rows)
    from labcore.experiments.core import paired_deltas

    d = paired_deltas(table, "answer_accuracy", baseline="dense", higher_is_better=True)
    m = paired_deltas(table[table["variant"] != "dense"], "answer_accuracy", baseline="moe", higher_is_better=True)

    class R:
        pass

    r = R()
    r.table, r.deltas, r.vs_moe = table, d, m
    return r


def test_interpret_reads_the_tables():
    text = A.interpret(_synthetic())
    assert "Dense reached 0.30" in text and "still far from its ceiling" in text
    assert "pkm - dense: +68.8 points" in text and "resolved" in text
    assert "store(s) more facts than MoE" in text
    assert "Placement: PKM replacing the FFN" in text and "+0.5 points" in text
    assert "sit at the ceiling" in text


def test_exercises_right_and_wrong(fam):
    moe = fam["moe"].plan.moe
    right = expected_distinct(moe.n_experts, moe.top_k, 16)
    assert exercises.check("04.1", right) and not exercises.check("04.1", 2 * right)
    b_moe = layer_step_cost(moe.cost(), 64).bytes_total
    b_um = layer_step_cost(fam["ultramem"].plan.memory.cost(), 64).bytes_total
    fewer = "moe" if b_moe < b_um else "ultramem"
    assert exercises.check("04.2", fewer) and not exercises.check("04.2", {"moe": "ultramem", "ultramem": "moe"}[fewer])
    dense = model_budget(fam["dense"], context_len=ArchitecturesParams().context_len).total_params
    assert exercises.check("04.3", 11 * dense) and not exercises.check("04.3", dense)
    for i in ("04.1", "04.3"):
        with pytest.raises(ConfigError, match="must be a finite number"):
            exercises.check(i, "many")
    with pytest.raises(ConfigError, match="must be one of"):
        exercises.check("04.2", 3)
    assert not exercises.check("04.1", ...)
    assert [e.id for e in exercises.exercises_for("04")] == ["04.1", "04.2", "04.3"]


def test_smoke_run(tmp_path):
    P = ArchitecturesParams(smoke=True, out_dir=str(tmp_path / "run"), n_seeds=2, batch_sizes=[1, 4], device="cpu")
    r = A.run(P)
    assert list(dict.fromkeys(r.table["variant"])) == list(A.ARMS) and len(r.table) == 2 * len(A.ARMS)
    assert r.table["answer_accuracy"].between(0, 1).all() and np.isfinite(r.table["answer_loss"]).all()
    assert list(r.deltas["variant"]) == list(A.ARMS[1:]) and set(r.deltas["reference"]) == {"dense"}
    assert list(r.vs_moe["variant"]) == ["pkm", "pkm_replaces_ffn", "ultramem"]
    # every memory starts calibrated to the FFN output std
    assert np.allclose(r.init["init_std"], r.init["init_target"], rtol=0.01)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "done"
    keys = sorted(p.name for p in (tmp_path / "run").rglob("*") if "deltas_vs_dense" in p.name)
    assert keys and keys[0].startswith("1_")   # the headline is the first key table
    assert isinstance(A.interpret(r), str)
