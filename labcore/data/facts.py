"""Synthetic fact memorisation: (subject, relation) -> object, one answer token per fact.

A task whose knowledge load is a knob and whose stored knowledge is measurable in bits. It is the
bare-bones version of the bit-complexity experiments of Allen-Zhu & Li ("Physics of Language Models
3.3: Knowledge Capacity Scaling Laws", arXiv 2404.05405): facts drawn independently and uniformly,
so every fact carries exactly ``log2(n_objects)`` bits that can only be stored, never inferred.

Facts
-----
``n_subjects`` subjects S, ``n_relations`` relations R, ``n_objects`` objects O (the answer space)::

    subject s      a distinct random string of ``subject_len`` symbols from ``subject_alphabet`` symbols
    fact (s, r)    object o(s, r) ~ Uniform{0 .. n_objects-1}, independent over all (s, r)
    n_facts        = n_subjects * n_relations
    bits per fact  = log2(n_objects)
    knowledge load = n_facts * log2(n_objects) bits            (what a model is asked to store)

Phrasings (templates): relation r has ``n_phrasings`` phrasings j, each a word token w(r, j) of its
own. Phrasing j puts the word after the subject when j is even and before it when j is odd (word
order varies, like "X's birthplace is" and "the birthplace of X is"). Every row is ``row_len =
subject_len + 3`` tokens and its answer is the last token::

    j even:  BOS  s_1 .. s_k  w(r, j)  o(s, r)
    j odd:   BOS  w(r, j)  s_1 .. s_k  o(s, r)

Held-out phrasings: for each fact, ``held_out_phrasings`` of its phrasings (chosen at random per fact)
never occur in the training data; the others do. Every phrasing is trained on the facts that do not
hold it out, so the model can learn what the word means, and a held-out row asks for a stored fact in
a phrasing never seen *with that subject* (the knowledge-extraction test of Allen-Zhu & Li,
"Physics of Language Models 3.1", arXiv 2309.14316).

Token ids (all below 256, so rows are streams of the byte tokenizer's ids, BOS = 257, and any model
with ``vocab_size >= 259`` reads them)::

    objects    0 .. O-1                              (the object with index o is token o)
    symbols    O .. O+A-1                            (A = subject_alphabet)
    words      O+A + r*n_phrasings + j               (relation r, phrasing j)

Splits and evaluation
---------------------
- train: one row per (fact, training phrasing), shuffled; ``n_facts * (n_phrasings -
  held_out_phrasings)`` rows.
- the fixed evaluation set (:meth:`FactSet.eval_set`): split "stored" is every training row, in fact
  order (the memorisation test: all stored facts, in every phrasing they were stored in); split
  "held_out" is one row per (fact, held-out phrasing) (empty when ``held_out_phrasings = 0``).
- val stream: the evaluation rows, "stored" then "held_out".

Loss and accuracy count the answer token only (the answer mask): key tokens are random strings
whose prediction would only spend capacity on memorising the subject list. With rows ``tokens`` and
their ``answer_mask``, :func:`inputs_targets` gives the model input ``x = tokens[:, :-1]`` and targets
``y = tokens[:, 1:]`` with -100 (ignored by ``labcore.lm.model.LM``'s loss) outside the answers.
Metrics from logits: :mod:`labcore.experiments.knowledge_metrics`.

Cached like every generator (``load_dataset(FactsConfig(...))``): train/val streams with
``row_len``, and the facts as ``subjects.npy``, ``objects.npy``, ``held_out.npy``;
``dataset.extras["facts"]`` is the :class:`FactSet`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from labcore.config import ConfigError, check_choice, check_int
from labcore.data.cache import Built, Generator, register
from labcore.data.tokenizer import N_BYTES, SPECIALS, ByteTokenizer

EVAL_SPLITS = ("stored", "held_out", "all")
IGNORE_INDEX = -100  # labcore.lm.model.LM's cross-entropy ignores these targets


@dataclass(frozen=True)
class FactsConfig:
    """n_subjects S, n_relations R (n_facts = S * R); n_objects O: the answer space (bits per fact
    log2 O); n_phrasings: phrasings per relation; held_out_phrasings: per fact, phrasings kept out of
    training for the held-out evaluation; subject_len k: symbols per subject (the key is k + 1 tokens);
    subject_alphabet A: symbols subjects are spelled with; seed: everything random."""

    n_subjects: int = 1000
    n_relations: int = 4
    n_objects: int = 128
    n_phrasings: int = 1
    held_out_phrasings: int = 0
    subject_len: int = 3
    subject_alphabet: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        o = "FactsConfig"
        check_int(o, "n_subjects", self.n_subjects, min_value=1, max_value=2_000_000)
        check_int(o, "n_relations", self.n_relations, min_value=1, max_value=64)
        check_int(o, "n_objects", self.n_objects, min_value=2, max_value=N_BYTES - 2)
        check_int(o, "n_phrasings", self.n_phrasings, min_value=1, max_value=16)
        check_int(o, "held_out_phrasings", self.held_out_phrasings, min_value=0,
                  max_value=self.n_phrasings - 1)
        check_int(o, "subject_len", self.subject_len, min_value=1, max_value=16)
        check_int(o, "subject_alphabet", self.subject_alphabet, min_value=1, max_value=N_BYTES - 2)
        check_int(o, "seed", self.seed, min_value=0)
        if self.subject_alphabet ** self.subject_len > 2 ** 62:
            raise ConfigError(f"{o}: subject_alphabet**subject_len = {self.subject_alphabet}**{self.subject_len} "
                              f"is not allowed: must be <= 2**62 (subjects are drawn as 64-bit codes)")
        if self.n_subjects > self.subject_alphabet ** self.subject_len:
            raise ConfigError(f"{o}.n_subjects={self.n_subjects} is not allowed with subject_alphabet="
                              f"{self.subject_alphabet}, subject_len={self.subject_len}: must be <= "
                              f"subject_alphabet**subject_len = {self.subject_alphabet ** self.subject_len} "
                              f"(subjects are distinct strings)")
        if self.n_facts > 8_000_000:
            raise ConfigError(f"{o}: n_subjects * n_relations = {self.n_facts} facts is not allowed: "
                              f"must be <= 8000000")
        used = self.n_objects + self.subject_alphabet + self.n_relations * self.n_phrasings
        if used > N_BYTES:
            raise ConfigError(f"{o}: n_objects + subject_alphabet + n_relations * n_phrasings = {used} "
                              f"token ids is not allowed: must be <= {N_BYTES} (ids below the byte "
                              f"tokenizer's specials; got n_objects={self.n_objects}, subject_alphabet="
                              f"{self.subject_alphabet}, n_relations={self.n_relations}, n_phrasings="
                              f"{self.n_phrasings})")

    @property
    def n_facts(self) -> int:
        return self.n_subjects * self.n_relations

    @property
    def row_len(self) -> int:
        """Tokens per row: BOS, subject_len symbols, one word, one answer."""
        return self.subject_len + 3

    @property
    def n_train_phrasings(self) -> int:
        return self.n_phrasings - self.held_out_phrasings

    @property
    def bits_per_fact(self) -> float:
        return math.log2(self.n_objects)

    @property
    def knowledge_bits(self) -> float:
        """n_facts * log2(n_objects): the knowledge load in bits."""
        return self.n_facts * self.bits_per_fact

    @property
    def symbol_offset(self) -> int:
        return self.n_objects

    @property
    def word_offset(self) -> int:
        return self.n_objects + self.subject_alphabet

    def word_id(self, relation: int, phrasing: int) -> int:
        return self.word_offset + relation * self.n_phrasings + phrasing


@dataclass(frozen=True)
class FactsEval:
    """Evaluation rows: ``tokens`` (n, row_len) int64, ``answer_mask`` (n, row_len) bool (True at
    answer tokens), and per row ``fact`` (s * R + r), ``subject``, ``relation``, ``phrasing`` and
    ``held_out`` (the phrasing was kept out of training for this fact)."""

    tokens: np.ndarray
    answer_mask: np.ndarray
    fact: np.ndarray
    subject: np.ndarray
    relation: np.ndarray
    phrasing: np.ndarray
    held_out: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, keep: np.ndarray) -> FactsEval:
        return FactsEval(*(a[keep] for a in (self.tokens, self.answer_mask, self.fact, self.subject,
                                              self.relation, self.phrasing, self.held_out)))


@dataclass(frozen=True)
class FactSet:
    """The facts of a :class:`FactsConfig`: ``subjects`` (S, k) symbol token ids, ``objects`` (S, R)
    object indices (= token ids), ``held_out`` (S, R, P) bool: phrasing j of fact (s, r) is not in
    the training data."""

    config: FactsConfig
    subjects: np.ndarray
    objects: np.ndarray
    held_out: np.ndarray

    @property
    def n_facts(self) -> int:
        return self.config.n_facts

    @property
    def answer_space(self) -> int:
        return self.config.n_objects

    def rows(self, subject: np.ndarray, relation: np.ndarray, phrasing: np.ndarray) -> np.ndarray:
        """(n, row_len) int64 rows for the given (subject, relation, phrasing) index arrays."""
        cfg, k = self.config, self.config.subject_len
        subject, relation, phrasing = (np.asarray(a, dtype=np.int64) for a in (subject, relation, phrasing))
        out = np.empty((subject.shape[0], cfg.row_len), dtype=np.int64)
        out[:, 0] = SPECIALS["BOS"]
        word = cfg.word_offset + relation * cfg.n_phrasings + phrasing  # (n,)
        after = phrasing % 2 == 0  # word after the subject
        out[after, 1: 1 + k] = self.subjects[subject[after]]
        out[after, 1 + k] = word[after]
        out[~after, 1] = word[~after]
        out[~after, 2: 2 + k] = self.subjects[subject[~after]]
        out[:, -1] = self.objects[subject, relation]
        return out

    def _indices(self, held_out: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(subject, relation, phrasing) of every row whose phrasing is (not) held out, in fact order."""
        s, r, j = np.nonzero(self.held_out == held_out)  # C order: fact s*R + r, then phrasing
        return s, r, j

    def train_rows(self) -> np.ndarray:
        """Every (fact, training phrasing) row, shuffled with the config's seed."""
        rows = self.rows(*self._indices(False))
        order = np.random.default_rng([self.config.seed, 1]).permutation(rows.shape[0])
        return rows[order]

    def eval_set(self, split: str = "all") -> FactsEval:
        """The fixed evaluation rows: "stored" (every training row, fact order), "held_out" (every
        held-out phrasing row) or "all" (stored then held out)."""
        check_choice("FactSet.eval_set", "split", split, EVAL_SPLITS)
        parts = []
        for flag in (False, True):
            if (split == "stored" and flag) or (split == "held_out" and not flag):
                continue
            s, r, j = self._indices(flag)
            parts.append((s, r, j, np.full(s.shape, flag)))
        s, r, j, h = (np.concatenate(a) for a in zip(*parts))
        tokens = self.rows(s, r, j)
        return FactsEval(tokens, answer_mask(tokens.shape[0], self.config.row_len), s * self.config.n_relations + r,
                         s, r, j, h)

    # -- storage ---------------------------------------------------------------------------------

    def files(self) -> dict[str, bytes]:
        return {"subjects.npy": _npy(self.subjects.astype(np.uint8)),
                "objects.npy": _npy(self.objects.astype(np.uint8)),
                "held_out.npy": _npy(self.held_out.astype(np.bool_))}

    @classmethod
    def from_files(cls, cfg: FactsConfig, files: Mapping[str, bytes]) -> FactSet:
        arrays = {name: np.load(io.BytesIO(files[f"{name}.npy"]), allow_pickle=False)
                  for name in ("subjects", "objects", "held_out")}
        S, R, P, k = cfg.n_subjects, cfg.n_relations, cfg.n_phrasings, cfg.subject_len
        for name, shape in (("subjects", (S, k)), ("objects", (S, R)), ("held_out", (S, R, P))):
            if arrays[name].shape != shape:
                raise ValueError(f"facts {name}.npy has shape {arrays[name].shape}, the config needs {shape}")
        return cls(cfg, arrays["subjects"].astype(np.int64), arrays["objects"].astype(np.int64),
                   arrays["held_out"].astype(bool))


def _npy(a: np.ndarray) -> bytes:
    """``np.save`` bytes (no timestamps: regenerating is byte-identical)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def answer_mask(n_rows: int, row_len: int) -> np.ndarray:
    """(n_rows, row_len) bool, True at the answer token (the last one of each row)."""
    mask = np.zeros((n_rows, row_len), dtype=bool)
    mask[:, -1] = True
    return mask


def make_facts(cfg: FactsConfig) -> FactSet:
    """The facts of ``cfg`` (a pure function of it)."""
    rng = np.random.default_rng([cfg.seed, 0])
    A, k = cfg.subject_alphabet, cfg.subject_len
    codes = rng.choice(A ** k, size=cfg.n_subjects, replace=False)  # distinct subjects as base-A numbers
    digits = (codes[:, None] // A ** np.arange(k - 1, -1, -1)) % A  # (S, k) base-A digits
    subjects = cfg.symbol_offset + digits
    objects = rng.integers(0, cfg.n_objects, size=(cfg.n_subjects, cfg.n_relations))
    held = np.zeros((cfg.n_subjects, cfg.n_relations, cfg.n_phrasings), dtype=bool)
    if cfg.held_out_phrasings:
        pick = rng.random(held.shape).argsort(axis=-1)[..., : cfg.held_out_phrasings]  # random per fact
        np.put_along_axis(held, pick, True, axis=-1)
    return FactSet(cfg, subjects.astype(np.int64), objects.astype(np.int64), held)


def inputs_targets(tokens: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, L) and their answer mask (B, L) -> model input x (B, L-1) and targets y (B, L-1):
    ``y[:, t] = tokens[:, t+1]`` where that token is an answer, else -100 (ignored by the loss)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    mask = torch.as_tensor(mask, dtype=torch.bool, device=tokens.device)
    if tokens.dim() != 2 or mask.shape != tokens.shape:
        raise ValueError(f"inputs_targets: tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must be "
                         f"the same (B, L) shape")
    y = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return tokens[:, :-1], y


def _build(cfg: FactsConfig, tok: ByteTokenizer) -> Built:
    facts = make_facts(cfg)
    train = facts.train_rows()
    val = facts.eval_set("all").tokens
    return Built(train.reshape(-1), val.reshape(-1), cfg.row_len, facts.files())


register(Generator("facts", FactsConfig, _build,
                   lambda cfg, files: {"facts": FactSet.from_files(cfg, files)}))
