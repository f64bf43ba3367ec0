"""Where and in which precision a run computes, and the RNG states a checkpoint saves.

Precision: on CUDA the forward runs under bf16 autocast (parameters and optimiser state stay fp32);
on CPU everything is fp32. ``TrainConfig.dtype`` overrides ("fp32" or "bf16").
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from labcore.config import ConfigError
from labcore.lm.train.config import TrainConfig


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device`` as a torch device ("auto": CUDA when available); ConfigError for an absent CUDA."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device='cuda' is not allowed here: torch.cuda.is_available() is False "
                          "(use 'auto' or 'cpu')")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for plain fp32."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``, disabled when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def seed_all(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (the streams a run draws from)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a run draws from (torch, numpy, Python, CUDA when present)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
