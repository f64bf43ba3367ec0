"""run_variants on the facts task: calibrated step-0 memory output, answer-token metrics, pairing by seed."""

import math

import numpy as np
import pytest

from labcore.data.facts import FactsConfig
from labcore.experiments.core import FACTS_METRICS, Variant, facts_cell, paired_deltas, run_variants
from labcore.experiments.params import LabParams
from labcore.lm.budget import match_pkm, model_budget
from labcore.lm.calibrate import output_stds

P = LabParams(steps=6, batch_size=32, n_facts=48, n_objects=16, n_seeds=2)


def _models():
    base = P.model()
    target = round(4 * model_budget(base, context_len=P.context_len).total_params)
    pkm = match_pkm(base, target, context_len=P.context_len, multiple_of=4, heads=2, top_k=4, k_dim=8,
                    placements=("1:1",))
    return base, pkm


def test_lab_params_describe_a_facts_run():
    f = P.data_config()
    assert isinstance(f, FactsConfig) and f.n_facts == 48 and f.n_objects == 16
    t = P.train_config()
    assert t.seq_len == f.row_len - 1 == P.context_len
    assert t.weight_decay == 0.0 and t.value_lr_multiplier == 10.0 and t.batch_size == 32
    m = P.model()
    assert m.max_seq_len >= P.context_len and m.plan.kind == "dense"


def test_calibrated_memory_starts_at_the_ffn_output_std_and_the_row_says_so(tmp_path):
    base, pkm = _models()
    df = run_variants([Variant("dense", base), Variant("pkm", pkm)], [0], P.data_config(), P.train_config(),
                      tmp_path)
    dense, mem = df.set_index("variant").loc["dense"], df.set_index("variant").loc["pkm"]
    assert math.isnan(dense["init_std"]) and math.isnan(dense["init_target"])
    # calibration moved the memory to the target (the trunk's mean FFN std), from somewhere else
    assert mem["init_std"] == pytest.approx(mem["init_target"], rel=2e-3)
    assert abs(mem["init_std_before"] / mem["init_target"] - 1) > 0.1
    for m in (*FACTS_METRICS, "bits_per_param", "coverage", "output_std", "total_params", "flops_per_token"):
        assert np.isfinite(mem[m]), m
    assert 0.0 <= mem["answer_accuracy"] <= 1.0 and mem["answer_loss"] > 0
    assert mem["n_values"] == pkm.plan.memory.n_keys ** 2 and mem["reads_per_token"] == 2 * 4
    assert dense["n_values"] == 0 and math.isnan(dense["coverage"])


def test_calibration_off_keeps_the_init_and_the_target_is_the_measured_ffn_std(tmp_path):
    _, pkm = _models()
    on = facts_cell(Variant("pkm", pkm), P.train_config(seed=0), P.data_config())
    off = facts_cell(Variant("pkm", pkm, calibrate=False), P.train_config(seed=0), P.data_config(),
                     calibrate=True)  # the variant's own switch wins
    assert off["init_std"] == off["init_std_before"] == pytest.approx(on["init_std_before"])
    assert off["init_target"] == pytest.approx(on["init_target"])
    assert off["answer_loss"] != on["answer_loss"]  # a different init trains differently


def test_given_init_target_is_met(tmp_path):
    from labcore.lm.model import LM

    _, pkm = _models()
    row = facts_cell(Variant("pkm", pkm), P.train_config(seed=0, steps=1), P.data_config(), init_target=0.05)
    assert row["init_target"] == 0.05 and row["init_std"] == pytest.approx(0.05, rel=2e-3)
    # the uncalibrated model built with the same seed has the 'before' std
    import torch

    from labcore.data.cache import load_dataset
    from labcore.data.facts import inputs_targets

    torch.manual_seed(0)
    model = LM(pkm)
    ev = load_dataset(P.data_config(), False).extras["facts"].eval_set("stored")
    x, _ = inputs_targets(ev.tokens[:256], ev.answer_mask[:256])
    assert np.mean(list(output_stds(model, x)[1].values())) == pytest.approx(row["init_std_before"], rel=1e-6)


def test_same_seed_same_result_and_seeds_pair(tmp_path):
    base, pkm = _models()
    a = run_variants([Variant("dense", base), Variant("pkm", pkm)], P.seeds, P.data_config(), P.train_config(),
                     tmp_path)
    b = run_variants([Variant("pkm", pkm)], [P.seeds[1]], P.data_config(), P.train_config(), tmp_path)
    row = a[(a.variant == "pkm") & (a.seed == P.seeds[1])].iloc[0]
    assert b.iloc[0]["answer_loss"] == row["answer_loss"]
    assert b.iloc[0]["stored_kbit"] == row["stored_kbit"]
    d = paired_deltas(a, "answer_loss", baseline="dense")
    assert list(d["variant"]) == ["pkm"] and d.iloc[0]["n"] == 2
    want = (a[a.variant == "pkm"].set_index("seed")["answer_loss"]
            - a[a.variant == "dense"].set_index("seed")["answer_loss"]).mean()
    assert d.iloc[0]["delta_mean"] == pytest.approx(want)


def test_log_receives_tagged_rows_and_a_final_row(tmp_path):
    base, _ = _models()
    rows = []
    run_variants([Variant("dense", base)], [3], P.data_config(), P.train_config(), tmp_path, log=rows.append)
    assert all(r["variant"] == "dense" and r["seed"] == 3 for r in rows)
    assert rows[-1]["kind"] == "final" and "answer_accuracy" in rows[-1]
    assert any(r.get("kind") == "train" for r in rows)
