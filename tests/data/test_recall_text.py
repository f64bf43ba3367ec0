"""Associative recall rows and the text-file corpus."""

import numpy as np
import pytest
import torch

from labcore.config import ConfigError
from labcore.data import RecallConfig, TextConfig, associative_recall_accuracy, load_dataset, sample_path
from labcore.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_recall_rows_are_well_formed():
    cfg = RecallConfig(n_train=40, n_val=10, n_pairs=5, key_len=2, value_len=3, seed=2)
    ds = load_dataset(cfg, False)
    assert ds.row_len == cfg.row_len == 1 + 5 * 7 + 2 + 1 + 3 + 1
    rows = ds.val.reshape(-1, cfg.row_len)
    assert rows.shape == (10, cfg.row_len)
    for r in rows:
        assert r[0] == TOK.bos_id and r[-1] == TOK.eos_id
        text = TOK.decode(r.tolist())
        pairs, query = text.split("?")
        kv = dict(p.split("=") for p in pairs.split(","))
        assert len(kv) == 5 and all(len(k) == 2 and k.isalpha() for k in kv)
        qk, qv = query.split("=")
        assert kv[qk] == qv and len(qv) == 3 and qv.isdigit()
        assert TOK.decode(r[cfg.answer_slice].tolist()) == qv
    with pytest.raises(ConfigError, match="n_pairs=30"):
        RecallConfig(n_pairs=30, key_len=1)


def _solver(wrong=False):
    def model(idx):
        B, L = idx.shape
        logits = torch.zeros(B, L, TOK.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            text = bytes(t for t in row if t < 256).decode()
            pairs, query = text.split("?")
            kv = dict(p.split("=") for p in pairs.split(","))
            key = query.split("=")[0]
            ans = kv[key].encode()
            start = row.index(ord("?")) + 1 + len(key) + 1  # first value position in the row
            for j, c in enumerate(ans):
                logits[b, start + j - 1, (c + wrong) % 256] = 1.0
        return logits
    return model


def test_recall_accuracy_on_oracles():
    ds = load_dataset(RecallConfig(n_train=4, n_val=12, n_pairs=4), False)
    assert associative_recall_accuracy(_solver(), ds) == 1.0
    assert associative_recall_accuracy(_solver(wrong=True), ds) == 0.0
    assert associative_recall_accuracy(_solver(), ds, max_rows=5, batch_size=2) == 1.0


def test_text_corpus_split_and_source_hash(tmp_path):
    p = tmp_path / "corpus.txt"
    body = ("the quick brown fox jumps over the lazy dog. " * 10).encode()
    p.write_bytes(body)
    ds = load_dataset(TextConfig(str(p), val_fraction=0.2), tmp_path / "cache")
    whole = np.concatenate([ds.train, ds.val])
    assert whole[0] == TOK.bos_id and whole[-1] == TOK.eos_id
    assert bytes(whole[1:-1].astype(np.uint8)) == body
    assert ds.val.size == whole.size - int(np.floor(0.8 * whole.size))
    # editing the file gives a different dataset (the key includes the file's hash)
    p.write_bytes(body.replace(b"fox", b"cat"))
    ds2 = load_dataset(TextConfig(str(p), val_fraction=0.2), tmp_path / "cache")
    assert ds2.path != ds.path and ds2.status == "built"
    with pytest.raises(ConfigError, match="must be an existing file"):
        TextConfig(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="val_fraction=0.9"):
        TextConfig(str(p), val_fraction=0.9)


def test_shipped_sample_loads():
    ds = load_dataset(TextConfig(str(sample_path("memory_notes"))), False)
    assert ds.train.size > 3000 and TOK.decode(ds.train[:6].tolist()) == "Notes"
