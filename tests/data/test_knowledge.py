"""Knowledge base: facts in the text, no held-out template leakage, bits, recall eval on oracles."""

import math

import numpy as np
import pytest
import torch

from labcore.config import ConfigError
from labcore.data import KnowledgeConfig, knowledge_bits, knowledge_recall, load_dataset, unigram_baseline
from labcore.data.knowledge import (
    BIO_TEMPLATES,
    N_TRAIN_QUESTIONS,
    QUESTION_TEMPLATES,
    greedy_generate,
    make_knowledge_base,
    recall_items,
)
from labcore.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = KnowledgeConfig(n_people=30, bios_per_person=3, qa_fraction=0.5, seed=1)


@pytest.fixture(scope="module")
def ds():
    return load_dataset(CFG, False)


def _text(tokens):
    return TOK.decode(tokens.tolist())


def test_config_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="n_people=0"):
        KnowledgeConfig(n_people=0)
    with pytest.raises(ConfigError, match="qa_fraction=1.5"):
        KnowledgeConfig(qa_fraction=1.5)
    with pytest.raises(ConfigError, match="attributes='height'"):
        KnowledgeConfig(attributes=("birth_city", "height"))
    with pytest.raises(ConfigError, match="bios_per_person=-1"):
        KnowledgeConfig(bios_per_person=-1)


def test_people_unique_and_seeded(ds):
    kb = ds.kb
    names = [p["name"] for p in kb.people]
    assert len(names) == 30 and len(set(names)) == 30
    assert make_knowledge_base(CFG).people == kb.people
    assert make_knowledge_base(KnowledgeConfig(n_people=30, seed=2)).people != kb.people
    assert kb.n_qa_train == 15
    big = make_knowledge_base(KnowledgeConfig(n_people=3000, seed=0))
    assert len({p["name"] for p in big.people}) == 3000


def test_every_fact_is_in_the_training_text_and_documents_are_wrapped(ds):
    text = _text(ds.train)
    for p in ds.kb.people:
        for a in ds.kb.attributes:
            sentences = [t.format(name=p["name"], value=p[a]) for t in BIO_TEMPLATES[a]]
            assert any(s in text for s in sentences), (p["name"], a)
    n_docs = 30 * 3 + 15
    assert int((ds.train == TOK.bos_id).sum()) == n_docs == int((ds.train == TOK.eos_id).sum())
    assert ds.train[0] == TOK.bos_id and ds.train[-1] == TOK.eos_id


def test_held_out_question_templates_never_leak_into_training(ds):
    text = _text(ds.train)
    for a, templates in QUESTION_TEMPLATES.items():
        for t in templates[N_TRAIN_QUESTIONS:]:
            for piece in t.split("{name}"):
                if len(piece.strip()) >= 6:
                    assert piece not in text, (a, piece)
        # the check above can fail: training question wording IS in the text
        assert any(t.split("{name}")[0] in text for t in templates[:N_TRAIN_QUESTIONS])
    for it in recall_items(ds.kb, "question"):
        assert it.prompt.strip() not in text
    # QA lines only for the qa_train people
    for i, p in enumerate(ds.kb.people):
        assert (f"Q: When was {p['name']} born?" in text or f"the birth date of {p['name']}?" in text) == (i < 15)


def test_knowledge_bits_by_hand():
    per_person = math.log2(28 * 12 * 100) + math.log2(40) + math.log2(30) + math.log2(30) + math.log2(40)
    assert knowledge_bits(make_knowledge_base(CFG)) == pytest.approx(30 * per_person)
    assert knowledge_bits(KnowledgeConfig(n_people=7, attributes=("field",))) == pytest.approx(7 * math.log2(30))


class Oracle:
    """Knows every (prompt, answer); predicts the answer's next byte when the generated prefix
    matches, else token 0. ``wrong(item, k)`` -> True makes it predict a wrong byte at answer byte k."""

    def __init__(self, items, wrong=lambda item, k: False):
        self.table = {tuple(TOK.encode(it.prompt, bos=True)): (it, TOK.encode(it.answer)) for it in items}
        self.lengths = sorted({len(k) for k in self.table})
        self.wrong = wrong

    def __call__(self, idx):
        B, L = idx.shape
        logits = torch.zeros(B, L, TOK.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            hit = next((self.table[tuple(row[:n])] for n in self.lengths if tuple(row[:n]) in self.table), None)
            for t in range(L):
                nxt = 0
                if hit is not None:
                    item, ans = hit
                    n = len(TOK.encode(item.prompt, bos=True))
                    k = t + 1 - n
                    if 0 <= k < len(ans) and row[n:t + 1] == ans[:k]:
                        nxt = ans[k] if not self.wrong(item, k) else (ans[k] + 1) % 256
                logits[b, t, nxt] = 1.0
        return logits


@pytest.mark.parametrize("mode", ["question", "bio"])
def test_recall_perfect_and_wrong_oracles(ds, mode):
    items = recall_items(ds.kb, mode)
    assert len(items) == 30 * 5
    perfect = knowledge_recall(Oracle(items), ds.kb, mode=mode, batch_size=16)
    assert perfect.overall == 1.0 and set(perfect.per_attribute.values()) == {1.0} and perfect.n_items == 150
    wrong = knowledge_recall(Oracle(items, lambda it, k: True), ds.kb, mode=mode)
    assert wrong.overall == 0.0
    # one wrong final byte is enough to miss; only "field" wrong -> 0 there, 1 elsewhere
    last = knowledge_recall(Oracle(items, lambda it, k: it.attribute == "field" and k == len(it.answer) - 1),
                            ds.kb, mode=mode)
    assert last.per_attribute["field"] == 0.0
    assert all(v == 1.0 for a, v in last.per_attribute.items() if a != "field")
    assert last.overall == pytest.approx(4 / 5)


def test_recall_people_subsets_and_errors(ds):
    items = recall_items(ds.kb, "question")
    odd = Oracle(items, lambda it, k: it.person % 2 == 1)
    assert knowledge_recall(odd, ds.kb, people="qa_train").overall == pytest.approx(8 / 15)  # persons 0..14
    assert knowledge_recall(odd, ds.kb, people=[0, 2, 4]).overall == 1.0
    assert knowledge_recall(odd, ds.kb, max_people=4).n_items == 4 * 5
    with pytest.raises(ConfigError, match="people='some'"):
        knowledge_recall(odd, ds.kb, people="some")
    with pytest.raises(ConfigError, match="mode='cloze'"):
        knowledge_recall(odd, ds.kb, mode="cloze")


def test_teacher_forced_check_agrees_with_greedy_generation(ds):
    """The fast exact-match (one forward) against slow step-by-step greedy decoding."""
    items = recall_items(ds.kb, "bio", people=range(6))
    rng = np.random.default_rng(0)
    wrong_at = {(it.person, it.attribute): int(rng.integers(-3, len(it.answer))) for it in items}
    oracle = Oracle(items, lambda it, k: k == wrong_at[(it.person, it.attribute)])
    fast = knowledge_recall(oracle, ds.kb, mode="bio", people=range(6))
    slow = [greedy_generate(oracle, it.prompt, len(TOK.encode(it.answer))) == it.answer for it in items]
    assert fast.overall == pytest.approx(np.mean(slow))
    assert 0 < np.mean(slow) < 1  # the case mixes hits and misses


def test_unigram_baseline_by_hand():
    train = np.array([0, 0, 1], dtype=np.uint16)
    val = np.array([5, 0, 1], dtype=np.uint16)
    out = unigram_baseline(train, val, vocab_size=259)
    total = 3 + 2 + 257  # add-one smoothing
    assert out["loss"] == pytest.approx(-(math.log(3 / total) + math.log(2 / total)) / 2)
    assert out["accuracy"] == pytest.approx(0.5)
