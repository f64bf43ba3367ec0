"""Fact memorisation task: determinism, row layout, held-out phrasings, cache round trip, metrics."""

import math

import numpy as np
import pytest
import torch

from labcore.config import ConfigError
from labcore.data import load_dataset
from labcore.data.facts import FactsConfig, FactSet, answer_mask, inputs_targets, make_facts
from labcore.data.tokenizer import SPECIALS
from labcore.experiments.knowledge_metrics import (
    answer_metrics,
    answer_scores,
    bits_per_param,
    evaluate_facts,
    stored_bits,
)
from labcore.lm.model import LM, ModelConfig

CFG = FactsConfig(n_subjects=40, n_relations=3, n_objects=20, n_phrasings=3, held_out_phrasings=1,
                  subject_len=2, subject_alphabet=8, seed=3)
BOS = SPECIALS["BOS"]


def test_config_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="n_subjects=0"):
        FactsConfig(n_subjects=0)
    with pytest.raises(ConfigError, match="n_objects=1"):
        FactsConfig(n_objects=1)
    with pytest.raises(ConfigError, match="held_out_phrasings=2"):
        FactsConfig(n_phrasings=2, held_out_phrasings=2)
    with pytest.raises(ConfigError, match="n_subjects=65"):
        FactsConfig(n_subjects=65, subject_len=2, subject_alphabet=8)  # only 8**2 = 64 distinct subjects
    with pytest.raises(ConfigError, match="= 257 token ids"):
        FactsConfig(n_objects=200, subject_alphabet=41, n_relations=4, n_phrasings=4)
    with pytest.raises(ConfigError, match="2\\*\\*62"):
        FactsConfig(subject_alphabet=200, subject_len=16)
    with pytest.raises(ConfigError, match="seed=-1"):
        FactsConfig(seed=-1)


def test_sizes_and_bits():
    assert CFG.n_facts == 120 and CFG.row_len == 5 and CFG.n_train_phrasings == 2
    assert CFG.bits_per_fact == pytest.approx(math.log2(20))
    assert CFG.knowledge_bits == pytest.approx(120 * math.log2(20))


def test_facts_are_deterministic_distinct_and_in_range():
    a, b = make_facts(CFG), make_facts(CFG)
    for x, y in ((a.subjects, b.subjects), (a.objects, b.objects), (a.held_out, b.held_out)):
        np.testing.assert_array_equal(x, y)
    other = make_facts(FactsConfig(**{**CFG.__dict__, "seed": 4}))
    assert not np.array_equal(a.objects, other.objects)
    assert len({tuple(s) for s in a.subjects.tolist()}) == CFG.n_subjects  # distinct subjects
    assert a.subjects.min() >= CFG.symbol_offset and a.subjects.max() < CFG.symbol_offset + CFG.subject_alphabet
    assert a.objects.min() >= 0 and a.objects.max() < CFG.n_objects
    # exactly held_out_phrasings phrasings are held out per fact
    np.testing.assert_array_equal(a.held_out.sum(-1), np.full((40, 3), 1))
    # every phrasing is trained on some facts (so its word can be learned) and held out on others
    assert (~a.held_out).any(axis=0).all() and a.held_out.any(axis=(0, 1)).all()


def test_objects_are_roughly_uniform():
    f = make_facts(FactsConfig(n_subjects=5000, n_relations=4, n_objects=16))
    counts = np.bincount(f.objects.reshape(-1), minlength=16)
    expect = 20000 / 16
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 50  # 15 dof: p(chi2 > 50) < 1e-5 for a uniform draw


def test_row_layout_by_hand():
    cfg = FactsConfig(n_subjects=2, n_relations=2, n_objects=10, n_phrasings=2, subject_len=3, subject_alphabet=4)
    f = FactSet(cfg, np.array([[10, 11, 12], [13, 13, 10]]), np.array([[7, 2], [5, 9]]),
                np.zeros((2, 2, 2), dtype=bool))
    rows = f.rows(np.array([0, 1, 1]), np.array([1, 0, 1]), np.array([0, 1, 1]))
    # words: 10 + 4 + r * 2 + j -> (1, 0): 16, (0, 1): 15, (1, 1): 17
    np.testing.assert_array_equal(rows, [[BOS, 10, 11, 12, 16, 2],   # phrasing 0: subject then word
                                         [BOS, 15, 13, 13, 10, 5],   # phrasing 1: word then subject
                                         [BOS, 17, 13, 13, 10, 9]])


def test_train_and_eval_splits():
    f = make_facts(CFG)
    train = f.train_rows()
    assert train.shape == (CFG.n_facts * 2, CFG.row_len)
    stored, held, both = f.eval_set("stored"), f.eval_set("held_out"), f.eval_set("all")
    assert len(stored) == CFG.n_facts * 2 and len(held) == CFG.n_facts and len(both) == 3 * CFG.n_facts
    # "stored" is exactly the training rows (as multisets), "held_out" never occurs in training
    key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
    assert key(stored.tokens) == key(train)
    assert not set(map(tuple, held.tokens.tolist())) & set(map(tuple, train.tolist()))
    assert not stored.held_out.any() and held.held_out.all()
    # every row's answer is its fact's object; fact ids cover every fact
    np.testing.assert_array_equal(both.tokens[:, -1], f.objects[both.subject, both.relation])
    np.testing.assert_array_equal(both.fact, both.subject * CFG.n_relations + both.relation)
    assert set(held.fact.tolist()) == set(range(CFG.n_facts))
    assert both.answer_mask.sum() == len(both) and both.answer_mask[:, -1].all()
    with pytest.raises(ConfigError, match="split='train'"):
        f.eval_set("train")


def test_no_phrasings_means_no_held_out_split():
    f = make_facts(FactsConfig(n_subjects=10, n_relations=2))
    assert len(f.eval_set("held_out")) == 0 and len(f.eval_set("stored")) == 20


def test_cache_round_trip(tmp_path):
    a = load_dataset(CFG, tmp_path)
    b = load_dataset(CFG, tmp_path)
    assert a.status == "built" and b.status == "hit"
    assert a.row_len == CFG.row_len and a.manifest["params"]["n_subjects"] == 40
    np.testing.assert_array_equal(a.train.reshape(-1, CFG.row_len), make_facts(CFG).train_rows())
    np.testing.assert_array_equal(b.val.reshape(-1, CFG.row_len), make_facts(CFG).eval_set().tokens)
    fb = b.extras["facts"]
    np.testing.assert_array_equal(fb.objects, make_facts(CFG).objects)
    np.testing.assert_array_equal(fb.held_out, make_facts(CFG).held_out)
    # the sampler aligned to rows gives whole rows
    x, y = b.sampler("train", 8, CFG.row_len - 1, seed=0).micro_batches(0)[0]
    assert (x[:, 0] == BOS).all()
    # regenerating writes byte-identical files
    files = {p.name: p.read_bytes() for p in a.path.iterdir()}
    with pytest.warns(UserWarning, match="rebuild requested"):
        b2 = load_dataset(CFG, tmp_path, rebuild=True)
    assert {p.name: p.read_bytes() for p in b2.path.iterdir()} == files


def test_inputs_targets_masks_everything_but_the_answer():
    rows = np.array([[BOS, 30, 31, 40, 7], [BOS, 41, 30, 30, 3]])
    x, y = inputs_targets(rows, answer_mask(2, 5))
    assert x.tolist() == [[BOS, 30, 31, 40], [BOS, 41, 30, 30]]
    assert y.tolist() == [[-100, -100, -100, 7], [-100, -100, -100, 3]]
    with pytest.raises(ValueError, match="same"):
        inputs_targets(rows, answer_mask(2, 4))


# ----------------------------------------------------------------------------------------------
# Metrics, with hand-computed values.
# ----------------------------------------------------------------------------------------------


def test_answer_scores_by_hand():
    # Two rows, T = 2, V = 3; row 0's answer at t = 1 (target 2), row 1's answers at t = 0, 1.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)]],
                           [[math.log(3.0), 0.0, 0.0], [0.0, 5.0, 0.0]]])
    targets = torch.tensor([[-100, 2], [0, 2]])
    mask = torch.tensor([[False, True], [True, True]])
    s = answer_scores(logits, targets, mask)
    # row 0: p(2) = 2 / (1 + 1 + 2) = 1/2 -> ce = ln 2, argmax 2 = target -> correct
    # row 1: p(0) at t=0 = 3/5 -> ln(5/3); at t=1 p(2) = 1 / (2 + e^5) -> ln(2 + e^5); argmax 1 != 2
    assert s.ce_nats.tolist() == pytest.approx([math.log(2), math.log(5 / 3) + math.log(2 + math.e ** 5)])
    assert s.correct.tolist() == [True, False]
    assert s.n_tokens.tolist() == [1, 2]
    m = answer_metrics(logits, targets, mask)
    assert m["answer_loss"] == pytest.approx((math.log(2) + math.log(5 / 3) + math.log(2 + math.e ** 5)) / 3)
    assert m["answer_accuracy"] == 0.5
    with pytest.raises(ValueError, match="no answer token"):
        answer_scores(logits, targets, torch.tensor([[False, False], [True, True]]))


def test_answer_scores_match_the_lm_loss():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 11)
    targets = torch.randint(0, 11, (4, 3))
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[:, -1] = True
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.masked_fill(~mask, -100).reshape(-1),
                                            ignore_index=-100)
    assert answer_scores(logits, targets, mask).loss == pytest.approx(float(ref), rel=1e-6)


def test_stored_bits_by_hand():
    ln2 = math.log(2)
    # answer space 8 (3 bits). Facts: perfect (0 bits of CE), 1 bit of CE, 5 bits of CE (worse than chance).
    k = stored_bits(torch.tensor([0.0, 1.0 * ln2, 5.0 * ln2]), 8)
    assert k.bits == pytest.approx(3 + 2 + 0)
    assert k.n_facts == 3 and k.capacity_bits == pytest.approx(9) and k.fraction == pytest.approx(5 / 9)
    # rows of one fact are averaged first: fact 0 rows (0, 2 bits) -> 1 bit CE -> 2 stored; fact 1: 3 bits CE -> 0
    k2 = stored_bits(np.array([0.0, 2 * ln2, 3 * ln2]), 8, fact=np.array([5, 5, 9]))
    assert k2.bits == pytest.approx(2.0) and k2.n_facts == 2
    # chance-level prediction stores nothing
    assert stored_bits(torch.full((10,), math.log(8)), 8).bits == pytest.approx(0.0, abs=1e-12)
    assert bits_per_param(100.0, 50) == 2.0
    with pytest.raises(ConfigError, match="answer_space=1"):
        stored_bits(torch.zeros(2), 1)
    with pytest.raises(ConfigError, match="n_params=0"):
        bits_per_param(1.0, 0)


class _Oracle(torch.nn.Module):
    """Puts logit `margin` on the right object of each (subject, word) key, from the fact table."""

    def __init__(self, facts: FactSet, margin: float, vocab: int = 259) -> None:
        super().__init__()
        self.table = {}
        for row in facts.eval_set("all").tokens.tolist():
            self.table[tuple(row[:-1])] = row[-1]
        self.margin, self.vocab = margin, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(*x.shape, self.vocab)
        for b, row in enumerate(x.tolist()):
            out[b, -1, self.table[tuple(row)]] = self.margin
        return out


def test_evaluate_facts_on_oracles():
    f = make_facts(CFG)
    rows = f.eval_set("stored")
    perfect = evaluate_facts(_Oracle(f, 50.0), rows, f.answer_space, batch_size=7)
    assert perfect["answer_accuracy"] == 1.0
    assert perfect["stored_bits"] == pytest.approx(CFG.knowledge_bits, rel=1e-6)
    # a margin m over V = 259 logits: p = e^m / (e^m + 258); CE in bits = -log2 p, same for every fact
    m = 3.0
    p = math.exp(m) / (math.exp(m) + 258)
    weak = evaluate_facts(_Oracle(f, m), rows, f.answer_space)
    assert weak["answer_loss"] == pytest.approx(-math.log(p), rel=1e-5)
    assert weak["stored_bits"] == pytest.approx(CFG.n_facts * max(0.0, math.log2(20) + math.log2(p)), rel=1e-5)


def test_small_lm_learns_facts_through_the_lm_loss():
    """A few hundred full-batch steps on 24 facts: the answer accuracy must rise far above chance."""
    cfg = FactsConfig(n_subjects=6, n_relations=4, n_objects=16, subject_len=2, subject_alphabet=4, seed=1)
    f = make_facts(cfg)
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = inputs_targets(f.train_rows(), answer_mask(cfg.n_facts, cfg.row_len))
    before = evaluate_facts(model, f.eval_set("stored"), f.answer_space)
    for _ in range(150):
        opt.zero_grad()
        model(x, y).loss.backward()
        opt.step()
    after = evaluate_facts(model, f.eval_set("stored"), f.answer_space)
    assert before["answer_accuracy"] < 0.3
    assert after["answer_accuracy"] == 1.0
    assert after["stored_bits"] > 0.9 * cfg.knowledge_bits
