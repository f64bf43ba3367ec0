"""The MoE expert computation on assignments grouped by expert (docs/performance.md, "MoE experts").

Input everywhere: ``x (N_tok, D)``; the kept assignments sorted by expert, assignment ``a`` reading
token ``tok[a]`` with weight ``w[a]``; expert e owning ``group_sizes[e]`` consecutive assignments.
Output: ``y (N_tok, D)`` with ``y_t = sum over t's kept assignments of w_a f_e(x_t)`` (U2 eq. 2),
where ``f_e(x) = (SiLU(x W_gate[e]) * x W_up[e]) W_down[e]``. Three paths compute it:

* :func:`padded_experts` (CPU): experts grouped by :func:`plan_padded_groups` and padded to the
  group's largest row count, so a group is one batched GEMM.
* :func:`grouped_experts` with ``grouped=True``: ``F.grouped_mm`` over blocks of consecutive
  experts (:func:`expert_blocks`); ``grouped=False``: one expert per block, plain products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

CPU_BLOCK_BYTES = 1 << 20
"""~ one core's L2: the size of the (rows, 2I) activation of one ``grouped_mm`` block in CPU inference."""
PADDED_BLOCK_BYTES = 3 << 19
"""``padded_bmm``: a group's (n, R, 2I) activation is at most this many bytes per thread (1.5 MiB)."""
GROUP_OVERHEAD_FLOPS = 15e6
"""Fixed cost of one ``padded_bmm`` group (gather, two bmm calls, SiLU, scatter, Python), priced as
FLOPs; a row costs 6*D*I."""
SPLIT_GEMM_FLOPS = 64e6
"""Below this size (both products of one expert's rows) a single-expert GEMM split over the threads
is slower per row than a batched one (see :func:`plan_padded_groups`)."""


def grouped_mm_ok(*tensors: Tensor) -> bool:
    """Whether F.grouped_mm accepts these operands: float32/bf16/fp16, 16-byte aligned pointers and
    strides (the CPU kernel's rule; CUDA needs the same plus sm80+)."""
    if not hasattr(F, "grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) < (8, 0):
            return False
        if t.numel() and t.data_ptr() % 16:
            return False
        if any(s != 1 and (s * t.element_size()) % 16 for s in t.stride()):
            return False
    return True


def swiglu_down(h: Tensor, w: Tensor, down: Callable[[Tensor], Tensor], d_expert: int, d_model: int) -> Tensor:
    """``w * down(SiLU(h_gate) * h_up)`` for pre-activations ``h (..., 2I)`` (gate half first) and
    row weights ``w (..., 1)``; ``down`` applies W_down. ``w`` multiplies the narrower of the
    ``(..., I)`` activation and the ``(..., D)`` output (the same product, W_down being linear)."""
    I = d_expert
    a = F.silu(h[..., :I]).mul_(h[..., I:])                                 # (..., I)  SiLU(W_gate x) * W_up x
    if I <= d_model:
        return down(a.mul_(w))
    return down(a).mul_(w)                                                  # (..., D)


def expert_blocks(n_experts: int, n_rows: int, sizes: list[int] | None,
                  max_rows: int | None) -> list[tuple[int, int, int, int]]:
    """Split experts 0..E-1 (rows grouped by expert, ``sizes[e]`` rows each) into blocks of
    consecutive experts ``(e0, e1, r0, r1)``: experts e0..e1-1 own rows r0..r1-1.

    ``max_rows=None``: one block of everything (``sizes`` unused, may be None). ``max_rows=0``:
    one block per expert that has rows. Otherwise experts are added to a block while its rows stay
    <= max_rows (a block always holds at least one expert). Blocks without rows are left out."""
    E = n_experts
    if max_rows is None:
        return [(0, E, 0, n_rows)]
    blocks, e0, r0, rows = [], 0, 0, 0
    for e, n in enumerate(sizes):
        if e > e0 and rows + n > max_rows:
            blocks.append((e0, e, r0, r0 + rows))
            e0, r0, rows = e, r0 + rows, 0
        rows += n
    blocks.append((e0, E, r0, r0 + rows))
    return [b for b in blocks if b[3] > b[2]]  # blocks without rows do no work


def plan_padded_groups(sizes: list[int], max_rows: int, threads: int = 1, max_group: int | None = None,
                       overhead_rows: float = 32, split_rows: float = math.inf) -> list[tuple[int, int, int]]:
    """Group consecutive experts for the ``padded_bmm`` path: ``(e0, e1, R)`` per group, experts
    e0..e1-1 (``sizes[e]`` rows each) padded to ``R = max(sizes[e0:e1])`` rows, so that the group
    is one ``bmm`` over ``(e1 - e0, R, .)``. Every expert with rows is in exactly one group; an
    expert without rows is in a group only where padding it is cheaper than starting a new group
    (few tokens: most experts are empty, and a group costs far more than a few padded rows).

    Dynamic programming over the experts in order minimises the modelled time, in units of one
    row computed by the whole machine::

        cost(group of n experts) = R * n_eff(n) + overhead_rows          (0 if R == 0: no group)
        n_eff(n) = ceil(n / threads) * threads     n > 1: each thread runs whole GEMMs, so an odd
                                                   group leaves a thread idle for one GEMM
        n_eff(1) = 1.15 if R < split_rows else 1   one GEMM split over the threads: ~15 % slower
                                                   per row for small GEMMs, as fast for large ones
                                                   (threads = 1: n_eff(n) = n)

    ``overhead_rows`` prices the fixed work of a group (gather, two bmm, SiLU, scatter) in rows.
    A group holds at most ``max_group`` experts (default ``max(8, 2 * threads)``) and
    ``n * R <= max_rows`` rows (a single expert may exceed it)."""
    E = len(sizes)
    max_group = max(8, 2 * threads) if max_group is None else max_group
    n_eff = [0.0] + [float(-(-n // threads) * threads) for n in range(1, max_group + 1)]  # n_eff[n], n > 1
    best = [0.0] + [math.inf] * E  # best[e]: cost of experts 0..e-1
    start = [0] * (E + 1)  # start[e]: first expert of the last group ending at e; -1: expert e-1 left out
    for e1 in range(1, E + 1):
        if sizes[e1 - 1] == 0:  # leave an empty expert out of every group
            best[e1], start[e1] = best[e1 - 1], -1
        R = 0
        for e0 in range(e1 - 1, max(e1 - max_group, 0) - 1, -1):
            if sizes[e0] > R:
                R = sizes[e0]
            n = e1 - e0
            if R == 0:
                continue  # only empty experts so far: covered by leaving them out
            if n > 1 and n * R > max_rows:
                break
            single = 1.15 if threads > 1 and R < split_rows else 1.0
            cost = best[e0] + R * (single if n == 1 else n_eff[n]) + overhead_rows
            if cost < best[e1]:
                best[e1], start[e1] = cost, e0
    groups, e1 = [], E
    while e1 > 0:
        e0 = start[e1]
        if e0 < 0:
            e1 -= 1
            continue
        groups.append((e0, e1, max(sizes[e0:e1])))
        e1 = e0
    return groups[::-1]


def padded_experts(x: Tensor, tok: Tensor, group_sizes: Tensor, w: Tensor, gate_up: Tensor,
                   down: Tensor) -> Tensor:
    """The ``padded_bmm`` path (CPU): ``y (N_tok, D)`` from the sorted assignments (module doc);
    ``gate_up (E, D, 2I)``, ``down (E, I, D)``.

    Per group of experts e0..e1-1 (n experts, R rows each after padding)::

        X_g = x[tok_pad]                                 gather       (n, R, D)
        H_g = bmm(X_g, [W_gate | W_up][e0:e1])                        (n, R, 2I)
        Y_g = bmm(w * SiLU(H_g[..., :I]) * H_g[..., I:], W_down[e0:e1])   (n, R, D)
        y.index_add_(0, tok_pad_out, Y_g)                scatter-add  (N_tok + 1, D)

    Padding rows read token 0 and add into an extra row N_tok that is dropped, with weight 0."""
    N, D = x.shape
    E, I = gate_up.shape[0], down.shape[1]
    M = tok.numel()
    sizes = group_sizes.tolist()
    threads = torch.get_num_threads()
    max_rows = max(1, threads * PADDED_BLOCK_BYTES // (2 * I * x.element_size()))
    row_flops = 6 * D * I  # both products of one expert row
    groups = plan_padded_groups(sizes, max_rows, threads, overhead_rows=GROUP_OVERHEAD_FLOPS / row_flops,
                                split_rows=SPLIT_GEMM_FLOPS / row_flops)
    # Padded layout: group (e0, e1, R) owns (e1 - e0) * R consecutive rows, expert e0 + i the
    # i-th R of them. shift[e] = (padded row of expert e's first assignment) - (its sorted row).
    first = [0] * E
    for e in range(1, E):
        first[e] = first[e - 1] + sizes[e - 1]
    shift, P = [0] * E, 0
    for e0, e1, R in groups:
        for e in range(e0, e1):
            shift[e] = P + (e - e0) * R - first[e]
        P += (e1 - e0) * R
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), group_sizes)  # (M,)
    pos = torch.tensor(shift, device=x.device)[expert_of_row] + torch.arange(M, device=x.device)  # (M,)
    tok_in = tok.new_zeros(P).index_copy_(0, pos, tok)  # (P,) padding rows read token 0 ...
    tok_out = tok.new_full((P,), N).index_copy_(0, pos, tok)  # (P,) ... and add into row N, dropped
    w = w.to(x.dtype)
    w_pad = w.new_zeros(P).index_copy(0, pos, w).unsqueeze(1)  # (P, 1) weight 0 on padding
    y = x.new_zeros(N + 1, D)  # (N_tok + 1, D)
    p = 0
    for e0, e1, R in groups:
        n, rows = e1 - e0, (e1 - e0) * R
        xg = x.index_select(0, tok_in[p:p + rows]).view(n, R, D)  # (n, R, D)
        h = torch.bmm(xg, gate_up[e0:e1])  # (n, R, D) @ (n, D, 2I) -> (n, R, 2I)
        out = swiglu_down(h, w_pad[p:p + rows].view(n, R, 1),  # (n, R, I) @ (n, I, D) -> (n, R, D)
                          lambda a, e0=e0, e1=e1: torch.bmm(a, down[e0:e1]), I, D)
        y.index_add_(0, tok_out[p:p + rows], out.view(rows, D))  # (rows, D) into (N_tok + 1, D)
        p += rows
    return y[:N]  # (N_tok, D)


def grouped_experts(x: Tensor, tok: Tensor, group_sizes: Tensor, w: Tensor, gate_up: Tensor, down: Tensor,
                    grouped: bool, records_grad: bool) -> Iterator[tuple[int, int, Tensor]]:
    """Run the experts on the sorted assignments (module doc) one block of consecutive experts at a
    time; yields ``(r0, r1, out)``, ``out (r1 - r0, D)`` = ``w_a f_e(x_tok_a)`` for assignments
    r0..r1-1.

    ``grouped`` (the ``grouped_mm`` path): all experts in one block on a GPU and in training
    (``records_grad``; no host sync, one grouped GEMM per product), in CPU inference blocks whose
    ``(rows, 2I)`` activation is about ``CPU_BLOCK_BYTES``, so gather, both products and the
    scatter stay in cache. Otherwise (the ``loop`` path) one expert per block."""
    D, I = x.shape[1], down.shape[1]
    w = w.to(x.dtype).unsqueeze(1)  # (M, 1)
    # (the lambdas below run at once; default arguments bind this iteration's experts)
    if not grouped:
        max_rows = 0  # one expert per block
    elif x.device.type == "cpu" and not records_grad:
        max_rows = max(1, CPU_BLOCK_BYTES // (2 * I * x.element_size()))
    else:
        max_rows = None  # one block: no host sync, one grouped GEMM per product
    sizes = group_sizes.tolist() if max_rows is not None else None
    for e0, e1, r0, r1 in expert_blocks(gate_up.shape[0], tok.numel(), sizes, max_rows):
        xb = x.index_select(0, tok[r0:r1])  # (M_b, D) rows of experts e0..e1-1
        if e1 - e0 == 1:  # one expert: plain matrix products
            h = xb @ gate_up[e0]  # (M_b, D) @ (D, 2I) -> (M_b, 2I)
            out = swiglu_down(h, w[r0:r1], lambda a, e=e0: a @ down[e], I, D)  # (M_b, D)
        else:
            offs = group_sizes[e0:e1].cumsum(0).to(torch.int32)  # (E_b,) end row of each expert
            h = F.grouped_mm(xb, gate_up[e0:e1], offs=offs)  # (M_b, 2I)
            out = swiglu_down(h, w[r0:r1], lambda a, e0=e0, e1=e1, offs=offs: F.grouped_mm(
                a, down[e0:e1], offs=offs), I, D)  # (M_b, D)
        yield r0, r1, out
