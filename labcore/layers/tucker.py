"""Tucker-decomposed query-key retrieval, the part UltraMem and UltraMemV2 share (docs/mechanisms.md §1.3, §1.5).

:class:`SearchGrid` and the ``check_*`` functions are the config fields and rules both layers'
configs have (the integer sizes, the virtual grid of n_s = sqrt(E) * n keys per side, the candidate
count m). :class:`TuckerRetrieval` is the retrieval state both layers hold (query projection W_q,
q/k norm gains, keys, Tucker cores with their rank-1 search proxy, the IVE shuffle) and the side
scores S_row, S_col and per-core (MCS) scores computed from it; each layer's file
(``labcore.layers.ultramem``, ``labcore.layers.ultramem_v2``) holds its config, its forward and its
read. Notation: docs/notation.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Self

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from labcore.config import check_choice, check_float, check_int, fail, is_perfect_square
from labcore.config import from_dict as config_from_dict
from labcore.layers.base import LayerCost, tag_param
from labcore.layers.fast.caches import DerivedCache, reuse
from labcore.layers.fast.search import PROXY_SEARCHES

INITS = ("release", "paper")
NORM_TYPES = ("layernorm", "rmsnorm")

# ---------------------------------------------------------------------------------------------
# The search grid: sizes and rules UltraMemConfig and UltraMemV2Config share
# ---------------------------------------------------------------------------------------------

SIZE_FIELDS = ("d_model", "n_keys", "heads", "k_dim", "top_k", "rank", "n_cores", "expansion",
               "n_model_layers", "calib_samples")


def check_common_fields(cfg: Any, owner: str) -> None:
    """The fields UltraMemConfig and UltraMemV2Config share: the integer sizes (:data:`SIZE_FIELDS`,
    each >= 1; ``d_value`` and ``candidate_m`` when given), ``seed`` (>= 0), ``init``, ``norm_type``,
    ``proxy_search`` and ``norm_eps`` (> 0)."""
    for name in SIZE_FIELDS:
        check_int(owner, name, getattr(cfg, name))
    check_int(owner, "seed", cfg.seed, min_value=0)
    for name in ("d_value", "candidate_m"):
        if getattr(cfg, name) is not None:
            check_int(owner, name, getattr(cfg, name))
    check_choice(owner, "init", cfg.init, INITS)
    check_choice(owner, "norm_type", cfg.norm_type, NORM_TYPES)
    check_choice(owner, "proxy_search", cfg.proxy_search, PROXY_SEARCHES)
    check_float(owner, "norm_eps", cfg.norm_eps, min_value=0.0, min_inclusive=False)


def check_search_grid(cfg: Any, owner: str) -> None:
    """The cross-field rules of the search: E a perfect square, m <= n_s candidate rows/columns per
    side, K <= m^2 candidate cells, and D_v divisible by h (one value chunk per core)."""
    if not is_perfect_square(cfg.expansion):
        fail(owner, "expansion", cfg.expansion, "a perfect square (1, 4, 9, 16, ...): keys per side "
             "grow by sqrt(E)")
    if cfg.m > cfg.n_side:
        name = "candidate_m" if cfg.candidate_m is not None else "top_k"
        fail(owner, name, getattr(cfg, name), f"<= keys per side sqrt(expansion)*n_keys = {cfg.n_side} "
             "(candidate rows/columns per side; candidate_m defaults to top_k)")
    if cfg.top_k > cfg.m * cfg.m:
        fail(owner, "top_k", cfg.top_k, f"<= candidate_m**2 = {cfg.m * cfg.m} (the candidate grid)")
    if cfg.d_v % cfg.n_cores:
        fail(owner, "d_value", cfg.d_v, f"divisible by n_cores={cfg.n_cores} (each core weights its own "
             "chunk of the value vector)")


class SearchGrid:
    """What UltraMemConfig and UltraMemV2Config share besides their fields: ``from_dict``,
    ``replace`` and the derived sizes of the search grid (docs/notation.md)."""

    n_keys: int
    expansion: int
    top_k: int
    candidate_m: int | None
    heads: int
    share_query: bool

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from a mapping (YAML, notebook parameters); unknown keys raise ConfigError."""
        return config_from_dict(cls, data)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    @property
    def n_side(self) -> int:
        """Keys per side searched: sqrt(E) * n."""
        return math.isqrt(self.expansion) * self.n_keys

    @property
    def n_slots(self) -> int:
        """N = n^2 physical value rows (UltraMemV2: the rows of the layer's window of the pool)."""
        return self.n_keys * self.n_keys

    @property
    def n_virtual(self) -> int:
        """E * N virtual slots (= n_side^2 grid cells)."""
        return self.expansion * self.n_slots

    @property
    def m(self) -> int:
        """Candidate rows / columns per side."""
        return self.top_k if self.candidate_m is None else self.candidate_m

    @property
    def q_heads(self) -> int:
        """Number of distinct queries: 1 when shared by all heads."""
        return 1 if self.share_query else self.heads


# ---------------------------------------------------------------------------------------------
# The retrieval state and side scores
# ---------------------------------------------------------------------------------------------


def apply_qk_norm(x: Tensor, gain: Tensor, norm_type: str, eps: float) -> Tensor:
    """Normalise the last dim (D_k) with a per-feature gain (no bias)."""
    if norm_type == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight=gain, eps=eps)
    return F.rms_norm(x, (x.shape[-1],), weight=gain, eps=eps)


def reference_qk_norm(v: Tensor, gain: Tensor, norm_type: str, eps: float) -> Tensor:
    """:func:`apply_qk_norm` written out, for the slow references."""
    if norm_type == "layernorm":
        v = v - v.mean(-1, keepdim=True)
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gain


def qk_gain(sigma: float, k_dim: int, norm_type: str) -> float:
    """The q/k norm gain g whose side scores have std sigma = g^2 * std(q_hat . k_hat).

    std(q_hat . k_hat) is sqrt(D_k) for rmsnorm; LayerNorm vectors live in the (D_k - 1)-dim
    zero-mean subspace, so var = D_k^2 / (D_k - 1) there."""
    dot_std = math.sqrt(k_dim)
    if norm_type == "layernorm" and k_dim > 1:
        dot_std = k_dim / math.sqrt(k_dim - 1)
    return math.sqrt(sigma / dot_std)                                       # sigma = g^2 * dot_std


def score_moments(scores: Tensor, owner: str) -> tuple[float, float]:
    """Mean and (biased) variance of the selected scores of a paper-init calibration run; the mean
    must be positive to calibrate anything."""
    mu = scores.mean().item()
    if not mu > 0:
        raise RuntimeError(f"{owner} paper init: mean selected score at unit scale is {mu}; cannot "
                           "calibrate the q/k norm gains")
    return mu, scores.var(unbiased=False).item()


class TuckerRetrieval(nn.Module):
    """The retrieval state UltraMem and UltraMemV2 share (docs/mechanisms.md §1.3, §1.5): the query
    projection W_q, the q/k norm gains (D_k,), the keys (H, 2, R, n_s, D_k) (side 0 = rows), the
    Tucker cores C^(c) (h, H, R, R) with the rank-1 proxy (u, t) of their sum, refreshed once per
    optimiser step, the IVE shuffle P, and the inference caches of derived tensors (fast.caches).
    Subclasses set ``self.cfg`` (an UltraMemConfig or UltraMemV2Config) before calling
    :meth:`_init_retrieval`."""

    def _init_retrieval(self, query_rows: int, rank: int, *, query_bias: bool = False,
                        tucker: bool = True) -> None:
        """Create W_q (``query_rows`` x D), the q/k norm gains, the keys and (``tucker``) the cores
        and the proxy buffers u, t (H, R)."""
        c = self.cfg
        H, Dk, ns = c.heads, c.k_dim, c.n_side
        self.query = nn.Linear(c.d_model, query_rows, bias=query_bias)     # W_q
        if query_bias:
            tag_param(self.query.bias, "no_decay")
        if c.qk_norm:
            self.query_gain = tag_param(nn.Parameter(torch.ones(Dk)), "no_decay")
            self.key_gain = tag_param(nn.Parameter(torch.ones(Dk)), "no_decay")
        else:
            self.query_gain = self.key_gain = None
        keys = torch.empty(H, 2, rank, ns, Dk)                             # [:, 0] K_row, [:, 1] K_col
        self.keys = tag_param(nn.Parameter(keys), "no_decay")
        if tucker:
            cores = torch.empty(c.n_cores, H, rank, rank)                   # C^(c) per head
            self.cores = tag_param(nn.Parameter(cores), "no_decay")
            self.register_buffer("u", torch.zeros(H, rank))                # rank-1 proxy, rows
            self.register_buffer("t", torch.zeros(H, rank))                # rank-1 proxy, columns
        else:
            self.cores = None
        self._derived = DerivedCache()                                      # inference caches (fast.caches)

    def _init_shuffle(self) -> None:
        """The IVE shuffle P of the E*N virtual slots (U2 eq. 8): a buffer seeded by ``cfg.seed``,
        None for E = 1."""
        c = self.cfg
        if c.expansion > 1:
            gen = torch.Generator().manual_seed(c.seed)
            self.register_buffer("perm", torch.randperm(c.n_virtual, generator=gen))
        else:
            self.perm = None

    def _init_proxy_and_gains(self, release_gain: float) -> None:
        """Refresh (u, t) for the initial cores, then fill both q/k norm gains with ``release_gain``,
        or with init "paper" the calibrated gain (a run of the search with that proxy)."""
        self.refresh_retrieval()
        if self.query_gain is not None:
            gain = self.calibrated_gain() if self.cfg.init == "paper" else release_gain
            self.query_gain.fill_(gain)
            self.key_gain.fill_(gain)

    @torch.no_grad()
    def refresh_retrieval(self) -> None:
        """Recompute (u, t), the leading singular vectors of the summed core, per head.

        Detached, in float32 or wider; the sign of (u, t) is flipped per head when that brings
        them closer (L1) to the previous vectors (the release's "must maintain smoothness"), so the
        proxy search does not jump between steps. No-op without cores (additive scoring).
        """
        if self.cores is None:
            return
        core = self.cores.detach().sum(0)                                   # (H, R, R)
        work = core.float() if core.dtype in (torch.float16, torch.bfloat16) else core
        U, _, Vh = torch.linalg.svd(work)
        u_new, t_new = U[..., :, 0], Vh[..., 0, :]                          # (H, R) each
        u_old, t_old = self.u.to(work.dtype), self.t.to(work.dtype)
        pos = (u_new - u_old).abs().sum(-1) + (t_new - t_old).abs().sum(-1)  # (H,)
        neg = (-u_new - u_old).abs().sum(-1) + (-t_new - t_old).abs().sum(-1)
        sign = torch.where(neg < pos, -1.0, 1.0).to(work.dtype).unsqueeze(-1)  # (H, 1)
        self.u.copy_(u_new * sign)
        self.t.copy_(t_new * sign)

    def side_scores(self, x2d: Tensor) -> tuple[Tensor, Tensor]:
        """(N_tok, D) -> S_row, S_col (N_tok, H, R, n_s): every key component scored with its query
        (U2 eq. 6; the subclass's ``_queries`` and ``_side_scores_q``)."""
        s = self._side_scores_q(self._queries(x2d))
        return s[0], s[1]

    def per_core_scores(self, vecs: Tensor) -> Tensor:
        """MCS: s^(c)_k = S_row[:, i_k]^T C^(c) S_col[:, j_k] at the selected cells, from their side
        score columns ``vecs`` (2, N_tok, H, R, K), as (S_row[:, i]^T [C^(1) .. C^(h)]) . S_col[:, j]:
        one small matmul against the cores side by side, then a dot product over R -> (N_tok, H, K, h)."""
        h, R = self.cores.shape[0], self.cores.shape[-1]
        cores_cat = rearrange(self.cores, "c h a b -> h a (c b)")          # (H, R, h*R)
        left = vecs[0].transpose(-1, -2) @ cores_cat                        # (N_tok, H, K, h*R)
        return (left.unflatten(-1, (h, R)) * vecs[1].transpose(-1, -2).unsqueeze(-2)).sum(-1)

    def cost(self) -> LayerCost:
        return self.cfg.cost()

    def _score_stats(self, scores: Tensor, y: Tensor) -> tuple[list[Tensor], list[str]]:
        """Detached 0-dim stats of a forward: the top-1, m-th (last) and mean selected score per
        head's K (``scores`` (N_tok, H*K), descending within each head) and the output std."""
        c = self.cfg
        sc = scores.detach().view(-1, c.heads, c.top_k).float()
        vals = [sc[..., 0].mean(), sc[..., -1].mean(), sc.mean(),
                y.detach().float().std() if y.numel() > 1 else sc.new_zeros(())]
        return vals, ["top1_score", "mth_score", "mean_score", "output_std"]

    # ----------------------------------------------------------------------------------------
    # derived tensors, reused in inference while their sources are unchanged (fast.caches)
    # ----------------------------------------------------------------------------------------
    def _reuse(self, name: str, sources: tuple[Tensor, ...], compute: Callable[[], Any], *,
               always: bool = False) -> Any:
        """``compute()``, cached in inference (:func:`labcore.layers.fast.caches.reuse`)."""
        return reuse(self._derived, self.training, name, sources, compute, always=always)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_derived"] = DerivedCache()                                  # never pickle/deepcopy the cache
        return state

    def _laid_out_keys(self, pattern: str) -> Tensor:
        """The keys (H, 2, R, n_s, D_k), q/k-normalised with ``apply_qk_norm``, rearranged by the einops
        ``pattern`` for the side-score matmul."""
        c = self.cfg

        def compute() -> Tensor:
            keys = self.keys                                                # (H, 2, R, n_s, D_k)
            if c.qk_norm:
                keys = apply_qk_norm(keys, self.key_gain, c.norm_type, c.norm_eps)
            return rearrange(keys, pattern)

        sources = (self.keys,) if self.key_gain is None else (self.keys, self.key_gain)
        return self._reuse(f"keys {pattern}", sources, compute)

    def _search_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Summed core C = sum_c C^(c) (H, R, R) and the proxy vectors (u, t) stacked: (2, H, R)."""
        return self._reuse(f"search_params_{dtype}", (self.cores, self.u, self.t),
                           lambda: (self.cores.sum(0), torch.stack((self.u, self.t)).to(dtype)))
