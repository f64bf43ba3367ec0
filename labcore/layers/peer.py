"""PEER: a mixture of up to a million single-neuron experts, found by product-key retrieval.

PEER ("Mixture of A Million Experts", He 2024, arXiv 2407.04153; docs/mechanisms.md §6) replaces an
FFN by a pool of N = n^2 experts, each a *single hidden neuron*: expert i has a down vector u_i and
an up vector v_i in R^D and computes e_i(x) = σ(u_i^T x) v_i. Each of H heads picks its own K experts
with PKM's product-key search (docs/mechanisms.md §4), so one token runs a dynamically assembled MLP
of H*K hidden neurons drawn from the pool.

Symbols (notation of ``labcore/__init__.py``)
---------------------------------------------
D      model dimension (input and output of the layer; u_i, v_i in R^D)
n      sub-keys per side (``n_keys``); N = n^2 experts
H      retrieval heads (each has its own query; all heads share the experts)
K      experts selected per head (``top_k``); a token runs H*K experts
D_k    key dimension ``k_dim``; each half (sub-query / sub-key) has D_k/2 features

The mechanism (arXiv 2407.04153 §2 and its Algorithm 1)
--------------------------------------------------------
For a token x and a head h::

    q_h = Norm(W_q x)_h,  split into  q_row, q_col in R^{D_k/2}        (query network)
    s_row = K_row q_row,  s_col = K_col q_col                         (n sub-key scores per side)
    I_h = TopK_{(i,j)} (s_row[i] + s_col[j])                          (product-key top-K of N)
    g_{h,i} = softmax_{i ∈ I_h}(s_i)                                  (router weights over K)
    f(x) = Σ_h Σ_{i ∈ I_h} g_{h,i} · σ(u_i^T x) · v_i                 (experts: one neuron each)

The expert of the pair (i_row, i_col) is i_row * n + i_col (PKM's row-major slot). Relative to PKM
the fixed value V_i weighted by the score becomes an input-dependent one, σ(u_i^T x) v_i; removing
σ and sharing a down-projection gives UltraMemV2's pre-values (docs/mechanisms.md §3).

Switches
--------
``query_norm``  "batchnorm" (the paper's: ``BatchNorm1d(H*D_k)`` on the projected query, statistics
                per feature over all tokens of the batch; couples tokens and is not causal in
                training mode), "layernorm" (per sub-query LayerNorm with gain/bias (H, 2, D_k/2), as
                PKM's causal replacement; the default, like PKM's), "none".
``activation``  σ = "gelu" (exact erf GELU; Meta's PEER variant and PEER-pytorch) or "relu".
``shared_keys`` True (the paper, §2 "multi-head retrieval": the H query networks differ, the pool
                of experts and its product keys are shared by all heads): one sub-key tensor
                (1, 2, n, D_k/2); False: per-head sub-keys (H, 2, n, D_k/2) as in PKM and
                PEER-pytorch.

Layout: ``query.weight`` (H*D_k, D) rows (head, half, d) (PKM's); ``keys`` (1 or H, 2, n, D_k/2);
``down.weight`` (N, D) the u_i; ``up.weight`` (N, D) the v_i. aux.indices / aux.scores are one bag
of H*K (expert, router weight g) pairs per token, head-major (columns h*K .. h*K+K-1 are head h's,
in no particular order within a head).

Initialisation (not specified in the paper): sub-keys Uniform(+-1/sqrt(D_k/2)) as PKM; u_i and v_i
N(0, ``expert_init_std``^2), default std D^-1/2 (so u_i^T x has unit scale for a unit-scale x); the
query projection as ``nn.Linear``. Both expert tables are tagged "memory_values": like PKM's value
table they are read sparsely, so they get the value group's learning rate and no weight decay
(docs/mechanisms.md §1.6); the paper trains them with the rest of the model.

Speed (both tested against autograd of the plain gather, forward and gradients): the readable
version of the two expert products gathers an (N_tok, H*K, D) tensor of rows and keeps it for
backward (as PEER-pytorch does). :func:`expert_down` (u_i^T x) and :func:`expert_up`
(Σ w_i v_i, an ``F.embedding_bag`` with per-sample weights) are one operation and its transpose:
the gather-dot runs in cache-sized token chunks, the scatter of gradients onto table rows is
torch's embedding-bag backward, and nothing of size N_tok*H*K*D is kept. The search is PKM's, from
``labcore.layers.fast`` (docs/performance.md): integer-ranked top-K per side, then only the rank
pairs (i+1)(j+1) <= K of the two sorted half-lists (the pair of ranks (i, j) is beaten by the
(i+1)(j+1)-1 pairs with smaller ranks on both sides, so no other pair can be in the top K), in
cache-sized token chunks.

Comparison with PyPI ``PEER-pytorch`` 0.2.2 (lucidrains; tests/layers/test_peer.py loads its weights)
-----------------------------------------------------------------------------------------------------
Same outputs and gradients (float64, copied weights) with ``PEER(dim=D, heads=H, num_experts=N,
num_experts_per_head=K, dim_key=D_k/2, non_competing_scores=False)`` and here ``query_norm="none"``,
``query_bias=False``, ``activation="gelu"``. Where it differs:

* Its default ``non_competing_scores=True`` keeps only the **top-1** expert per head (of a top-K
  product search) and weights it by ReLU(score) instead of a softmax over K: a different layer from
  the paper's; K must be asked for explicitly (``non_competing_scores=False``).
* It has **per-head product keys** (H, n, 2, D_k/2); the paper's heads share one set. Shared keys
  load into it by copying them into every head; ``shared_keys=False`` here is its layout.
* No query BatchNorm (the paper's): only an optional RMSNorm of x before the query projection
  (``pre_rmsnorm``), which has no counterpart here. No query bias.
* Layout: query rows ordered (half, head, d) vs (head, half, d) here; keys (head, n, half, d) vs
  (head, half, n, d) here (``peer_pytorch_state`` in the test permutes them).
* Init: keys N(0, 0.02^2); u and v ``nn.Embedding``'s default N(0, 1).
* It scores the full K x K candidate grid (same selection, more work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labcore.config import ConfigError, check_bool, check_choice, check_float
from labcore.layers.base import LayerAux, LayerCost, flatten_tokens, tag_param
from labcore.layers.fast.search import (
    fused_pkm_search,
    fused_search_ok,
    in_token_chunks,
    pruned_candidates,
    pruned_pair_topk,
)
from labcore.layers.fast.topk import exact_topk
from labcore.layers.pkm import ProductKeys, check_product_keys, query_network, reference_query, selection_aux
from labcore.layers.registry import LayerSpec, register

ACTIVATIONS = ("gelu", "relu")


@dataclass(frozen=True)
class PEERConfig(ProductKeys):
    """Configuration of a PEER layer (paper defaults for H, K; N = n_keys^2 experts).

    d_model: D, input and output dimension (u_i, v_i in R^D).
    n_keys: n sub-keys per side; the layer has N = n^2 experts (paper: n = 1024).
    heads: H retrieval heads (paper: 8).  top_k: K experts per head (paper: 16), 1 <= K <= n.
    k_dim: D_k, full key dimension (even; D_k/2 per half).
    query_norm: "layernorm" (per sub-query, causal), "batchnorm" (the paper's), "none".
    activation: σ of the single-neuron experts, "gelu" or "relu".
    shared_keys: one set of product keys for all heads (the paper) or one per head.
    query_bias: bias of the query projection.
    expert_init_std: std of the u_i and v_i init (default D^-0.5).
    norm_eps: epsilon of the query normalisation.
    """

    d_model: int
    n_keys: int
    heads: int = 8
    top_k: int = 16
    k_dim: int = 128
    query_norm: str = "layernorm"
    activation: str = "gelu"
    shared_keys: bool = True
    query_bias: bool = False
    expert_init_std: float | None = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        owner = "PEERConfig"
        check_product_keys(self, owner)
        check_choice(owner, "activation", self.activation, ACTIVATIONS)
        for name in ("shared_keys", "query_bias"):
            check_bool(owner, name, getattr(self, name))
        if self.expert_init_std is not None:
            check_float(owner, "expert_init_std", self.expert_init_std, min_value=0.0, min_inclusive=False)

    # derived sizes ---------------------------------------------------------------------------
    @property
    def n_experts(self) -> int:
        """N = n^2 experts."""
        return self.n_keys * self.n_keys

    @property
    def key_heads(self) -> int:
        """Leading size of the sub-key tensor: 1 (shared by the heads) or H."""
        return 1 if self.shared_keys else self.heads

    @property
    def expert_std(self) -> float:
        return self.d_model ** -0.5 if self.expert_init_std is None else self.expert_init_std

    def flops_by_part(self) -> dict[str, int]:
        """Forward FLOPs per token by part (2 per multiply-add).

        query: W_q x (+ bias adds); keys: sub-key scores (H * 2 * n * D_k/2 MACs, each head scores
        its own query even when the keys are shared); candidates: one add per pruned candidate;
        softmax: 3 per selected score (exp, sum, divide); expert_down: u_i^T x for H*K experts;
        weighting: g * σ(.) (one multiply each); expert_up: the weighted sum of H*K rows v_i.
        Not counted: the query norm, σ and the top-k comparisons.
        """
        H, K, n, Dk, D = self.heads, self.top_k, self.n_keys, self.k_dim, self.d_model
        return {
            "query": 2 * D * H * Dk + (H * Dk if self.query_bias else 0),
            "keys": 2 * H * 2 * n * (Dk // 2),
            "candidates": H * self.n_candidates,
            "softmax": 3 * H * K,
            "expert_down": 2 * H * K * D,
            "weighting": H * K,
            "expert_up": 2 * H * K * D,
        }

    def cost(self) -> LayerCost:
        """Exact parameter count by part and forward FLOPs per token (see :meth:`flops_by_part`)."""
        H, n, Dk, D = self.heads, self.n_keys, self.k_dim, self.d_model
        params = {
            "query": D * H * Dk + (H * Dk if self.query_bias else 0),
            "keys": self.key_heads * 2 * n * (Dk // 2),
            "norms": 2 * H * Dk if self.query_norm != "none" else 0,
            "experts": 2 * n * n * D,                                    # u_i and v_i
        }
        return LayerCost(params=params, sparse_part="experts", n_units=n * n, unit_params=2 * D,
                         units_per_token=H * self.top_k, flops_per_token=sum(self.flops_by_part().values()))


def _softmax_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision scores (a softmax over K in fp16/bf16 loses the small weights)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


EXPERT_CHUNK_BYTES = 8 << 20
"""Tokens are processed in chunks whose gathered down vectors (chunk, H*K, D) take at most this many
bytes: the gather then stays in cache instead of filling freshly mapped memory."""


def _chunks(n_tok: int, per_token: int, element_size: int) -> list[slice]:
    size = max(1, EXPERT_CHUNK_BYTES // max(1, per_token * element_size))
    return [slice(i, min(i + size, n_tok)) for i in range(0, n_tok, size)]


def _gather_dot(x2d: Tensor, experts: Tensor, table: Tensor) -> Tensor:
    """out[t, s] = table[experts[t, s]] . x2d[t]: (N_tok, D), (N_tok, S), (N, D) -> (N_tok, S)."""
    n_tok, S = experts.shape
    out = x2d.new_empty(n_tok, S)
    for sl in _chunks(n_tok, S * table.shape[1], table.element_size()):
        out[sl] = torch.bmm(F.embedding(experts[sl], table), x2d[sl, :, None]).squeeze(-1)  # (c, S)
    return out


def _scatter_outer(x2d: Tensor, experts: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """grad[i] = Σ_{(t, s): experts[t, s] = i} weights[t, s] x2d[t], shaped like ``table``.

    This is the table gradient of ``F.embedding_bag(experts, table, per_sample_weights=weights)`` for
    the upstream gradient ``x2d``, so torch's own embedding-bag backward computes it (without the
    (N_tok, S, D) product an ``index_add_`` would need).
    """
    with torch.enable_grad():
        leaf = table.detach().requires_grad_(True)
        out = F.embedding_bag(experts, leaf, mode="sum", per_sample_weights=weights.detach().to(table.dtype))
        (grad,) = torch.autograd.grad(out, leaf, x2d.detach().to(table.dtype))
    return grad


class _ExpertDown(torch.autograd.Function):
    """h[t, s] = u[experts[t, s]] . x[t], saving only the indices (not the (N_tok, S, D) gather).

    Backward: grad_x[t] = Σ_s grad_h[t, s] u[experts[t, s]] (an ``embedding_bag``) and
    grad_u = the scatter of grad_h[t, s] x[t] onto the rows experts[t, s].
    """

    @staticmethod
    def forward(ctx, x2d: Tensor, experts: Tensor, table: Tensor) -> Tensor:
        ctx.save_for_backward(x2d, experts, table)
        return _gather_dot(x2d, experts, table)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: Tensor):
        x2d, experts, table = ctx.saved_tensors
        grad_x = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(experts, table, mode="sum", per_sample_weights=grad_h.to(table.dtype))
        if ctx.needs_input_grad[2]:
            grad_table = _scatter_outer(x2d, experts, grad_h, table)
        return grad_x, None, grad_table


class _ExpertUp(torch.autograd.Function):
    """y[t] = Σ_s w[t, s] v[experts[t, s]] (an ``embedding_bag``): the transpose of _ExpertDown.

    Backward: grad_w[t, s] = v[experts[t, s]] . grad_y[t] (the gather-dot, chunked) and grad_v = the
    scatter of w[t, s] grad_y[t]; torch's own embedding_bag backward for per-sample weights
    materialises the (N_tok, S, D) gather instead.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, experts: Tensor, table: Tensor) -> Tensor:
        ctx.save_for_backward(weights, experts, table)
        return F.embedding_bag(experts, table, mode="sum", per_sample_weights=weights.to(table.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        weights, experts, table = ctx.saved_tensors
        grad_w = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_w = _gather_dot(grad_y, experts, table).to(weights.dtype)
        if ctx.needs_input_grad[2]:
            grad_table = _scatter_outer(grad_y, experts, weights, table)
        return grad_w, None, grad_table


def expert_down(x2d: Tensor, experts: Tensor, table: Tensor) -> Tensor:
    """u_i^T x for the selected experts: x2d (N_tok, D), experts (N_tok, S), table (N, D) -> (N_tok, S).
    Equal to ``torch.bmm(table[experts], x2d[:, :, None]).squeeze(-1)``, gradients included."""
    return _ExpertDown.apply(x2d, experts, table)


def expert_up(weights: Tensor, experts: Tensor, table: Tensor) -> Tensor:
    """Σ_s w[t, s] v[experts[t, s]]: weights, experts (N_tok, S), table (N, D) -> (N_tok, D). Equal to
    ``(weights[:, :, None] * table[experts]).sum(1)``, gradients included."""
    return _ExpertUp.apply(weights, experts, table)


class PEER(nn.Module):
    """PEER layer: ``y, aux = peer(x)`` with x (B, T, D) or (N_tok, D).

    ``values`` exists for the memory-layer constructor signature ``layer(cfg, values=pool)`` and
    must be None: PEER has no value pool to share.
    """

    def __init__(self, cfg: PEERConfig, values: nn.Embedding | None = None):
        super().__init__()
        if not isinstance(cfg, PEERConfig):
            raise ConfigError(f"PEER: cfg of type {type(cfg).__name__} is not allowed: must be a PEERConfig")
        if values is not None:
            raise ConfigError("PEER: values=<shared pool> is not allowed: must be None (PEER's expert tables "
                              "belong to one layer; the paper shares no pool across layers)")
        self.cfg = cfg
        n, half, D = cfg.n_keys, cfg.half, cfg.d_model
        self.query, self.norm = query_network(cfg)                              # W_q (head, half, d); norm
        bound = 1.0 / math.sqrt(half)
        keys = torch.empty(cfg.key_heads, 2, n, half).uniform_(-bound, bound)
        self.keys = tag_param(nn.Parameter(keys), "no_decay")                  # (1 or H, 2, n, D_k/2)
        self.down = nn.Embedding(cfg.n_experts, D)                              # u_i
        self.up = nn.Embedding(cfg.n_experts, D)                                # v_i
        for table in (self.down, self.up):
            nn.init.normal_(table.weight, mean=0.0, std=cfg.expert_std)
            tag_param(table.weight, "memory_values")
        self.act = F.gelu if cfg.activation == "gelu" else F.relu
        cand_row, cand_col = pruned_candidates(cfg.top_k)
        self.register_buffer("cand_row", cand_row, persistent=False)           # (C,)
        self.register_buffer("cand_col", cand_col, persistent=False)           # (C,)
        self.detailed_aux = True     # per-call O(N) diagnostics (aux.counts, coverage, KL)

    def cost(self) -> LayerCost:
        return self.cfg.cost()

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_keys={c.n_keys} (N={c.n_experts}), heads={c.heads}, top_k={c.top_k}, k_dim={c.k_dim}, "
                f"query_norm={c.query_norm!r}, activation={c.activation!r}, shared_keys={c.shared_keys}")

    # ----------------------------------------------------------------------------------------
    def make_query(self, x2d: Tensor) -> Tensor:
        """(N_tok, D) -> normalised queries (N_tok, H, 2, D_k/2): [:, h, 0] row, [:, h, 1] column."""
        c = self.cfg
        return self.norm(self.query(x2d)).view(-1, c.heads, 2, c.half)

    def retrieve(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Queries (N_tok, H, 2, D_k/2) -> experts (N_tok, H, K) and their raw scores (each head's K
        in no particular order)."""
        c = self.cfg
        H, n, K = c.heads, c.n_keys, c.top_k
        keys = self.keys.expand(H, 2, n, c.half)                                # shared: a view
        if fused_search_ok(q, self.keys):                                       # inference: one compiled pass
            scores, experts = fused_pkm_search(q, keys, K)                      # (N_tok, H, K), descending
            return experts, scores
        sub = torch.einsum("thsd,hsnd->thsn", q, keys)                          # (N_tok, H, 2, n) K_row q_row, K_col q_col
        s_half, i_half = exact_topk(sub, K, sorted=True)                        # (N_tok, H, 2, K), descending
        # I_h = TopK over the pairs (i, j) of s_row[i] + s_col[j] (only rank pairs (i+1)(j+1) <= K can win)
        scores, i_row, i_col = pruned_pair_topk(s_half[:, :, 0], s_half[:, :, 1], i_half[:, :, 0],
                                                i_half[:, :, 1], self.cand_row, self.cand_col, K)  # (N_tok, H, K)
        return i_row * n + i_col, scores                                        # expert = i_row*n + i_col

    def forward(self, x: Tensor) -> tuple[Tensor, LayerAux]:
        c = self.cfg
        x2d, lead = flatten_tokens(x, c.d_model, "PEER")                        # (N_tok, D)
        n_tok, S = x2d.shape[0], c.heads * c.top_k
        q = self.make_query(x2d)                                                # (N_tok, H, 2, D_k/2)
        # the search, in token chunks whose (N_c, H, 2, n) sub-key scores stay in cache; per token
        experts, scores = in_token_chunks(self.retrieve, q, c.heads * 2 * c.n_keys)  # (N_tok, H, K)
        g = F.softmax(scores, dim=-1, dtype=_softmax_dtype(scores)).type_as(scores)  # router weights over K
        experts, g = experts.reshape(n_tok, S), g.reshape(n_tok, S)             # (N_tok, H*K), heads summed
        h = expert_down(x2d, experts, self.down.weight)                         # u_i^T x: (N_tok, H*K)
        w = g * self.act(h)                                                     # g_i σ(u_i^T x)
        y = expert_up(w, experts, self.up.weight)                               # Σ_i w_i v_i: (N_tok, D)
        aux = self._aux(x2d, y, experts, scores, g, h)
        return y.view(*lead, c.d_model), aux                                    # (B, T, D) or (N_tok, D)

    def _aux(self, x2d: Tensor, y: Tensor, experts: Tensor, scores: Tensor, g: Tensor, h: Tensor) -> LayerAux:
        """The aux record (``labcore.layers.pkm.selection_aux``) plus ``active_fraction``, the
        selected neurons with u^T x > 0; ``detailed_aux=False`` drops the O(N) parts (counts,
        coverage, KL)."""
        with torch.no_grad():
            active = (h > 0).float().mean()
        return selection_aux(x2d, y, experts, scores, g, self.cfg.n_experts, self.detailed_aux,
                             active_fraction=active)


# ---------------------------------------------------------------------------------------------
# The slow, obviously-correct reference: every token scores all N experts and loops over them.
# ---------------------------------------------------------------------------------------------


def peer_reference(layer: PEER, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Brute-force PEER: each token and head scores all N = n^2 experts (s[i*n + j] = s_row[i] +
    s_col[j]), takes the top K, and adds g_i σ(u_i^T x) v_i expert by expert in a Python loop.

    Returns ``(y, experts, weights)``: y shaped like x; experts and router weights (N_tok, H*K),
    head-major, each head's K in descending score order. Differentiable like the layer.
    """
    c = layer.cfg
    x2d, lead = flatten_tokens(x, c.d_model, "peer_reference")
    q = reference_query(layer, x2d)                                             # written-out norm
    act = F.gelu if c.activation == "gelu" else F.relu
    n = c.n_keys
    rows, all_experts, all_weights = [], [], []
    for t in range(x2d.shape[0]):
        out = torch.zeros(c.d_model, dtype=x2d.dtype, device=x2d.device)
        tok_experts, tok_weights = [], []
        for h in range(c.heads):
            keys = layer.keys[0 if c.shared_keys else h]                        # (2, n, D_k/2)
            s_row, s_col = keys[0] @ q[t, h, 0], keys[1] @ q[t, h, 1]           # (n,), (n,)
            s_all = (s_row[:, None] + s_col[None, :]).reshape(n * n)            # expert i*n + j
            top, idx = s_all.topk(c.top_k)
            g = torch.softmax(top, dim=-1)
            for k in range(c.top_k):
                i = int(idx[k])
                out = out + g[k] * act(layer.down.weight[i] @ x2d[t]) * layer.up.weight[i]
            tok_experts.append(idx)
            tok_weights.append(g)
        rows.append(out)
        all_experts.append(torch.cat(tok_experts))
        all_weights.append(torch.cat(tok_weights))
    y = torch.stack(rows)
    return y.view(*lead, c.d_model), torch.stack(all_experts), torch.stack(all_weights)


register(LayerSpec(name="peer", role="memory", config=PEERConfig, layer=PEER, label="PEER", color="#9467bd",
                   size_field="n_keys", min_size=lambda kw: kw.get("top_k", PEERConfig.top_k),
                   # The paper's 8 heads x top-16 (128 single-neuron experts per token, arXiv 2407.04153
                   # §3); D/4 key features per half (k_dim = D/2) as PKM's family shape.
                   family_kwargs=lambda D: {"heads": 8, "top_k": 16, "k_dim": 2 * max(1, D // 4)},
                   layout=None,  # one PEER layer beside the middle block's FFN, as the paper places it
                   shares_values=False,  # two expert tables (u_i, v_i) per layer: no single value pool
                   summary="N = n^2 single-neuron experts σ(u_i·x) v_i, H heads x top-K by product keys, "
                           "softmax router weights (arXiv 2407.04153)"))
