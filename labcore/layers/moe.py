"""Top-k mixture of SwiGLU experts (MoE), dropless or with a capacity factor, with shared experts.

A router scores every expert for every token; each token is processed by its K best experts only,
and their outputs are mixed with the router's weights. Parameters grow with E, compute per token
with K. Symbols (docs/notation.md): D model width, E experts, K experts per token (``top_k``), I
expert hidden width (``d_expert``), N_tok = B*T tokens, C per-expert capacity, I_s shared-expert
hidden width.

The layer (UltraMemV2 arXiv 2508.18756 eqs. 1-2; docs/mechanisms.md §7.1)::

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
``gate_up_proj`` (E, D, 2I) = ``[W_gate | W_up]`` with the I gate columns first, then the I up
columns, and ``down_proj`` (E, I, D). This is the transpose of Hugging Face transformers 5.x's
fused experts (``nn.Linear`` layout, ``(E, 2I, D)`` and ``(E, D, I)``; ``labcore.interop``
transposes on copy), because the CPU GEMMs run faster with a plain row-major right operand.

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
(dropped *assignments*, an integer stored as a float). docs/mechanisms.md §7.1 writes the capacity
per token (``CF * tokens / E``) for top-1 routing; labcore multiplies by K so that CF = 1 means
"exactly enough slots for perfectly balanced routing" for every K (GShard/Switch top-2 convention).

Auxiliary losses (Switch Transformer arXiv 2101.03961 eqs. 4-6; ST-MoE arXiv 2202.08906 z-loss)
----------------------------------------------------------------------------------------------
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

Expert paths
------------
The forward never loops over tokens: the N_tok*K assignments ``a = t*K + j`` are sorted by expert
(stable with a capacity, so earlier tokens come first), each expert runs on its consecutive rows,
and ``index_add_`` adds every row back to its token ``a // K``. Three interchangeable
implementations (``MoEConfig.expert_impl``; ``labcore.layers.fast.experts``; measured in
docs/performance.md): ``padded_bmm`` (CPU: groups of experts padded to one batched GEMM; "auto"
picks it for CPU inference), ``grouped_mm`` (``F.grouped_mm`` over consecutive experts; "auto"
picks it otherwise, where supported) and ``loop`` (one expert at a time, any dtype and device). On
CUDA, where ``index_add_`` uses atomics, rows are copied to token-major slots and summed over K in
a fixed order, so results stay deterministic.

Where labcore differs from public code (docs/implementations.md "MoE")
----------------------------------------------------------------------
- No random routing and no router noise at all, in training or eval: two community MoE ports route
  the second expert at random even in eval mode; Mixtral's optional ``router_jitter_noise``
  multiplies the input (in place!) during training -- labcore has neither, so the same weights and
  input always give bitwise-identical outputs.
- Balance loss normalised per assignment (minimum 1, not K; see above).
- Capacity in assignments, earlier tokens win, dropped assignments reported (many codes drop
  silently, or give priority to all first choices before any second choice).
- ``moe_reference(layer, x)`` below is a per-token Python loop that spells the equations out; the
  tests compare the fast path with it (and with the Hugging Face blocks via ``labcore.interop``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labcore.config import ConfigError, check_choice, check_float, check_int
from labcore.layers.base import LayerAux, LayerCost, flatten_tokens
from labcore.layers.fast import experts as fast_experts
from labcore.layers.fast.experts import (  # noqa: F401  (public names, kept importable from here)
    CPU_BLOCK_BYTES,
    PADDED_BLOCK_BYTES,
    expert_blocks,
    plan_padded_groups,
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
        "padded_bmm" (CPU only), "grouped_mm" or "loop" (module docstring, "Expert paths").
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

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, LayerAux]:
        cfg = self.cfg
        D, E, K = cfg.d_model, cfg.n_experts, cfg.top_k
        x2, lead = flatten_tokens(x, D, "MoE")  # (N_tok, D)
        N = x2.shape[0]

        logits = self.router(x2)  # (N_tok, E)   l = x W_r^T  [U2 eq. 1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # route in >= float32
        probs = logits.softmax(dim=-1)  # (N_tok, E)   p = softmax(l)
        weights, idx = route(cfg, logits, probs)  # (N_tok, K), (N_tok, K)   (w, idx) = ROUTER(l)

        # Group the N_tok*K assignments a = t*K + j by expert. With a capacity, a stable sort keeps
        # token order inside a group (earlier tokens win); dropless, any order will do (a token
        # meets an expert at most once, so each token's outputs are still added in expert order).
        flat_e = idx.reshape(-1)  # (N_tok*K,) expert of assignment a = t*K + j
        capacity = expert_capacity(cfg, N)  # C = ceil(CF * N_tok * K / E), or None
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
        y = self.routed_experts(x2, order, tok, group_sizes, w_rows)  # (N_tok, D)  sum_j w_j f_{idx_j}(x)  [U2 eq. 2]

        if self.shared is not None:
            s = self.shared.mlp(x2)  # (N_tok, D)  f_shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x2)) * s  # (N_tok, 1) * (N_tok, D)  g(x) f_shared(x)
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

    # -- the experts on the assignments grouped by expert (labcore.layers.fast.experts) -------
    def routed_experts(self, x: Tensor, order: Tensor, tok: Tensor, group_sizes: Tensor, w: Tensor) -> Tensor:
        """``y (N_tok, D)``, ``y_t = sum_a w_a f_{e(a)}(x_t)`` over the kept assignments of token t;
        ``order (M,)`` assignment ids sorted by expert, ``tok = order // K``, expert e owning
        ``group_sizes[e]`` consecutive ones, ``w (M,)`` their weights."""
        N, D = x.shape
        K = self.cfg.top_k
        impl = self._resolve_impl(x)
        if impl == "padded_bmm":
            return self.padded_experts(x, tok, group_sizes, w)  # (N_tok, D)
        if x.device.type == "cuda":  # index_add_ uses atomics there: scatter to slots, sum in order
            slots = x.new_zeros(N * K, D)  # (N_tok*K, D) token-major assignment slots
            for r0, r1, out in self.experts(x, tok, group_sizes, w, impl == "grouped_mm"):
                slots.index_copy_(0, order[r0:r1], out)
            return slots.view(N, K, D).sum(1)  # (N_tok, D)
        y = x.new_zeros(N, D)  # (N_tok, D), deterministic on CPU
        for r0, r1, out in self.experts(x, tok, group_sizes, w, impl == "grouped_mm"):
            y.index_add_(0, tok[r0:r1], out)
        return y

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
        ok = fast_experts.grouped_mm_ok(x, self.gate_up_proj, self.down_proj)
        ok = ok and self.cfg.d_expert * x.element_size() % 16 == 0  # the (M, I) activation rows
        if impl == "grouped_mm" and not ok:
            raise RuntimeError(f"MoE: expert_impl='grouped_mm' cannot run here (dtype={x.dtype}, "
                               f"device={x.device}, D={self.cfg.d_model}, I={self.cfg.d_expert}); "
                               "use expert_impl='auto' or 'loop'")
        return "grouped_mm" if ok else "loop"

    def padded_experts(self, x: Tensor, tok: Tensor, group_sizes: Tensor, w: Tensor) -> Tensor:
        """The ``padded_bmm`` path: :func:`labcore.layers.fast.experts.padded_experts`."""
        return fast_experts.padded_experts(x, tok, group_sizes, w, self.gate_up_proj, self.down_proj)

    def experts(self, x: Tensor, tok: Tensor, group_sizes: Tensor, w: Tensor,
                grouped: bool) -> Iterator[tuple[int, int, Tensor]]:
        """The ``grouped_mm`` (``grouped``) or ``loop`` path, block by block:
        :func:`labcore.layers.fast.experts.grouped_experts`."""
        return fast_experts.grouped_experts(x, tok, group_sizes, w, self.gate_up_proj, self.down_proj,
                                            grouped, self._records_grad(x))


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
