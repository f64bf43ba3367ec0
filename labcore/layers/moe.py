"""Top-k mixture of SwiGLU experts (MoE), dropless or with a capacity factor, with shared experts.

Symbols (notation table in ``labcore/__init__.py``): D model width, E experts, K experts per token
(``top_k``), I expert hidden width (``d_expert``), N_tok = B*T tokens, C per-expert capacity,
I_s shared-expert hidden width.

The layer (U2 eqs. 1-2, papers.md section 7.1)
------------------------------------------------
::

    logits  l = x W_r^T                          W_r (E, D)       l (N_tok, E)       [U2 eq. 1]
    probs   p = softmax(l)                                        p (N_tok, E)
    route   (w, idx) = ROUTER(l)                 w, idx (N_tok, K)  (table below)
    expert  f_e(x) = (SiLU(x W_gate[e]) * x W_up[e]) W_down[e]   (SwiGLU; x a row vector)
    output  y = sum_{j<K} w_j * f_{idx_j}(x)  +  g(x) * f_shared(x)                  [U2 eq. 2]

``g(x) = sigmoid(w_g . x)`` with ``shared_gate=True`` (Qwen2-MoE's ``shared_expert_gate``), else 1.
With ``n_shared_experts`` = S the shared part is one SwiGLU MLP of hidden width
``I_s = d_shared or S*I`` (S always-on experts of width I with weight 1 are exactly one MLP of width
S*I: DeepSeek's fused shared experts). Fine-grained experts (OLMoE's "granularity") are only a
config: more, narrower experts and a larger K.

Weights: ``router.weight`` (E, D) (an ``nn.Linear``); the experts fused in the ``x @ W`` layout,
``gate_up_proj`` (E, D, 2I) = ``[W_gate | W_up]`` with the I gate columns first, then the I up columns,
and ``down_proj`` (E, I, D). This is the transpose of Hugging Face transformers 5.x's fused experts
(``nn.Linear`` layout, ``(E, 2I, D)`` and ``(E, D, I)``; ``labcore.interop`` transposes on copy)
because the CPU GEMMs run faster with the weight as a plain row-major right operand: the
``padded_bmm`` products 6-7 % faster, the E=64, K=8 forward ~4 % (measured, ``bmm`` of (8, 145, 256)
rows by cold expert weights, 2 threads: 16.4 vs 17.6 ms per 8 groups); training alike.

Router conventions (``MoEConfig.router``) -- the most common source of mismatch between MoE codes
-------------------------------------------------------------------------------------------------
=======================  =====================================================  =========================
router                   weights w of the K chosen experts                      used by
=======================  =====================================================  =========================
``softmax_topk_renorm``  p = softmax(l); keep top-K of p; w = p_K / sum(p_K)     Mixtral; Qwen-MoE with
                                                                                ``norm_topk_prob=True``
``topk_softmax``         keep top-K of l; w = softmax(l_K)                      GraniteMoE
``softmax_topk``         p = softmax(l); keep top-K of p; w = p_K (no renorm)   Switch, Qwen2-MoE default,
                                                                                OLMoE, DeepSeek-V2
=======================  =====================================================  =========================

The first two are the same function (softmax is monotone, and renormalising the top-K softmax
probabilities cancels the full partition function), so their outputs and gradients agree up to
rounding; the tests check it. ``softmax_topk`` is a different layer: its weights sum to less than
1. All three are multiplied by ``routed_scaling`` (DeepSeek's ``routed_scaling_factor``; 1.0
elsewhere). ``aux.scores`` holds exactly the applied weights (after renormalisation, scaling and
capacity drops).

Dropless vs capacity factor
---------------------------
``capacity_factor=None`` (default) is dropless (megablocks/OLMoE): every assignment is computed.
With a capacity factor CF each expert processes at most::

    C = ceil(CF * N_tok * K / E)          (evaluated in float64; see ``expert_capacity``)

assignments per call. Over-subscribed experts keep their assignments in token order (earlier
tokens win; a token's K choices are distinct experts, so they never compete with each other) and
the rest are dropped: they contribute zero (the residual stream passes through unchanged, as in
Switch/GShard), their ``aux.scores`` entry is 0 and their number is ``aux.stats["dropped_tokens"]``
(dropped *assignments*, an integer stored as a float). papers.md writes the capacity per token
(``CF * tokens / E``) for top-1 routing; labcore multiplies by K so that CF = 1 means "exactly
enough slots for perfectly balanced routing" for every K (GShard/Switch top-2 convention).

Auxiliary losses (Switch eqs. 4-6 via papers.md section 7.1; ST-MoE z-loss)
--------------------------------------------------------------------------
::

    f_i = (number of top-K assignments to expert i) / (N_tok * K)         sum_i f_i = 1
    P_i = mean over tokens of p_i                                       sum_i P_i = 1
    L_balance = E * sum_i f_i P_i         (= 1 at perfectly uniform routing, its minimum)
    L_z       = mean over tokens of (logsumexp_i l_i)^2     (computed as l_j - log p_j, j = top-1)
    aux_loss  = balance_coef * L_balance + z_coef * L_z

f is counted from the router's choices before capacity drops and carries no gradient; the
gradient reaches the router through P (as in Switch). ``aux.losses`` holds the unweighted
``"balance"`` and ``"z"``; ``aux.aux_loss`` the weighted sum. Hugging Face's
``load_balancing_loss_func`` normalises f per top-k slot, so its value is K times labcore's
(its uniform minimum is K, labcore's is 1); OLMoE/megablocks' coefficient 0.01 was tuned for their
own normalisation, so compare coefficients with care.

The fast path (``MoE.forward``)
-------------------------------
No Python loop over tokens::

    a = t*K + j                 assignment ids, token-major             (N_tok*K,)
    order = argsort of idx[a]   grouped by expert (stable with a capacity: token order)   (M,)
    tok = order // K            token of each sorted assignment          (M,)

then one of three expert paths (``MoEConfig.expert_impl``; "auto" picks ``padded_bmm`` for CPU
inference, i.e. when no autograd graph is recorded, and ``grouped_mm`` otherwise -- in training one
grouped GEMM per product back-propagates faster than padded groups: 82 vs 130 ms forward+backward
at E=64, K=8, I=128, 4x256 tokens, 2 threads):

``padded_bmm`` (CPU). Consecutive experts are grouped (``plan_padded_groups``) and every expert of
a group is padded to the group's largest row count R, so that a group is one batched GEMM::

    per group of experts e0..e1-1 (n = e1 - e0 experts, R rows each after padding):
        X_g = x[tok_pad]                                    gather       (n, R, D)
        H_g = bmm(X_g, [W_gate | W_up][e0:e1])                           (n, R, 2I)
        A_g = w * SiLU(H_g[..., :I]) * H_g[..., I:]                      (n, R, I)
        Y_g = bmm(A_g, W_down[e0:e1])                                    (n, R, D)
        y.index_add_(0, tok_pad_out, Y_g)                   scatter-add  (N_tok + 1, D)

Padding rows read token 0 and add into an extra row N_tok that is dropped, with weight 0. Why pad:
the CPU ``bmm`` hands each thread whole GEMMs (MKL's batched GEMM), which at these sizes runs ~20 %
faster than splitting every small per-expert GEMM across the threads as ``grouped_mm`` and a
single matrix product do. The planner keeps the padding small (11 % extra rows at E=64, K=8 with random
routing) by grouping experts of similar size, prefers groups of a multiple of the thread count,
and caps a group at ``threads x PADDED_BLOCK_BYTES`` (1.5 MiB) of ``(rows, 2I)`` activation so the
gather, both products and the scatter run in cache. ``python -m labcore.bench layers`` (HF Mixtral
eager, 4x256 tokens, D=256, 2 threads, 22 runs on a 2-vCPU VM whose speed drifts): E=64, K=8,
I=128 median 1.55x, range 1.37-1.84x, 17 of 22 runs >= 1.5x (``grouped_mm`` blocks: 1.34-1.56x);
E=8, K=2, I=512, where the experts' GEMMs are large and mostly run alone, 1.03-1.24x. Both sides
run the same 1.6 GFLOP of expert GEMMs (labcore 11 % more with padding): ~14-15 ms of labcore's
~18-20 ms in the VM's fast state, near what MKL reaches on these shapes with cold weights; the
rest is routing (~1.6 ms), gather, SiLU and scatter. One bmm over all experts padded to the
largest was 1.6x slower than ``grouped_mm`` (25 % wasted rows); planning with a third of the group
overhead (14 groups, 2.6 % fewer rows) was no faster.

``grouped_mm`` (GPU; CPU on request). ``torch.nn.functional.grouped_mm`` multiplies each expert's
consecutive sorted rows by that expert's matrix, no padding::

    per block of consecutive experts e0..e1-1 (rows r0..r1 of the sorted assignments):
        X_b = x[tok[r0:r1]]                                 gather       (M_b, D)
        H_b = grouped_mm(X_b, [W_gate | W_up][e0:e1])       per-expert   (M_b, 2I)
        A_b = w * SiLU(H_b[:, :I]) * H_b[:, I:]                          (M_b, I)
        Y_b = grouped_mm(A_b, W_down[e0:e1])                             (M_b, D)
        y.index_add_(0, tok[r0:r1], Y_b)                    scatter-add  (N_tok, D)

It has kernels for float32/bfloat16/float16 with 16-byte aligned strides (CUDA sm80+, CPU in
torch >= 2.10; a one-expert block uses a plain matrix product). One block of all experts on a GPU
(no host sync) and in training; in CPU inference, blocks whose ``(M_b, 2I)`` activation is about
``CPU_BLOCK_BYTES``. On CUDA, where
``index_add_`` uses atomics, rows are instead copied to token-major slots and summed over K in a
fixed order, so results stay deterministic.

``loop``: the same, one expert per block with plain matrix products (any dtype and device).

In all three, ``w`` multiplies the narrower of the ``(rows, I)`` activation and the ``(rows, D)``
output (the same product, W_down being linear). Also tried on CPU and slower: combining through
``(N_tok, K, D)`` slots with a ``(1, K) @ (K, D)`` bmm per token (30x the cost of ``index_add_``),
and running expert ranges in Python threads with one BLAS thread each (the OpenMP threads of the
calling thread spin for milliseconds after each parallel region and steal the cores).

Where labcore differs from public code
--------------------------------------
- No random routing and no router noise at all, in training or eval: two community MoE ports route
  the second expert at random even in eval mode (implementations.md); Mixtral's optional
  ``router_jitter_noise`` multiplies the input (in place!) during training -- labcore has neither,
  so the same weights and input always give bitwise-identical outputs.
- Balance loss normalised per assignment (minimum 1, not K; see above).
- Capacity in assignments, earlier tokens win, dropped assignments reported (many codes drop
  silently, or give priority to all first choices before any second choice).
- ``moe_reference(layer, x)`` below is a per-token Python loop that spells the equations out; the
  tests compare the fast path with it (and with the Hugging Face blocks via ``labcore.interop``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labcore.layers.base import (
    ConfigError,
    LayerAux,
    LayerCost,
    check_choice,
    check_float,
    check_int,
    flatten_tokens,
)
from labcore.layers.ffn import DenseFFN, FFNConfig
from labcore.layers.registry import LayerSpec, register

ROUTERS = ("softmax_topk_renorm", "topk_softmax", "softmax_topk")
EXPERT_IMPLS = ("auto", "padded_bmm", "grouped_mm", "loop")


@dataclass(frozen=True)
class MoEConfig:
    """d_model: D; d_expert: I (hidden width of one expert); n_experts: E; top_k: K.

    router: weight convention, one of ROUTERS (module docstring table).
    routed_scaling: factor on the routed weights (DeepSeek-V2's routed_scaling_factor).
    capacity_factor: None = dropless; else CF > 0, capacity C = ceil(CF * N_tok * K / E).
    n_shared_experts: always-on experts S (0 = none); d_shared: their total hidden width
        (default S * d_expert); shared_gate: multiply them by sigmoid(w_g . x) (Qwen2-MoE).
    balance_coef, z_coef: weights of the load-balancing loss and the router z-loss in aux_loss.
    init_std: std of the normal init of every weight.
    expert_impl: "auto" (CPU inference: "padded_bmm"; otherwise "grouped_mm" where supported,
        else "loop"),
        "padded_bmm" (CPU only), "grouped_mm" or "loop" (module docstring, "The fast path").
    """

    d_model: int
    d_expert: int
    n_experts: int
    top_k: int
    router: str = "softmax_topk_renorm"
    routed_scaling: float = 1.0
    capacity_factor: float | None = None
    n_shared_experts: int = 0
    d_shared: int | None = None
    shared_gate: bool = False
    balance_coef: float = 0.01
    z_coef: float = 0.001
    init_std: float = 0.02
    expert_impl: str = "auto"

    def __post_init__(self) -> None:
        o = "MoEConfig"
        check_int(o, "d_model", self.d_model, min_value=1)
        check_int(o, "d_expert", self.d_expert, min_value=1)
        check_int(o, "n_experts", self.n_experts, min_value=1)
        check_int(o, "top_k", self.top_k, min_value=1, max_value=self.n_experts)
        check_choice(o, "router", self.router, ROUTERS)
        check_float(o, "routed_scaling", self.routed_scaling, min_value=0.0, min_inclusive=False)
        if self.capacity_factor is not None:
            check_float(o, "capacity_factor", self.capacity_factor, min_value=0.0, min_inclusive=False)
        check_int(o, "n_shared_experts", self.n_shared_experts, min_value=0)
        if self.d_shared is not None:
            check_int(o, "d_shared", self.d_shared, min_value=1)
            if self.n_shared_experts == 0:
                raise ConfigError(f"{o}.d_shared={self.d_shared!r} is not allowed: must be None when "
                                  "n_shared_experts=0 (there is no shared expert to size)")
        if not isinstance(self.shared_gate, bool):
            raise ConfigError(f"{o}.shared_gate={self.shared_gate!r} is not allowed: must be True or False")
        if self.shared_gate and self.n_shared_experts == 0:
            raise ConfigError(f"{o}.shared_gate=True is not allowed: must be False when n_shared_experts=0")
        check_float(o, "balance_coef", self.balance_coef, min_value=0.0)
        check_float(o, "z_coef", self.z_coef, min_value=0.0)
        check_float(o, "init_std", self.init_std, min_value=0.0, min_inclusive=False)
        check_choice(o, "expert_impl", self.expert_impl, EXPERT_IMPLS)

    @property
    def shared_hidden(self) -> int:
        """I_s: hidden width of the (fused) shared expert MLP; 0 when there is none."""
        if self.n_shared_experts == 0:
            return 0
        return self.d_shared if self.d_shared is not None else self.n_shared_experts * self.d_expert

    def cost(self) -> LayerCost:
        """Exact parameters by part; FLOPs per token = matrix products (router, K experts, shared
        MLP and gate, the weighted K-way combine) at 2 per multiply-add. With a capacity factor this
        is the upper bound (no drops)."""
        D, I, E, K, Is = self.d_model, self.d_expert, self.n_experts, self.top_k, self.shared_hidden
        unit = 3 * D * I  # gate rows, up rows, down: one expert's weights
        params = {"router": E * D, "experts": E * unit}
        if Is:
            params["shared"] = 3 * D * Is + (D if self.shared_gate else 0)
        flops = 2 * D * E + 2 * K * unit + 2 * 3 * D * Is + (2 * D if self.shared_gate else 0) + 2 * K * D
        return LayerCost(params=params, sparse_part="experts", n_units=E, unit_params=unit,
                         units_per_token=K, flops_per_token=flops)


def expert_capacity(cfg: MoEConfig, n_tokens: int) -> int | None:
    """C = ceil(CF * N_tok * K / E) assignments per expert (float64 arithmetic); None if dropless."""
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_experts)


def route(cfg: MoEConfig, logits: Tensor, probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Router convention applied to ``logits (N_tok, E)`` -> weights ``(N_tok, K)`` (including
    routed_scaling, before capacity drops) and expert ids ``(N_tok, K)`` long. ``probs`` may pass
    ``softmax(logits)`` when the caller already has it."""
    K = cfg.top_k
    if cfg.router == "topk_softmax":
        top_logits, idx = logits.topk(K, dim=-1)  # (N_tok, K)
        w = top_logits.softmax(dim=-1)  # (N_tok, K)
    else:
        probs = logits.softmax(dim=-1) if probs is None else probs  # (N_tok, E)
        w, idx = probs.topk(K, dim=-1)  # (N_tok, K)
        if cfg.router == "softmax_topk_renorm":
            w = w / w.sum(dim=-1, keepdim=True)
    if cfg.routed_scaling != 1.0:
        w = w * cfg.routed_scaling
    return w, idx


def _grouped_mm_ok(*tensors: Tensor) -> bool:
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


CPU_BLOCK_BYTES = 1 << 20  # ~ one core's L2: size of the (rows, 2I) activation of one CPU block
# padded_bmm: a group's (n, R, 2I) activation is at most PADDED_BLOCK_BYTES per thread. Measured at
# E=8, K=2, I=512 (2 threads, experts of 250-290 rows, 1 MiB of activation each): no pairs (cap
# 1 MiB/thread) 1.10x HF, pairs 1.30x, groups of 4 (4 MiB, spilling the 2 x 1 MiB of L2) 1.12x; at
# E=64, K=8, I=128 caps of 1-8 MiB/thread are alike.
PADDED_BLOCK_BYTES = 3 << 19  # 1.5 MiB
# Fixed cost of one padded_bmm group (gather, two bmm calls, SiLU, scatter, Python: ~150 us
# measured with 1-row experts), priced as FLOPs at ~100 GFLOP/s (2 threads); a row costs 6*D*I.
GROUP_OVERHEAD_FLOPS = 15e6
# A single-expert GEMM split over the threads loses ~15 % below this size (both products of the
# expert's rows; M=128, D=256, I=128 is 25 MFLOP) and nothing measurable above (E=8, I=512,
# ~270 rows: 210 MFLOP, where pairing experts in one bmm lost ~10 % to 2-thread GEMMs).
SPLIT_GEMM_FLOPS = 64e6


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
                                                   per row for small GEMMs (M=128, D=256, 2I=256
                                                   on 2 threads), as fast for large ones
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


class MoE(nn.Module):
    """Top-k MoE of SwiGLU experts; ``y, aux = moe(x)`` (see module docstring)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, I, E = cfg.d_model, cfg.d_expert, cfg.n_experts
        self.router = nn.Linear(D, E, bias=False)  # W_r, weight (E, D)
        self.gate_up_proj = nn.Parameter(torch.empty(E, D, 2 * I))  # [W_gate | W_up] per expert, x @ W
        self.down_proj = nn.Parameter(torch.empty(E, I, D))  # W_down per expert, a @ W
        self.shared: DenseFFN | None = None
        self.shared_gate: nn.Linear | None = None
        if cfg.shared_hidden:
            self.shared = DenseFFN(FFNConfig(D, cfg.shared_hidden, init_std=cfg.init_std))
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(D, 1, bias=False)  # w_g, weight (1, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)
        if self.shared is not None:
            self.shared.reset_parameters()
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, mean=0.0, std=std)

    # -- the experts on rows grouped by expert ------------------------------------------------
    def _records_grad(self, x: Tensor) -> bool:
        """Whether this forward records an autograd graph (training) rather than only computing."""
        return torch.is_grad_enabled() and (x.requires_grad or self.gate_up_proj.requires_grad)

    def _resolve_impl(self, x: Tensor) -> str:
        """The expert path for input ``x``: "padded_bmm", "grouped_mm" or "loop" (see
        ``MoEConfig.expert_impl``); raises if a requested path cannot run here."""
        impl, cpu = self.cfg.expert_impl, x.device.type == "cpu"
        if impl == "loop":
            return impl
        if impl == "padded_bmm" or (impl == "auto" and cpu and not self._records_grad(x)):
            if not cpu:
                raise RuntimeError(f"MoE: expert_impl='padded_bmm' runs on CPU only (device={x.device}): it "
                                   "combines with index_add_, which is not deterministic on CUDA; use "
                                   "expert_impl='auto', 'grouped_mm' or 'loop'")
            return "padded_bmm"
        ok = _grouped_mm_ok(x, self.gate_up_proj, self.down_proj)
        ok = ok and self.cfg.d_expert * x.element_size() % 16 == 0  # the (M, I) activation rows
        if impl == "grouped_mm" and not ok:
            raise RuntimeError(f"MoE: expert_impl='grouped_mm' cannot run here (dtype={x.dtype}, "
                               f"device={x.device}, D={self.cfg.d_model}, I={self.cfg.d_expert}); "
                               "use expert_impl='auto' or 'loop'")
        return "grouped_mm" if ok else "loop"

    def _swiglu_down(self, h: Tensor, w: Tensor, down: Callable[[Tensor], Tensor]) -> Tensor:
        """``w * down(SiLU(h_gate) * h_up)`` for pre-activations ``h (..., 2I)`` (gate half first)
        and row weights ``w (..., 1)``; ``down`` applies W_down. ``w`` multiplies the narrower of
        the ``(..., I)`` activation and the ``(..., D)`` output (the same product, W_down being
        linear)."""
        I = self.cfg.d_expert
        a = F.silu(h[..., :I]).mul_(h[..., I:])  # (..., I)  SiLU(W_gate x) * W_up x
        if I <= self.cfg.d_model:
            return down(a.mul_(w))
        return down(a).mul_(w)  # (..., D)

    def padded_experts(self, x: Tensor, tok: Tensor, group_sizes: Tensor, w: Tensor) -> Tensor:
        """The ``padded_bmm`` path (CPU): ``y (N_tok, D)``, row t = sum over the kept assignments a
        of token t of ``w[a] f_e(x_t)``. Inputs as in ``experts``: assignments sorted by expert,
        expert e owning ``group_sizes[e]`` consecutive ones (module docstring, "The fast path")."""
        N, D = x.shape
        I, E, M = self.cfg.d_expert, self.cfg.n_experts, tok.numel()
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
            h = torch.bmm(xg, self.gate_up_proj[e0:e1])  # (n, R, D) @ (n, D, 2I) -> (n, R, 2I)
            out = self._swiglu_down(h, w_pad[p:p + rows].view(n, R, 1),  # (n, R, I) @ (n, I, D) -> (n, R, D)
                                    lambda a, e0=e0, e1=e1: torch.bmm(a, self.down_proj[e0:e1]))
            y.index_add_(0, tok_out[p:p + rows], out.view(rows, D))  # (rows, D) into (N_tok + 1, D)
            p += rows
        return y[:N]  # (N_tok, D)

    def experts(self, x: Tensor, tok: Tensor, group_sizes: Tensor, w: Tensor,
                grouped: bool) -> Iterator[tuple[int, int, Tensor]]:
        """Run the experts on the kept assignments, sorted by expert: assignment ``a`` reads token
        ``tok[a]`` of ``x (N_tok, D)`` with weight ``w[a]``; expert e owns ``group_sizes[e]``
        consecutive assignments. Yields ``(r0, r1, out)``, ``out (r1 - r0, D)`` = ``w_a f_e(x_tok_a)``
        for assignments r0..r1-1, one block of consecutive experts at a time (``expert_blocks``):
        with ``grouped`` (the ``grouped_mm`` path) all experts at once on a GPU and in training, in
        CPU inference blocks whose ``(rows, 2I)`` activation is about ``CPU_BLOCK_BYTES``, so gather,
        both products and the scatter stay in cache; else (the ``loop`` path) one expert per block.
        (In training every block's slice of the expert weights back-propagates a full-size
        gradient, so blocks cost more than they save: E=64, K=8, I=128, 4x256 tokens, 2 threads,
        forward + backward 114 ms in 1 MiB blocks, 82 ms in one block.)"""
        I = self.cfg.d_expert
        w = w.to(x.dtype).unsqueeze(1)  # (M, 1)
        # (the lambdas below run at once; default arguments bind this iteration's experts)
        if not grouped:
            max_rows = 0  # one expert per block
        elif x.device.type == "cpu" and not self._records_grad(x):
            max_rows = max(1, CPU_BLOCK_BYTES // (2 * I * x.element_size()))
        else:
            max_rows = None  # one block: no host sync, one grouped GEMM per product
        sizes = group_sizes.tolist() if max_rows is not None else None
        for e0, e1, r0, r1 in expert_blocks(self.cfg.n_experts, tok.numel(), sizes, max_rows):
            xb = x.index_select(0, tok[r0:r1])  # (M_b, D) rows of experts e0..e1-1
            if e1 - e0 == 1:  # one expert: plain matrix products
                h = xb @ self.gate_up_proj[e0]  # (M_b, D) @ (D, 2I) -> (M_b, 2I)
                out = self._swiglu_down(h, w[r0:r1], lambda a, e=e0: a @ self.down_proj[e])  # (M_b, D)
            else:
                offs = group_sizes[e0:e1].cumsum(0).to(torch.int32)  # (E_b,) end row of each expert
                h = F.grouped_mm(xb, self.gate_up_proj[e0:e1], offs=offs)  # (M_b, 2I)
                out = self._swiglu_down(h, w[r0:r1], lambda a, e0=e0, e1=e1, offs=offs: F.grouped_mm(
                    a, self.down_proj[e0:e1], offs=offs))  # (M_b, D)
            yield r0, r1, out

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, LayerAux]:
        cfg = self.cfg
        D, E, K = cfg.d_model, cfg.n_experts, cfg.top_k
        x2, lead = flatten_tokens(x, D, "MoE")  # (N_tok, D)
        N = x2.shape[0]

        logits = self.router(x2)  # (N_tok, E)   l = x W_r^T  [U2 eq. 1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # route in >= float32
        probs = logits.softmax(dim=-1)  # (N_tok, E)
        weights, idx = route(cfg, logits, probs)  # (N_tok, K), (N_tok, K)

        # Group the N_tok*K assignments by expert. With a capacity, a stable sort keeps token order
        # inside a group (earlier tokens win); dropless, any order will do (a token meets an expert
        # at most once, so each token's outputs are still added in expert order) and the unstable
        # sort is 2x faster.
        flat_e = idx.reshape(-1)  # (N_tok*K,) expert of assignment a = t*K + j
        capacity = expert_capacity(cfg, N)
        order = flat_e.argsort(stable=capacity is not None)  # (N_tok*K,) assignment ids, grouped by expert
        counts = torch.bincount(flat_e, minlength=E)  # (E,) demand per expert
        group_sizes, dropped = counts, 0
        if capacity is not None:
            start = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
            rank = torch.arange(order.numel(), device=x.device) - start[flat_e[order]]  # queue position
            order = order[rank < capacity]  # (M,) kept assignments: the first C of each expert
            group_sizes = counts.clamp(max=capacity)  # (E,)
            kept = torch.zeros(N * K, dtype=torch.bool, device=x.device)
            kept[order] = True
            weights = weights * kept.view(N, K)  # dropped assignments contribute zero
            dropped = N * K - order.numel()

        tok = torch.div(order, K, rounding_mode="floor")  # (M,) token of each kept assignment
        w_rows = weights.reshape(-1).index_select(0, order)  # (M,) weight of each kept assignment
        # y_t = sum_j w_tj f_{idx_tj}(x_t)   [U2 eq. 2]: add each expert row back to its token
        impl = self._resolve_impl(x2)
        if impl == "padded_bmm":
            y = self.padded_experts(x2, tok, group_sizes, w_rows)  # (N_tok, D)
        elif x.device.type == "cuda":  # index_add_ uses atomics there: scatter to slots, sum in order
            slots = x2.new_zeros(N * K, D)  # (N_tok*K, D) token-major assignment slots
            for r0, r1, out in self.experts(x2, tok, group_sizes, w_rows, impl == "grouped_mm"):
                slots.index_copy_(0, order[r0:r1], out)
            y = slots.view(N, K, D).sum(1)  # (N_tok, D)
        else:  # deterministic on CPU
            y = x2.new_zeros(N, D)  # (N_tok, D)
            for r0, r1, out in self.experts(x2, tok, group_sizes, w_rows, impl == "grouped_mm"):
                y.index_add_(0, tok[r0:r1], out)

        if self.shared is not None:
            s = self.shared.mlp(x2)  # (N_tok, D)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x2)) * s  # (N_tok, 1) * (N_tok, D)
            y = y + s

        # Auxiliary losses (Switch eqs. 4-6; ST-MoE z-loss)
        f = counts.to(probs.dtype) / max(N * K, 1)  # (E,) fraction of assignments, no gradient
        P = probs.mean(dim=0)  # (E,) mean router probability
        balance = E * (f * P).sum()  # L_balance = E sum_i f_i P_i
        # logsumexp_i l_i = l_j - log p_j for any expert j; j = the top-1 expert (p_j >= 1/E, so
        # the log is accurate) reuses the softmax instead of a second pass over the (N_tok, E) logits
        top1 = idx[:, :1]  # (N_tok, 1) argmax of l (and of p) under every router
        lse = (logits.gather(1, top1) - probs.gather(1, top1).log()).squeeze(1)  # (N_tok,)
        z = lse.pow(2).mean()  # L_z
        aux_loss = cfg.balance_coef * balance + cfg.z_coef * z

        stats = {"dropped_tokens": float(dropped)}
        if capacity is not None:
            stats["capacity"] = float(capacity)
        aux = LayerAux(aux_loss=aux_loss.to(x.dtype), indices=idx.detach(), scores=weights.detach(),
                       counts=counts.detach(), losses={"balance": balance, "z": z}, stats=stats)
        return y.reshape(*lead, D).to(x.dtype), aux  # (B, T, D) or (N_tok, D)


class ReferenceOutput(NamedTuple):
    y: Tensor  # shape of x
    indices: Tensor  # (N_tok, K) long
    scores: Tensor  # (N_tok, K) applied weights (0 for dropped assignments)
    dropped: int  # dropped assignments


def moe_reference(layer: MoE, x: Tensor) -> ReferenceOutput:
    """Slow, obviously-correct MoE: one token at a time, one expert at a time, in token order.

    Spells out the module docstring's equations with the layer's own weights; differentiable.
    Used by the tests to check the fast path (``MoE.forward``), never by the layer itself.
    """
    cfg = layer.cfg
    D, I, K = cfg.d_model, cfg.d_expert, cfg.top_k
    x2 = x.reshape(-1, D)  # (N_tok, D)
    N = x2.shape[0]
    capacity = expert_capacity(cfg, N)
    load = [0] * cfg.n_experts  # assignments accepted so far by each expert
    dropped = 0
    ys, all_idx, all_w = [], [], []
    for t in range(N):
        xt = x2[t]  # (D,)
        logits = layer.router.weight @ xt  # (E,)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if cfg.router == "topk_softmax":
            idx = torch.topk(logits, K).indices  # (K,)
            w = torch.softmax(logits[idx], dim=0)  # (K,)
        else:
            p = torch.softmax(logits, dim=0)  # (E,)
            idx = torch.topk(p, K).indices  # (K,)
            w = p[idx] if cfg.router == "softmax_topk" else p[idx] / p[idx].sum()
        w = w * cfg.routed_scaling
        yt = torch.zeros_like(xt)
        applied = []
        for j in range(K):
            e = int(idx[j])
            if capacity is not None and load[e] >= capacity:
                dropped += 1  # expert full: this assignment is skipped (residual passthrough)
                applied.append(w[j] * 0)
                continue
            load[e] += 1
            gate = xt @ layer.gate_up_proj[e, :, :I]  # (D,) @ (D, I) -> (I,)
            up = xt @ layer.gate_up_proj[e, :, I:]  # (I,)
            yt = yt + w[j].to(xt.dtype) * ((F.silu(gate) * up) @ layer.down_proj[e])  # (I,) @ (I, D) -> (D,)
            applied.append(w[j])
        if layer.shared is not None:
            sh = layer.shared.w_out.weight @ (F.silu(layer.shared.w_gate.weight @ xt)
                                              * (layer.shared.w_up.weight @ xt))  # (D,)
            if layer.shared_gate is not None:
                sh = torch.sigmoid(layer.shared_gate.weight[0] @ xt) * sh
            yt = yt + sh
        ys.append(yt)
        all_idx.append(idx)
        all_w.append(torch.stack(applied))
    y = torch.stack(ys).reshape(x.shape) if ys else torch.zeros_like(x)
    indices = torch.stack(all_idx) if all_idx else torch.zeros(0, K, dtype=torch.long)
    scores = torch.stack(all_w) if all_w else torch.zeros(0, K)
    return ReferenceOutput(y=y, indices=indices, scores=scores, dropped=dropped)


# ----------------------------------------------------------------------------------------------
# Registration (labcore.layers.registry): what the rest of the package knows about this layer.
# ----------------------------------------------------------------------------------------------

register(LayerSpec(name="moe", role="ffn", config=MoEConfig, layer=MoE, label="MoE", color="#ef553b",
                   size_field="n_experts",
                   min_size=lambda kw: kw.get("top_k", MoEConfig.__dataclass_fields__["top_k"].default),
                   summary="top-k routed SwiGLU experts"))
