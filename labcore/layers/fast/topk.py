"""``exact_topk``: ``x.topk(k, dim=-1)`` with a faster CPU float32 path (docs/performance.md, "Top-k"
and "Compiled top-k").

Every memory layer ranks scores twice per token (sub-keys, then candidates); on CPU float32 these
rankings are a large share of the layer's time. CPU float32 rows go to the compiled
``labcore.layers.fast.compiled.topk_rows`` when it is built and not disabled (``LABCORE_COMPILED=0``);
otherwise :func:`torch_exact_topk`, the PyTorch tricks below. Both return the same selection as
``torch.topk`` up to ties.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from labcore.layers.fast import compiled
from labcore.layers.fast.bits import ordered_int32


def block_size(n: int, k: int) -> int:
    """Block size g for :func:`exact_topk`'s block maxima: the largest divisor of n that is at most
    sqrt(n/K) (this minimises n/g + K*g); 1 (no blocks) for rows shorter than 16 K."""
    if k < 1 or n < 16 * k:
        return 1
    g = math.isqrt(n // k)
    while n % g:
        g -= 1
    return g


def exact_topk(x: Tensor, k: int, sorted: bool) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)``, faster on CPU float32: the compiled ``topk_rows`` when
    ``compiled.available()``, else :func:`torch_exact_topk`; ``x.topk`` on other devices and dtypes.
    Same selection up to ties (an element equal to the K-th largest may be swapped for another equal
    one); the values are the selected entries of ``x`` and gradients flow to ``x`` as through ``topk``.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.topk(k, dim=-1, sorted=sorted)
    if x.dim() >= 1 and 0 <= k <= x.shape[-1] and compiled.available():
        return compiled.topk_rows(x, k, sorted)
    return torch_exact_topk(x, k, sorted)


def torch_exact_topk(x: Tensor, k: int, sorted: bool) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` with PyTorch ops only, faster on CPU float32 (the path of
    :func:`exact_topk` without the compiled extension). Same result up to ties (an element equal to
    the K-th largest may be swapped for another equal one); NaN ranks above +inf only when its sign
    bit is clear. Gradients flow to ``x`` as through ``topk``.

    Three tricks, all exact:

    1. Block maxima, for long rows (n >= 16 K): split the n entries into n/g blocks of g (g ~
       sqrt(n/K), a divisor of n) and take the top K blocks by their maximum. A block outside
       them lies entirely below K larger block maxima, i.e. below K distinct larger entries, so
       it holds no top-K entry: the top K of the K*g entries of the chosen blocks is the answer.
       n/g + K*g entries are ranked instead of n (1024 -> 384 for K = 32).
    2. Integer ranking of the raw bits: a float32 with its sign bit clear (+0, positive, +inf)
       read as an int32 is >= 0 and such ints order like the floats, while every float with the
       sign bit set reads as a negative int. So in a row whose K-th largest raw int is >= 0, the K
       selected are non-negative floats and everything left out is smaller or equal. (torch's CPU
       top-k is faster on int32 than on float32.)
    3. Rows where that fails are ranked again with :func:`ordered_int32` keys (order-preserving
       for every float).

    Values: gathered back from ``x`` when autograd needs them or step 3 ran; otherwise the
    selected raw ints ARE the float bits (a free view).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.topk(k, dim=-1, sorted=sorted)
    if x.dim() == 1:
        v, i = torch_exact_topk(x.unsqueeze(0), k, sorted)
        return v[0], i[0]
    n = x.shape[-1]
    g = block_size(n, k) if x.numel() >= 1 << 15 else 1                    # small inputs: fewer ops wins
    if g > 1:                                                               # step 1
        lead = x.shape[:-1]
        block_max = F.max_pool1d(x.detach().reshape(-1, 1, n), g).view(*lead, n // g)  # (..., n/g)
        blocks = torch_exact_topk(block_max, k, sorted=False)[1]                # (..., K) best blocks
        pos = (blocks.unsqueeze(-1) * g + torch.arange(g, device=x.device)).flatten(-2)  # (..., K*g) entries
        vals, best = torch_exact_topk(x.gather(-1, pos), k, sorted)             # (..., K)
        return vals, pos.gather(-1, best)
    vals, idx = x.detach().view(torch.int32).topk(k, dim=-1, sorted=sorted)  # step 2
    if k == 0 or x.numel() == 0:
        return x.gather(-1, idx), idx
    if int(vals.min()) < 0:                                                 # some row fails step 2
        rows = (vals.amin(-1) < 0).nonzero(as_tuple=True)                   # index tuple over the leading dims
        idx[rows] = ordered_int32(x.detach()[rows]).topk(k, dim=-1, sorted=sorted).indices  # step 3
        return x.gather(-1, idx), idx
    if torch.is_grad_enabled() and x.requires_grad:
        return x.gather(-1, idx), idx
    return vals.view(torch.float32), idx
