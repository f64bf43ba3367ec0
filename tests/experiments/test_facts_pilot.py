"""train_facts: answer-only training through labcore.lm.train's optimiser; bad sizes rejected first."""

import json

import pytest

from labcore.config import ConfigError
from labcore.data.facts import FactsConfig
from labcore.experiments.facts_pilot import (
    dense_model,
    facts_model,
    main,
    memory_reads,
    run_cell,
    train_facts,
)
from labcore.experiments.knowledge_metrics import bits_per_param, evaluate_facts
from labcore.lm.budget import model_budget
from labcore.lm.train import TrainConfig

FACTS = FactsConfig(n_subjects=6, n_relations=4, n_objects=16, n_phrasings=2, held_out_phrasings=1,
                    subject_len=2, subject_alphabet=4, seed=1)


def _tcfg(**kw):
    base = dict(steps=120, batch_size=32, seq_len=FACTS.row_len - 1, lr=1e-2, warmup_steps=5, weight_decay=0.0,
                eval_every=0, checkpoint_every=0, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def test_train_facts_memorises_and_reports_consistent_metrics():
    run = train_facts(dense_model(d_model=32, n_layers=1, d_ff=64, max_seq_len=8), FACTS, _tcfg(), log_every=40,
                      eval_every=60)
    f = run.facts
    again = evaluate_facts(run.model, f.eval_set("stored"), f.answer_space)
    assert run.final["answer_accuracy"] == again["answer_accuracy"] == 1.0
    assert run.final["stored_bits"] == pytest.approx(again["stored_bits"])
    assert run.final["stored_bits"] > 0.9 * FACTS.knowledge_bits
    assert run.final["bits_per_param"] == pytest.approx(bits_per_param(again["stored_bits"], run.n_params))
    assert "held_out_answer_accuracy" in run.final
    kinds = [(r["kind"], r["step"]) for r in run.history]
    assert kinds == [("train", 40), ("eval", 60), ("train", 80), ("train", 120), ("eval", 120)]


def test_train_facts_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="seq_len=5"):
        train_facts(dense_model(), FACTS, _tcfg(seq_len=5))
    with pytest.raises(ConfigError, match="grad_accum=2"):
        train_facts(dense_model(), FACTS, _tcfg(grad_accum=2))


def test_facts_model_matches_flops_and_params():
    base = dense_model()
    b0 = model_budget(base, context_len=5)
    for arch in ("pkm", "ultramem"):
        cfg = facts_model(arch, base, ratio=10.0)
        b = model_budget(cfg, context_len=5)
        assert b.flops_per_token == pytest.approx(b0.flops_per_token, rel=0.02)
        assert b.total_params == pytest.approx(11 * b0.total_params, rel=0.02)
        n_values, reads = memory_reads(cfg)
        mem = cfg.plan.memory
        assert n_values == mem.n_keys ** 2 and reads == mem.heads * mem.top_k
    assert facts_model("pkm", base, memory={"top_k": 16}).plan.memory.top_k == 16
    assert facts_model("dense", base) is base
    assert memory_reads(base) == (0, 0)
    with pytest.raises(ConfigError, match="arch"):
        facts_model("moe", base)


def test_run_cell_reports_a_consistent_row():
    base = dense_model(d_model=16, n_layers=1, d_ff=32, max_seq_len=8)
    cfg = facts_model("pkm", base, ratio=2.0, memory={"heads": 1, "top_k": 4, "k_dim": 8})
    row = run_cell("pkm", 64, steps=30, seed=3, model_cfg=cfg, batch_size=32, lr=1e-2, eval_every=15)
    n_values, reads = memory_reads(cfg)
    assert row["arch"] == "pkm" and row["seed"] == 3 and row["n_facts"] == 64 and row["steps"] == 30
    assert row["n_values"] == n_values
    assert row["exposures_per_fact"] == pytest.approx(30 * 32 / 64)
    assert row["reads_per_value"] == pytest.approx(30 * 32 * reads / n_values)
    assert row["load_kbit"] == pytest.approx(64 * 7 / 1e3)
    assert 0.0 <= row["answer_accuracy"] <= 1.0 and 0.0 <= row["stored_kbit"] <= row["load_kbit"]
    assert row["bits_per_param"] == pytest.approx(1e3 * row["stored_kbit"] / row["total_params"])
    assert [c["step"] for c in row["curve"]] == [15, 30]
    assert row["curve"][-1]["answer_accuracy"] == row["answer_accuracy"]
    again = run_cell("pkm", 64, steps=30, seed=3, model_cfg=cfg, batch_size=32, lr=1e-2)
    assert again["answer_loss"] == pytest.approx(row["answer_loss"], rel=1e-5)  # seeded end to end
    assert again["curve"] == []
    with pytest.raises(ConfigError, match="n_facts=66"):
        run_cell("dense", 66, steps=1)


def test_cli_cells_print_one_row_per_cell(capsys):
    rc = main(["--archs", "dense", "--facts", "16,32", "--seeds", "0", "1", "--steps", "2", "--batch-size", "8",
               "--d-model", "16", "--n-layers", "1", "--d-ff", "32"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert [(r["n_facts"], r["seed"], r["arch"], r["steps"]) for r in rows] == [
        (16, 0, "dense", 2), (16, 1, "dense", 2), (32, 0, "dense", 2), (32, 1, "dense", 2)]
    assert main(["--archs", "moe", "--facts", "16", "--steps", "1"]) == 2


@pytest.mark.parametrize("arch", ["pkm", "ultramem"])
def test_train_facts_with_lazy_values_trains_on_sparse_value_gradients(arch):
    """optimizer="lazy_adamw": the memory hands the optimiser a sparse value gradient (the clip and
    the lazy update take it) and the run learns the facts as AdamW's does."""
    seen = []

    def runs(optimizer):
        run = train_facts(facts_model(arch, dense_model()), FACTS, _tcfg(optimizer=optimizer, grad_clip=1.0))
        table = next(m for _, m in run.model.memory_layers()).values.weight
        seen.append(table.grad.is_sparse)
        return run.final["answer_accuracy"]

    lazy, dense = runs("lazy_adamw"), runs("adamw")
    assert seen == [True, False]
    assert lazy >= 0.9 and dense >= 0.9
