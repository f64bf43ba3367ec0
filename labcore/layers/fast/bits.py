"""Float bit tricks shared by the PyTorch and the compiled top-k paths (docs/performance.md, "Top-k")."""

from __future__ import annotations

import torch
from torch import Tensor


def ordered_int32(x: Tensor) -> Tensor:
    """float32 -> int32 keys with the same order (sign-magnitude to two's complement), no grad."""
    b = x.detach().view(torch.int32)
    key = b >> 31                                   # -1 where negative, else 0
    key &= 0x7FFFFFFF                               # flip magnitude bits of negatives only
    key ^= b
    return key
