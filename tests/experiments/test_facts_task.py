"""08_facts_task: FactsTaskParams validation, the sizes (load, capacity line, steps at equal exposures),
the tables on synthetic runs, interpret(), the exercises, the tiny forward pass and a smoke run()."""

import math

import numpy as np
import pandas as pd
import pytest

from labcore import exercises
from labcore.config import ConfigError
from labcore.experiments import facts_task as ft
from labcore.experiments.facts_task import FactsTaskParams
from labcore.experiments.params import LabParams
from labcore.lm.budget import model_budget
from labcore.lm.model import LM

# -- params -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("fact_counts", [800, 400], "strictly increasing"),
    ("fact_counts", [400], "at least 2"),
    ("fact_counts", [400, 802], "multiples of 4"),
    ("fact_counts", [4, 400], "[8, 400000]"),
    ("d_models", [16, 24], "multiples"),
    ("d_models", [16, 16], "distinct"),
    ("d_models", [], "non-empty"),
    ("exposures", 0, "exposures"),
    ("capacity_bits", 0.0, "capacity_bits"),
    ("eval_points", -1, "eval_points"),
    ("n_seeds", 0, "n_seeds"),
])
def test_params_reject_bad_values_naming_field_and_value(field, value, needle):
    with pytest.raises(ConfigError) as e:
        FactsTaskParams(**{field: value})
    msg = str(e.value)
    assert f"FactsTaskParams.{field}={value!r}" in msg and needle in msg


def test_params_defaults_and_smoke():
    P = FactsTaskParams()
    assert P.d_models == [16] and P.fact_counts == [400, 800, 1600, 3200] and P.n_seeds >= 2
    S = FactsTaskParams(smoke=True, d_models=[16, 32]).effective()
    assert S.fact_counts == [40, 80] and S.d_models == [16, 32] and S.batch_size <= 32 and S.exposures <= 16
    assert P.effective() is P


def test_steps_keep_exposures_per_fact_equal():
    P = FactsTaskParams(exposures=192, batch_size=256)
    assert [P.steps_for(n) for n in (400, 800, 1600, 3200)] == [300, 600, 1200, 2400]
    plan = ft.plan(P)
    assert np.allclose(plan["exposures_per_fact"], 192.0)
    assert (plan["rows"] == plan["steps"] * 256).all()
    assert FactsTaskParams(exposures=1, batch_size=1024).steps_for(8) == 1   # at least one step


# -- sizes --------------------------------------------------------------------------------------

def test_load_and_capacity_from_first_principles():
    assert ft.load_kbit(2000, 128) == pytest.approx(2000 * 7 / 1e3)
    assert ft.load_kbit(400, 32) == pytest.approx(400 * 5 / 1e3)
    with pytest.raises(ConfigError, match="multiple of 4"):
        ft.load_kbit(402)
    assert ft.capacity_kbit(12416, 2.0) == pytest.approx(24.832)
    assert ft.capacity_facts(12416, 2.0, 128) == math.floor(2 * 12416 / 7)
    with pytest.raises(ConfigError, match="n_params"):
        ft.capacity_kbit(0)


def test_trunk_is_dense_and_counted_like_the_lab_default():
    P = FactsTaskParams()
    cfg = ft.trunk(P, 32)
    assert cfg.plan.kind != "memory" and cfg.d_model == 32 and cfg.d_ff == 128 and cfg.n_heads == 2
    base = LabParams().model()
    assert ft.trunk_params(P, 32) == model_budget(base, context_len=5).total_params == 41216
    # by hand: tied embedding V*D; per block attention 4 D^2 + SwiGLU FFN 3 D d_ff + 2 norms; final norm
    D, V = 16, 259
    by_hand = V * D + 2 * (4 * D * D + 3 * D * 4 * D + 2 * D) + D
    assert ft.trunk_params(P, 16) == by_hand == 12416
    assert sum(p.numel() for p in LM(ft.trunk(P, 16)).parameters()) == by_hand


# -- tables on a synthetic run ------------------------------------------------------------------

def _synthetic(plateau_kbit: float = 8.0, noise: float = 0.1, seeds=(0, 1, 2)) -> pd.DataFrame:
    """A D=16 trunk that stores min(load, plateau) kbit (+ seed noise) at loads 400..3200."""
    rng = np.random.default_rng(0)
    rows = []
    for n in (400, 800, 1600, 3200):
        load = n * 7 / 1e3
        for s in seeds:
            stored = min(load, plateau_kbit) + noise * rng.standard_normal()
            rows.append({"variant": ft.variant_name(16, n), "seed": s, "d_model": 16, "n_facts": n,
                         "load_kbit": load, "steps": 3 * n // 4, "exposures_per_fact": 192.0,
                         "total_params": 12416, "stored_kbit": stored, "bits_per_param": stored * 1e3 / 12416,
                         "answer_accuracy": min(1.0, stored / load), "answer_loss": 1.0})
    return pd.DataFrame(rows)


def test_tables_find_the_plateau_of_a_synthetic_trunk():
    t = _synthetic(plateau_kbit=8.0)
    s = ft.summary_table(t)
    assert s["n_facts"].tolist() == [400, 800, 1600, 3200] and (s["n"] == 3).all()
    assert s["stored_kbit_mean"].iloc[0] == pytest.approx(2.8, abs=0.2)
    d = ft.load_deltas(t)
    assert d["variant"].tolist() == ["D=16 800 facts", "D=16 1600 facts", "D=16 3200 facts"]
    assert d["reference"].tolist() == ["D=16 400 facts", "D=16 800 facts", "D=16 1600 facts"]
    assert d["load_added_kbit"].tolist() == pytest.approx([2.8, 5.6, 11.2])
    assert d["delta_mean"].iloc[0] == pytest.approx(2.8, abs=0.3)       # below the plateau: all stored
    assert abs(d["delta_mean"].iloc[-1]) < 0.3                          # on it: nothing more
    assert d["verdict"].iloc[0].startswith("resolved")
    c = ft.capacity_table(s, d, t, capacity_bits=2.0)
    row = c.iloc[0]
    assert bool(row["plateau"]) and row["largest_load"] == 3200 and row["capacity_line_kbit"] == pytest.approx(24.832)
    assert row["stored_kbit"] == pytest.approx(8.0, abs=0.2)
    assert row["bits_per_param"] == pytest.approx(8000 / 12416, abs=0.02)
    assert row["bpp_ci_low"] < row["bits_per_param"] < row["bpp_ci_high"]
    assert row["of_capacity_line"] == pytest.approx(row["stored_kbit"] / 24.832)
    # a trunk that stores everything has no plateau
    t2 = _synthetic(plateau_kbit=100.0)
    s2 = ft.summary_table(t2)
    c2 = ft.capacity_table(s2, ft.load_deltas(t2), t2)
    assert not bool(c2.iloc[0]["plateau"])


def test_last_gain_comes_from_the_learning_curves():
    t = _synthetic()
    hist = []
    for v in t["variant"].unique():
        for s in (0, 1, 2):
            for step, acc in ((10, 0.2), (20, 0.5)):
                hist.append({"kind": "eval", "variant": v, "seed": s, "step": step, "answer_accuracy": acc,
                             "stored_bits": 1000.0})
    hist.append({"kind": "train", "variant": "x", "seed": 0, "step": 5, "answer_accuracy": 0.0})
    c = ft.curves_table(hist, t)
    assert len(c) == 2 * 3 * 4 and set(c.columns) >= {"exposures", "stored_kbit"}
    assert c[c["step"] == 10]["exposures"].iloc[0] == pytest.approx(10 / (3 * 400 // 4) * 192)
    s = ft.summary_table(t, c)
    assert s["last_gain"].tolist() == pytest.approx([0.3] * 4)


def test_interpret_reads_the_numbers_of_the_table():
    t = _synthetic(plateau_kbit=8.0)
    s = ft.summary_table(t)
    c = ft.capacity_table(s, ft.load_deltas(t), t)
    text = ft.interpret(s, c, 2.0)
    assert "D=16 (12,416 parameters): up to 800 facts (5.6 kbit) it stores almost everything" in text
    assert "levelled off" in text and "3200 facts (22.4 kbit)" in text
    assert f"{c.iloc[0]['bits_per_param']:.2f} bits/param" in text and "well below 2" in text
    t2 = _synthetic(plateau_kbit=100.0)
    s2 = ft.summary_table(t2)
    text2 = ft.interpret(s2, ft.capacity_table(s2, ft.load_deltas(t2), t2), 2.0)
    assert "still growing" in text2 and "levelled off" not in text2
    # two trunks: D=32 with 3.3x the parameters storing 3.3x the bits reads as a capacity
    t32 = _synthetic(plateau_kbit=8.0 * 41216 / 12416).assign(
        d_model=32, total_params=41216, variant=lambda d: [ft.variant_name(32, n) for n in d["n_facts"]])
    tt = pd.concat([t, t32], ignore_index=True)
    ss = ft.summary_table(tt)
    cc = ft.capacity_table(ss, ft.load_deltas(tt), tt)
    assert cc["d_model"].tolist() == [16, 32]
    assert "about in proportion" in ft.interpret(ss, cc, 2.0)


# -- the tiny forward pass ----------------------------------------------------------------------

def test_tiny_forward_shapes_and_zero_knowledge_at_init():
    df = ft.tiny_forward()
    shapes = dict(zip(df["step"], df["shape"]))
    assert shapes["facts"] == (2, 4) and shapes["rows"] == (8, 6) and shapes["input"] == (8, 5)
    assert shapes["logits"] == (8, 5, 259) and shapes["answer CE"] == (8,)
    assert df.set_index("step").loc["stored", "value"].startswith("0.00 bits")   # untrained: ~8 bits > log2 8


# -- exercises ----------------------------------------------------------------------------------

@pytest.mark.parametrize("id, right, wrong", [("08.1", 14000, 14), ("08.2", 11776, 82432), ("08.3", 2400, 614400)])
def test_exercises_right_and_wrong(id, right, wrong):
    assert exercises.check(id, right).right
    v = exercises.check(id, wrong)
    assert not v.right and v.why
    assert not exercises.check(id, ...).right
    with pytest.raises(ConfigError, match="must be a finite number"):
        exercises.check(id, "a lot")
    assert exercises.solution(id).strip()


def test_exercise_answers_follow_labcore():
    # the checker's answers are computed, not stored: they agree with the sizes above
    assert exercises.check("08.1", ft.load_kbit(2000, 128) * 1e3).right
    assert exercises.check("08.2", ft.capacity_facts(ft.trunk_params(FactsTaskParams(), 32), 2.0, 128)).right
    assert exercises.check("08.3", FactsTaskParams(exposures=192, batch_size=256).steps_for(3200)).right


# -- smoke run ----------------------------------------------------------------------------------

def test_smoke_run_writes_capacity_first_and_pairs_loads(tmp_path):
    P = FactsTaskParams(smoke=True, out_dir=str(tmp_path / "run"), d_models=[16, 32])
    r = ft.run(P)
    t = r.table
    assert len(t) == 2 * 2 * 2                                        # trunks x loads x seeds
    assert set(t["variant"]) == {"D=16 40 facts", "D=16 80 facts", "D=32 40 facts", "D=32 80 facts"}
    assert np.allclose(t["exposures_per_fact"], 16.0)                  # equal exposures at every load
    assert t.groupby("d_model")["total_params"].nunique().eq(1).all()
    assert t["answer_accuracy"].between(0, 1).all() and (t["stored_kbit"] >= 0).all()
    assert (t["stored_kbit"] <= t["load_kbit"] + 1e-9).all()
    assert r.capacity["d_model"].tolist() == [16, 32]
    assert set(r.deltas["d_model"]) == {16, 32} and (r.deltas["n"] == 2).all()
    assert len(r.curves) == 2 * 2 * 2 * 2                               # 2 evaluations per run
    tables = sorted(p.name for p in (tmp_path / "run" / "tables").glob("*.parquet"))
    assert tables == ["1_capacity.parquet", "2_paired_deltas.parquet", "3_per_load.parquet", "4_plan.parquet"]
    figs = sorted(p.stem for p in (tmp_path / "run" / "figures").glob("*.html"))
    assert figs[0] == "capacity" and not any("delta" in f for f in figs)
