"""Dataset cache and batching: generated token streams on disk, verified by hash, sampled by step.

A dataset is two token streams (``train``, ``val``: 1-D uint16 arrays of ids of the byte
tokenizer), the tokenizer, and optional extra files (the knowledge base's facts as JSON). The
generators in this package (``knowledge``, ``recall``, ``text``) are pure functions of their
frozen config (seed included), so a dataset is identified by

    key = sha256(canonical JSON of {format, generator, params, tokenizer, source hash})[:12]

and stored under ``<cache_dir>/<generator>-<key>/``::

    train.bin       uint16 little-endian token ids
    val.bin         uint16 little-endian token ids
    tokenizer.json  the tokenizer (ids <-> bytes, specials)
    <extras>        generator-specific files, e.g. kb.json
    manifest.json   generator, params, seed, tokenizer, sha256 + size of every file, content hash;
                    written last: a directory without a valid manifest is not a dataset

Regenerating writes byte-identical files (no timestamps, sorted JSON). Loading re-hashes every
file; a corrupted file or a manifest whose parameters do not match the request is reported with a
warning and the dataset is rebuilt. A build happens in a temporary sibling directory that is
renamed into place (atomic on one filesystem), so a killed build never leaves a half dataset.

Batching: :class:`BatchSampler` maps ``(seed, stream, step)`` to a ``(B_step, T+1)`` block of
token windows with ``numpy.random.default_rng([seed, stream, step])``. The batch of step ``s``
does not depend on what came before, so the sampler's whole state is the next step number and a
resumed run sees exactly the batches an uninterrupted run would. ``B_step = B * grad_accum``
windows are drawn per step and split into ``grad_accum`` micro-batches of ``B``, so accumulating
2 micro-batches of B sees the same tokens as one batch of 2B.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labcore.data.tokenizer import ByteTokenizer
from labcore.results import write_atomic

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u2")  # uint16 little-endian; the byte tokenizer needs 259 ids
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / "data" / "cache"


def default_cache_dir() -> Path:
    """``$LABCORE_DATA_CACHE`` if set, else ``<repo>/data/cache`` (git-ignored)."""
    env = os.environ.get("LABCORE_DATA_CACHE")
    return Path(env) if env else DEFAULT_CACHE_DIR


# ----------------------------------------------------------------------------------------------
# What a generator returns, and what a loaded dataset is.
# ----------------------------------------------------------------------------------------------


@dataclass
class Built:
    """A generator's output: token streams, fixed row length (or None), extra files as bytes."""

    train: np.ndarray
    val: np.ndarray
    row_len: int | None = None
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Dataset:
    """A loaded dataset. ``extras`` holds generator objects rebuilt from the extra files (e.g.
    ``extras["kb"]``, a :class:`labcore.data.knowledge.KnowledgeBase`). ``status`` says how it was
    obtained: "memory" (not cached), "built", "hit" or "rebuilt: <reason>"."""

    generator: str
    config: Any
    train: np.ndarray
    val: np.ndarray
    tokenizer: ByteTokenizer
    manifest: dict[str, Any]
    path: Path | None = None
    row_len: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    status: str = "memory"

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def kb(self):
        """The knowledge base when this is a knowledge dataset, else None."""
        return self.extras.get("kb")

    def sampler(self, split: str, batch_size: int, seq_len: int, seed: int,
                grad_accum: int = 1) -> BatchSampler:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not allowed: must be 'train' or 'val'")
        tokens = self.train if split == "train" else self.val
        return BatchSampler(tokens, batch_size, seq_len, seed, stream=0 if split == "train" else 1,
                            grad_accum=grad_accum, row_len=self.row_len, name=f"{self.generator}.{split}")


@dataclass(frozen=True)
class Generator:
    """A registered generator: its config class, its build function and how to reload extras."""

    name: str
    config_cls: type
    build: Callable[[Any, ByteTokenizer], Built]
    load_extras: Callable[[Any, Mapping[str, bytes]], dict[str, Any]] = lambda cfg, files: {}
    source_hash: Callable[[Any], str | None] = lambda cfg: None


GENERATORS: dict[str, Generator] = {}


def register(gen: Generator) -> Generator:
    GENERATORS[gen.name] = gen
    return gen


def generator_for(cfg: Any) -> Generator:
    for gen in GENERATORS.values():
        if type(cfg) is gen.config_cls:
            return gen
    raise TypeError(f"data config of type {type(cfg).__name__} is not a registered generator config; "
                    f"known: {[g.config_cls.__name__ for g in GENERATORS.values()]}")


# ----------------------------------------------------------------------------------------------
# Hashing, keys, atomic writes.
# ----------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def config_params(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dataset_key(cfg: Any, tokenizer: ByteTokenizer | None = None) -> str:
    gen = generator_for(cfg)
    tokenizer = tokenizer or ByteTokenizer()
    ident = {"format": FORMAT_VERSION, "generator": gen.name, "params": config_params(cfg),
             "tokenizer": tokenizer.to_dict(), "source_sha256": gen.source_hash(cfg)}
    return sha256_bytes(canonical_json(ident).encode())[:12]


def dataset_dir(cfg: Any, cache_dir: str | Path | None = None) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"{generator_for(cfg).name}-{dataset_key(cfg)}"


def tokens_to_bytes(tokens: np.ndarray) -> bytes:
    return np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()


# ----------------------------------------------------------------------------------------------
# Build, write, verify, load.
# ----------------------------------------------------------------------------------------------


def _encode_files(built: Built, tokenizer: ByteTokenizer) -> dict[str, bytes]:
    files = {"train.bin": tokens_to_bytes(built.train), "val.bin": tokens_to_bytes(built.val),
             "tokenizer.json": tokenizer.to_json().encode()}
    for name in built.files:
        if name in files or name == "manifest.json" or "/" in name:
            raise ValueError(f"generator extra file name {name!r} is not allowed")
    files.update(built.files)
    return files


def _manifest(cfg: Any, gen: Generator, tokenizer: ByteTokenizer, built: Built,
              files: Mapping[str, bytes]) -> dict[str, Any]:
    hashes = {name: sha256_bytes(data) for name, data in sorted(files.items())}
    content = sha256_bytes("".join(f"{k}:{v}\n" for k, v in hashes.items()).encode())
    params = config_params(cfg)
    return {
        "format": FORMAT_VERSION,
        "generator": gen.name,
        "key": dataset_key(cfg, tokenizer),
        "params": params,
        "seed": params.get("seed"),
        "source_sha256": gen.source_hash(cfg),
        "tokenizer": tokenizer.to_dict(),
        "token_dtype": TOKEN_DTYPE.str,
        "row_len": built.row_len,
        "stats": {"train_tokens": int(built.train.size), "val_tokens": int(built.val.size)},
        "files": {name: {"sha256": hashes[name], "bytes": len(files[name])} for name in sorted(files)},
        "content_hash": content,
    }


def verify_dataset_dir(path: Path, cfg: Any) -> str | None:
    """None when ``path`` holds a complete dataset for ``cfg``; else the reason it does not."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        return "manifest.json missing"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({e})"
    gen = generator_for(cfg)
    expect = {"format": FORMAT_VERSION, "generator": gen.name, "params": config_params(cfg),
              "source_sha256": gen.source_hash(cfg), "tokenizer": ByteTokenizer().to_dict()}
    for k, v in expect.items():
        if manifest.get(k) != v:
            return f"manifest {k} mismatch (cached {manifest.get(k)!r}, requested {v!r})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not {"train.bin", "val.bin", "tokenizer.json"} <= set(files):
        return "manifest lists no train.bin/val.bin/tokenizer.json"
    for name, meta in files.items():
        fpath = path / name
        if not fpath.is_file():
            return f"{name} missing"
        if fpath.stat().st_size != meta.get("bytes"):
            return f"{name} has {fpath.stat().st_size} bytes, manifest says {meta.get('bytes')}"
        if sha256_file(fpath) != meta.get("sha256"):
            return f"{name} sha256 mismatch (corrupted)"
    content = sha256_bytes("".join(f"{k}:{files[k]['sha256']}\n" for k in sorted(files)).encode())
    if content != manifest.get("content_hash"):
        return "content_hash mismatch"
    return None


def _read_dataset(path: Path, cfg: Any, status: str) -> Dataset:
    gen = generator_for(cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    tokenizer = ByteTokenizer.from_json((path / "tokenizer.json").read_text())
    train = np.fromfile(path / "train.bin", dtype=TOKEN_DTYPE)
    val = np.fromfile(path / "val.bin", dtype=TOKEN_DTYPE)
    extra = {name: (path / name).read_bytes() for name in manifest["files"]
             if name not in ("train.bin", "val.bin", "tokenizer.json")}
    return Dataset(gen.name, cfg, train, val, tokenizer, manifest, path, manifest.get("row_len"),
                   gen.load_extras(cfg, extra), status)


def build_dataset(cfg: Any) -> Dataset:
    """Generate in memory, write nothing."""
    gen = generator_for(cfg)
    tokenizer = ByteTokenizer()
    built = gen.build(cfg, tokenizer)
    files = _encode_files(built, tokenizer)
    manifest = _manifest(cfg, gen, tokenizer, built, files)
    extra = {k: v for k, v in built.files.items()}
    return Dataset(gen.name, cfg, built.train.astype(TOKEN_DTYPE), built.val.astype(TOKEN_DTYPE),
                   tokenizer, manifest, None, built.row_len, gen.load_extras(cfg, extra), "memory")


def write_dataset_dir(path: Path, cfg: Any) -> None:
    """Generate ``cfg`` into a temporary sibling directory, then rename it to ``path``."""
    gen = generator_for(cfg)
    tokenizer = ByteTokenizer()
    built = gen.build(cfg, tokenizer)
    files = _encode_files(built, tokenizer)
    manifest = _manifest(cfg, gen, tokenizer, built, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, data in files.items():
            write_atomic(tmp / name, data)
        write_atomic(tmp / "manifest.json", canonical_json(manifest).encode())  # last
        if path.exists():
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process renamed a finished build into place first: keep theirs.
            if verify_dataset_dir(path, cfg) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_dataset(cfg: Any, cache_dir: str | Path | None | bool = None, *, rebuild: bool = False) -> Dataset:
    """The dataset for ``cfg``: from the cache when it verifies, else (re)built and cached.

    ``cache_dir=None`` uses :func:`default_cache_dir`; ``cache_dir=False`` builds in memory only.
    """
    if cache_dir is False:
        return build_dataset(cfg)
    path = dataset_dir(cfg, None if cache_dir is None else Path(cache_dir))
    reason = "rebuild requested" if rebuild else (verify_dataset_dir(path, cfg) if path.exists() else None)
    if not path.exists() and not rebuild:
        write_dataset_dir(path, cfg)
        status = "built"
    elif reason is None:
        status = "hit"
    else:
        warnings.warn(f"dataset cache {path} is invalid ({reason}); rebuilding it", stacklevel=2)
        write_dataset_dir(path, cfg)
        status = f"rebuilt: {reason}"
        if (again := verify_dataset_dir(path, cfg)) is not None:
            raise RuntimeError(f"dataset cache {path} still invalid after a rebuild: {again}")
    return _read_dataset(path, cfg, status)


# ----------------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------------


class BatchSampler:
    """Deterministic, resumable sampler of ``(B, T+1)`` token windows (x = w[:, :-1], y = w[:, 1:]).

    ``batch(step)`` is a pure function of ``(seed, stream, step)``; ``next()`` returns the batch
    of ``self.step`` and advances it. ``row_len`` (fixed-length rows, e.g. associative recall)
    aligns every window to the start of a row.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, *,
                 stream: int = 0, grad_accum: int = 1, row_len: int | None = None,
                 name: str = "tokens") -> None:
        for pname, v in (("batch_size", batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BatchSampler.{pname}={v!r} is not allowed: must be an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"BatchSampler.seed={seed!r} is not allowed: must be an integer >= 0")
        n = int(tokens.shape[0])
        if n < seq_len + 1:
            raise ValueError(f"BatchSampler.seq_len={seq_len} is not allowed for {name}: windows of "
                             f"seq_len+1={seq_len + 1} tokens need at least that many tokens, "
                             f"the stream has {n}")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.stream, self.grad_accum, self.row_len = stream, grad_accum, row_len
        if row_len is not None:
            self.n_starts = (n - (seq_len + 1)) // row_len + 1  # rows whose window fits
        else:
            self.n_starts = n - (seq_len + 1) + 1
        self.step = 0

    def batch(self, step: int) -> torch.Tensor:
        """``(B * grad_accum, T+1)`` long windows of ``step``."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        starts = rng.integers(0, self.n_starts, size=self.batch_size * self.grad_accum)
        if self.row_len is not None:
            starts = starts * self.row_len
        offsets = torch.from_numpy(starts)[:, None] + torch.arange(self.seq_len + 1)  # (B_step, T+1)
        return self.tokens[offsets]

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The step's batch split into ``grad_accum`` (x, y) pairs of shape (B, T)."""
        w = self.batch(step)
        return [(c[:, :-1], c[:, 1:]) for c in w.split(self.batch_size)]

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.micro_batches(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "stream": self.stream}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("stream", self.stream) != self.stream:
            raise ValueError(f"BatchSampler state {dict(state)} was saved with a different seed/stream "
                             f"(this sampler: seed={self.seed}, stream={self.stream})")
        self.step = int(state["step"])
