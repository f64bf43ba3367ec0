"""Dataset cache: byte-identical regeneration, hit/miss, corruption and mismatch detection; sampler."""

import json
import warnings

import numpy as np
import pytest
import torch

from labcore.config import ConfigError
from labcore.data import (
    KnowledgeConfig,
    RecallConfig,
    data_config_from_dict,
    dataset_dir,
    load_dataset,
    verify_dataset_dir,
)
from labcore.data.cache import BatchSampler

SMALL = KnowledgeConfig(n_people=12, bios_per_person=2, seed=3)


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_regeneration_is_byte_identical(tmp_path):
    a = load_dataset(SMALL, tmp_path / "a")
    b = load_dataset(SMALL, tmp_path / "b")
    assert a.status == b.status == "built"
    assert a.path.name == b.path.name and a.path.name.startswith("knowledge-")
    fa, fb = _files(a.path), _files(b.path)
    assert set(fa) == {"manifest.json", "train.bin", "val.bin", "tokenizer.json", "kb.json"}
    assert fa == fb
    # the in-memory build has the same tokens and manifest
    m = load_dataset(SMALL, False)
    assert np.array_equal(m.train, a.train) and m.manifest == a.manifest
    man = json.loads(fa["manifest.json"])
    assert man["generator"] == "knowledge" and man["seed"] == 3 and man["params"]["n_people"] == 12
    assert man["tokenizer"]["vocab_size"] == 259
    assert man["stats"]["train_tokens"] == a.train.size


def test_key_depends_on_params(tmp_path):
    assert dataset_dir(SMALL, tmp_path) != dataset_dir(KnowledgeConfig(n_people=12, bios_per_person=2, seed=4), tmp_path)
    assert dataset_dir(SMALL, tmp_path) == dataset_dir(KnowledgeConfig(n_people=12, bios_per_person=2, seed=3), tmp_path)


def test_hit_then_corruption_is_detected_and_rebuilt(tmp_path):
    first = load_dataset(SMALL, tmp_path)
    original = _files(first.path)
    assert load_dataset(SMALL, tmp_path).status == "hit"

    # flip one byte of the training tokens
    raw = bytearray(original["train.bin"])
    raw[10] ^= 0xFF
    (first.path / "train.bin").write_bytes(bytes(raw))
    assert "sha256 mismatch" in verify_dataset_dir(first.path, SMALL)
    with pytest.warns(UserWarning, match="train.bin sha256 mismatch"):
        again = load_dataset(SMALL, tmp_path)
    assert again.status.startswith("rebuilt") and _files(first.path) == original

    # truncated file
    (first.path / "val.bin").write_bytes(original["val.bin"][:-2])
    with pytest.warns(UserWarning, match="val.bin has"):
        assert load_dataset(SMALL, tmp_path).status.startswith("rebuilt")

    # manifest whose parameters do not match the request (e.g. hand-edited or hash collision)
    man = json.loads(original["manifest.json"])
    man["params"]["n_people"] = 13
    (first.path / "manifest.json").write_text(json.dumps(man))
    with pytest.warns(UserWarning, match="params mismatch"):
        assert load_dataset(SMALL, tmp_path).status.startswith("rebuilt")

    # a half-written directory without manifest (killed build)
    (first.path / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="manifest.json missing"):
        assert load_dataset(SMALL, tmp_path).status.startswith("rebuilt")
    assert _files(first.path) == original
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset(SMALL, tmp_path).status == "hit"


def test_kb_extra_reloads(tmp_path):
    a = load_dataset(SMALL, tmp_path)
    b = load_dataset(SMALL, tmp_path)
    assert b.status == "hit" and b.kb.people == a.kb.people and len(b.kb.people) == 12


def test_sampler_deterministic_resumable_and_windows():
    tokens = np.arange(1000, dtype=np.uint16) % 259
    s1 = BatchSampler(tokens, 4, 16, seed=7)
    s2 = BatchSampler(tokens, 4, 16, seed=7)
    assert torch.equal(s1.batch(5), s2.batch(5))
    assert not torch.equal(s1.batch(5), s1.batch(6))
    assert not torch.equal(s1.batch(5), BatchSampler(tokens, 4, 16, seed=8).batch(5))
    w = s1.batch(3)
    assert w.shape == (4, 17)
    for row in w:  # every row is a contiguous window of the stream
        start = int(row[0])
        assert torch.equal(row, torch.from_numpy(tokens[start:start + 17].astype(np.int64)))
    x, y = s1.micro_batches(3)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    # resuming: the state is the step
    seq = [s1.next() for _ in range(3)]
    s3 = BatchSampler(tokens, 4, 16, seed=7)
    s3.load_state_dict({"step": 2, "seed": 7, "stream": 0})
    assert all(torch.equal(a, b) for a, b in zip(sum(s3.next(), ()), sum(seq[2], ())))
    with pytest.raises(ValueError, match="different seed"):
        s3.load_state_dict({"step": 1, "seed": 8, "stream": 0})


def test_sampler_accumulation_sees_the_same_tokens():
    tokens = np.arange(500, dtype=np.uint16)
    acc = BatchSampler(tokens, 2, 8, seed=1, grad_accum=3).micro_batches(4)
    big = BatchSampler(tokens, 6, 8, seed=1).micro_batches(4)
    assert len(acc) == 3 and len(big) == 1
    assert torch.equal(torch.cat([x for x, _ in acc]), big[0][0])


def test_sampler_rows_are_aligned_and_errors():
    ds = load_dataset(RecallConfig(n_train=30, n_val=5, n_pairs=3), False)
    s = ds.sampler("train", 8, ds.row_len - 1, seed=0)
    w = s.batch(0)
    assert (w[:, 0] == 257).all() and (w[:, -1] == 258).all()
    with pytest.raises(ValueError, match="seq_len=600"):
        BatchSampler(np.zeros(100, np.uint16), 2, 600, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        BatchSampler(np.zeros(100, np.uint16), 0, 6, seed=0)
    with pytest.raises(ValueError, match="split='test'"):
        ds.sampler("test", 2, 4, 0)


def test_data_config_from_dict_rejects_bad_input():
    cfg = data_config_from_dict({"kind": "knowledge", "n_people": 5})
    assert cfg == KnowledgeConfig(n_people=5)
    with pytest.raises(ConfigError, match="n_peple"):
        data_config_from_dict({"kind": "knowledge", "n_peple": 5})
    with pytest.raises(ConfigError, match="data.kind='wiki'"):
        data_config_from_dict({"kind": "wiki"})
    with pytest.raises(ConfigError, match="n_people='5'"):
        data_config_from_dict({"kind": "knowledge", "n_people": "5"})
    with pytest.raises(ConfigError, match="sample name='nope'"):
        data_config_from_dict({"kind": "text", "sample": "nope"})
    assert data_config_from_dict({"kind": "text", "sample": "memory_notes"}).path.endswith("memory_notes.txt")
