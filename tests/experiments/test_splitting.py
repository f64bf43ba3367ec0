"""02_layer_splitting: the split keeps total and activated values equal, the arms are what the
notebook says, interpret() reads a table, the exercises check, and a smoke run writes its outputs."""

import json
import types

import numpy as np
import pandas as pd
import pytest
from experimenthelpers import assert_exercise_checks, synthetic_facts_table

from labcore import exercises
from labcore.config import ConfigError
from labcore.experiments import splitting
from labcore.experiments.splitting import SplittingParams, analyse, held_equal, interpret, split_variants
from labcore.lm.budget import model_budget
from labcore.lm.model import LM


def test_params_defaults_and_rules():
    P = SplittingParams()
    assert (P.n_layers, P.total_values, P.top_k, P.splits, P.spans) == (4, 9216, 32, [1, 4], [0])
    smoke = SplittingParams(smoke=True).effective()
    assert smoke.n_layers == 4 and smoke.steps <= 12 and smoke.n_seeds <= 2   # the depth survives smoke
    for kw, msg in [({"splits": [4]}, "must include 1"),
                    ({"splits": [1, 3]}, "9216/3 is not a perfect square"),
                    ({"top_k": 30}, "top_k must be divisible by every S"),
                    ({"total_values": 64, "top_k": 16}, "8 keys per side < top_k/S = 16"),
                    ({"n_layers": 2}, "n_layers=2 is not allowed"),
                    ({"same_block": 1}, "same_block=1 is not allowed: must be True or False")]:
        with pytest.raises(ConfigError, match=msg):
            SplittingParams(**kw)


def test_split_arms_hold_total_and_activated_values_equal():
    P = SplittingParams(spans=[0, 1])
    vs = split_variants(P)
    assert [v.name for v in vs] == ["S=1", "S=4 same block", "S=4 depth span 0", "S=4 depth span 1"]
    budgets = [model_budget(v.model, context_len=P.context_len) for v in vs]
    # equal total values (value parameters) and equal values read per token (bytes of values touched)
    assert {b.sparse_params for b in budgets} == {9216 * P.d_model}
    assert {b.sparse_bytes_per_token for b in budgets} == {budgets[0].dtype_bytes * 2 * 32 * P.d_model}
    for v in vs:
        m, S = v.model.plan.memory, len(v.model.plan.placements)
        assert S * m.n_keys ** 2 == 9216 and S * m.heads * m.top_k == 2 * 32     # the rule, stated per arm
        assert (v.model.d_ff, v.model.n_layers) == (4 * P.d_model, 4)             # the trunk is the same
    assert vs[0].model.plan.placements == ("1:1",)
    assert vs[1].model.plan.placements == ("1:1",) * 4                          # the split alone, same block
    assert vs[2].model.plan.placements == ("0:0", "1:1", "2:2", "3:3")          # one per block
    assert all(int(p.split(":")[1]) - int(p.split(":")[0]) == 1 for p in vs[3].model.plan.placements)
    # what is NOT equal: the split memories' own queries and keys add parameters and FLOPs, in the memory only
    for b in budgets[1:]:
        assert b.total_params > budgets[0].total_params and b.flops_per_token > budgets[0].flops_per_token
        assert b.flops_by_part["ffn"] == budgets[0].flops_by_part["ffn"]
    assert [v.name for v in split_variants(SplittingParams(same_block=False))] == ["S=1", "S=4 depth span 0"]
    LM(vs[3].model)  # buildable


def test_held_equal_table():
    P = SplittingParams()
    t = held_equal(split_variants(P), P.context_len).set_index("variant")
    assert (t["values_total"] == 9216).all() and (t["values_read_per_token"] == 64).all()
    assert list(t["values_per_memory"]) == [9216, 2304, 2304] and list(t["top_k_per_head"]) == [32, 8, 8]
    assert t.loc["S=1", "flops_vs_S1"] == 0 and 0 < t.loc["S=4 same block", "flops_vs_S1"] < 0.1


def test_tiny_forward_counts_equal_on_both_sides():
    df = splitting.tiny_forward(n_keys=8, splits=4, top_k=4)
    stored = df[df["tensor"] == "values stored, all memories"]["shape"].tolist()
    read = df[df["tensor"] == "values read per token, all memories"]["shape"].tolist()
    assert stored == ["64", "64"] and read == ["8", "8"]
    slots = df[df["tensor"] == "slots (aux.indices)"]["shape"].tolist()
    assert slots == ["(3, 8)", "(3, 2)"]                    # 2 heads x 4, then 2 heads x 1 per memory
    assert set(df.columns) == {"step", "tensor", "shape", "meaning"}


def _synthetic(effects: dict[str, float], sd: float, n: int = 4, base: float = 0.5) -> pd.DataFrame:
    return synthetic_facts_table(effects, sd, n=n, base=base, rng_seed=0, coverage=0.5)


def test_interpret_reads_the_numbers():
    t = _synthetic({"S=1": 0.0, "S=4 same block": 0.3, "S=4 depth span 0": -0.4}, sd=0.01)
    a = analyse(t)
    assert list(a["deltas"]["variant"]) == ["S=4 same block", "S=4 depth span 0"]
    assert a["deltas"].set_index("variant")["paper_delta"].isna().tolist() == [True, False]   # paper on depth only
    text = interpret(types.SimpleNamespace(**a))
    r = a["accuracy_deltas"].set_index("variant")
    assert f"S=4 same block: {100 * r.loc['S=4 same block', 'delta_mean']:+.1f} accuracy points" in text
    assert "more facts answered (resolved)" in text and "fewer facts answered (resolved)" in text
    assert "side by side than spread over the depth" in text and "the direction is opposite" in text
    noisy = interpret(types.SimpleNamespace(**analyse(_synthetic(
        {"S=1": 0.0, "S=4 same block": 0.01, "S=4 depth span 0": -0.01}, sd=0.2))))
    assert "Not resolved at n = 4 seeds" in noisy and "opposite" not in noisy
    ceiling = interpret(types.SimpleNamespace(**analyse(_synthetic({"S=1": 0.0, "S=4 same block": 0.0}, 0.01,
                                                                   base=0.99))))
    assert "at the ceiling" in ceiling


@pytest.mark.parametrize("ex, right, wrong", [("02.1", (2304, 8), (2304, 32)), ("02.2", 4, 1),
                                              ("02.3", "split", "equal")])
def test_exercises_check_right_and_wrong(ex, right, wrong):
    assert_exercise_checks(ex, right, wrong)


def test_exercises_reject_the_wrong_type():
    for ex, bad in [("02.1", 2304), ("02.2", "four"), ("02.3", 3)]:
        with pytest.raises(ConfigError, match=f"exercise {ex}"):
            exercises.check(ex, bad)
    assert not exercises.check("02.1", ...).right


def test_smoke_run_writes_headline_first(tmp_path):
    P = SplittingParams(smoke=True, out_dir=str(tmp_path / "run"), batch_sizes=[1, 2])
    r = splitting.run(P)
    assert len(r.table) == 3 * 2 and list(dict.fromkeys(r.table["variant"])) == [
        "S=1", "S=4 same block", "S=4 depth span 0"]
    assert r.table["answer_accuracy"].between(0, 1).all() and np.isfinite(r.table["answer_loss"]).all()
    assert np.allclose(r.init["init_std"], r.init["init_target"], rtol=1e-3)   # calibrated in every arm
    out = tmp_path / "run"
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    tables = sorted(p.name for p in (out / "tables").glob("*.parquet"))
    assert tables[0] == "1_deltas.parquet"
    first = pd.read_parquet(out / "tables" / "1_deltas.parquet")
    assert {"variant", "reference", "delta_mean", "resolution"} <= set(first.columns)
    assert (first["metric"] == "answer_loss").all()
    assert set(r.cost["batch_size"]) == {1, 2} and (r.cost["latency_ms"] > 0).all()
    assert next(iter(r.figures)) == "answer_loss_deltas"
