"""Answer-token metrics and stored knowledge in bits, from logits and an answer mask.

For a batch of rows with targets ``y`` (B, T) and an answer mask ``m`` (B, T) (True where ``y[b, t]``
is an answer token; ``logits[b, t]`` predicts ``y[b, t]``), per row b (one fact query):

    ce_b       = sum_{t: m[b,t]} -log softmax(logits[b, t])[y[b, t]]       nats, the answer's cross-entropy
    correct_b  = all_{t: m[b,t]} argmax logits[b, t] == y[b, t]            exact match (greedy decoding
                                                                          emits the whole answer)
    loss       = sum_b ce_b / sum_b |{t: m[b,t]}|                          nats per answer token
    accuracy   = mean_b correct_b

Knowledge stored (the per-fact form of the bit-complexity measure of Allen-Zhu & Li, "Physics of
Language Models 3.3", arXiv 2404.05405, whose models store about 2 bits per parameter): with ``A``
the answer space (objects drawn uniformly, so a fact carries log2 A bits) and ``ce_f`` a fact's
answer cross-entropy in bits (the mean over the rows that ask for fact f, e.g. its phrasings),

    stored_bits    = sum_f max(0, log2 A - ce_f)        a fact predicted at chance or worse counts 0
    bits_per_param = stored_bits / n_params

A model that puts probability 1 on every answer stores ``n_facts * log2 A`` bits; one at the uniform
distribution stores 0. The floor keeps confidently wrong facts from cancelling known ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labcore.config import ConfigError
from labcore.data.facts import FactsEval, inputs_targets


@dataclass(frozen=True)
class AnswerScores:
    """Per row: ``ce_nats`` (answer cross-entropy, summed over the row's answer tokens),
    ``correct`` (every answer token is the argmax) and ``n_tokens`` (answer tokens in the row)."""

    ce_nats: torch.Tensor
    correct: torch.Tensor
    n_tokens: torch.Tensor

    @property
    def loss(self) -> float:
        """Mean cross-entropy per answer token, nats."""
        return float(self.ce_nats.sum() / self.n_tokens.sum())

    @property
    def accuracy(self) -> float:
        """Exact-match accuracy over rows."""
        return float(self.correct.float().mean())


def answer_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> AnswerScores:
    """logits (B, T, V), targets (B, T) long, mask (B, T) bool -> per-row scores (see module doc).
    Every row needs at least one answer token; targets outside the mask are not read."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"answer_scores: logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and "
                         f"mask {tuple(mask.shape)} must be (B, T, V), (B, T), (B, T)")
    mask = mask.to(torch.bool)
    n_tokens = mask.sum(dim=1)  # (B,)
    if bool((n_tokens == 0).any()):
        raise ValueError(f"answer_scores: rows {torch.nonzero(n_tokens == 0).flatten()[:5].tolist()} have no "
                         f"answer token in the mask")
    y = targets.masked_fill(~mask, 0)  # any valid id where unmasked; those positions are zeroed below
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, T)
    ce = (nll * mask).sum(dim=1)  # (B,)
    hit = (logits.argmax(dim=-1) == y) | ~mask  # (B, T): unmasked positions count as hits
    return AnswerScores(ce, hit.all(dim=1), n_tokens)


def answer_metrics(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``{"answer_loss": nats per answer token, "answer_accuracy": exact match per row}``."""
    s = answer_scores(logits, targets, mask)
    return {"answer_loss": s.loss, "answer_accuracy": s.accuracy}


@dataclass(frozen=True)
class StoredKnowledge:
    """``bits`` stored (floored per fact), ``n_facts``, ``capacity_bits = n_facts * log2 A`` (all of
    it known) and ``fraction = bits / capacity_bits``."""

    bits: float
    n_facts: int
    capacity_bits: float

    @property
    def fraction(self) -> float:
        return self.bits / self.capacity_bits if self.capacity_bits > 0 else float("nan")


def stored_bits(ce_nats: torch.Tensor | np.ndarray, answer_space: int,
                fact: torch.Tensor | np.ndarray | None = None) -> StoredKnowledge:
    """Knowledge stored, in bits: per fact ``max(0, log2(answer_space) - ce_f / ln 2)`` summed.

    ``ce_nats``: per-row answer cross-entropy (nats); ``fact``: the fact each row asks for (rows of
    one fact are averaged first, e.g. its phrasings); None: every row is its own fact.
    """
    if isinstance(answer_space, bool) or not isinstance(answer_space, int) or answer_space < 2:
        raise ConfigError(f"stored_bits: answer_space={answer_space!r} is not allowed: must be an integer >= 2")
    ce = np.asarray(torch.as_tensor(ce_nats, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
    if fact is None:
        ce_fact = ce
    else:
        f = np.asarray(torch.as_tensor(fact).cpu(), dtype=np.int64).reshape(-1)
        if f.shape != ce.shape:
            raise ValueError(f"stored_bits: fact has {f.shape[0]} rows, ce_nats {ce.shape[0]}")
        _, inv = np.unique(f, return_inverse=True)
        ce_fact = np.bincount(inv, weights=ce) / np.bincount(inv)  # mean per fact
    h = math.log2(answer_space)
    bits = float(np.maximum(0.0, h - ce_fact / math.log(2)).sum())
    return StoredKnowledge(bits, int(ce_fact.shape[0]), ce_fact.shape[0] * h)


def bits_per_param(bits: float, n_params: int) -> float:
    """Stored bits per parameter (Allen-Zhu & Li report about 2 for trained transformers)."""
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 1:
        raise ConfigError(f"bits_per_param: n_params={n_params!r} is not allowed: must be an integer >= 1")
    return bits / n_params


def _logits(model: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate_facts(model: Callable[..., Any], rows: FactsEval, answer_space: int, *, batch_size: int = 4096,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Answer loss, exact-match accuracy and stored bits of ``model`` (``model(x) -> logits`` or an
    ``LMOutput``) on evaluation rows (e.g. ``FactSet.eval_set("stored")``): keys ``answer_loss``,
    ``answer_accuracy``, ``stored_bits``, ``stored_fraction``, ``n_rows``."""
    if device is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = p.device if p is not None else "cpu"
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ce, correct, n_tok = [], [], []
    try:
        for s in range(0, len(rows), batch_size):
            x, y = inputs_targets(rows.tokens[s: s + batch_size], rows.answer_mask[s: s + batch_size])
            x, y = x.to(device), y.to(device)
            sc = answer_scores(_logits(model, x), y, y != -100)
            ce.append(sc.ce_nats.cpu())
            correct.append(sc.correct.cpu())
            n_tok.append(sc.n_tokens.cpu())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    sc = AnswerScores(torch.cat(ce), torch.cat(correct), torch.cat(n_tok))
    kn = stored_bits(sc.ce_nats, answer_space, rows.fact)
    return {"answer_loss": sc.loss, "answer_accuracy": sc.accuracy, "stored_bits": kn.bits,
            "stored_fraction": kn.fraction, "n_rows": float(len(rows))}
