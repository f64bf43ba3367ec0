"""03_virtual_memory: equal physical values across the IVE arms, what grows with E, the references,
interpret() on a synthetic table, the exercises, and a smoke run."""

import json
import types

import numpy as np
import pandas as pd
import pytest
from experimenthelpers import assert_exercise_checks, synthetic_facts_table

from labcore import exercises
from labcore.config import ConfigError
from labcore.experiments import virtual_memory
from labcore.experiments.virtual_memory import (
    VirtualMemoryParams,
    analyse,
    held_equal,
    interpret,
    ive_variants,
)
from labcore.lm.budget import model_budget


def test_params_defaults_and_rules():
    P = VirtualMemoryParams()
    assert (P.n_keys, P.top_k, P.d_value, P.expansions, P.references) == (64, 16, 16, [1, 4], ["full_width"])
    for kw, msg in [({"expansions": [1, 8]}, "must list perfect squares"), ({"expansions": [4]}, "including 1"),
                    ({"d_value": 15}, "must be even"), ({"references": ["full_width", "full_width"]}, "distinct"),
                    ({"top_k": 65}, "top_k=65 is not allowed")]:
        with pytest.raises(ConfigError, match=msg):
            VirtualMemoryParams(**kw)


def test_ive_arms_hold_physical_values_equal_and_grow_virtual_rows():
    P = VirtualMemoryParams(expansions=[1, 4, 9], references=["full_width", "full_width_proj"])
    vs = ive_variants(P)
    assert [v.name for v in vs] == ["E=1", "E=4", "E=9", "E=1 d_v=D", "E=1 d_v=D +proj"]
    mems = {v.name: v.model.plan.memory for v in vs}
    ive = [mems[n] for n in ("E=1", "E=4", "E=9")]
    costs = [m.cost() for m in ive]
    assert {c.params["values"] for c in costs} == {64 * 64 * 16}                  # same physical values
    assert {c.units_per_token for c in costs} == {2 * 16}                        # same rows read per token
    assert [m.n_virtual for m in ive] == [4096, 4 * 4096, 9 * 4096]               # virtual rows grow E-fold
    assert [m.n_side for m in ive] == [64, 128, 192]                             # keys per side grow sqrt(E)
    assert costs[2].params["value_proj"] > costs[1].params["value_proj"] > costs[0].params["value_proj"]
    assert {c.params["query"] for c in costs} == {costs[0].params["query"]}       # the query does not change
    budgets = [model_budget(v.model, context_len=P.context_len) for v in vs[:3]]
    assert budgets[2].flops_per_token > budgets[1].flops_per_token > budgets[0].flops_per_token
    assert {b.sparse_params for b in budgets} == {64 * 64 * 16}
    # references: full-width values, E = 1; with and without the projection
    assert (mems["E=1 d_v=D"].d_v, mems["E=1 d_v=D"].value_proj) == (P.d_model, False)
    assert (mems["E=1 d_v=D +proj"].d_v, mems["E=1 d_v=D +proj"].value_proj) == (P.d_model, True)
    assert {v.model.plan.placements for v in vs} == {("1:1",)}                   # same place, same trunk
    assert {v.model.d_ff for v in vs} == {4 * P.d_model}


def test_held_equal_table():
    P = VirtualMemoryParams()
    t = held_equal(ive_variants(P), P.context_len).set_index("variant")
    assert list(t.index) == ["E=1", "E=4", "E=1 d_v=D"]
    assert t.loc["E=1", "physical_values"] == t.loc["E=4", "physical_values"] == 4096
    assert t.loc["E=4", "virtual_values"] == 4 * t.loc["E=1", "virtual_values"]
    assert t.loc["E=1", "value_params"] == t.loc["E=4", "value_params"]
    assert t.loc["E=4", "flops_vs_E1"] > 0


def test_tiny_forward_matches_the_layer():
    df = virtual_memory.tiny_forward().set_index("tensor")
    assert float(df.loc["max |y - y by hand|", "meaning"]) < 1e-5
    assert df.loc["grid", "shape"] == "(8, 8)" and df.loc["pooled", "shape"] == "(2, 4, 4)"
    assert df.loc["values V", "shape"] == "(16, 4)"                              # N = 4^2 physical rows only


def _synthetic(effects: dict[str, float], sd: float, n: int = 4, base: float = 0.5) -> pd.DataFrame:
    return synthetic_facts_table(effects, sd, n=n, base=base, rng_seed=1, coverage=0.4,
                                 extra=lambda v: {"flops_per_token": 1e5 * (1.1 if v == "E=4" else 1)})


def test_interpret_reads_the_numbers():
    a = analyse(_synthetic({"E=1": 0.0, "E=4": 0.2, "E=1 d_v=D": 0.3}, sd=0.01))
    assert list(a["deltas"]["variant"]) == ["E=4"] and a["deltas"]["paper_delta"].tolist() == [-0.017]
    assert list(a["width_deltas"]["variant"]) == ["E=1"] and a["width_deltas"]["reference"].iloc[0] == "E=1 d_v=D"
    text = interpret(types.SimpleNamespace(**a))
    r = a["accuracy_deltas"].iloc[0]
    assert f"E=4 vs E=1: {100 * r['delta_mean']:+.1f} accuracy points (95% CI" in text
    assert "more facts answered (resolved)" in text
    assert "IVE stores more facts" in text and "goes the same way" in text
    assert "not IVE itself" in text                     # half width resolved worse than full width
    assert "E=4 +10.0%" in text                         # the FLOPs line
    noisy = interpret(types.SimpleNamespace(**analyse(_synthetic({"E=1": 0.0, "E=4": 0.0}, sd=0.2))))
    assert "Not resolved at n = 4 seeds" in noisy and "IVE stores more" not in noisy and "not IVE itself" not in noisy


@pytest.mark.parametrize("ex, right, wrong", [("03.1", 4, 9), ("03.2", 128, 64),
                                              ("03.3", {"keys", "value_proj"}, {"values", "keys"}),
                                              ("03.4", 1, 4)])
def test_exercises_check_right_and_wrong(ex, right, wrong):
    assert_exercise_checks(ex, right, wrong)


def test_exercises_reject_the_wrong_type():
    for ex, bad in [("03.1", "four"), ("03.2", 1.5), ("03.3", "keys"), ("03.3", {"weights"}), ("03.4", "1")]:
        with pytest.raises(ConfigError, match=f"exercise {ex}"):
            exercises.check(ex, bad)


def test_smoke_run_writes_headline_first(tmp_path):
    r = virtual_memory.run(VirtualMemoryParams(smoke=True, out_dir=str(tmp_path / "run")))
    assert len(r.table) == 3 * 2 and list(dict.fromkeys(r.table["variant"])) == ["E=1", "E=4", "E=1 d_v=D"]
    assert r.table["answer_accuracy"].between(0, 1).all() and np.isfinite(r.table["stored_kbit"]).all()
    assert np.allclose(r.init["init_std"], r.init["init_target"], rtol=1e-3)
    out = tmp_path / "run"
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    first = pd.read_parquet(out / "tables" / sorted(p.name for p in (out / "tables").glob("*.parquet"))[0])
    assert list(first["variant"]) == ["E=4"] and (first["reference"] == "E=1").all()
    assert (first["metric"] == "answer_loss").all() and "resolution" in first.columns
    assert next(iter(r.figures)) == "answer_loss_deltas"
