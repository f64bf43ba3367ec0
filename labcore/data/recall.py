"""Associative recall: a list of random key-value pairs, then a query key; answer its value.

Every row is one fixed-length byte sequence (``row_len`` tokens)::

    BOS k_1 = v_1 , k_2 = v_2 , ... , k_P = v_P ? k_q = v_q EOS
        key: key_len letters a-z    value: value_len digits 0-9    q uniform in 1..P

Keys in a row are distinct; keys and values are redrawn for every row, so the answer can only be
found *in context* (an induction / lookup skill, the in-context counterpart of the knowledge task
whose facts live in the parameters). ``row_len = 1 + P*(key_len+value_len+2) + key_len + 1
+ value_len + 1`` (the last pair has ',' replaced by '?'). Training windows are aligned to row
starts (:class:`labcore.data.cache.BatchSampler` with ``row_len``).

:func:`associative_recall_accuracy` scores the val rows by exact match of the value after the
query, with the same teacher-forced argmax check as knowledge recall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labcore.config import ConfigError, check_int
from labcore.data.cache import Built, Dataset, Generator, register
from labcore.data.tokenizer import ByteTokenizer

LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)


@dataclass(frozen=True)
class RecallConfig:
    """n_train / n_val rows; n_pairs key-value pairs per row; key_len letters, value_len digits."""

    n_train: int = 2000
    n_val: int = 200
    n_pairs: int = 8
    key_len: int = 2
    value_len: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        o = "RecallConfig"
        check_int(o, "n_train", self.n_train, min_value=1, max_value=10_000_000)
        check_int(o, "n_val", self.n_val, min_value=1, max_value=1_000_000)
        check_int(o, "n_pairs", self.n_pairs, min_value=1, max_value=4096)
        check_int(o, "key_len", self.key_len, min_value=1, max_value=16)
        check_int(o, "value_len", self.value_len, min_value=1, max_value=16)
        check_int(o, "seed", self.seed, min_value=0)
        if self.n_pairs > 26 ** self.key_len:
            raise ConfigError(f"{o}.n_pairs={self.n_pairs} is not allowed: must be <= 26**key_len = "
                              f"{26 ** self.key_len} (keys in a row are distinct)")

    @property
    def row_len(self) -> int:
        return 1 + self.n_pairs * (self.key_len + self.value_len + 2) + self.key_len + 1 + self.value_len + 1

    @property
    def answer_slice(self) -> slice:
        """Positions of the answer's value tokens inside a row."""
        end = self.row_len - 1
        return slice(end - self.value_len, end)


def make_rows(cfg: RecallConfig, n: int, rng: np.random.Generator, tok: ByteTokenizer) -> np.ndarray:
    """(n, row_len) uint16 rows."""
    P, kl, vl = cfg.n_pairs, cfg.key_len, cfg.value_len
    rows = np.empty((n, cfg.row_len), dtype=np.uint16)
    for r in range(n):
        keys: set[bytes] = set()
        key_list = []
        while len(key_list) < P:
            k = LETTERS[rng.integers(0, 26, size=kl)].tobytes()
            if k not in keys:
                keys.add(k)
                key_list.append(k)
        vals = [DIGITS[rng.integers(0, 10, size=vl)].tobytes() for _ in range(P)]
        q = int(rng.integers(0, P))
        body = b",".join(k + b"=" + v for k, v in zip(key_list, vals)) + b"?" + key_list[q] + b"=" + vals[q]
        rows[r] = [tok.bos_id, *body, tok.eos_id]
    return rows


def _build(cfg: RecallConfig, tok: ByteTokenizer) -> Built:
    train = make_rows(cfg, cfg.n_train, np.random.default_rng([cfg.seed, 0]), tok)
    val = make_rows(cfg, cfg.n_val, np.random.default_rng([cfg.seed, 1]), tok)
    return Built(train.reshape(-1), val.reshape(-1), cfg.row_len)


register(Generator("recall", RecallConfig, _build))


@torch.no_grad()
def associative_recall_accuracy(model: Callable[..., Any], data: Dataset, *, max_rows: int | None = 256,
                                batch_size: int = 64, device: torch.device | str = "cpu") -> float:
    """Fraction of val rows whose whole value after the query is the argmax prediction."""
    cfg: RecallConfig = data.config
    rows = torch.from_numpy(data.val.astype(np.int64)).view(-1, cfg.row_len)  # (n_val, row_len)
    if max_rows is not None:
        rows = rows[:max_rows]
    sl = cfg.answer_slice
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    hits = 0
    try:
        for s in range(0, rows.shape[0], batch_size):
            r = rows[s: s + batch_size]
            out = model(r[:, :-1].to(device))  # (b, row_len-1) -> logits (b, row_len-1, V)
            logits = out.logits if hasattr(out, "logits") else out
            pred = logits.argmax(-1).cpu()  # position t predicts token t+1
            got = pred[:, sl.start - 1: sl.stop - 1]
            hits += int((got == r[:, sl]).all(dim=1).sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return hits / rows.shape[0]
