"""05_paper_table on the facts task: the walk changes one switch per row, the split keeps total and
activated values, the row notes, direction_table, the tiny forward, interpret(), the exercises and a
smoke run."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from labcore import exercises
from labcore.config import ConfigError
from labcore.experiments import paper_table as T
from labcore.experiments import stats
from labcore.experiments.core import paired_deltas
from labcore.experiments.params import PAPER_VAL_DELTAS, ROWS, PaperTableParams
from labcore.lm.model import LM


def _mem(v):
    return dataclasses.asdict(v.model.plan.memory)


# What each Table 2 row changes relative to the previous row (memory fields, placements, value LR).
EXPECTED_CHANGES = {
    "+rm softmax": {"score_activation"},
    "+half vdim + proj": {"d_value", "value_proj", "n_keys"},
    "+share query": {"share_query"},
    "+split big mem & skip": {"n_keys", "top_k", "n_model_layers", "placements"},
    "+query/key LN": {"qk_norm"},
    "+IVE": {"expansion"},
    "+TDQKR": {"scoring", "rank"},
    "+MCS": {"n_cores"},
    "+improved init": {"init"},
    "+value lr decay": {"value_lr_multiplier"},
}


def test_params_defaults_and_bad_values():
    P = PaperTableParams()
    assert (P.n_seeds, P.steps, P.n_facts, P.n_keys, P.top_k) == (3, 150, 800, 29, 16)
    for kw, msg in [({"top_k": 15}, "PaperTableParams.top_k=15 is not allowed: must be even"),
                    ({"rows": ["+IVE"]}, "must start with 'PKM'"),
                    ({"rows": ["PKM", "+IVE", "+TDQKR", "+IVE"]}, "distinct rows"),
                    ({"rows": ["PKM", "+TDQKR", "+IVE"]}, "in table order"),
                    ({"k_dim": 1}, "PaperTableParams.k_dim=1 is not allowed"),
                    ({"top_k": 40}, "PaperTableParams.top_k=40 is not allowed: must be an integer in [2, 29]")]:
        with pytest.raises(ConfigError) as e:
            PaperTableParams(**kw)
        assert msg in str(e.value)


def test_walk_changes_one_switch_per_row():
    P = PaperTableParams()
    vs = T.table2_variants(P)
    assert [v.name for v in vs] == list(ROWS)
    first = vs[0].model.plan.memory
    assert (first.scoring, first.score_activation, first.expansion, first.value_proj, first.share_query,
            first.qk_norm, first.n_cores, first.d_v) == ("additive", "softmax", 1, False, False, False, 1, P.d_model)
    for prev, cur in zip(vs, vs[1:]):
        changed = {k for k, v in _mem(cur).items() if _mem(prev)[k] != v}
        if cur.model.plan.placements != prev.model.plan.placements:
            changed.add("placements")
        if cur.train_overrides != prev.train_overrides:
            changed.add("value_lr_multiplier")
        assert changed == EXPECTED_CHANGES[cur.name], cur.name
    assert vs[-1].train_overrides["value_lr_multiplier"] == P.value_lr_multiplier == 10.0
    assert all(v.train_overrides["value_lr_multiplier"] == 1.0 for v in vs[:-1])


def test_half_vdim_doubles_values_and_split_keeps_total_and_activated_values():
    vs = {v.name: v for v in T.table2_variants(PaperTableParams())}
    pkm = vs["PKM"].model.plan.memory
    half = vs["+half vdim + proj"].model.plan.memory
    assert abs(half.n_slots / (2 * pkm.n_slots) - 1) < 0.01
    before, split = vs["+share query"].model.plan, vs["+split big mem & skip"].model.plan
    S = len(split.placements)
    assert S == 2 and split.memory.n_model_layers == 2
    assert abs(S * split.memory.n_slots / before.memory.n_slots - 1) < 0.01         # equal total values
    assert S * split.memory.heads * split.memory.top_k == before.memory.heads * before.memory.top_k  # activated
    assert all(p.split(":")[1] > p.split(":")[0] for p in split.placements)         # skip span 1
    LM(vs["+value lr decay"].model)   # the last row builds


def test_subset_of_rows_keeps_earlier_changes():
    vs = T.table2_variants(PaperTableParams(rows=["PKM", "+IVE"]))
    assert [v.name for v in vs] == ["PKM", "+IVE"]
    m = vs[1].model.plan.memory
    assert (m.expansion, m.qk_norm, m.share_query, m.score_activation, len(vs[1].model.plan.placements)) == (
        4, True, True, "none", 2)


def test_walk_table_and_row_notes():
    P = PaperTableParams()
    w = T.walk_table(T.table2_variants(P), P.context_len).set_index("row")
    assert w.loc["+IVE", "virtual_values"] == 4 * w.loc["+IVE", "values"]
    assert w["rows_read_per_token"].nunique() == 1
    notes = T.row_notes(P).set_index("row")
    assert list(notes.index) == [*ROWS, "+query conv"]
    assert notes.loc["+query conv", "applied"] == "not walked"
    assert notes.loc["+split big mem & skip", "applied"] == "adapted" and "2-block trunk" in notes.loc[
        "+split big mem & skip", "why"]
    assert notes.loc["+improved init", "applied"] == "adapted"
    assert T.row_notes(dataclasses.replace(P, calibrate_init=False)).set_index("row").loc[
        "+improved init", "applied"] == "as in the paper"
    assert notes.loc["+IVE", "paper_delta_val_loss"] == PAPER_VAL_DELTAS["+IVE"]


def _synthetic(effects):
    """A walk of rows with known answer-loss effects (nats) and small seed noise."""
    rng = np.random.default_rng(1)
    rows, base = [], np.array([3.0, 3.1, 2.9, 3.05])
    loss = base.copy()
    for i, (name, eff) in enumerate(effects.items()):
        loss = loss + eff + (0.005 * rng.standard_normal(4) if i else 0)
        rows += [{"variant": name, "seed": s, "answer_loss": loss[s], "answer_accuracy": 0.5 - 0.1 * (loss[s] - 3)}
                 for s in range(4)]
    return pd.DataFrame(rows)


def test_direction_table_and_interpret():
    effects = {"PKM": 0.0, "+rm softmax": +0.3, "+half vdim + proj": -0.2, "+share query": 0.0}
    table = _synthetic(effects)
    d = paired_deltas(table, "answer_loss", chain=True, order=list(effects), paper=PAPER_VAL_DELTAS)
    dirs = T.direction_table(d).set_index("row")
    assert dirs.loc["+rm softmax", "agreement"] == "opposite"           # lab worse, paper better
    assert dirs.loc["+half vdim + proj", "agreement"] == "same direction"
    assert dirs.loc["+share query", "agreement"] == "not resolved"

    class R:
        pass

    r = R()
    r.table, r.deltas = table, d
    text = T.interpret(r)
    assert "starts at PKM with answer accuracy 0.50" in text and "off its ceiling" in text
    assert "2 of 3 changes are resolved" in text
    assert "+rm softmax +0.300 nats (against the paper's -0.006)" in text
    assert "+half vdim + proj -0.198 nats (the paper's direction)" in text
    assert "only their direction is compared" in text


def test_tiny_forward_shapes():
    t = T.tiny_forward(seed=2, tokens=3).set_index("step")
    layer = T.tiny_layer(2)
    c = layer.cfg
    assert t.loc["G^(c) = S_row^T C^(c) S_col", "shape"] == (3, c.heads, c.n_cores, c.n_side, c.n_side)
    assert t.loc["top-K of sum_c G^(c)", "shape"] == (3, c.heads, c.top_k)
    assert t.loc["y = W_p pooled", "shape"] == (3, c.d_model)


def test_exercises_right_and_wrong():
    vs = {v.name: v for v in T.table2_variants(PaperTableParams())}
    half = vs["+half vdim + proj"].model.plan.memory.n_keys
    assert exercises.check("05.1", half) and not exercises.check("05.1", 29)
    assert exercises.check("05.2", 32) and not exercises.check("05.2", 64)
    ive = vs["+IVE"].model.plan.memory
    assert exercises.check("05.3", 2 * ive.n_virtual) and not exercises.check("05.3", 2 * ive.n_slots)
    assert exercises.check("05.4", stats.seeds_needed(0.022, 0.05)) and not exercises.check("05.4", 3)
    for i in ("05.1", "05.2", "05.3", "05.4"):
        with pytest.raises(ConfigError, match="must be a whole number"):
            exercises.check(i, 2.5)
    assert [e.id for e in exercises.exercises_for("05_paper_table")] == ["05.1", "05.2", "05.3", "05.4"]


def test_smoke_run(tmp_path):
    P = PaperTableParams(smoke=True, out_dir=str(tmp_path / "run"), n_seeds=2, device="cpu",
                         rows=["PKM", "+rm softmax", "+TDQKR"])
    r = T.run(P)
    assert list(dict.fromkeys(r.table["variant"])) == ["PKM", "+rm softmax", "+TDQKR"] and len(r.table) == 6
    assert list(r.deltas["reference"]) == ["PKM", "+rm softmax"] and (r.deltas["metric"] == "answer_loss").all()
    assert list(r.deltas["paper_delta"]) == [PAPER_VAL_DELTAS["+rm softmax"], PAPER_VAL_DELTAS["+TDQKR"]]
    assert np.isfinite(r.deltas["p_holm"]).all() and len(r.directions) == 2
    assert list(r.net["metric"]) == ["answer_loss", "answer_accuracy", "stored_kbit"]
    assert np.allclose(r.init["init_std"], r.init["init_target"], rtol=0.01)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"
    assert isinstance(T.interpret(r), str)
