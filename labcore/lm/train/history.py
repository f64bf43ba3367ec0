"""``history.jsonl``: one JSON object per line, flushed as it is written, truncated on resume.

Rows are ``{"kind": "train", "step", "loss", "aux_loss", "lr", "grad_norm", "tokens",
"tokens_per_s", ...}`` and ``{"kind": "eval", "step", "val_loss", "val_ppl", recall, memory/MoE
diagnostics}``. Non-finite floats are written as strings (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from labcore.results import write_atomic


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats replaced by their string ("nan", "inf"), recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


class History:
    """``history.jsonl`` writer: one object per line, flushed; ``truncate(step)`` for resuming."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self._f = None

    def truncate(self, step: int) -> None:
        """Keep the rows up to ``step`` (rewritten atomically)."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        if self._f is None:
            self._f = open(self.path, "a")
        self.rows.append(row)
        self._f.write(json.dumps(json_safe(row)) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
