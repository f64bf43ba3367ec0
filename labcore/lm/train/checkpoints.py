"""Checkpoints of a run: ``checkpoints/step-000100.pt`` in the run directory.

A checkpoint holds the model, optimiser, schedule, sampler and RNG states, the configs and the data
key (format :data:`CHECKPOINT_FORMAT`). Writes are atomic (a temporary file, then ``os.replace``),
and only the last ``keep`` checkpoints stay. A run resumes only from a checkpoint whose
:func:`resume_identity`, model config and data key equal its own.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from labcore.lm.train.config import TrainConfig

CHECKPOINT_FORMAT = 1


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's file name (``step-000100.pt`` -> 100); ValueError otherwise."""
    m = re.search(r"step-(\d+)\.pt$", str(path))
    if not m:
        raise ValueError(f"not a checkpoint file name: {path}")
    return int(m.group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``run_dir/checkpoints``, or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*.pt"), key=checkpoint_step)
    return ckpts[-1] if ckpts else None


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as ``ckpt_dir/step-<step>.pt`` atomically; delete all but the last ``keep``."""
    path = ckpt_dir / f"step-{step:06d}.pt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".step-", suffix=".tmp", dir=ckpt_dir)
    os.close(fd)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "step": step, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in sorted(ckpt_dir.glob("step-*.pt"), key=checkpoint_step)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint's state, tensors mapped to ``device`` (our own files: full unpickling)."""
    return torch.load(path, map_location=device, weights_only=False)


def clear_checkpoints(run_dir: str | Path) -> None:
    """Delete every checkpoint of ``run_dir`` (a fresh run in a used directory)."""
    for p in (Path(run_dir) / "checkpoints").glob("step-*.pt"):
        p.unlink()


def resume_identity(train_cfg: TrainConfig) -> dict[str, Any]:
    """The fields that must match between a checkpoint and the run resuming it."""
    d = train_cfg.to_dict()
    for k in ("device", "threads", "progress", "recall_max_people", "keep_checkpoints"):
        d.pop(k)
    return d
