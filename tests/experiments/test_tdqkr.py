"""01_tdqkr on the facts task: parameters, arms held equal, the tiny forward pass, search recall,
the interpretation, the exercises and a smoke run."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from experimenthelpers import assert_exercise_checks

from labcore import exercises
from labcore.config import ConfigError
from labcore.experiments import tdqkr
from labcore.experiments.params import TDQKRParams
from labcore.layers.ultramem import UltraMem
from labcore.lm.budget import model_budget
from labcore.lm.model import LM
from labcore.results import RunDir

ALL_ARMS = dict(ranks=[2, 3], two_sided=True, multi_core=True, aux_loss=True)


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    ({"ranks": [1, 2]}, "TDQKRParams.ranks=[1, 2] is not allowed: must be a non-empty list of integers in [2, 8]"),
    ({"ranks": [2, 2]}, "TDQKRParams.ranks=[2, 2] is not allowed: must list distinct ranks"),
    ({"ranks": [3], "two_sided": True}, "TDQKRParams.ranks=[3] is not allowed with two_sided=True: must include 2"),
    ({"ranks": [3], "two_sided": False, "aux_loss": True}, "TDQKRParams.ranks=[3] is not allowed with aux_loss=True"),
    ({"ratio": 0.1}, "TDQKRParams.ratio=0.1 is not allowed: must be a finite number in [0.5, 64.0]"),
    ({"k_dim": 0}, "TDQKRParams.k_dim=0 is not allowed: must be an integer in [1, 256]"),
    ({"top_k": 0}, "TDQKRParams.top_k=0 is not allowed: must be an integer in [1, 64]"),
    ({"multi_core": "yes"}, "TDQKRParams.multi_core='yes' is not allowed: must be True or False"),
    ({"additive_equal_keys": 1}, "TDQKRParams.additive_equal_keys=1 is not allowed: must be True or False"),
    ({"recall_rows": 0}, "TDQKRParams.recall_rows=0 is not allowed: must be an integer in [1, 400000]"),
])
def test_params_reject_bad_values_naming_field_value_and_allowed(kw, message):
    with pytest.raises(ConfigError) as e:
        TDQKRParams(**kw)
    assert message in str(e.value)


def test_params_defaults_and_smoke():
    P = TDQKRParams()
    assert (P.n_facts, P.steps, P.batch_size, P.n_seeds, P.d_model) == (2000, 400, 256, 3, 32)
    assert P.effective() == P
    S = TDQKRParams(smoke=True).effective()
    assert isinstance(S, TDQKRParams) and S.steps <= 12 and S.recall_rows == 64 and S.n_facts <= 200


# ----------------------------------------------------------------------------------------------
# The arms: one switch each, equal params / FLOPs / values read
# ----------------------------------------------------------------------------------------------


def _fields(v):
    return dataclasses.asdict(v.model.plan.memory)


def test_arms_and_what_each_changes():
    vs = {v.name: v for v in tdqkr.tdqkr_variants(TDQKRParams(**ALL_ARMS))}
    assert list(vs) == ["additive", "R=2", "R=3", "R=2 two-sided", "R=2 h=2", "R=2 +aux"]
    ref = _fields(vs["R=2"])
    assert (ref["scoring"], ref["rank"], ref["n_cores"], ref["proxy_search"], ref["tucker_aux"]) == (
        "tucker", 2, 1, "signed", False)
    assert (ref["heads"], ref["top_k"], ref["k_dim"], ref["d_value"], ref["expansion"], ref["value_proj"],
            ref["score_activation"]) == (2, 16, 8, 32, 1, False, "none")
    # Besides the values N (n_keys), each arm changes exactly its own switch relative to R=2.
    expected = {"additive": {"scoring", "rank", "k_dim"}, "R=3": {"rank"}, "R=2 two-sided": {"proxy_search"},
                "R=2 h=2": {"n_cores"}, "R=2 +aux": {"tucker_aux"}}
    for name, changed in expected.items():
        got = {k for k, x in _fields(vs[name]).items() if ref[k] != x} - {"n_keys"}
        assert got == changed, name
    assert _fields(vs["additive"])["k_dim"] == 16                         # 2 x k_dim: equal key budget
    assert all(v.model.plan.placements == (("1:1",) if isinstance(v.model.plan.placements[0], str)
                                           else v.model.plan.placements) for v in vs.values())


def test_arms_hold_params_flops_and_reads_equal():
    P = TDQKRParams(**ALL_ARMS)
    vs = tdqkr.tdqkr_variants(P)
    dense = model_budget(P.model(), context_len=P.context_len)
    target = (1 + P.ratio) * dense.total_params
    for v in vs:
        b = model_budget(v.model, context_len=P.context_len)
        assert abs(b.total_params - target) / target <= 0.02, v.name
        assert abs(b.flops_per_token - dense.flops_per_token) / dense.flops_per_token <= 0.02, v.name
        m = v.model.plan.memory
        assert m.heads * m.top_k == 32 and m.d_v == 32
    table = tdqkr.variants_table(P)
    assert table["values_read_per_token"].nunique() == 1
    assert table["total_params"].max() / table["total_params"].min() - 1 <= 0.02
    assert table["flops_per_token"].max() / table["flops_per_token"].min() - 1 <= 0.02


def test_additive_keys_match_the_rank_2_keys_only_when_asked():
    def keys(P, name):
        return tdqkr.model_for(P, name).plan.memory.cost().params["keys"]

    P = TDQKRParams()
    assert keys(P, "additive") == keys(P, "R=2")
    Q = TDQKRParams(additive_equal_keys=False)
    assert keys(Q, "additive") * 2 == keys(Q, "R=2")
    with pytest.raises(ConfigError, match="name='R=9' is not allowed"):
        tdqkr.model_for(P, "R=9")


# ----------------------------------------------------------------------------------------------
# The tiny forward pass
# ----------------------------------------------------------------------------------------------


def test_tiny_forward_reproduces_the_layer_and_prints_shapes():
    df = tdqkr.tiny_forward(seed=0, n_tokens=4)
    assert list(df.columns) == ["step", "tensor", "shape", "meaning"]
    shapes = dict(zip(df["tensor"], df["shape"]))
    assert shapes["S_row = K_row q_row"] == (4, 1, 2, 6)                  # (T, H, R, n)
    assert shapes["S_rowᵀ C S_col"] == (4, 1, 6, 6)
    assert shapes["y = Σ_k s_k V[slot_k]"] == (4, 8)
    check = df[df["step"] == "check"]["tensor"].iloc[0]
    assert float(check.split("=")[1]) < 1e-6
    recalls = [float(t.split()[-1]) for t in df[df["step"] == "search recall"]["tensor"]]
    assert all(0.0 <= r <= 1.0 for r in recalls)


# ----------------------------------------------------------------------------------------------
# Search recall against a slow brute-force reference
# ----------------------------------------------------------------------------------------------


def _slow_recall(layer, h, proxy):
    """Per token and head: the search's slots (a copy of the layer with ``proxy``) against the top-K
    of the full grid S_rowᵀ C S_col, by sets."""
    twin = UltraMem(dataclasses.replace(layer.cfg, proxy_search=proxy))
    twin.load_state_dict(layer.state_dict())
    s_row, s_col = twin.side_scores(h)                                   # (N, H, R, n)
    grid = torch.einsum("thai,hab,thbj->thij", s_row, twin.cores.sum(0), s_col)
    exact = grid.flatten(-2).topk(layer.cfg.top_k, dim=-1).indices        # (N, H, K)
    found = twin.search(s_row, s_col)[0]
    hits = [len(set(a.tolist()) & set(b.tolist())) / layer.cfg.top_k
            for a, b in zip(found.flatten(0, 1), exact.flatten(0, 1))]
    return float(np.mean(hits))


def test_search_recalls_match_a_brute_force_reference():
    P = TDQKRParams(smoke=True).effective()
    x, ans = tdqkr.recall_inputs(P)
    assert x.shape == (64, P.context_len) and ans.sum() == 64            # one answer position per fact row
    torch.manual_seed(3)
    model = LM(tdqkr.model_for(P, "R=2")).eval()
    got = tdqkr.search_recalls(model, x, ans)
    captured = {}
    layer = next(m for m in model.modules() if isinstance(m, UltraMem))
    hook = layer.register_forward_hook(lambda mod, args, out: captured.setdefault("h", args[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    h = captured["h"][ans]
    with torch.no_grad():
        signed, two = _slow_recall(layer, h, "signed"), _slow_recall(layer, h, "two_sided")
    assert got["recall_signed"] == pytest.approx(signed, abs=1e-6)
    assert got["recall_two_sided"] == pytest.approx(two, abs=1e-6)
    assert got["search_recall"] == pytest.approx(signed, abs=1e-6)        # the model's own search is signed
    assert two > signed                                                   # at init: signed misses about half
    torch.manual_seed(3)
    add = tdqkr.search_recalls(LM(tdqkr.model_for(P, "additive")).eval(), x, ans)
    assert add["search_recall"] == 1.0 and math.isnan(add["recall_signed"]) and math.isnan(add["recall_two_sided"])


def test_recall_table_pairs_the_two_searches_by_seed():
    table = pd.DataFrame({"variant": ["additive"] * 3 + ["R=2"] * 3, "seed": [0, 1, 2] * 2,
                          "recall_signed": [np.nan] * 3 + [0.70, 0.80, 0.75],
                          "recall_two_sided": [np.nan] * 3 + [0.90, 0.95, 0.97],
                          "init_recall_signed": [np.nan] * 3 + [0.5, 0.5, 0.5],
                          "init_recall_two_sided": [np.nan] * 3 + [1.0, 1.0, 1.0]})
    r = tdqkr.recall_table(table)
    assert list(r["variant"]) == ["R=2: two-sided search"]
    row = r.iloc[0]
    diffs = np.array([0.20, 0.15, 0.22])
    assert row["delta_mean"] == pytest.approx(diffs.mean())
    assert row["sd"] == pytest.approx(diffs.std(ddof=1))
    assert row["signed_mean"] == pytest.approx(0.75) and row["init_signed_mean"] == pytest.approx(0.5)
    assert row["ci_low"] > 0
    with pytest.raises(KeyError, match="recall_signed"):
        tdqkr.recall_table(table.drop(columns=["recall_signed"]))


# ----------------------------------------------------------------------------------------------
# interpret() on a synthetic result
# ----------------------------------------------------------------------------------------------


def _synthetic(delta_r2, spread):
    seeds = [0, 1, 2, 3]
    rows = []
    for s in seeds:
        base = 2.0 + 0.1 * s
        rows += [{"variant": "additive", "seed": s, "answer_loss": base, "answer_accuracy": 0.5},
                 {"variant": "R=2", "seed": s, "answer_loss": base + delta_r2 + spread[s],
                  "answer_accuracy": 0.5 - delta_r2 / 4},
                 {"variant": "R=2 two-sided", "seed": s, "answer_loss": base + delta_r2 + 0.01, "answer_accuracy": 0.5}]
    table = pd.DataFrame(rows)
    from labcore.experiments.core import paired_deltas

    rec = pd.DataFrame([{"variant": "R=2: two-sided search", "reference": "R=2: signed search", "n": 4,
                         "signed_mean": 0.81, "two_sided_mean": 0.97, "init_signed_mean": 0.52,
                         "init_two_sided_mean": 0.99, "delta_mean": 0.16, "ci_low": 0.12, "ci_high": 0.2}])
    summary = pd.DataFrame({"variant": ["additive", "R=2"], "lambda1_mean": [np.nan, 2.0],
                            "lambda2_mean": [np.nan, 0.25]})
    return SimpleNamespace(deltas=paired_deltas(table, "answer_loss", baseline="additive", paper=tdqkr.PAPER_DELTAS),
                           accuracy_deltas=paired_deltas(table, "answer_accuracy", baseline="additive",
                                                         higher_is_better=True),
                           recall=rec, summary=summary)


def test_interpret_reads_the_numbers_of_the_run():
    text = tdqkr.interpret(_synthetic(-0.30, [0.01, -0.01, 0.02, -0.02]))
    assert "lower answer loss than additive scoring: Δ = -0.300 nats" in text
    assert "; resolved." in text and "agrees with the paper" in text
    assert "In exact-match accuracy that is +7.5 points (95% CI +7.5 .. +7.5" in text
    assert "signed search finds 0.810" in text and "two-sided search 0.970" in text
    assert "At step 0 the signed search found 0.520" in text and "misses less than at init (+0.290)" in text
    assert "λ₁/λ₂ = 8.0" in text and "close to rank 1" in text
    assert "two-sided minus signed is +0.010 nats" in text
    assert "What this does not resolve" in text
    noisy = tdqkr.interpret(_synthetic(0.05, [0.4, -0.4, 0.3, -0.3]))
    assert "higher answer loss" in noisy and "not resolved: the interval contains zero" in noisy
    assert "disagrees with the paper" in noisy and "not evidence either way" in noisy


# ----------------------------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ex_id, right, wrong", [
    ("01.1", 256, 12996), ("01.2", [[0, 1], [1, 0]], [[1, 0], [0, 1]]), ("01.3", 2304, 1152), ("01.4", 24, 8)])
def test_exercises_check_right_and_wrong_answers(ex_id, right, wrong):
    assert_exercise_checks(ex_id, right, wrong)
    assert not exercises.check(ex_id, ...).right
    with pytest.raises(ConfigError, match=f"exercise {ex_id}: answer='x' is not allowed"):
        exercises.check(ex_id, "x")


def test_exercise_answers_follow_the_cost_model():
    m = tdqkr.model_for(TDQKRParams(), "R=2").plan.memory
    assert exercises.check("01.1", m.m ** 2).right
    assert [e.id for e in exercises.exercises_for("01_tdqkr")] == ["01.1", "01.2", "01.3", "01.4"]


# ----------------------------------------------------------------------------------------------
# Smoke run
# ----------------------------------------------------------------------------------------------


def test_smoke_run_writes_the_tables_in_order(tmp_path):
    P = TDQKRParams(smoke=True, out_dir=str(tmp_path / "run"), n_seeds=2)
    r = tdqkr.run(P)
    t = r.table.set_index(["variant", "seed"])
    assert list(dict.fromkeys(r.table["variant"])) == ["additive", "R=2", "R=2 two-sided"]
    assert len(r.table) == 6 and t["answer_accuracy"].between(0, 1).all()
    assert (t.loc["additive", "search_recall"] == 1.0).all()
    assert t.loc["R=2 two-sided", "recall_two_sided"].tolist() == pytest.approx(
        t.loc["R=2 two-sided", "search_recall"].tolist())                 # its own search is two-sided
    assert t["init_std"].to_numpy() == pytest.approx(t["init_target"].to_numpy(), rel=1e-3)  # calibrated
    assert list(r.deltas["variant"]) == ["R=2", "R=2 two-sided"] and set(r.deltas["reference"]) == {"additive"}
    assert r.deltas["resolution"].gt(0).all() and r.deltas.loc[0, "paper_delta"] == -0.008
    assert list(r.search_deltas["variant"]) == ["R=2 two-sided"]
    run = RunDir(tmp_path / "run")
    assert run.read()["status"] == "done"
    names = list(run.key_tables())
    assert names[:2] == ["1_deltas_vs_additive", "2_search_recall"]
    assert next(iter(r.figures)) == "deltas_vs_additive"
    assert isinstance(tdqkr.interpret(r), str)
