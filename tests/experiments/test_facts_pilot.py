"""train_facts: answer-only training through labcore.lm.train's optimiser; bad sizes rejected first."""

import pytest

from labcore.config import ConfigError
from labcore.data.facts import FactsConfig
from labcore.experiments.facts_pilot import dense_model, train_facts
from labcore.experiments.knowledge_metrics import bits_per_param, evaluate_facts
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
