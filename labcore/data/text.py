"""Any text file as a byte-level corpus: the first (1 - val_fraction) of its bytes train, the rest validate.

The split is contiguous (no shuffling), so validation text is text the model has not seen, and
the cache key includes the file's sha256: editing the file gives a new dataset, never a stale one.
A document is the whole file: ``BOS bytes... EOS`` is split at the byte boundary
``floor((1 - val_fraction) * n_bytes)``. A few small samples written for the lab ship in
``data/samples/`` (:func:`sample_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labcore.config import ConfigError, check_float
from labcore.data.cache import Built, Generator, register, sha256_file
from labcore.data.tokenizer import ByteTokenizer

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "data" / "samples"


def sample_path(name: str) -> Path:
    """Path of a shipped sample, e.g. ``sample_path("memory_notes")``."""
    p = SAMPLES_DIR / (name if name.endswith(".txt") else name + ".txt")
    if not p.is_file():
        have = sorted(x.stem for x in SAMPLES_DIR.glob("*.txt"))
        raise ConfigError(f"sample name={name!r} is not allowed: must be one of {have}")
    return p


@dataclass(frozen=True)
class TextConfig:
    """path: a UTF-8 (or any) text file; val_fraction: tail share held out for validation."""

    path: str
    val_fraction: float = 0.1
    seed: int = 0  # unused by the split (it is contiguous); kept so every data config has a seed

    def __post_init__(self) -> None:
        o = "TextConfig"
        if not isinstance(self.path, str | Path):
            raise ConfigError(f"{o}.path={self.path!r} is not allowed: must be a path string")
        object.__setattr__(self, "path", str(Path(self.path).expanduser().resolve()))
        if not Path(self.path).is_file():
            raise ConfigError(f"{o}.path={self.path!r} is not allowed: must be an existing file")
        check_float(o, "val_fraction", self.val_fraction, min_value=0.0, max_value=0.5, min_inclusive=False)
        n = Path(self.path).stat().st_size
        if n < 64:
            raise ConfigError(f"{o}.path={self.path!r} is not allowed: the file has {n} bytes, need >= 64")


def _build(cfg: TextConfig, tok: ByteTokenizer) -> Built:
    data = Path(cfg.path).read_bytes()
    ids = np.concatenate([[tok.bos_id], np.frombuffer(data, dtype=np.uint8), [tok.eos_id]]).astype(np.uint16)
    cut = int(np.floor((1.0 - cfg.val_fraction) * ids.size))
    return Built(ids[:cut], ids[cut:])


register(Generator("text", TextConfig, _build, source_hash=lambda cfg: sha256_file(Path(cfg.path))))
