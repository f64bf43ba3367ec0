"""UltraMem's value read as one ``F.embedding_bag`` call (docs/performance.md, "Value bags").

The readable read (U2 eqs. 8-9) pools ``score^(c) * V[row, chunk c]`` into block p of an
(E, D_v) buffer per token, then projects E*D_v -> D. Here the pooling is one ``embedding_bag``
over the (N*h, D_v/h) chunk view of the value table, with one bag per (token, core, block): the
pooled buffer comes out in (core, block, d) order, and the projection weight's columns are
permuted once to match (:func:`core_major_proj_weight`) instead of the activations every call.

The backward of a weighted bag (2-D indices: PKM's read, UltraMem's at E = 1; 1-D indices with
offsets: UltraMem's IVE read) is :func:`weighted_bag`'s: the table gradient and the weight gradient in one
pass over the indices (:func:`labcore.layers.fast.compiled.bag_backward`), instead of PyTorch's
CPU embedding-bag backward, which sorts the indices and materialises the (n, S, D) products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from labcore.layers.fast import compiled


def ive_key_table(perm: Tensor, n_cores: int) -> Tensor:
    """(E*N,) ``P[v] * h``: the shuffled slot (U2 eq. 8) pre-multiplied by the number of cores, so
    that ``key % (N*h)`` is the row of the (N*h, D_v/h) chunk view and ``key // (N*h)`` the block.
    int32 when it fits, which halves the bytes of the random lookups into it."""
    dtype = torch.int32 if perm.numel() * n_cores < 2**31 else torch.int64
    return (perm * n_cores).to(dtype)


def value_bags(slots: Tensor, core_scores: Tensor, ive_key: Tensor | None, n_cores: int, expansion: int,
               n_slots: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """``F.embedding_bag`` arguments ``(indices, offsets, per_sample_weights)`` over the (N*h, D_v/h)
    chunk view for virtual ``slots (N_tok, S)`` weighted by ``core_scores (N_tok, S, h)``.

    The bags, in order, are (token, core, block), so the output is (N_tok*h*E, D_v/h). ``offsets``
    is None for E = 1 (2-D indices, one bag of S entries per (token, core)). ``ive_key``:
    :func:`ive_key_table` (unused when E = 1)."""
    n_tok, S = slots.shape
    h, E, N = n_cores, expansion, n_slots
    core_ids = torch.arange(h, device=slots.device)
    w = core_scores.to(dtype).transpose(1, 2)                               # (N_tok, h, S)
    if E == 1:                                                              # physical row = slot
        idx = slots.unsqueeze(1) * h + core_ids.view(1, h, 1)               # (N_tok, h, S)
        return idx.reshape(n_tok * h, S), None, w.reshape(n_tok * h, S)     # one bag per (token, core)
    # key = P[v]*h = p*(N*h) + r*h. Sorting each token's keys groups its slots by block p, so the
    # bags (token, core, block) are contiguous runs of the index list; a bag starts where
    # searchsorted finds its block's first key.
    key, order = ive_key[slots].sort(dim=-1)                                # (N_tok, S), by block
    ints = dict(device=slots.device, dtype=key.dtype)                       # int32 unless E*N*h >= 2^31
    bounds = torch.arange(E, **ints) * (N * h)                              # first key of block p
    starts = torch.searchsorted(key, bounds.expand(n_tok, E).contiguous(),
                                out_int32=key.dtype == torch.int32)         # (N_tok, E)
    base = torch.arange(n_tok * h, **ints).view(n_tok, h, 1) * S
    offsets = (base + starts.unsqueeze(1)).flatten()                        # bag (t, c, p) starts at (t*h+c)*S + start
    idx = (key % (N * h)).unsqueeze(1) + core_ids.to(key.dtype).view(1, h, 1)  # (N_tok, h, S): row*h + c
    w = w.gather(-1, order.unsqueeze(1).expand(n_tok, h, S))                # (N_tok, h, S), sorted order
    return idx.flatten(), offsets, w.flatten()


def core_major_proj_weight(weight: Tensor, expansion: int, n_cores: int) -> Tensor:
    """The (D, E*D_v) projection weight with its input columns reordered from (block, core, d), the
    layout of U2 eq. 9's pooled buffer, to (core, block, d), the layout :func:`value_bags` pools
    into. Same sums, a different order of the columns."""
    d_model = weight.shape[0]
    Dc = weight.shape[1] // (expansion * n_cores)
    return weight.view(d_model, expansion, n_cores, Dc).transpose(1, 2).reshape(d_model, -1)


class _WeightedBag(torch.autograd.Function):
    """y[b] = Σ_{j in bag b} w[j] V[idx[j]] over the (N*h, F/h) chunk view V of ``table`` (N, F):
    forward is ``F.embedding_bag``; backward :func:`labcore.layers.fast.compiled.bag_backward` (a
    dense (N, F) gradient) or, ``sparse``, :func:`~labcore.layers.fast.compiled.sparse_bag_backward`
    (a sparse COO one over the rows read)."""

    @staticmethod
    def forward(ctx, idx: Tensor, table: Tensor, w: Tensor, offsets: Tensor | None, n_chunks: int,
                sparse: bool) -> Tensor:
        view = table.view(table.shape[0] * n_chunks, table.shape[1] // n_chunks)
        ctx.save_for_backward(idx, view, w, offsets)
        ctx.n_chunks, ctx.sparse, ctx.table_shape = n_chunks, sparse, table.shape
        return F.embedding_bag(idx, view, offsets, mode="sum", per_sample_weights=w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        idx, view, w, offsets = ctx.saved_tensors
        need_table, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if ctx.sparse and need_table:
            gt, gw = compiled.sparse_bag_backward(gy.contiguous(), idx, w, view, offsets=offsets,
                                                  n_chunks=ctx.n_chunks, need_w=need_w)
        else:
            gt, gw = compiled.bag_backward(gy.contiguous(), idx, w, view, offsets=offsets, need_table=need_table,
                                           need_w=need_w)
            gt = None if gt is None else gt.view(ctx.table_shape)
        return None, gt, gw, None, None, None


def weighted_bag(idx: Tensor, table: Tensor, w: Tensor, offsets: Tensor | None = None, *, n_chunks: int = 1,
                 sparse: bool = False) -> Tensor:
    """``F.embedding_bag(idx, V, offsets, mode="sum", per_sample_weights=w)`` over the (N*h, F/h)
    chunk view V of ``table`` (N, F) (h = ``n_chunks``; 1: the table itself), with the fast
    backward; for 2-D ``idx`` (n, S) (one bag of S rows per b) or 1-D ``idx`` with ``offsets`` (the
    IVE read's bags). The same values; gradients equal to float32 rounding. ``sparse``: the
    table's gradient is a sparse COO tensor over the rows read (for
    :class:`labcore.lm.sparse_optim.LazyAdamW`). Falls back to the plain call when nothing needs a
    gradient."""
    if table.shape[1] % n_chunks:
        raise ValueError(f"weighted_bag: n_chunks={n_chunks} does not divide the table's {table.shape[1]} columns")
    if (not (torch.is_grad_enabled() and (table.requires_grad or w.requires_grad))
            or (idx.dim() == 2) != (offsets is None)):                      # nothing to record, or let torch report it
        view = table.view(table.shape[0] * n_chunks, table.shape[1] // n_chunks)
        return F.embedding_bag(idx, view, offsets, mode="sum", per_sample_weights=w)
    return _WeightedBag.apply(idx.long(), table, w.to(table.dtype), None if offsets is None else offsets.long(),
                              n_chunks, sparse)
