"""Byte-level tokenizer: every UTF-8 byte is a token, plus a few special tokens.

Token ids
---------
====  =====  ==================================================================
id    name   meaning
====  =====  ==================================================================
0-255 bytes  the UTF-8 bytes of the text, id == byte value
256   PAD    padding (never produced by ``encode``; ignored by the loss where used)
257   BOS    beginning of a document (prepended by the data generators)
258   EOS    end of a document (appended by the data generators)
====  =====  ==================================================================

``vocab_size == 259``; a model's ``vocab_size`` must be at least this. Byte tokens make every
dataset self-describing (no merges file, no downloads) and make a model's knowledge measurable in
exact bits: an answer is right only if every byte of it is right.

The tokenizer is saved with every dataset as JSON (``to_dict``/``from_dict``) so a cached dataset
names exactly how its ids map to text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

N_BYTES = 256
SPECIALS: Mapping[str, int] = {"PAD": 256, "BOS": 257, "EOS": 258}


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes -> ids 0..255; specials PAD=256, BOS=257, EOS=258 (``vocab_size`` 259)."""

    kind: str = "byte"
    version: int = 1

    pad_id: int = SPECIALS["PAD"]
    bos_id: int = SPECIALS["BOS"]
    eos_id: int = SPECIALS["EOS"]

    def __post_init__(self) -> None:
        if self.kind != "byte" or self.version != 1:
            raise ValueError(f"ByteTokenizer: kind={self.kind!r}, version={self.version!r} is not "
                             "supported: must be kind='byte', version=1")
        ids = (self.pad_id, self.bos_id, self.eos_id)
        if ids != tuple(SPECIALS.values()):
            raise ValueError(f"ByteTokenizer: special ids {ids} are not allowed: must be "
                             f"{tuple(SPECIALS.values())} (PAD, BOS, EOS)")

    @property
    def vocab_size(self) -> int:
        return N_BYTES + len(SPECIALS)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> list of ids (UTF-8 bytes), optionally wrapped in BOS ... EOS."""
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int], *, skip_specials: bool = True) -> str:
        """Ids -> text. Specials are dropped (or rendered as ``<BOS>`` etc. when
        ``skip_specials=False``); invalid UTF-8 (e.g. a model's half-finished character) is
        replaced by U+FFFD instead of raising."""
        names = {v: k for k, v in SPECIALS.items()}
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < N_BYTES:
                buf.append(i)
                continue
            if i not in names:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_specials:
                out.append(f"<{names[i]}>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "vocab_size": self.vocab_size,
                "specials": dict(SPECIALS)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ByteTokenizer:
        tok = cls(kind=d.get("kind"), version=d.get("version"))
        if d.get("specials", dict(SPECIALS)) != dict(SPECIALS) or d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise ValueError(f"ByteTokenizer.from_dict: specials/vocab_size {d.get('specials')}, "
                             f"{d.get('vocab_size')} do not match this tokenizer "
                             f"({dict(SPECIALS)}, {tok.vocab_size})")
        return tok

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ByteTokenizer:
        return cls.from_dict(json.loads(text))
