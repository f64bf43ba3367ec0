"""Tensors derived from parameters, computed once and reused in inference while their sources are
unchanged (docs/performance.md, "Inference caches")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class DerivedCache:
    """Tensors derived from parameters or buffers, reused while their sources are unchanged.

    An entry is valid while every source has the same storage address, version counter (bumped by
    every in-place write: optimiser steps, ``copy_``, ``load_state_dict``), dtype, device and shape
    as when it was computed. The entry keeps a (detached) reference to each source, so a freed
    storage cannot come back at the same address and fake a match. Tensors without a version
    counter (inference tensors) are never cached.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple, tuple[Tensor, ...], Any]] = {}

    @staticmethod
    def _stamp(sources: tuple[Tensor, ...]) -> tuple | None:
        try:
            return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in sources)
        except RuntimeError:                                                # inference tensor: no version
            return None

    def get(self, name: str, sources: tuple[Tensor, ...], compute: Callable[[], Any]) -> Any:
        stamp = self._stamp(sources)
        if stamp is None:
            return compute()
        hit = self.entries.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[2]
        value = compute()
        self.entries[name] = (stamp, tuple(t.detach() for t in sources), value)
        return value


def reuse(cache: DerivedCache, training: bool, name: str, sources: tuple[Tensor, ...],
          compute: Callable[[], Any], *, always: bool = False) -> Any:
    """``compute()``, cached in ``cache`` while ``sources`` are unchanged.

    Parameter-derived tensors are cached only in eval mode (``training`` False) with grad disabled
    (inference): in training they must be recomputed so gradients flow through them.
    ``always=True`` is for integer tables derived from buffers (no gradient); those are built
    outside inference mode so they can be used in any mode.
    """
    if always:
        with torch.inference_mode(False), torch.no_grad():
            return cache.get(name, sources, compute)
    if training or torch.is_grad_enabled():
        return compute()
    return cache.get(name, sources, compute)
