"""Product-Key Memory (PKM): a huge key-value memory read with an exact, cheap top-k search.

PKM (Lample et al., NeurIPS 2019, arXiv 1907.05242; docs/mechanisms.md §4) replaces an FFN with a
table of N = n^2 value vectors, of which each token reads H*K, selected by comparing a query with
N keys. The N keys are never stored: each key is the *concatenation* of a row sub-key and a column
sub-key, so one token scores only 2n sub-keys and still finds the exact top-K of all N keys.

Symbols (docs/notation.md)
--------------------------
D      model dimension (input of the query projection; output of the layer)
H      memory heads (each head has its own query and sub-keys; all heads share the values)
D_k    key dimension ``k_dim``; each half (sub-query / sub-key) has D_k/2 features
n      sub-keys per side (``n_keys``); N = n^2 value slots
K      slots read per head (``top_k``); a token reads H*K (slot, weight) pairs
D_v    value dimension (``d_value``, default D; a D_v -> D projection is added when D_v != D)

The mechanism (UltraMemV2 arXiv 2508.18756 §3.1 eqs. 3-5, docs/mechanisms.md §1.1, plus PKM's softmax)
------------------------------------------------------------------------------------------------------
For one head h and a token x (queries are normalised, see below)::

    q = W_q x + b_q,  split into  q_row, q_col in R^{D_k/2}          (query network)
    s_row = σ_TopK(K_row q_row),  s_col = σ_TopK(K_col q_col)         (U2 eq. 3)
    S_grid[i, j] = s_row[i] + s_col[j]   over the K x K candidates      (U2 eq. 4)
    I = TopK(S_grid),  w = softmax(S_grid[I])                           (PKM softmax)
    o = Σ_h Σ_{(i,j) ∈ I_h} w_ij · V[i*n + j]                           (U2 eq. 5, heads summed)
    y = o                  (D_v == D)      or   y = W_o o   (D_v != D)

σ_TopK keeps the K largest entries of a vector. The search is *exact* for additive scores: if
(i, j) is among the top K of all n^2 sums, then i is among the top K rows (otherwise K better rows
paired with column j beat it), and likewise j. Cost per token and head: 2 * n * D_k/2 sub-key
MACs plus the candidate work, i.e. O((sqrt(N) + K^2) * D_k) instead of O(N * D_k).

labcore goes one step further, still exactly: with both half-lists sorted descending, the pair of
ranks (i, j) is beaten by the (i+1)(j+1)-1 pairs (i' <= i, j' <= j), so only pairs with
(i+1)(j+1) <= K can be in the top K (119 candidates instead of 1024 for K = 32). Ties aside, the
selected set equals the K^2-grid result; ``pkm_reference`` (brute force over all N slots) checks
this in the tests. The speed machinery (integer top-k, token chunks, the pruned grid) lives in
``labcore.layers.fast``; docs/performance.md explains and measures it. ``detailed_aux=False``
(``labcore.layers.base.set_detailed_aux``) drops the per-call diagnostics that scan all N slots
(``aux.counts``, coverage, KL); default True (training / eval metrics read ``aux.counts``).

Layout (the PKM authors' own, facebookresearch/XLM ``HashingMemory`` -- weights exchange 1:1)
-----------------------------------------------------------------------------------------------
``query.weight``  (H*D_k, D) with rows ordered (head, half, d): half 0 = row sub-query, half 1 =
                  column sub-query  (XLM ``query_proj[0].weight``; ``query.bias`` its bias).
``keys``          (H, 2, n, D_k/2) (XLM ``keys``; [h, 0] row sub-keys, [h, 1] column sub-keys).
``values.weight`` (n^2, D_v); slot of the pair (i_row, i_col) = i_row * n + i_col (XLM
                  ``values.weight``, an ``nn.EmbeddingBag`` there, an ``nn.Embedding`` here).
``norm``          "batchnorm": ``nn.BatchNorm1d(H*D_k)`` on the projected query, exactly XLM's
                  ``query_proj[1]``; "layernorm": per sub-query (H*2 groups of D_k/2 features)
                  normalisation with per-feature gain/bias of shape (H, 2, D_k/2) (labcore's
                  causal replacement, not in XLM); "none": identity.
Heads are summed: ``aux.indices``/``aux.scores`` hold one bag of H*K pairs per token, head-major
(columns h*K .. h*K+K-1 belong to head h, in no particular order within a head).

Initialisation (XLM / PKM notebook): sub-keys Uniform(-1/sqrt(D_k/2), 1/sqrt(D_k/2)); values
N(0, D_v^-1/2) (std); query projection as ``nn.Linear``. XLM draws each sub-key set with a fixed
numpy seed 2h+j, so all its memories start with identical keys; labcore uses the torch RNG.

Query BatchNorm (the PKM authors' best setting; slot usage 25.8% -> 80.3% as a secondary source
reports arXiv 1907.05242, docs/mechanisms.md §4) normalises each of the H*D_k query features over
the *tokens of the batch*: it couples the tokens, is not causal (a token's query depends on later
tokens in training mode), breaks with padding, and eval mode uses running statistics. Use
"layernorm" for causal LMs. Tokens are flattened to (N_tok, H*D_k) before ``BatchNorm1d``, so
statistics are per feature over all B*T tokens.

Public-code bugs avoided (docs/implementations.md "PKM")
--------------------------------------------------------
* lucidrains ``product-key-memory`` (0.3.0) feeds (B*2*H, T, D_k/2) to ``BatchNorm1d(D_k/2)``,
  which takes dim 1 (time) as the channel axis: it raises unless T == D_k/2 and then normalises
  each time step over heads and features instead of each feature over tokens; another public port
  does not chain its BatchNorm after the projection. Here BatchNorm sees (N_tok, H*D_k): one
  mean/variance per query feature over all tokens.
* Heads are summed into one bag (not concatenated), the softmax is over the K selected scores of
  one head (not over all H*K), and the slot is i_row*n + i_col (row-major), as in XLM. (The
  lucidrains port orders query rows (half, head, d) and keys (H, n, 2, d): same algorithm, a
  different layout, so its weights need a permutation to load here.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from labcore.config import ConfigError, check_choice, check_float, check_int
from labcore.layers.base import LayerAux, LayerCost, flatten_tokens, tag_param, zero_loss
from labcore.layers.fast.bags import weighted_bag
from labcore.layers.fast.search import (  # noqa: F401  (SEARCH_CHUNK_BYTES, search_chunk: public, kept here)
    SEARCH_CHUNK_BYTES,
    fused_pkm_search,
    fused_search_ok,
    in_token_chunks,
    pruned_candidates,
    pruned_pair_topk,
    search_chunk,
    side_search,
)
from labcore.layers.registry import LayerSpec, register

QUERY_NORMS = ("layernorm", "batchnorm", "none")


def check_product_keys(cfg: Any, owner: str) -> None:
    """The product-key fields PKM, PEER and Memory+ configs share: d_model, n_keys, heads (>= 1),
    k_dim (even, >= 2: a row half and a column half), top_k (1 <= K <= n), query_norm and its
    norm_eps (> 0)."""
    check_int(owner, "d_model", cfg.d_model)
    check_int(owner, "n_keys", cfg.n_keys)
    check_int(owner, "heads", cfg.heads)
    check_int(owner, "k_dim", cfg.k_dim, min_value=2)
    if cfg.k_dim % 2:
        raise ConfigError(f"{owner}.k_dim={cfg.k_dim!r} is not allowed: must be an even integer >= 2 "
                          "(the key is split into a row half and a column half)")
    check_int(owner, "top_k", cfg.top_k, min_value=1, max_value=cfg.n_keys)
    check_choice(owner, "query_norm", cfg.query_norm, QUERY_NORMS)
    check_float(owner, "norm_eps", cfg.norm_eps, min_value=0.0, min_inclusive=False)


def check_dropouts(cfg: Any, owner: str) -> None:
    """input_dropout, query_dropout and value_dropout: each a finite number in [0, 1)."""
    allowed = "a finite number in [0, 1)"
    for name in ("input_dropout", "query_dropout", "value_dropout"):
        value = getattr(cfg, name)
        try:
            check_float(owner, name, value, min_value=0.0)
        except ConfigError:
            raise ConfigError(f"{owner}.{name}={value!r} is not allowed: must be {allowed}") from None
        if value >= 1.0:
            raise ConfigError(f"{owner}.{name}={value!r} is not allowed: must be {allowed}")


class ProductKeys:
    """Derived sizes of the product-key search (PKMConfig, PEERConfig): k_dim and top_k fields."""

    k_dim: int
    top_k: int

    @property
    def half(self) -> int:
        """D_k/2, the size of one sub-query / sub-key."""
        return self.k_dim // 2

    @property
    def n_candidates(self) -> int:
        """Candidates per head scored after the per-half top-K: #{(i, j): (i+1)(j+1) <= K}."""
        return sum(self.top_k // (i + 1) for i in range(self.top_k))


@dataclass(frozen=True)
class PKMConfig(ProductKeys):
    """Configuration of a product-key memory layer (defaults: PKM notebook, except n_keys).

    d_model: D, input and output dimension.
    n_keys: n sub-keys per side; the memory has N = n^2 value slots.
    heads: H query heads (summed).  k_dim: D_k, full key dimension (even; D_k/2 per half).
    top_k: K slots read per head (also the per-half candidate count), 1 <= K <= n.
    query_norm: "layernorm" (per sub-query, causal), "batchnorm" (PKM's, couples tokens), "none".
    d_value: D_v (default D); when D_v != D an output projection D_v -> D is added.
    value_init_std: std of the value init (default D_v^-0.5 as in the PKM notebook).
    query_bias: bias of the query projection (XLM: True).
    input_dropout / query_dropout / value_dropout: dropout on x, on the normalised query, and on
        the memory read (before the output projection), in [0, 1).
    norm_eps: epsilon of the query normalisation.
    """

    d_model: int
    n_keys: int
    heads: int = 4
    k_dim: int = 128
    top_k: int = 32
    query_norm: str = "layernorm"
    d_value: int | None = None
    value_init_std: float | None = None
    query_bias: bool = True
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        owner = "PKMConfig"
        check_product_keys(self, owner)
        if self.d_value is not None:
            check_int(owner, "d_value", self.d_value)
        if self.value_init_std is not None:
            check_float(owner, "value_init_std", self.value_init_std, min_value=0.0, min_inclusive=False)
        check_choice(owner, "query_bias", self.query_bias, (True, False))
        check_dropouts(self, owner)

    # derived sizes ---------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        """N = n^2 value slots."""
        return self.n_keys * self.n_keys

    @property
    def d_v(self) -> int:
        return self.d_model if self.d_value is None else self.d_value

    @property
    def value_std(self) -> float:
        return self.d_v ** -0.5 if self.value_init_std is None else self.value_init_std

    @property
    def has_value_proj(self) -> bool:
        return self.d_v != self.d_model

    def cost(self) -> LayerCost:
        """Exact parameter count by part and forward FLOPs per token (2 per multiply-add).

        FLOPs count: query projection (+ bias adds), sub-key scores (H * 2 * n * D_k/2 MACs),
        candidate sums (H * n_candidates adds), softmax (3 per selected score: exp, sum, divide),
        gather-sum (H*K*D_v MACs) and the output projection. Not counted: the query norm and the
        top-k comparisons (no multiply-adds; a few per element).
        """
        H, K, n, Dk, Dv, D = self.heads, self.top_k, self.n_keys, self.k_dim, self.d_v, self.d_model
        params = {
            "query": D * H * Dk + (H * Dk if self.query_bias else 0),
            "keys": H * 2 * n * (Dk // 2),
            "values": n * n * Dv,
            "norms": 2 * H * Dk if self.query_norm != "none" else 0,
            "value_proj": Dv * D if self.has_value_proj else 0,
        }
        flops = (2 * D * H * Dk + (H * Dk if self.query_bias else 0)  # query projection
                 + 2 * H * 2 * n * (Dk // 2)                          # sub-key scores
                 + H * self.n_candidates                              # candidate sums
                 + 3 * H * K                                          # softmax
                 + 2 * H * K * Dv                                     # weighted gather-sum
                 + (2 * Dv * D if self.has_value_proj else 0))        # output projection
        return LayerCost(params=params, sparse_part="values", n_units=n * n, unit_params=Dv,
                         units_per_token=H * K, flops_per_token=flops)


class SubQueryLayerNorm(nn.Module):
    """LayerNorm of each (head, half) sub-query over its D_k/2 features, gain/bias per feature."""

    def __init__(self, heads: int, half: int, eps: float):
        super().__init__()
        self.half, self.eps = half, eps
        self.weight = tag_param(nn.Parameter(torch.ones(heads, 2, half)), "no_decay")
        self.bias = tag_param(nn.Parameter(torch.zeros(heads, 2, half)), "no_decay")

    def forward(self, q: Tensor) -> Tensor:  # q: (N_tok, H*D_k) -> (N_tok, H*D_k)
        n_tok = q.shape[0]
        q = q.view(n_tok, -1, self.half)                                   # (N_tok, H*2, D_k/2)
        q = F.layer_norm(q, (self.half,), eps=self.eps)
        q = torch.addcmul(self.bias.view(-1, self.half), q, self.weight.view(-1, self.half))
        return q.view(n_tok, -1)                                           # (N_tok, H*D_k)


def query_network(cfg: Any) -> tuple[nn.Linear, nn.Module]:
    """W_q (D -> H*D_k, rows (head, half, d); bias with ``cfg.query_bias``) and the query norm:
    "layernorm" per (head, half) sub-query (:class:`SubQueryLayerNorm`), "batchnorm" per feature
    over the tokens (PKM's; couples tokens), "none" an identity. For PKM and PEER configs."""
    H, Dk = cfg.heads, cfg.k_dim
    query = nn.Linear(cfg.d_model, H * Dk, bias=cfg.query_bias)
    if cfg.query_bias:
        tag_param(query.bias, "no_decay")
    if cfg.query_norm == "layernorm":
        norm: nn.Module = SubQueryLayerNorm(H, cfg.half, cfg.norm_eps)
    elif cfg.query_norm == "batchnorm":
        norm = nn.BatchNorm1d(H * Dk, eps=cfg.norm_eps)                    # per feature over tokens
        tag_param(norm.weight, "no_decay")
        tag_param(norm.bias, "no_decay")
    else:
        norm = nn.Identity()
    return query, norm


@torch.no_grad()
def selection_aux(x2d: Tensor, y: Tensor, indices: Tensor, scores: Tensor, weights: Tensor, n_units: int,
                  detailed: bool, **extra: Tensor) -> LayerAux:
    """The aux record of a product-key read (PKM, PEER): indices and weights (N_tok, H*K), raw
    scores (N_tok, H, K). Stats: top1_score (best raw score per head), top1_weight (its weight),
    the ``extra`` stats, and with ``detailed`` (O(N) per call, which dominates a decode step of a few
    tokens) ``counts`` (a bincount over all N units), coverage (fraction of units hit) and
    kl_uniform = KL(usage || uniform); then output_std. ``detailed=False``: counts is None."""
    vals = {"top1_score": scores.amax(-1).float().mean(),
            "top1_weight": weights.view(scores.shape).amax(-1).float().mean(), **extra}
    counts = None
    if detailed:
        counts = torch.bincount(indices.reshape(-1), minlength=n_units)    # (N,)
        usage = counts.float() / max(indices.numel(), 1)
        vals["coverage"] = (counts > 0).float().mean()                     # fraction of units hit
        vals["kl_uniform"] = torch.special.xlogy(usage, usage * n_units).sum()  # KL(usage || uniform)
    vals["output_std"] = y.float().std() if y.numel() > 1 else y.new_zeros((), dtype=torch.float32)
    stats = dict(zip(vals, torch.stack(list(vals.values())).tolist()))    # one device sync
    return LayerAux(aux_loss=zero_loss(x2d), indices=indices.detach(), scores=weights.detach(),
                    counts=counts, stats=stats)


class PKM(nn.Module):
    """Product-key memory layer: ``y, aux = pkm(x)`` with x (B, T, D) or (N_tok, D).

    ``values``: an optional external ``nn.Embedding(n^2, D_v)`` shared with other layers (Memory
    Layers at Scale's shared value pool); it is used as is (not re-initialised).
    """

    def __init__(self, cfg: PKMConfig, values: nn.Embedding | None = None):
        super().__init__()
        self.cfg = cfg
        H, n, half = cfg.heads, cfg.n_keys, cfg.half
        self.query, self.norm = query_network(cfg)                          # W_q rows (head, half, d); norm
        bound = 1.0 / math.sqrt(half)                                       # XLM get_uniform_keys
        self.keys = tag_param(nn.Parameter(torch.empty(H, 2, n, half).uniform_(-bound, bound)), "no_decay")
        if values is None:
            values = nn.Embedding(cfg.n_slots, cfg.d_v)
            nn.init.normal_(values.weight, mean=0.0, std=cfg.value_std)
        elif not isinstance(values, nn.Embedding):
            raise TypeError(f"PKM: values must be an nn.Embedding, got {type(values).__name__}")
        elif tuple(values.weight.shape) != (cfg.n_slots, cfg.d_v):
            raise ConfigError(f"PKM: values.weight has shape {tuple(values.weight.shape)}; must be "
                              f"(n_keys**2, d_value) = ({cfg.n_slots}, {cfg.d_v})")
        self.values = values
        tag_param(self.values.weight, "memory_values")
        self.value_proj = nn.Linear(cfg.d_v, cfg.d_model, bias=False) if cfg.has_value_proj else None
        cand_row, cand_col = pruned_candidates(cfg.top_k)  # rank pairs (i+1)(j+1) <= K
        self.register_buffer("cand_row", cand_row, persistent=False)       # (C,)
        self.register_buffer("cand_col", cand_col, persistent=False)       # (C,)
        self.detailed_aux = True      # per-call O(N) diagnostics (aux.counts, coverage, KL); see _aux
        self.sparse_value_grad = False  # sparse COO value gradient (base.set_sparse_value_grads)

    def cost(self) -> LayerCost:
        return self.cfg.cost()

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_keys={c.n_keys} (N={c.n_slots}), heads={c.heads}, k_dim={c.k_dim}, top_k={c.top_k}, "
                f"d_value={c.d_v}, query_norm={c.query_norm!r}")

    # ----------------------------------------------------------------------------------------
    def make_query(self, x2d: Tensor) -> Tensor:
        """(N_tok, D) -> normalised queries (N_tok, H, 2, D_k/2): [:, h, 0] row, [:, h, 1] column."""
        c = self.cfg
        x2d = F.dropout(x2d, c.input_dropout, self.training)
        q = self.norm(self.query(x2d))                                      # (N_tok, H*D_k)
        q = F.dropout(q, c.query_dropout, self.training)
        return rearrange(q, "t (h s d) -> t h s d", s=2, d=c.half)          # (N_tok, H, 2, D_k/2)

    def retrieve(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (N_tok, H, 2, D_k/2) -> slots (N_tok, H, K), raw scores and softmax weights.

        Each head's K entries come in no particular order (the final top-K is unsorted).
        """
        n, K = self.cfg.n_keys, self.cfg.top_k
        if fused_search_ok(q, self.keys):                                   # inference: the same search, one compiled pass
            scores, slots = fused_pkm_search(q, self.keys, K)               # (N_tok, H, K), descending
            return slots, scores, F.softmax(scores, dim=-1)
        # sub-key scores, one matmul per (head, half): (H*2, N_tok, D_k/2) @ (H*2, D_k/2, n)
        qs = rearrange(q, "t h s d -> (h s) t d")                           # (H*2, N_tok, D_k/2)
        keys = rearrange(self.keys, "h s n d -> (h s) d n")                 # (H*2, D_k/2, n)
        s_half, i_half = side_search(qs, keys, K)  # U2 eq. 3, TopK(qs @ keys): (H*2, N_tok, K), descending
        s_half = rearrange(s_half, "(h s) t k -> h s t k", s=2)             # [:, 0] rows, [:, 1] columns
        i_half = rearrange(i_half, "(h s) t k -> h s t k", s=2)             # (H, 2, N_tok, K)
        # U2 eq. 4 on the pruned grid: S[i, j] = s_row[i] + s_col[j], then I = TopK(S)
        scores, i_row, i_col = pruned_pair_topk(s_half[:, 0], s_half[:, 1], i_half[:, 0], i_half[:, 1],
                                                self.cand_row, self.cand_col, K)  # (H, N_tok, K) each
        slots = torch.add(i_col, i_row, alpha=n)                            # slot = i_row*n + i_col
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)         # w = softmax(S[I]), PKM
        return slots.transpose(0, 1), scores.transpose(0, 1), weights.transpose(0, 1)  # (N_tok, H, K)

    def read(self, slots: Tensor, weights: Tensor) -> Tensor:
        """Weighted sum of value rows (U2 eq. 5): slots, weights (N_tok, S) -> (N_tok, D_v)."""
        table = self.values.weight
        return weighted_bag(slots, table, weights.to(table.dtype),  # F.embedding_bag, single-pass backward
                            sparse=self.sparse_value_grad)

    def forward(self, x: Tensor) -> tuple[Tensor, LayerAux]:
        c = self.cfg
        x2d, lead = flatten_tokens(x, c.d_model, "PKM")                    # (N_tok, D)
        q = self.make_query(x2d)                                            # (N_tok, H, 2, D_k/2)
        # the search, in token chunks whose (H*2, N_c, n) sub-key scores stay in cache; per token
        slots, scores, weights = in_token_chunks(self.retrieve, q, c.heads * 2 * c.n_keys)  # (N_tok, H, K)
        slots = rearrange(slots, "t h k -> t (h k)")                        # (N_tok, H*K), heads summed
        weights = rearrange(weights, "t h k -> t (h k)")                    # (N_tok, H*K)
        o = self.read(slots, weights)                                       # (N_tok, D_v)
        o = F.dropout(o, c.value_dropout, self.training)
        y = self.value_proj(o) if self.value_proj is not None else o        # (N_tok, D)
        aux = self._aux(x2d, y, slots, scores, weights)
        return y.view(*lead, c.d_model), aux                                # (B, T, D) or (N_tok, D)

    def _aux(self, x2d: Tensor, y: Tensor, slots: Tensor, scores: Tensor, weights: Tensor) -> LayerAux:
        """The aux record (:func:`selection_aux`); ``detailed_aux`` (default True) adds the O(N)
        ``counts``, ``coverage`` and ``kl_uniform``."""
        return selection_aux(x2d, y, slots, scores, weights, self.cfg.n_slots, self.detailed_aux)


# ---------------------------------------------------------------------------------------------
# The slow, obviously-correct reference: score all n^2 slots by brute force.
# ---------------------------------------------------------------------------------------------


def reference_query(layer: nn.Module, x2d: Tensor) -> Tensor:
    """Query with the norm written out (no running-stat updates: BatchNorm uses batch statistics in
    training mode, running ones in eval); dropout is ignored. For PKM and PEER layers."""
    c = layer.cfg
    q = x2d @ layer.query.weight.T
    if layer.query.bias is not None:
        q = q + layer.query.bias                                            # (N_tok, H*D_k)
    if c.query_norm == "layernorm":
        g = q.view(-1, c.heads, 2, c.half)                                  # (N_tok, H, 2, D_k/2)
        mu = g.mean(-1, keepdim=True)
        var = ((g - mu) ** 2).mean(-1, keepdim=True)
        g = (g - mu) / torch.sqrt(var + c.norm_eps) * layer.norm.weight + layer.norm.bias
        q = g.reshape(-1, c.heads * c.k_dim)
    elif c.query_norm == "batchnorm":
        bn = layer.norm
        if bn.training:                                                     # statistics of this batch
            mu = q.mean(0)                                                  # per feature over tokens
            var = ((q - mu) ** 2).mean(0)
        else:
            mu, var = bn.running_mean, bn.running_var
        q = (q - mu) / torch.sqrt(var + c.norm_eps) * bn.weight + bn.bias
    return q.view(-1, c.heads, 2, c.half)                                   # (N_tok, H, 2, D_k/2)


def pkm_reference(layer: PKM, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Brute-force PKM read: every head scores all n^2 slots, s[i*n + j] = s_row[i] + s_col[j].

    Returns ``(y, slots, weights)``: y shaped like x, slots and weights (N_tok, H*K) head-major with
    each head's K in descending score order. Dropout is ignored; BatchNorm uses batch statistics in
    training mode and running statistics in eval mode, without updating them.
    """
    c = layer.cfg
    x2d, lead = flatten_tokens(x, c.d_model, "pkm_reference")
    q = reference_query(layer, x2d)
    n = c.n_keys
    out = torch.zeros(x2d.shape[0], c.d_v, dtype=x2d.dtype, device=x2d.device)
    all_slots, all_weights = [], []
    for h in range(c.heads):
        s_row = q[:, h, 0] @ layer.keys[h, 0].T                             # (N_tok, n)
        s_col = q[:, h, 1] @ layer.keys[h, 1].T                             # (N_tok, n)
        grid = (s_row[:, :, None] + s_col[:, None, :]).reshape(-1, n * n)   # (N_tok, n^2), slot i*n+j
        top, slots = grid.topk(c.top_k, dim=-1)                             # (N_tok, K)
        w = torch.softmax(top, dim=-1)                                      # (N_tok, K)
        out = out + (layer.values.weight[slots] * w[..., None]).sum(1)      # explicit weighted sum
        all_slots.append(slots)
        all_weights.append(w)
    y = layer.value_proj(out) if layer.value_proj is not None else out
    return y.view(*lead, c.d_model), torch.cat(all_slots, 1), torch.cat(all_weights, 1)


# ----------------------------------------------------------------------------------------------
# Registration (labcore.layers.registry): what the rest of the package knows about this layer.
# ----------------------------------------------------------------------------------------------


def _pkm_value_read(layer: PKM, aux: LayerAux) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """One forward's value read replayed (``read`` with its slots and softmax weights), and the gather
    inside it: one bag of H*K rows per token, the whole read without a value projection."""
    table = layer.values.weight
    w = aux.scores.to(table.dtype)
    return (lambda: layer.read(aux.indices, aux.scores),
            lambda: F.embedding_bag(aux.indices, table, mode="sum", per_sample_weights=w))


register(LayerSpec(
    name="pkm", role="memory", config=PKMConfig, layer=PKM, label="PKM", color="#00cc96",
    size_field="n_keys",
    min_size=lambda kw: kw.get("top_k", PKMConfig.__dataclass_fields__["top_k"].default),
    # D/4 key features per half (k_dim = D/2), 4 heads x top-32: the PKM paper's shape at lab width.
    family_kwargs=lambda D: {"heads": 4, "top_k": 32, "k_dim": 2 * max(1, D // 4)},
    layout=None,  # one memory beside the middle block's FFN: PKM is best at an intermediate layer
    value_read=_pkm_value_read,
    summary="product-key memory"))
