"""UltraMemV2: UltraMem's retrieval with one value projection, per-rank queries and PEER-style values.

UltraMemV2 (Huang, Bao, Min et al., arXiv 2508.18756, §3.2 and App. A; docs/mechanisms.md §3) keeps
UltraMem's search (TDQKR with multi-core scoring, docs/mechanisms.md §1.3 and §1.5) and changes the
value path: the E virtual blocks are summed before ONE value projection (U2 eq. 12), every Tucker
rank component gets its own query, each selected slot's score is multiplied by an input-dependent
"pre-value" weight (U2 eqs. 13-15), all memory layers read windows of one shared value pool ("ring"
sharing), the Tucker auxiliary loss is dropped, an optional Switch-style balance loss acts on the
row and column keys, and the value learning rate is constant. Every change is a switch of
:class:`UltraMemV2Config`; with the v1 settings (``projection="per_block"``, ``query_per_rank=False``,
``pre_values=False``) the layer computes exactly what ``labcore.layers.ultramem.UltraMem`` computes
on the same weights (tested, forward and gradients).

Symbols (docs/notation.md; as in ``labcore/layers/ultramem.py``)
----------------------------------------------------------------
D      model dimension                       H    memory heads (U2 uses 1)
D_k    key dimension per side (``k_dim``)     R    Tucker rank (``rank``)
h      Tucker cores (``n_cores``, MCS)        K    slots selected per head (``top_k``)
E      virtual expansion (``expansion``, a perfect square; the release's ``key_expand_time`` is sqrt(E))
n      keys per side of the physical window (``n_keys``); N = n^2 physical rows the layer reads
n_s    keys per side searched: sqrt(E) * n; the grid has n_s^2 = E*N virtual slots
m      candidate rows / columns per side (``candidate_m``, default K)
D_v    value width (``d_value``)              D_p  pre-value width (``d_pre``)
N_pool rows of the value pool the layer reads from (N without a shared pool)

The mechanism, for one token x (docs/mechanisms.md §3.1)
--------------------------------------------------------
Queries, one per side and, with ``query_per_rank``, one per Tucker rank component (release
``mem_q_for_each_tucker_rank``; U2 §3.2)::

    q[s, a] = Norm(W_q x)[s, a]          W_q: (Hq*2*Rq*D_k, D), rows (head, side, rank, d); Rq = R or 1
    S_row[a] = K_row[a] q[row, a],  S_col[a] = K_col[a] q[col, a]     in R^{n_s}        (U2 eq. 6)

(without ``query_per_rank`` every rank component reads the same q[s]: UltraMem's eq. 6.)

Search (unchanged from UltraMem, docs/mechanisms.md §1.3): rows I = TopM(u^T S_row), columns
J = TopM(t^T S_col), the m x m candidates scored exactly with the summed core C = sum_c C^(c)
(U2 eq. 7), the K best kept; per-core scores s^(c)_k = S_row[:, i_k]^T C^(c) S_col[:, j_k] weight
chunk c of the value vector (MCS). Slot v_k = i_k * n_s + j_k is a virtual slot; for E > 1 a fixed
permutation P (seeded by ``cfg.seed``) maps it to a physical row and a block, as in UltraMem::

    P[v] = p * N + r,     physical row r in the window,  block p (U2 eq. 8)
    pool row(v) = (r + window_start) mod N_pool            the layer's ring window in the pool

Pre-values (``pre_values``; U2 eqs. 13-15, release ``pre_vdim``): a second table P_pre (one row per
pool row, width D_p) and a projection W_pre: D -> D_p give every selected slot an input-dependent
weight::

    g_k = < P_pre[row(v_k)], W_pre x >            (GELU(g_k) with ``pre_gelu``; off in the release)
    w^(c)_k = s^(c)_k * g_k

The value read and ONE projection (``projection="single"``; U2 eq. 12)::

    o = W^T sum_k sum_c w^(c)_k V[row(v_k), chunk c]          W: (D, D_v), the E blocks summed first

``projection="per_block"`` keeps UltraMem's E projectors (o = sum_p W_p^T V^T w_p, one E*D_v -> D
map; U2 eq. 9). For E = 1 both are the same map.

Key balance loss (``balance_loss``; U2 §4.2, release ``mem_key_balance_reg_coef``), Switch-style
on each side's first-stage picks, summed over the two sides::

    L_bal = sum_{side} n_s * sum_j f_j p_j
    p_j = mean over (tokens, heads) of softmax_j(proxy),  proxy = u^T S_row (rows) or t^T S_col
    f_j = fraction of the top-m picks of that side that land on key j (no gradient; the m largest
          proxies, the release's definition, also with ``proxy_search="two_sided"``)

It is reported in ``aux.losses["balance"]`` whenever it is computed (``balance_loss`` or
``detailed_aux``) and added as ``balance_coef * L_bal`` to ``aux.aux_loss`` only with
``balance_loss=True`` (U2 uses 0.001).

Shared pool with ring windows (release ``share_ratio``; U2 §4.2 "shared value tables")
--------------------------------------------------------------------------------------
All memory layers of a model may read one pool of N_pool rows (values and pre-values alike). Layer l
reads the N = n^2 rows starting at its ``window_start``, wrapping around the end of the pool, so
neighbouring layers overlap. :func:`ring_window` computes (window_start, n) from (layer index,
number of memory layers, N_pool, share_ratio) exactly as the release does: window_start =
l * N_pool / L and n = floor(sqrt(N_pool * share_ratio)). :func:`value_pool` builds the pool tables with this config's init.
The layer takes them as ``UltraMemV2(cfg, values=pool, pre_values=pre_pool, window_start=start)``.

Value learning rate (U2 §4.2: a constant 1x ends better than UltraMem's decay on long runs)
------------------------------------------------------------------------------------------
Value and pre-value tables are tagged "memory_values". ``value_lr_multiplier`` M and
``value_lr_schedule`` are read by the optimiser builder: "constant" means the value group's learning
rate is M * lr for the whole run (``labcore.lm.optim.build_param_groups(value_lr=M * lr)`` and no
``ValueLRSchedule``); "decay" means UltraMem's M -> 1 linear decay (``ValueLRSchedule(M, ...)``).

Initialisation (``init``; docs/mechanisms.md §3.2)
-------------------------------------------------
"release" (``olmo/ultramem_layer_v2.py``): values and pre-values N(0, 0.02^2); q/k norm gains
D_k^-0.4; query projection and keys std 1/sqrt(D_k); cores Uniform[0, 1); value projection std
1/sqrt(its input width); pre-value projection std 1/sqrt(D).
"paper" (U2 App. A): the q/k norm gains are set by simulation so that the mean selected score is
~1 (:meth:`UltraMemV2.calibrated_gain`, a Monte-Carlo run of this search with the layer's own
cores on unit-scale side scores), sigma_s^2 is the variance of the selected scores at that scale
(:meth:`UltraMemV2Config.paper_calibration`, the same simulation with cores drawn from their init
distribution, so that it depends on the config alone and layers sharing a pool agree), the memory linears (W, W_pre) use the paper's small init std sqrt(2/(5D)),
and the value / pre-value std sigma_V makes the memory output variance equal an FFN's,
sigma_mem^2 = sigma_ffn^2 (U2 eqs. 22, 25, 26)::

    sigma_V^4 = 0.2 * k_inner * D / (K * H * (1 + sigma_s^2) * D_p * D_v * L)        (U2 eq. 26)

with k_inner = ``ffn_ratio`` (FFN width / D) and L = ``n_model_layers``. Without pre-values the
same derivation gives sigma_V^2 = 0.08 * k_inner * D / (K * H * (1 + sigma_s^2) * D_v * L)
(labcore's, docs/mechanisms.md §3.2 [D]).

Differences from the release (docs/implementations.md "UltraMemV2")
----------------------------------------------------------------
* Per-rank queries: the release's CUDA path reads the rank-0 and rank-1 queries of the ROW side as
  the row and column queries for every rank component (it indexes the (side, rank*D_k) query by
  head // 2 and splits it in halves), and its NPU path uses only rank 0 of each side. labcore
  implements what U2 §3.2 describes: component a of side s is scored with q[s, a].
* The release shares one query between two heads (``nhead_share_query = 2``); ``share_query``
  shares one query among all H heads or none (as in UltraMem). U2 uses H = 1, where both agree.
* For E = 1 the release still shuffles the rows of the window; labcore skips the shuffle (a
  relabelling of rows, as in UltraMem).
* The balance loss enters the loss through ``aux.aux_loss`` (the release adds its gradient with a
  backward hook on the output); the gradients are the same.
* The "paper" init reads eq. 26 as sigma_V^4 (values and pre-values share sigma_V and enter as a
  product; docs/mechanisms.md §3.2 [D]); the release initialises both with std 0.02 ("release").
* Not implemented: the release's vertical (dimension-wise) memory parallelism and output dropout.

Shapes: tokens are flattened to N_tok; keys (H, 2, R, n_s, D_k) as in UltraMem (rows side 0);
``aux.indices`` (N_tok, H*K) virtual slots, head-major, descending within each head; ``aux.scores``
(N_tok, H*K) the summed weight that multiplies each value (s * g with pre-values);
``aux.core_scores`` (N_tok, H*K, h) the per-core weights w^(c); ``aux.pre_scores`` (N_tok, H*K) g or
None; ``aux.rows`` (N_tok, H*K) pool rows. The speed machinery is ``labcore.layers.fast`` (token
chunks, the fused two-sided search, value bags, inference caches); :func:`ultramem_v2_reference` is
the slow per-token reference every path is tested against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from labcore.config import ConfigError, check_bool, check_choice, check_float, check_int
from labcore.layers.base import LayerAux, LayerCost, flatten_tokens, tag_param, zero_loss
from labcore.layers.fast import bags
from labcore.layers.fast.search import in_token_chunks, tucker_search
from labcore.layers.fast.topk import exact_topk
from labcore.layers.registry import LayerSpec, register
from labcore.layers.tucker import (
    SearchGrid,
    TuckerRetrieval,
    apply_qk_norm,
    check_common_fields,
    check_search_grid,
    qk_gain,
    reference_qk_norm,
    score_moments,
)

PROJECTIONS = ("single", "per_block")
VALUE_LR_SCHEDULES = ("constant", "decay")
_OWNER = "UltraMemV2Config"


def _bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{_OWNER}.{name}={value!r} is not allowed: must be {allowed}")


@dataclass(frozen=True)
class UltraMemV2Config(SearchGrid):
    """Configuration of an UltraMemV2 layer (module doc); the v2 switches and their v1 settings:

    projection "single" (v2: sum the E blocks, one D_v -> D map) | "per_block" (v1: E*D_v -> D);
    expansion E (keys per side sqrt(E)*n, E*N virtual slots; 1 = off); query_per_rank (v2) | False
    (v1: one query for all rank components); pre_values with width d_pre (None: D_v // 3, U2's 1:3)
    and pre_gelu (off in the release) | False (v1); init "release" | "paper" (U2 eq. 26, uses
    n_model_layers L, ffn_ratio k_inner, calib_samples); balance_loss with balance_coef (U2: 0.001);
    value_lr_multiplier with value_lr_schedule "constant" (v2) | "decay" (v1).
    Sizes: d_model D; n_keys n (physical keys per side of the window, N = n^2); heads H; k_dim
    D_k per side; top_k K per head; d_value D_v (None: D // 4, U2 Table 10); rank R; n_cores h;
    candidate_m m (None: K). Others as in UltraMem: proxy_search "signed" (the release) | "two_sided"
    (labcore's: also the m most negative proxies), qk_norm, norm_type, share_query, norm_eps, seed.
    """

    d_model: int
    n_keys: int
    heads: int = 1
    k_dim: int = 128
    top_k: int = 32
    d_value: int | None = None
    rank: int = 2
    n_cores: int = 2
    expansion: int = 1
    projection: str = "single"
    query_per_rank: bool = True
    pre_values: bool = True
    d_pre: int | None = None
    pre_gelu: bool = False
    qk_norm: bool = True
    norm_type: str = "layernorm"
    share_query: bool = True
    candidate_m: int | None = None
    proxy_search: str = "signed"
    balance_loss: bool = False
    balance_coef: float = 0.001
    init: str = "release"
    n_model_layers: int = 1
    ffn_ratio: float = 4.0
    calib_samples: int = 256
    value_lr_multiplier: float = 1.0
    value_lr_schedule: str = "constant"
    norm_eps: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        o = _OWNER
        check_common_fields(self, o)
        if self.d_pre is not None:
            check_int(o, "d_pre", self.d_pre)
        for name in ("query_per_rank", "pre_values", "pre_gelu", "qk_norm", "share_query", "balance_loss"):
            check_bool(o, name, getattr(self, name))
        check_choice(o, "projection", self.projection, PROJECTIONS)
        check_choice(o, "value_lr_schedule", self.value_lr_schedule, VALUE_LR_SCHEDULES)
        check_float(o, "balance_coef", self.balance_coef, min_value=0.0)
        check_float(o, "ffn_ratio", self.ffn_ratio, min_value=0.0, min_inclusive=False)
        check_float(o, "value_lr_multiplier", self.value_lr_multiplier, min_value=0.0, min_inclusive=False)
        # cross-field rules ---------------------------------------------------------------
        check_search_grid(self, o)
        if not self.pre_values and self.d_pre is not None:
            raise _bad("d_pre", self.d_pre, "None when pre_values=False")
        if not self.pre_values and self.pre_gelu:
            raise _bad("pre_gelu", self.pre_gelu, "False when pre_values=False (GELU acts on the pre-value "
                       "weight)")
        if self.init == "paper" and not self.qk_norm:
            raise _bad("init", self.init, "'release' when qk_norm=False (paper init calibrates the q/k "
                       "norm gains)")
        if self.value_lr_schedule == "decay" and self.value_lr_multiplier < 1:
            raise _bad("value_lr_multiplier", self.value_lr_multiplier, ">= 1 when value_lr_schedule="
                       "'decay' (the multiplier decays linearly from M to 1)")

    # derived sizes ---------------------------------------------------------------------------
    @property
    def d_v(self) -> int:
        return self.d_value if self.d_value is not None else max(self.n_cores, self.d_model // 4)

    @property
    def d_p(self) -> int:
        """Pre-value width D_p (0 without pre-values)."""
        if not self.pre_values:
            return 0
        return self.d_pre if self.d_pre is not None else max(1, self.d_v // 3)

    @property
    def q_ranks(self) -> int:
        """Queries per side and head: R with ``query_per_rank``, else 1."""
        return self.rank if self.query_per_rank else 1

    @property
    def proj_in(self) -> int:
        """Input width of the value projection: D_v ("single") or E*D_v ("per_block")."""
        return self.d_v * (self.expansion if self.projection == "per_block" else 1)

    # initialisation (docs/mechanisms.md §3.2) ------------------------------------------------
    def paper_calibration(self) -> tuple[float, float]:
        """(q/k norm gain g, sigma_s^2) of the paper init (U2 App. A); see :func:`_paper_calibration`."""
        return _paper_calibration(self)

    def value_init_std(self) -> float:
        """Std of the values and pre-values: 0.02 (release) or U2 eq. 26's sigma_V (paper)."""
        if self.init == "release":
            return 0.02
        _, var_s = self.paper_calibration()
        D, K, H, Dv, L, k_inner = self.d_model, self.top_k, self.heads, self.d_v, self.n_model_layers, self.ffn_ratio
        if self.pre_values:                                                 # U2 eq. 26: sigma_V^4
            return (0.2 * k_inner * D / (K * H * (1.0 + var_s) * self.d_p * Dv * L)) ** 0.25
        return (0.08 * k_inner * D / (K * H * (1.0 + var_s) * Dv * L)) ** 0.5  # same derivation, no P_pre

    # cost -----------------------------------------------------------------------------------
    def flops_by_part(self) -> dict[str, int]:
        """Forward FLOPs per token by part (2 per multiply-add, 1 per add or product).

        Matrix products (what ``FlopCounterMode`` counts): "query", "key_scores" (R * n_s * D_k MACs
        per side per head), "proxies" (R * n_s per side per head), "candidates" (m*R^2 + m^2*R per
        head, twice with ``proxy_search="two_sided"``), "mcs" (S_row[:, i]^T [C^(1)..C^(h)]: h*R^2 per selected cell, h > 1), "pre_proj"
        (D*D_p), "pre_dot" (D_p per selected slot), "projection" (proj_in*D); with balance_loss
        "balance_proxies" (the proxies again; ``detailed_aux`` computes them for the report even
        with the switch off, uncounted). Not matrix products: "mcs_dot" (h*R per
        cell), "pre_weight" (h per slot), "gather" (H*K*D_v MACs, an embedding bag). Not counted:
        norms, top-k comparisons, softmax of the balance loss, the per-call key normalisation.
        """
        D, H, Hq, Dk, R, Rq = self.d_model, self.heads, self.q_heads, self.k_dim, self.rank, self.q_ranks
        h, ns, Dv, Dp, K, m = self.n_cores, self.n_side, self.d_v, self.d_p, self.top_k, self.m
        quadrants = 2 if self.proxy_search == "two_sided" else 1            # I+ x J+ (, I- x J-)
        parts = {
            "query": 2 * D * Hq * 2 * Rq * Dk,
            "key_scores": 2 * H * 2 * R * ns * Dk,                          # U2 eq. 6
            "proxies": 2 * H * 2 * R * ns,
            "candidates": 2 * H * quadrants * (m * R * R + m * m * R),      # U2 eq. 7 on I x J
            "mcs": 2 * H * K * h * R * R if h > 1 else 0,
            "mcs_dot": 2 * H * K * h * R if h > 1 else 0,
            "pre_proj": 2 * D * Dp,
            "pre_dot": 2 * H * K * Dp,                                      # <P_pre[row], W_pre x>
            "pre_weight": H * K * h if self.pre_values else 0,             # s^(c) * g
            "gather": 2 * H * K * Dv,
            "projection": 2 * self.proj_in * D,                             # U2 eq. 12 (or eq. 9)
            "balance_proxies": 2 * H * 2 * R * ns if self.balance_loss else 0,
        }
        return parts

    def cost(self) -> LayerCost:
        """Exact parameter count by part and forward FLOPs per token (:meth:`flops_by_part`).

        The sparse part "values" holds the value AND pre-value rows of the layer's window,
        N * (D_v + D_p): one selected slot reads one row of each, so a sparse unit is D_v + D_p
        parameters and a token touches H*K units. With a shared pool the window's rows are shared
        with other layers (the LM's budget counts the pool once)."""
        D, H, Hq, Dk, R = self.d_model, self.heads, self.q_heads, self.k_dim, self.rank
        N, Dv, Dp = self.n_slots, self.d_v, self.d_p
        params = {
            "query": D * Hq * 2 * self.q_ranks * Dk,
            "norms": 2 * Dk if self.qk_norm else 0,
            "keys": H * 2 * R * self.n_side * Dk,
            "cores": self.n_cores * H * R * R,
            "values": N * (Dv + Dp),
            "pre_proj": D * Dp,
            "value_proj": self.proj_in * D,
        }
        return LayerCost(params=params, sparse_part="values", n_units=N, unit_params=Dv + Dp,
                         units_per_token=H * self.top_k, flops_per_token=int(sum(self.flops_by_part().values())))

    def bytes_per_token(self, element_size: int = 4) -> int:
        """Parameter bytes one token reads on its own (a decode step with B = 1): every dense
        parameter plus its H*K value and pre-value rows, i.e. ``cost().active_params_per_token``
        elements. (Batches share dense reads: ``labcore.profiling.cost_model`` models B > 1.)"""
        check_int("UltraMemV2Config.bytes_per_token", "element_size", element_size)
        return self.cost().active_params_per_token * element_size


# ---------------------------------------------------------------------------------------------
# The paper init's simulation (U2 App. A)
# ---------------------------------------------------------------------------------------------


def _selected_moments(cfg: UltraMemV2Config, core: Tensor, uv: Tensor) -> tuple[float, float]:
    """Mean and variance of the selected summed scores at unit scale: ``calib_samples`` draws of
    S_row and S_col as independent standard normals (a generator seeded by ``cfg.seed``) run
    through exactly this layer's search with the summed core ``core`` (H, R, R) and the proxy
    vectors ``uv`` (2, H, R) (m candidates, top K)."""
    c = cfg
    gen = torch.Generator().manual_seed(c.seed + 1)
    z = torch.randn((2, c.calib_samples, c.heads, c.rank, c.n_side), generator=gen, dtype=torch.float64)
    scores = tucker_search(z, uv.to(torch.float64), core.to(torch.float64), c.m, c.top_k,
                           c.proxy_search)[1]                               # (samples, H, K)
    return score_moments(scores, "UltraMemV2")


def _gain_for(cfg: UltraMemV2Config, mu: float) -> float:
    """q/k norm gain g making the mean selected score 1 when it is ``mu`` at unit side-score scale:
    scores are quadratic in the side-score scale sigma = g^2 * std(q_hat . k_hat), so sigma =
    mu^(-1/2) (:func:`labcore.layers.tucker.qk_gain`)."""
    return qk_gain(mu**-0.5, cfg.k_dim, cfg.norm_type)


@functools.lru_cache(maxsize=64)
def _paper_calibration(cfg: UltraMemV2Config) -> tuple[float, float]:
    """(g, sigma_s^2) of the paper init's "simulation" (U2 App. A) on cores drawn from their init
    distribution, Uniform[0, 1) (seeded by ``cfg.seed``), and their rank-1 proxy. sigma_s^2 =
    var / mu^2 is the variance of the selected scores at the scale where their mean is 1 (the
    search's selection does not depend on the scale). A function of the config alone, so that every
    layer sharing a pool agrees on the value std; the layer's own gain uses its own cores
    (:meth:`UltraMemV2.calibrated_gain`)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    core = torch.rand((cfg.n_cores, cfg.heads, cfg.rank, cfg.rank), generator=gen, dtype=torch.float64).sum(0)
    U, _, Vh = torch.linalg.svd(core)
    mu, var = _selected_moments(cfg, core, torch.stack((U[..., :, 0], Vh[..., 0, :])))
    return _gain_for(cfg, mu), var / mu**2


# ---------------------------------------------------------------------------------------------
# Shared pool and ring windows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingWindow:
    """The rows of a shared pool one layer reads: n_keys^2 rows from ``start``, wrapping around."""

    start: int
    n_keys: int
    pool_size: int

    @property
    def size(self) -> int:
        return self.n_keys * self.n_keys

    def rows(self) -> Tensor:
        """(n_keys^2,) pool rows, in the order of the layer's physical rows 0..N-1."""
        return (self.start + torch.arange(self.size)) % self.pool_size


def ring_window(layer_index: int, n_layers: int, pool_size: int, share_ratio: float = 1.0) -> RingWindow:
    """The ring window of memory layer ``layer_index`` of ``n_layers`` in a pool of ``pool_size`` rows.

    As the release (``olmo/ultramem_layer_v2.py``): the pool holds L = n_layers equal home segments
    of N_pool / L rows; layer l's window starts at its segment, start = l * N_pool / L, and holds
    n^2 rows with n = floor(sqrt(N_pool * share_ratio)), wrapping around the end of the pool. With
    share_ratio = g / L every layer reads g segments (its own and the next g - 1), i.e. sqrt(g)
    times the keys per side of an unshared layer (U2 §4.2: "ring" sharing over g tables);
    share_ratio = 1 gives every layer the whole pool, rotated.
    """
    o = "ring_window"
    check_int(o, "n_layers", n_layers)
    check_int(o, "layer_index", layer_index, min_value=0, max_value=n_layers - 1)
    check_int(o, "pool_size", pool_size)
    check_float(o, "share_ratio", share_ratio, min_value=0.0, max_value=1.0, min_inclusive=False)
    if pool_size % n_layers:
        raise ConfigError(f"ring_window.pool_size={pool_size!r} is not allowed: must be a multiple of "
                          f"n_layers={n_layers} (one home segment per layer)")
    n = math.isqrt(math.floor(pool_size * share_ratio + 1e-9))             # release: int(sqrt(N_pool * ratio))
    if n < 1:
        raise ConfigError(f"ring_window.share_ratio={share_ratio!r} is not allowed: must be >= 1 / pool_size "
                          f"= {1 / pool_size!r} (a window of at least one row)")
    return RingWindow(start=layer_index * (pool_size // n_layers), n_keys=n, pool_size=pool_size)


def value_pool(cfg: UltraMemV2Config, pool_size: int) -> tuple[nn.Embedding, nn.Embedding | None]:
    """Value and pre-value tables of ``pool_size`` rows, initialised per ``cfg.init`` (std
    :meth:`UltraMemV2Config.value_init_std`) and tagged "memory_values"; pass them to every layer
    that shares the pool (``values=``, ``pre_values=``). Pre-values are None without ``pre_values``."""
    check_int("value_pool", "pool_size", pool_size)
    std = cfg.value_init_std()
    values = nn.Embedding(pool_size, cfg.d_v)
    nn.init.normal_(values.weight, std=std)
    tag_param(values.weight, "memory_values")
    pre = None
    if cfg.pre_values:
        pre = nn.Embedding(pool_size, cfg.d_p)
        nn.init.normal_(pre.weight, std=std)
        tag_param(pre.weight, "memory_values")
    return values, pre


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class UltraMemV2Aux(LayerAux):
    """LayerAux plus ``core_scores`` (N_tok, H*K, h): the weight w^(c) = s^(c) * g of each core's
    chunk; ``pre_scores`` (N_tok, H*K): g (None without pre-values); ``rows`` (N_tok, H*K): the
    pool rows read. ``scores`` is the sum of ``core_scores`` over the cores."""

    core_scores: Tensor | None = None
    pre_scores: Tensor | None = None
    rows: Tensor | None = None


class UltraMemV2(TuckerRetrieval):
    """UltraMemV2 layer: ``y, aux = layer(x)`` with x (B, T, D) or (N_tok, D); see the module doc.

    ``values`` / ``pre_values``: an optional shared pool (``nn.Embedding(N_pool, D_v)`` /
    ``nn.Embedding(N_pool, D_p)``, e.g. from :func:`value_pool`), used as is; the layer reads its
    N = n_keys^2 rows from ``window_start`` on, wrapping around (:func:`ring_window`). Call
    :meth:`refresh_retrieval` once per optimiser step (``labcore.lm.optim.refresh_all`` does).
    """

    def __init__(self, cfg: UltraMemV2Config, values: nn.Embedding | None = None,
                 pre_values: nn.Embedding | None = None, window_start: int = 0):
        super().__init__()
        if not isinstance(cfg, UltraMemV2Config):
            raise TypeError(f"UltraMemV2: cfg must be an UltraMemV2Config, got {type(cfg).__name__}")
        self.cfg = c = cfg
        # W_q rows (head, side, rank, d); q/k norm gains; keys (H, 2, R, n_s, D_k); cores and (u, t)
        self._init_retrieval(c.q_heads * 2 * c.q_ranks * c.k_dim, c.rank)
        own_values = values is None
        self.values, self.pre_values = self._pool_tables(values, pre_values, window_start)
        self.pool_size = self.values.num_embeddings                         # N_pool
        self.window_start = window_start
        tag_param(self.values.weight, "memory_values")                     # V: (N_pool, D_v)
        if self.pre_values is not None:
            tag_param(self.pre_values.weight, "memory_values")             # P_pre: (N_pool, D_p)
        self.pre_proj = nn.Linear(c.d_model, c.d_p, bias=False) if c.pre_values else None  # W_pre
        self.value_proj = nn.Linear(c.proj_in, c.d_model, bias=False)       # W (U2 eq. 12) or [W_p] (eq. 9)
        self._init_shuffle()                                                # virtual -> (block, row) shuffle
        block, rows = self._virtual_rows()
        self.register_buffer("slot_rows", rows, persistent=False)          # (E*N,) pool row of each virtual slot
        self.detailed_aux = True      # per-call diagnostics: counts, coverage, the balance loss report
        self.reset_parameters(init_values=own_values)

    def _pool_tables(self, values: nn.Embedding | None, pre_values: nn.Embedding | None,
                     window_start: int) -> tuple[nn.Embedding, nn.Embedding | None]:
        """Check a shared pool (or build the layer's own N-row tables) and the window start."""
        c = self.cfg
        if values is None:
            if pre_values is not None:
                raise ConfigError("UltraMemV2: pre_values=<table> is not allowed without values=<table> "
                                  "(a shared pool passes both)")
            values = nn.Embedding(c.n_slots, c.d_v)
            pre_values = nn.Embedding(c.n_slots, c.d_p) if c.pre_values else None
        if c.pre_values and pre_values is None:
            raise ConfigError("UltraMemV2: pre_values=None is not allowed with cfg.pre_values=True and a "
                              "shared values pool: pass the pool's pre-value table too")
        if not c.pre_values and pre_values is not None:
            raise ConfigError("UltraMemV2: pre_values=<table> is not allowed with cfg.pre_values=False")
        for name, table, width in (("values", values, c.d_v), ("pre_values", pre_values, c.d_p)):
            if table is None:
                continue
            if not isinstance(table, nn.Embedding):
                raise TypeError(f"UltraMemV2: {name} must be an nn.Embedding, got {type(table).__name__}")
            rows, cols = table.weight.shape
            if cols != width or rows < c.n_slots or rows != values.weight.shape[0]:
                raise ConfigError(f"UltraMemV2: {name}.weight has shape {(rows, cols)}; must be (N_pool, {width}) "
                                  f"with N_pool >= n_keys**2 = {c.n_slots} rows, the same N_pool for values and pre_values")
        check_int("UltraMemV2", "window_start", window_start, min_value=0, max_value=values.weight.shape[0] - 1)
        return values, pre_values

    # ----------------------------------------------------------------------------------------
    # forward: the mechanism
    # ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, UltraMemV2Aux]:
        c = self.cfg
        x2d, lead = flatten_tokens(x, c.d_model, "UltraMemV2")              # (N_tok, D)
        q = self._queries(x2d)                                              # (N_tok, Hq, 2, Rq, D_k)
        with_balance = c.balance_loss or self.detailed_aux
        # side scores (U2 eq. 6) and the search (eq. 7), in token chunks whose S stays in cache
        out = in_token_chunks(lambda qc: self._search(self._side_scores_q(qc), with_balance), q,
                              2 * c.heads * c.rank * c.n_side)
        slots, scores, core_scores = (rearrange(t, "t h k ... -> t (h k) ...") for t in out[:3])  # (N_tok, H*K[, h])
        rows = self._row_table()[slots]                                     # pool rows: (N_tok, H*K)
        weights, pre = core_scores, None                                    # w^(c) = s^(c) without pre-values
        if c.pre_values:                                                    # U2 eqs. 13-15
            z = self.pre_proj(x2d)                                          # W_pre x: (N_tok, D_p)
            pre = torch.einsum("tkd,td->tk", F.embedding(rows, self.pre_values.weight), z)  # g = <P_pre[row], W_pre x>
            if c.pre_gelu:
                pre = F.gelu(pre)
            weights = core_scores * pre.unsqueeze(-1)                       # w^(c) = s^(c) * g: (N_tok, H*K, h)
        y = self.read(slots, weights)                                       # (N_tok, D)  U2 eq. 12 (or 9)
        balance = self._balance(*out[3:], x2d.shape[0]) if with_balance else None
        aux = self._aux(x2d, y, slots, scores, weights, pre, rows, balance)
        return y.view(*lead, c.d_model), aux

    def _queries(self, x2d: Tensor) -> Tensor:
        """(N_tok, D) -> normalised queries (N_tok, Hq, 2, Rq, D_k): [:, h, side, a]."""
        c = self.cfg
        q = rearrange(self.query(x2d), "t (h s a d) -> t h s a d", s=2, a=c.q_ranks, d=c.k_dim)
        return apply_qk_norm(q, self.query_gain, c.norm_type, c.norm_eps) if c.qk_norm else q

    def _side_scores_q(self, q: Tensor) -> Tensor:
        """Queries (N_tok, Hq, 2, Rq, D_k) -> S (2, N_tok, H, R, n_s), one batched matmul."""
        c = self.cfg
        kk = self._key_matrix()
        q = q.expand(-1, -1, -1, c.rank, -1)                                # Rq = 1: every component reads q[side]
        if c.share_query:
            qq = rearrange(q[:, 0], "t s a d -> (s a) t d")                 # (2R, N_tok, D_k)
            s = torch.bmm(qq, kk)                                           # (2R, N_tok, H*n_s)
            return rearrange(s, "(s a) t (h n) -> s t h a n", s=2, h=c.heads)
        qq = rearrange(q, "t h s a d -> (h s a) t d")                       # (H*2*R, N_tok, D_k)
        s = torch.bmm(qq, kk)                                               # (H*2*R, N_tok, n_s)
        return rearrange(s, "(h s a) t n -> s t h a n", s=2, a=c.rank)

    def search(self, s_row: Tensor, s_col: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Side scores -> virtual slots (N_tok, H, K), summed scores (N_tok, H, K), per-core
        scores (N_tok, H, K, h): UltraMem's search (docs/mechanisms.md §1.3, §1.5)."""
        return self._search(torch.stack((s_row, s_col)), False)[:3]

    def _search(self, s: Tensor, with_balance: bool) -> tuple[Tensor, ...]:
        """:meth:`search` on S (2, N_tok, H, R, n_s), plus the balance-loss sums when asked."""
        c = self.cfg
        core_sum, uv = self._search_params(s.dtype)                         # C (H, R, R), (u, t) (2, H, R)
        cells, scores, vecs = tucker_search(s, uv, core_sum, c.m, c.top_k, c.proxy_search)  # (2, N_tok, H, K), ...
        slots = cells[0] * c.n_side + cells[1]                              # virtual slot v = i*n_s + j
        # MCS: s^(c)_k = S_row[:, i_k]^T C^(c) S_col[:, j_k], all cores in one small matmul
        per_core = scores.unsqueeze(-1) if c.n_cores == 1 else self.per_core_scores(vecs)  # (N_tok, H, K, h)
        out = (slots, scores, per_core)
        return out + self._balance_sums(s, uv) if with_balance else out

    def _balance_sums(self, s: Tensor, uv: Tensor) -> tuple[Tensor, Tensor]:
        """Per chunk: sum over (tokens, heads) of softmax(proxy) and the top-m hit counts, per side,
        each (1, 2, n_s) (the leading 1 lets token chunks concatenate)."""
        c = self.cfg
        proxy = (uv.view(2, 1, c.heads, 1, c.rank) @ s).squeeze(-2)         # [u^T S_row; t^T S_col]: (2, N_tok, H, n_s)
        work = torch.promote_types(proxy.dtype, torch.float32)
        p_sum = F.softmax(proxy.to(work), dim=-1).sum((1, 2))               # (2, n_s)
        top = exact_topk(proxy.detach(), c.m, sorted=False)[1]              # first-stage picks: (2, N_tok, H, m)
        hits = torch.zeros(2, c.n_side, dtype=work, device=s.device)
        hits.scatter_add_(1, top.flatten(1), torch.ones(top[0].numel(), dtype=work, device=s.device).expand(2, -1))
        return p_sum.unsqueeze(0), hits.unsqueeze(0)

    def _balance(self, p_sum: Tensor, hits: Tensor, n_tok: int) -> Tensor:
        """L_bal = sum_side n_s * sum_j f_j p_j from the chunk sums (module doc)."""
        c = self.cfg
        p = p_sum.sum(0) / (n_tok * c.heads)                                # mean softmax: (2, n_s)
        counts = hits.sum(0)
        f = counts / counts.sum(-1, keepdim=True)                           # fraction of picks: (2, n_s)
        return c.n_side * (f * p).sum()

    def read(self, slots: Tensor, weights: Tensor) -> Tensor:
        """Weighted value read and projection: slots (N_tok, S) virtual, weights (N_tok, S, h) the
        per-core w^(c) -> (N_tok, D).

        "single" (U2 eq. 12): o = W^T sum_k sum_c w^(c)_k V[row(v_k), chunk c], the E blocks summed
        before the one projection: one bag per (token, core) over the pool's chunk view.
        "per_block" (U2 eq. 9): one bag per (token, core, block), then the E*D_v -> D map, exactly
        as UltraMem's read (``fast.bags``), with the rows shifted into the window.
        """
        c = self.cfg
        n_tok, P, h = slots.shape[0], self.pool_size, c.n_cores
        dtype = self.values.weight.dtype
        if c.projection == "single" or c.expansion == 1:
            rows = self._row_table()[slots]                                 # (N_tok, S) pool rows
            idx, offsets, w = bags.value_bags(rows, weights, None, h, 1, P, dtype)
            pooled = F.embedding_bag(idx, self.value_chunks(), offsets, mode="sum", per_sample_weights=w)
            return self.value_proj(pooled.view(n_tok, c.d_v))               # W^T (sum of values)
        idx, offsets, w = bags.value_bags(slots, weights, self._block_key(), h, c.expansion, P, dtype)
        pooled = F.embedding_bag(idx, self.value_chunks(), offsets, mode="sum", per_sample_weights=w)
        return F.linear(pooled.view(n_tok, c.expansion * c.d_v), self._proj_weight())  # sum_p W_p^T pooled_p

    def value_chunks(self) -> Tensor:
        """The pool viewed as (N_pool*h, D_v/h): row r*h + c = V[r, chunk c] (no copy)."""
        c = self.cfg
        return self.values.weight.view(self.pool_size * c.n_cores, c.d_v // c.n_cores)

    # ----------------------------------------------------------------------------------------
    # aux record
    # ----------------------------------------------------------------------------------------
    def _aux(self, x2d: Tensor, y: Tensor, slots: Tensor, scores: Tensor, weights: Tensor, pre: Tensor | None,
             rows: Tensor, balance: Tensor | None) -> UltraMemV2Aux:
        """Losses ("balance" when computed), the selections and detached stats: retrieval scores
        (top1/mth/mean, before pre-values), output std, lambda1/lambda2 of the summed core (mean over
        heads; U2 §4.2: lambda1 > 4 lambda2 without any penalty), pre-score std, and with
        ``detailed_aux`` the bincount over all E*N virtual slots and its coverage."""
        c = self.cfg
        losses: dict[str, Tensor] = {}
        aux_loss = zero_loss(x2d)
        if balance is not None:
            losses["balance"] = balance
            if c.balance_loss:
                aux_loss = aux_loss + c.balance_coef * balance.to(aux_loss.dtype)
        with torch.no_grad():
            lam = self._reuse("svdvals", (self.cores,), lambda: torch.linalg.svdvals(
                self.cores.detach().sum(0).float()).mean(0))                # (R,)
            vals, names = self._score_stats(scores, y)
            vals.append(lam[0])
            names.append("lambda1")
            if lam.numel() > 1:
                vals.append(lam[1])
                names.append("lambda2")
            if pre is not None and pre.numel() > 1:
                vals.append(pre.detach().float().std())
                names.append("pre_score_std")
            if balance is not None:
                vals.append(balance.detach().float())
                names.append("balance")
            counts = None
            if self.detailed_aux:
                counts = torch.bincount(slots.flatten(), minlength=c.n_virtual)  # (E*N,)
                vals.append((counts > 0).float().mean())
                names.append("coverage")
            stats = dict(zip(names, torch.stack([v.to(vals[0].device) for v in vals]).tolist()))  # one sync
        return UltraMemV2Aux(aux_loss=aux_loss, indices=slots.detach(), scores=weights.sum(-1).detach(),
                             counts=counts, losses=losses, stats=stats, core_scores=weights.detach(),
                             pre_scores=None if pre is None else pre.detach(), rows=rows)

    # ----------------------------------------------------------------------------------------
    # initialisation and the once-per-step refresh
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, init_values: bool = True) -> None:
        """Initialise per ``cfg.init`` (module doc) and refresh the search proxy."""
        c = self.cfg
        paper = c.init == "paper"
        small = math.sqrt(2.0 / (5.0 * c.d_model))                          # U2 App. A "small init"
        nn.init.normal_(self.query.weight, std=1.0 / math.sqrt(c.k_dim))
        nn.init.normal_(self.keys, std=1.0 / math.sqrt(c.k_dim))
        nn.init.uniform_(self.cores, 0.0, 1.0)
        nn.init.normal_(self.value_proj.weight, std=small if paper else 1.0 / math.sqrt(c.proj_in))
        if self.pre_proj is not None:
            nn.init.normal_(self.pre_proj.weight, std=small if paper else 1.0 / math.sqrt(c.d_model))
        if init_values:
            std = c.value_init_std()
            nn.init.normal_(self.values.weight, std=std)
            if self.pre_values is not None:
                nn.init.normal_(self.pre_values.weight, std=std)
        self._init_proxy_and_gains(release_gain=c.k_dim ** -0.4)

    @torch.no_grad()
    def calibrated_gain(self) -> float:
        """Paper init: the q/k norm gain making the mean selected score ~1 with this layer's own
        cores and proxy (:func:`_selected_moments`, :func:`_gain_for`)."""
        core = self.cores.detach().sum(0).cpu()
        uv = torch.stack((self.u, self.t)).cpu()
        return _gain_for(self.cfg, _selected_moments(self.cfg, core, uv)[0])

    # refresh_retrieval (TuckerRetrieval): the rank-1 proxy (u, t) of the summed core, refreshed
    # once per optimiser step with the release's sign smoothing, exactly as UltraMem's

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"N={c.n_slots} rows from {self.window_start} of a pool of {self.pool_size}, E={c.expansion} "
                f"(n_side={c.n_side}), heads={c.heads}, k_dim={c.k_dim}, top_k={c.top_k}, m={c.m}, "
                f"d_value={c.d_v}, d_pre={c.d_p}, rank={c.rank}, n_cores={c.n_cores}, "
                f"projection={c.projection!r}, query_per_rank={c.query_per_rank}")

    # ----------------------------------------------------------------------------------------
    # derived tensors, reused in inference while their sources are unchanged (fast.caches;
    # _reuse, _search_params: TuckerRetrieval)
    # ----------------------------------------------------------------------------------------
    def _key_matrix(self) -> Tensor:
        """Normalised keys laid out for the side-score bmm: share_query (2R, D_k, H*n_s), rows
        (side, rank); otherwise (H*2*R, D_k, n_s), rows (head, side, rank)."""
        if self.cfg.share_query:
            return self._laid_out_keys("h s a n d -> (s a) d (h n)")
        return self._laid_out_keys("h s a n d -> (h s a) d n")

    def _virtual_rows(self) -> tuple[Tensor, Tensor]:
        """(E*N,) block p and pool row of every virtual slot: P[v] = p*N + r, row = (r + start) mod N_pool."""
        c = self.cfg
        v = self.perm if self.perm is not None else torch.arange(c.n_slots, device=self.values.weight.device)
        return v // c.n_slots, (v % c.n_slots + self.window_start) % self.pool_size

    def _row_table(self) -> Tensor:
        """(E*N,) long: pool row of each virtual slot (a buffer built at construction)."""
        return self.slot_rows

    def _block_key(self) -> Tensor:
        """(E*N,) ``(p*N_pool + row) * h``: :func:`labcore.layers.fast.bags.ive_key_table` of the shuffle
        shifted into the window, so that ``value_bags`` groups by block over the pool's rows."""
        def compute() -> Tensor:
            block, row = self._virtual_rows()
            return bags.ive_key_table(block * self.pool_size + row, self.cfg.n_cores)

        return self._reuse("block_key", (self.perm,), compute, always=True)

    def _proj_weight(self) -> Tensor:
        """The E*D_v -> D weight with input columns in (core, block, d) order (``fast.bags``)."""
        c = self.cfg
        w = self.value_proj.weight                                          # (D, E*D_v), columns (p, c, d)
        if c.n_cores == 1:
            return w
        return self._reuse("proj", (w,), lambda: bags.core_major_proj_weight(w, c.expansion, c.n_cores))


# ---------------------------------------------------------------------------------------------
# The slow, obviously-correct reference: per-token loops over heads, sides, ranks, candidates.
# ---------------------------------------------------------------------------------------------


def ultramem_v2_reference(layer: UltraMemV2, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token UltraMemV2, written out: for every token and head, each rank component's side
    scores with its own query, the proxies u^T S_row and t^T S_col, their m best rows and columns
    (and the m most negative with ``proxy_search="two_sided"``), every candidate cell scored with
    the summed core, the K best, per-core scores, the pre-value
    weight <P_pre[row], W_pre x>, a python loop adding w^(c) * V[row, chunk c] into the buffer
    (one buffer, or block p's with ``projection="per_block"``), then the projection; and the
    balance loss from the per-token proxies and picks.

    Returns ``(y, slots, weights, balance)``: y shaped like x; slots (N_tok, H*K) head-major,
    descending within each head; weights (N_tok, H*K, h) = w^(c); balance the unweighted L_bal.
    """
    c = layer.cfg
    x2d, lead = flatten_tokens(x, c.d_model, "ultramem_v2_reference")
    H, Dk, K, h, N, R, ns, m = c.heads, c.k_dim, c.top_k, c.n_cores, c.n_slots, c.rank, c.n_side, c.m
    P, start, Dc = layer.pool_size, layer.window_start, c.d_v // c.n_cores
    n_buf = c.expansion if (c.projection == "per_block" and c.expansion > 1) else 1
    q = (x2d @ layer.query.weight.T).view(-1, c.q_heads, 2, c.q_ranks, Dk)  # (N_tok, Hq, 2, Rq, D_k)

    keys = layer.keys                                                       # (H, 2, R, n_s, D_k)
    if c.qk_norm:                                                           # written-out q/k norm
        q = reference_qk_norm(q, layer.query_gain, c.norm_type, c.norm_eps)
        keys = reference_qk_norm(keys, layer.key_gain, c.norm_type, c.norm_eps)
    V = layer.values.weight
    p_acc = torch.zeros(2, ns, dtype=x2d.dtype)
    hits = torch.zeros(2, ns, dtype=x2d.dtype)
    ys, all_slots, all_w = [], [], []
    for tok in range(x2d.shape[0]):
        z = layer.pre_proj.weight @ x2d[tok] if c.pre_values else None     # W_pre x: (D_p,)
        buf = torch.zeros(n_buf, c.d_v, dtype=x2d.dtype)
        tok_slots, tok_w = [], []
        for head in range(H):
            qh = q[tok, 0 if c.share_query else head]                       # (2, Rq, D_k)
            S = [torch.stack([keys[head, side, a] @ qh[side, a if c.query_per_rank else 0] for a in range(R)])
                 for side in (0, 1)]                                        # S_row, S_col: (R, n_s) each
            proxies = (layer.u[head] @ S[0], layer.t[head] @ S[1])          # (n_s,) each
            picks = [p.topk(m).indices.tolist() for p in proxies]           # m rows, m columns
            for side in (0, 1):
                p_acc[side] += torch.softmax(proxies[side], dim=0)
                for j in picks[side]:
                    hits[side, j] += 1
            core = layer.cores[:, head].sum(0)                              # summed core (R, R)
            cells = [(i, j) for i in picks[0] for j in picks[1]]            # I+ x J+
            if c.proxy_search == "two_sided":                               # U I- x J- (each cell once)
                lows = [(-p).topk(m).indices.tolist() for p in proxies]
                cells += [(i, j) for i in lows[0] for j in lows[1] if (i, j) not in cells]
            cand = torch.stack([S[0][:, i] @ core @ S[1][:, j] for i, j in cells])
            order = cand.topk(K).indices.tolist()                           # descending
            for o in order:
                i, j = cells[o]
                v = i * ns + j
                shuffled = int(layer.perm[v]) if layer.perm is not None else v
                row, block = (shuffled % N + start) % P, shuffled // N
                g = None
                if c.pre_values:
                    g = layer.pre_values.weight[row] @ z
                    g = F.gelu(g) if c.pre_gelu else g
                ws = []
                for cc in range(h):
                    s_c = S[0][:, i] @ layer.cores[cc, head] @ S[1][:, j]
                    w = s_c * g if g is not None else s_c
                    chunk = slice(cc * Dc, (cc + 1) * Dc)
                    buf[block if n_buf > 1 else 0, chunk] += w * V[row, chunk]
                    ws.append(w)
                tok_slots.append(v)
                tok_w.append(torch.stack(ws))
        ys.append(layer.value_proj.weight @ buf.flatten())                  # (block, d) columns
        all_slots.append(torch.tensor(tok_slots))
        all_w.append(torch.stack(tok_w))
    n_tok = x2d.shape[0]
    balance = sum(ns * ((hits[s] / hits[s].sum()) * (p_acc[s] / (n_tok * H))).sum() for s in (0, 1))
    y = torch.stack(ys).view(*lead, c.d_model)
    return y, torch.stack(all_slots), torch.stack(all_w), balance


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _smallest_n_keys(kwargs: Mapping[str, Any]) -> int:
    """Smallest n_keys with m <= sqrt(E) * n_keys (m = candidate_m or top_k)."""
    fields = UltraMemV2Config.__dataclass_fields__
    top_k = kwargs.get("top_k", fields["top_k"].default)
    m = kwargs.get("candidate_m") or top_k
    e = math.isqrt(kwargs.get("expansion", fields["expansion"].default))
    return max(1, -(-m // max(1, e)))


def _every_block(n_layers: int) -> tuple[int, int]:
    """A memory in parallel to every block's FFN (span 0): UltraMemV2's layout (arXiv 2508.18756 §3.2;
    the placements ``"0:0" .. "L-1:L-1"``, the same as ``"full"``)."""
    return n_layers, 0


register(LayerSpec(
    name="ultramem_v2", role="memory", config=UltraMemV2Config, layer=UltraMemV2, label="UltraMemV2",
    color="#ff6692", size_field="n_keys", min_size=_smallest_n_keys,
    # The 227M/1.2B shape of arXiv 2508.18756 Table 10 at width D (there D = 768): 1 head x top-32,
    # k_dim D/4 per side, D_v = D_p = D/4 (even: 2 cores); R = 2, E = 1 and the switches keep
    # UltraMemV2Config's defaults. Each memory has its own table here (the LM shares plain value
    # pools only; the release's ring-shared pool is the layer's ``values=``/``window_start``).
    family_kwargs=lambda D: {"heads": 1, "top_k": 32, "k_dim": max(1, D // 4),
                             "d_value": max(2, 2 * (D // 8)), "d_pre": max(1, D // 4)},
    layout=_every_block,
    summary="TDQKR search, pre-value weights, one value projection, ring-shared value pool"))
