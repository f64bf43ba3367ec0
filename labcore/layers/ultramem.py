"""UltraMem: a product-key memory with Tucker-decomposed retrieval, multi-core scoring and virtual values.

UltraMem (Huang et al., ICLR 2025, arXiv 2411.12364; docs/mechanisms.md §1) keeps PKM's idea, a
huge table of value vectors of which each token reads a handful, found by a cheap search over row
and column sub-keys, and changes how the row and column scores are combined (TDQKR), how the
selected scores weight the values (MCS, no softmax) and how many values the search can address
(IVE). Every change is a switch of :class:`UltraMemConfig`, so one layer walks the ablation of U1
Table 2 (docs/mechanisms.md §1.8) from PKM to UltraMem row by row; with PKM's choices it computes
exactly what ``labcore.layers.pkm`` computes (:func:`ultramem_from_pkm`, tested).

Symbols (docs/notation.md)
--------------------------
D      model dimension (input of the query projection, output of the layer)
H      memory heads; each has its own keys and cores; the queries are shared when ``share_query``
D_k    key dimension PER SIDE (``k_dim``; the release's ``kdim``). PKM's ``k_dim`` is both halves
       together, so PKM k_dim = 2 * UltraMem k_dim (:func:`ultramem_from_pkm` converts)
R      Tucker rank (``rank``): every key has R components, each a full D_k-vector
h      number of Tucker cores (``n_cores``, multi-core scoring); D_v must be divisible by h
E      value-expansion factor (``expansion``, a perfect square; 1 = IVE off)
n      physical keys per side (``n_keys``); N = n^2 physical values
n_s    keys per side actually searched: n_s = sqrt(E) * n; the grid has n_s^2 = E*N virtual slots
K      slots selected per head (``top_k``); a token reads H*K (slot, score) pairs, heads summed
m      rows / columns kept per side in the candidate search (``candidate_m``, default K)
D_v    value dimension (``d_value``); values V is an (N, D_v) table, split into h chunks of D_v/h

The mechanism, for one token x and one head (U2 = UltraMemV2 arXiv 2508.18756, which restates U1)
---------------------------------------------------------------------------------------------------
Query and keys (``qk_norm`` normalises each side's query and every key over its D_k features, with
a gain shared by all heads/sides; ``norm_type`` "layernorm" or "rmsnorm")::

    q_row, q_col = split(W_q x)                        W_q: (Hq*2*D_k, D), rows (head, side, d)
    S_row = K_row q_row  in R^{R x n_s}                 K_row: (R, n_s, D_k)          (U2 eq. 6)
    S_col = K_col q_col  in R^{R x n_s}

TDQKR, Tucker-decomposed query-key retrieval (``scoring="tucker"``; docs/mechanisms.md §1.3)::

    C = sum_{c=1..h} C^(c)                              h cores, each (R, R)
    S_grid = S_row^T C S_col  in R^{n_s x n_s}                                       (U2 eq. 7)

Searching all n_s^2 grid cells is what product keys avoid. The search uses the rank-1 part of the
core: C ~ lambda_1 u t^T (leading singular vectors of the SUMMED core, computed by
:meth:`UltraMem.refresh_retrieval`, once per optimiser step, detached)::

    rows I = TopM(u^T S_row),  cols J = TopM(t^T S_col)           m rows and m columns (proxies)
    candidates: the m x m cells I x J scored EXACTLY with the full summed core C
    selection:  the K best candidates (i_k, j_k);  slot v_k = i_k * n_s + j_k  (virtual slot)

The search is exact when m = n_s and approximate otherwise. Like the release, it keeps the LARGEST
proxies only (``proxy_search="signed"``, the default), so cells whose two proxies are both strongly
negative (a large positive product) are never candidates: at init, with symmetric scores, that is
about half of the exact top-K (recall ~0.5 at m = K; the tests measure it); training shapes the
keys around the search it is given. ``proxy_search="two_sided"`` also keeps the m MOST NEGATIVE
proxies per side, I- and J-, and rescores the 2 m^2 cells (I+ x J+) U (I- x J-) exactly; with a
rank-1 summed core every cell scores lambda_1 p_i q_j (p = u^T S_row, q = t^T S_col), so a
positive score needs proxies of equal sign, and for m >= K and positive top-K scores this search is
exact, at twice the candidate-scoring cost (docs/mechanisms.md §1.3). :meth:`UltraMem.search_recall`
measures either search against the full grid.

PKM is the special case R = 2, S_row = [s_row; 1], S_col = [s_col; 1], C = [[0, 1], [1, 0]]
(score = s_row[i]·1 + 1·s_col[j]; with S_col = [1; s_col] the core must be the identity,
docs/mechanisms.md §1.3). labcore implements it directly as ``scoring="additive"`` (one key set per
side, R = 1; exact product-key top-K: the top-K sums lie in the top-K rows x top-K cols).

MCS, multi-core scoring (``n_cores = h``; docs/mechanisms.md §1.5). ONE selection by the summed
grid; each core's own score at the selected slots, s^(c)_k = S_row[:, i_k]^T C^(c) S_col[:, j_k],
weights its own chunk of the value vector::

    o = concat_c ( sum_k s^(c)_k V[row(v_k), chunk c] )           chunk c = D_v/h features

Scores: no softmax and no activation (``score_activation="none"``, Table 2 "+rm softmax"); the raw
scores, possibly negative, weight the values. "softmax" (over each head's K scores) is PKM's.

IVE, implicit value expansion (``expansion = E``; U2 eqs. 8-9; docs/mechanisms.md §1.4). The grid
has E*N virtual slots but only N physical values. A fixed random permutation P of the virtual slots
(a buffer, seeded by ``cfg.seed``) maps a virtual slot to a physical row and a projector block::

    s_hat = Shuffle(vec(S_grid))                                                       (U2 eq. 8)
    P[v] = p * N + r:   physical row r = P[v] mod N,  block p = P[v] div N
    o = sum_p W_p^T V^T s_hat_p   = one linear map (E*D_v -> D) of the pooled (E, D_v) buffer (U2 eq. 9)

i.e. pool FIRST on physical rows, per block (values of colliding slots SUMMED), then project once.
``value_proj`` (Table 2 "+half vdim + proj") is that projection; with E = 1 it is a plain
D_v -> D map; without it (E = 1 only) D_v must equal D. Heads are summed: all H*K selections of a
token go into the same pooled buffer.

Tucker auxiliary loss (``tucker_aux``; U2 eqs. 16-17, U1 Table 5: alpha = 0.001, tau = 0.15)::

    L_aux = alpha / (R - 1) * sum_{i>=2} relu(lambda_i - tau)^2,   lambda = singular values of C

(averaged over heads, as the release does). It keeps C from drifting far from rank 1, where the
proxy search would miss good cells. It is always reported in ``aux.losses["tucker"]`` (tucker
scoring, R >= 2); only ``tucker_aux=True`` adds ``alpha * L_aux`` to ``aux.aux_loss``.

Shapes: tokens are flattened to N_tok; keys are (H, 2, R, n_s, D_k) (side 0 = rows; the release
stores (H, 2, n_s, D_k, R): ``keys.permute(0, 1, 3, 4, 2)``); side scores travel as one tensor
S (2, N_tok, H, R, n_s), [0] = S_row, [1] = S_col; selections (N_tok, H, K); ``aux.indices`` /
``aux.scores`` are (N_tok, H*K), head-major, each head's K sorted by descending summed score;
``aux.core_scores`` (N_tok, H*K, h). The speed machinery (integer top-k, token chunks, the fused
two-sided search, inference caches, the value bags) lives in ``labcore.layers.fast``;
docs/performance.md explains and measures it. ``detailed_aux=False`` skips the per-call bincount
over all E*N virtual slots (``aux.counts``, coverage). Default True.

Initialisation (``init``; docs/mechanisms.md §1.6)
--------------------------------------------------
"release" (what ``olmo/ultramem_layer.py`` does): values N(0, 0.02^2); q/k norm gains 1/D_k^0.33;
query projection std 1/sqrt(D_k); keys std 1/sqrt(D_k); value projector std 1/sqrt(E*D_v); cores
Uniform[0, 1).
"paper" (secondary sources): values N(0, E / (2*K*H*L)), L = ``n_model_layers``, so the memory
output variance matches an MLP's ~1/(2L); q/k norm gains g (query and key alike) chosen so that the
mean selected score is ~1 (a Monte-Carlo calibration through this layer's own search:
:meth:`UltraMem.calibrated_gain`). The other parameters follow the release. Needs ``qk_norm``.

Differences from the paper / the release / the community port (docs/implementations.md "UltraMem")
----------------------------------------------------------------------------------------------------
* Paper (U1): equations follow U2's restatement; the paper init is reconstructed from secondary
  sources (see above). Cores are per head (release), shape (h, H, R, R); the paper writes one
  R x R core per MCS core.
* Release (``ZihaoHuang-notabot/Ultra-Sparse-Memory-Network``): faithful in the search (rank-1
  proxy of the summed core, buffers refreshed once per step with sign smoothing, the K largest
  proxies only, exact rescoring of m^2 = K^2 candidates), MCS (one selection, per-core scores on
  value chunks), IVE (permutation, mod/div, summed per block, one E*D_v -> D map) and init.
  Differences: the release's query is shared by exactly two heads (``nhead_share_query = 2``),
  labcore's ``share_query`` shares one query among all H heads or none; the release always applies
  the shuffle, labcore skips it for E = 1 (a relabelling of the rows: no effect on what the layer
  can compute, and it keeps PKM's slot = i_row * n + i_col); the release never adds the Tucker aux
  loss (the line is commented out), labcore makes it a switch; labcore adds ``candidate_m``
  (release: m = K), ``proxy_search="two_sided"`` (release: the largest proxies only) and the
  "additive" / "softmax" / no-``value_proj`` settings for the ablation.
* Community port (PyPI ``ultra-mem`` 0.1.2, lucidrains): runs an independent top-k per core
  (different algorithm; labcore selects once by the summed grid), overwrites colliding IVE slots
  with ``scatter`` instead of summing them, computes the key LayerNorm and then scores with the
  un-normalised keys, uses a ReLU on the scores, treats ``num_memories`` as the virtual count
  (physical = num_memories / E) and gives every core its own value table. None of that is here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from labcore.config import (
    ConfigError,
    check_choice,
    check_float,
)
from labcore.layers.base import LayerAux, LayerCost, flatten_tokens, tag_param, zero_loss
from labcore.layers.fast import bags
from labcore.layers.fast.search import (
    fused_search_ok,
    fused_tucker_search,
    in_token_chunks,
    topk_recall,
    tucker_exact_topk,
    tucker_search,
)
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

SCORINGS = ("tucker", "additive")
SCORE_ACTIVATIONS = ("none", "softmax")
_OWNER = "UltraMemConfig"


def _bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{_OWNER}.{name}={value!r} is not allowed: must be {allowed}")


@dataclass(frozen=True)
class UltraMemConfig(SearchGrid):
    """Configuration of an UltraMem layer; the switches are U1 Table 2's ablation rows.

    Sizes: d_model D; n_keys n (physical keys per side, N = n^2 physical values); heads H;
    k_dim D_k per side; top_k K per head; d_value D_v (None: D // 2 with value_proj, else D);
    rank R; n_cores h; expansion E (perfect square, 1 = off); candidate_m m (None: K);
    proxy_search "signed" (the release: the m largest proxies per side, m^2 candidates) |
    "two_sided" (also the m most negative: 2 m^2 candidates; tucker scoring only).
    Switches: scoring "tucker" (TDQKR) | "additive" (PKM product keys; needs rank = n_cores = 1);
    score_activation "none" (UltraMem) | "softmax" (PKM; needs n_cores = 1); qk_norm with
    norm_type "layernorm" | "rmsnorm"; share_query (one query for all heads); value_proj (the
    E*D_v -> D output projection; off only with E = 1 and D_v = D); tucker_aux (add
    tucker_aux_coef * L_aux to aux_loss; margin tucker_aux_margin); init "release" | "paper"
    (paper uses n_model_layers L and calib_samples Monte-Carlo draws; needs qk_norm).
    Others: query_bias (PKM/XLM has one), norm_eps, seed (the IVE permutation and the paper-init
    calibration draws).
    """

    d_model: int
    n_keys: int
    heads: int = 2
    k_dim: int = 128
    top_k: int = 32
    d_value: int | None = None
    rank: int = 2
    n_cores: int = 2
    expansion: int = 4
    scoring: str = "tucker"
    score_activation: str = "none"
    qk_norm: bool = True
    norm_type: str = "layernorm"
    share_query: bool = True
    value_proj: bool = True
    tucker_aux: bool = False
    tucker_aux_coef: float = 0.001
    tucker_aux_margin: float = 0.15
    init: str = "release"
    n_model_layers: int = 1
    candidate_m: int | None = None
    proxy_search: str = "signed"
    query_bias: bool = False
    norm_eps: float = 1e-5
    seed: int = 0
    calib_samples: int = 64

    def __post_init__(self) -> None:
        o = _OWNER
        check_common_fields(self, o)
        for name in ("qk_norm", "share_query", "value_proj", "tucker_aux", "query_bias"):
            check_choice(o, name, getattr(self, name), (True, False))
        check_choice(o, "scoring", self.scoring, SCORINGS)
        check_choice(o, "score_activation", self.score_activation, SCORE_ACTIVATIONS)
        check_float(o, "tucker_aux_coef", self.tucker_aux_coef, min_value=0.0)
        check_float(o, "tucker_aux_margin", self.tucker_aux_margin, min_value=0.0)
        # cross-field rules ---------------------------------------------------------------
        check_search_grid(self, o)
        if not self.value_proj and self.expansion != 1:
            raise _bad("value_proj", self.value_proj, f"True when expansion={self.expansion} > 1 (IVE "
                       "needs the E*D_v -> D projection)")
        if not self.value_proj and self.d_v != self.d_model:
            raise _bad("d_value", self.d_v, f"equal to d_model={self.d_model} when value_proj=False")
        if self.scoring == "additive" and self.rank != 1:
            raise _bad("rank", self.rank, "1 when scoring='additive' (one sub-key set per side)")
        if self.scoring == "additive" and self.n_cores != 1:
            raise _bad("n_cores", self.n_cores, "1 when scoring='additive' (no Tucker cores)")
        if self.score_activation == "softmax" and self.n_cores != 1:
            raise _bad("n_cores", self.n_cores, "1 when score_activation='softmax' (per-core scores "
                       "have no softmax)")
        if self.proxy_search != "signed" and self.scoring != "tucker":
            raise _bad("proxy_search", self.proxy_search, "'signed' when scoring='additive' (the product-key "
                       "search has no proxy; it is exact for m >= top_k)")
        if self.tucker_aux and (self.scoring != "tucker" or self.rank < 2):
            raise _bad("tucker_aux", self.tucker_aux, "False unless scoring='tucker' and rank >= 2 "
                       f"(got scoring={self.scoring!r}, rank={self.rank})")
        if self.init == "paper" and not self.qk_norm:
            raise _bad("init", self.init, "'release' when qk_norm=False (paper init calibrates the "
                       "q/k norm gains)")

    # derived sizes ---------------------------------------------------------------------------
    @property
    def d_v(self) -> int:
        if self.d_value is not None:
            return self.d_value
        return max(1, self.d_model // 2) if self.value_proj else self.d_model

    @property
    def key_rank(self) -> int:
        """Key components per key: R for tucker, 1 for additive scoring."""
        return self.rank if self.scoring == "tucker" else 1

    def cost(self) -> LayerCost:
        """Exact parameter count by part and forward FLOPs per token (2 per multiply-add, 1 per add).

        FLOPs: query projection; key scores (R * n_s * D_k MACs per side per head); tucker: rank-1
        proxies (R * n_s per side per head), candidate scoring with the summed core
        ((S_row[:, I]^T C) S_col[:, J]: m*R^2 + m^2*R MACs per head, twice that for the two quadrants
        of ``proxy_search="two_sided"``), per-core rescoring of the K
        selected cells when h > 1 (h*(R^2 + R) MACs each); additive: m^2 candidate sums per head;
        softmax (3 per selected score); the weighted gather (H*K*D_v MACs); the projection
        (E*D_v*D MACs). Not counted: norms, top-k comparisons, the per-call key normalisation.
        """
        D, H, Hq, Dk, R = self.d_model, self.heads, self.q_heads, self.k_dim, self.key_rank
        h, E, ns, Dv, K, m = self.n_cores, self.expansion, self.n_side, self.d_v, self.top_k, self.m
        tucker = self.scoring == "tucker"
        params = {
            "query": D * Hq * 2 * Dk + (Hq * 2 * Dk if self.query_bias else 0),
            "norms": 2 * Dk if self.qk_norm else 0,
            "keys": H * 2 * ns * Dk * R,
            "cores": h * H * R * R if tucker else 0,
            "values": self.n_slots * Dv,
            "value_proj": E * Dv * D if self.value_proj else 0,
        }
        flops = 2 * D * Hq * 2 * Dk + (Hq * 2 * Dk if self.query_bias else 0)  # query projection
        flops += 2 * H * 2 * ns * Dk * R                                      # key scores (U2 eq. 6)
        if tucker:
            flops += 2 * H * 2 * ns * R                                       # rank-1 proxies
            quadrants = 2 if self.proxy_search == "two_sided" else 1          # I+ x J+ (, I- x J-)
            flops += 2 * H * quadrants * (m * R * R + m * m * R)              # exact candidate scores
            if h > 1:
                flops += 2 * H * K * h * (R * R + R)                          # per-core scores (MCS)
        else:
            flops += H * m * m                                                # candidate sums
        if self.score_activation == "softmax":
            flops += 3 * H * K
        flops += 2 * H * K * Dv                                               # weighted gather-sum
        if self.value_proj:
            flops += 2 * E * Dv * D                                           # projection (U2 eq. 9)
        return LayerCost(params=params, sparse_part="values", n_units=self.n_slots, unit_params=Dv,
                         units_per_token=H * K, flops_per_token=int(flops))


@dataclass(frozen=True, eq=False)
class UltraMemAux(LayerAux):
    """LayerAux plus ``core_scores``: (N_tok, H*K, h), each core's score at the selected slots
    (MCS), after the score activation; ``scores`` is their sum (the summed-core score)."""

    core_scores: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


def _search_additive(s_row: Tensor, s_col: Tensor, m: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """PKM product-key search on side scores (..., H, n_s): exact top-K of s_row[i] + s_col[j]
    when m >= K. Returns rows, cols, scores (..., H, K)."""
    val_r, top_r = s_row.topk(m, dim=-1)                                    # U2 eq. 3: (..., H, m)
    val_c, top_c = s_col.topk(m, dim=-1)
    grid = val_r.unsqueeze(-1) + val_c.unsqueeze(-2)                        # U2 eq. 4: (..., H, m, m)
    scores, flat = grid.flatten(-2).topk(k, dim=-1)                         # (..., H, K), descending
    return top_r.gather(-1, flat // m), top_c.gather(-1, flat % m), scores



class UltraMem(TuckerRetrieval):
    """UltraMem layer: ``y, aux = layer(x)`` with x (B, T, D) or (N_tok, D); see the module doc.

    ``values``: an optional external ``nn.Embedding(N, D_v)`` (a value pool shared with other
    layers); it is used as is, not re-initialised. Call :meth:`refresh_retrieval` once per
    optimiser step (``labcore.lm.optim.refresh_all`` does): it recomputes the rank-1 search proxy.
    """

    def __init__(self, cfg: UltraMemConfig, values: nn.Embedding | None = None):
        super().__init__()
        self.cfg = c = cfg
        # W_q rows (head, side, d); q/k norm gains; keys (H, 2, R, n_s, D_k); tucker: cores and (u, t)
        self._init_retrieval(c.q_heads * 2 * c.k_dim, c.key_rank, query_bias=c.query_bias,
                             tucker=c.scoring == "tucker")
        own_values = values is None
        if values is None:
            values = nn.Embedding(c.n_slots, c.d_v)
        elif not isinstance(values, nn.Embedding):
            raise TypeError(f"UltraMem: values must be an nn.Embedding, got {type(values).__name__}")
        elif tuple(values.weight.shape) != (c.n_slots, c.d_v):
            raise ConfigError(f"UltraMem: values.weight has shape {tuple(values.weight.shape)}; must be "
                              f"(n_keys**2, d_value) = ({c.n_slots}, {c.d_v})")
        self.values = values                                                # V: (N, D_v)
        tag_param(self.values.weight, "memory_values")
        self.value_proj = nn.Linear(c.expansion * c.d_v, c.d_model, bias=False) if c.value_proj else None
        self._init_shuffle()                                                # IVE shuffle P (U2 eq. 8)
        self.detailed_aux = True      # per-call O(N_slots) diagnostics (aux.counts, coverage); see _aux
        self.sparse_value_grad = False  # sparse COO value gradient (base.set_sparse_value_grads)
        self.reset_parameters(init_values=own_values)

    # ----------------------------------------------------------------------------------------
    # forward: the mechanism
    # ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, UltraMemAux]:
        c = self.cfg
        x2d, lead = flatten_tokens(x, c.d_model, "UltraMem")                # (N_tok, D)
        q = self._queries(x2d)                                              # (N_tok, Hq, 2, D_k)
        if c.scoring == "tucker" and fused_search_ok(q, self.keys, self.cores):  # inference: one compiled pass
            slots, scores, core_scores = self._search_fused(q)              # the same search, S never formed
        else:
            # side scores (U2 eq. 6) and the search (eq. 7), in token chunks whose S stays in cache
            slots, scores, core_scores = in_token_chunks(lambda qc: self._search(self._side_scores_q(qc)), q,
                                                         2 * c.heads * c.key_rank * c.n_side)  # (N_tok, H, K[, h])
        if c.score_activation == "softmax":                                 # PKM (h == 1)
            work = torch.promote_types(scores.dtype, torch.float32)         # >= float32, keeps float64
            scores = F.softmax(scores.to(work), dim=-1).type_as(scores)
            core_scores = scores.unsqueeze(-1)
        slots = rearrange(slots, "t h k -> t (h k)")                        # (N_tok, H*K), heads summed
        scores = rearrange(scores, "t h k -> t (h k)")                      # (N_tok, H*K)
        core_scores = rearrange(core_scores, "t h k c -> t (h k) c")        # (N_tok, H*K, h)
        y = self.read(slots, core_scores)                                   # (N_tok, D)  U2 eqs. 8-9
        aux = self._aux(x2d, y, slots, scores, core_scores)
        return y.view(*lead, c.d_model), aux                                # (B, T, D) or (N_tok, D)

    def _queries(self, x2d: Tensor) -> Tensor:
        """(N_tok, D) -> normalised queries (N_tok, Hq, 2, D_k): [:, h, 0] = q_row, [:, h, 1] = q_col."""
        c = self.cfg
        q = rearrange(self.query(x2d), "t (h s d) -> t h s d", s=2, d=c.k_dim)  # (N_tok, Hq, 2, D_k)
        return apply_qk_norm(q, self.query_gain, c.norm_type, c.norm_eps) if c.qk_norm else q

    def _side_scores_q(self, q: Tensor) -> Tensor:
        """Queries (N_tok, Hq, 2, D_k) -> S (2, N_tok, H, R, n_s): S_row = K_row q_row, S_col = K_col q_col."""
        c = self.cfg
        kk = self._key_matrix()                                             # normalised keys, see _key_matrix
        if c.share_query:
            # one matmul per side for all heads: (2, N_tok, D_k) @ (2, D_k, H*R*n_s)
            s = torch.bmm(q[:, 0].transpose(0, 1), kk.transpose(1, 2))      # (2, N_tok, H*R*n_s)
            return rearrange(s, "s t (h r n) -> s t h r n", h=c.heads, r=c.key_rank)  # (2, N_tok, H, R, n_s)
        # one matmul per (head, side): (H*2, N_tok, D_k) @ (H*2, D_k, R*n_s)
        qq = rearrange(q, "t h s d -> (h s) t d")                           # (H*2, N_tok, D_k)
        s = torch.bmm(qq, kk.transpose(1, 2))                               # (H*2, N_tok, R*n_s)
        return rearrange(s, "(h s) t (r n) -> s t h r n", s=2, r=c.key_rank)  # (2, N_tok, H, R, n_s)

    def search(self, s_row: Tensor, s_col: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Side scores -> virtual slots (N_tok, H, K), summed scores (N_tok, H, K) and per-core
        scores (N_tok, H, K, h), all before the score activation."""
        return self._search(torch.stack((s_row, s_col)))

    @torch.no_grad()
    def search_recall(self, x: Tensor) -> float:
        """Search recall: the fraction of the EXACT top-K (brute force over all n_s^2 cells of the
        summed-core grid, :func:`~labcore.layers.fast.search.tucker_exact_topk`) that this layer's
        search selects, |found ∩ exact| / K, averaged over tokens and heads.

        x: (B, T, D) or (N_tok, D). Additive scoring is scored on the additive grid (its search is
        exact for m >= K). O(n_s^2) per token and head, run in token chunks: a diagnostic
        (notebook 01, tests), not a training path.
        """
        c = self.cfg
        x2d, _ = flatten_tokens(x, c.d_model, "UltraMem.search_recall")    # (N_tok, D)

        def recall(qc: Tensor) -> tuple[Tensor]:
            s = self._side_scores_q(qc)                                     # (2, n, H, R, n_s)
            found = self._search(s)[0]                                      # (n, H, K) virtual slots
            if c.scoring == "tucker":
                cells = tucker_exact_topk(s, self.cores.sum(0), c.top_k)[0]  # (2, n, H, K)
                exact = cells[0] * c.n_side + cells[1]
            else:
                grid = s[0, ..., 0, :, None] + s[1, ..., 0, None, :]        # s_row[i] + s_col[j]: (n, H, n_s, n_s)
                exact = grid.flatten(-2).topk(c.top_k, dim=-1).indices
            return (topk_recall(found, exact),)                             # (n, H)

        hits = in_token_chunks(recall, self._queries(x2d), c.heads * c.n_side * c.n_side)[0]
        return float(hits.mean())

    def _search(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`search` on the stacked side scores S (2, N_tok, H, R, n_s)."""
        c = self.cfg
        if c.scoring == "additive":                                         # PKM: s_row[i] + s_col[j]
            rows, cols, scores = _search_additive(s[0, ..., 0, :], s[1, ..., 0, :], c.m, c.top_k)
            return rows * c.n_side + cols, scores, scores.unsqueeze(-1)
        # TDQKR: rows I = TopM(u^T S_row), cols J = TopM(t^T S_col), exact S_row^T C S_col on I x J
        # (two_sided: also the m most negative proxies, I- x J-)
        core_sum, uv = self._search_params(s.dtype)                         # C (H, R, R), (u, t) (2, H, R)
        cells, scores, vecs = tucker_search(s, uv, core_sum, c.m, c.top_k,  # (2, N_tok, H, K), ..., (2, N_tok, H, R, K)
                                            c.proxy_search)
        slots = cells[0] * c.n_side + cells[1]                              # virtual slot v = i*n_s + j
        if c.n_cores == 1:
            return slots, scores, scores.unsqueeze(-1)
        return slots, scores, self.per_core_scores(vecs)                    # MCS: (N_tok, H, K, h)

    def _search_fused(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_search` from the queries (N_tok, Hq, 2, D_k) in one compiled pass
        (``fast.search.fused_tucker_search``: proxies against u^T K, S only at the m selected
        sub-keys), for inference; the same slots and scores up to float32 rounding."""
        c = self.cfg
        q = q.expand(-1, c.heads, -1, -1) if c.share_query else q           # (N_tok, H, 2, D_k)
        keys = self._laid_out_keys("h s r n d -> h s r n d")                # normalised: (H, 2, R, n_s, D_k)
        core_sum, uv = self._search_params(q.dtype)                         # C (H, R, R), (u, t) (2, H, R)
        cells, scores, _, core_scores = fused_tucker_search(
            q, keys, uv, core_sum, self.cores if c.n_cores > 1 else None, c.m, c.top_k, c.proxy_search)
        slots = cells[0] * c.n_side + cells[1]                              # virtual slot v = i*n_s + j
        return slots, scores, (scores.unsqueeze(-1) if core_scores is None else core_scores)

    def read(self, slots: Tensor, core_scores: Tensor) -> Tensor:
        """Pool the selected values per projector block and core chunk, then project (U2 eq. 9).

        slots (N_tok, S) virtual, core_scores (N_tok, S, h) -> (N_tok, D) (or (N_tok, D_v) without
        value_proj). Bag (token, core c, block p) sums score^(c) * V[row, chunk c] over the slots
        that P maps to block p: one ``embedding_bag`` (:meth:`value_bags`, ``fast.bags``).
        """
        c = self.cfg
        n_tok = slots.shape[0]
        idx, offsets, w = self.value_bags(slots, core_scores)
        # one bag per (token, core[, block]) over the (N*h, D_v/h) chunk view (value_chunks);
        # single-pass backward (fast.bags.weighted_bag), a sparse gradient with sparse_value_grad
        pooled = bags.weighted_bag(idx, self.values.weight, w, offsets, n_chunks=c.n_cores,
                                   sparse=self.sparse_value_grad)
        pooled = pooled.view(n_tok, c.expansion * c.d_v)                    # (N_tok, E*D_v): (c, p, d)
        return F.linear(pooled, self._proj_weight()) if self.value_proj is not None else pooled

    def value_chunks(self) -> Tensor:
        """The value table viewed as (N*h, D_v/h): row r*h + c = V[r, chunk c] (no copy)."""
        c = self.cfg
        return self.values.weight.view(c.n_slots * c.n_cores, c.d_v // c.n_cores)

    def value_bags(self, slots: Tensor, core_scores: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """The value gather of :meth:`read` as ``F.embedding_bag`` arguments over :meth:`value_chunks`
        (:func:`labcore.layers.fast.bags.value_bags`): bags (token, core, block) in that order."""
        c = self.cfg
        key = self._ive_key() if c.expansion > 1 else None
        return bags.value_bags(slots, core_scores, key, c.n_cores, c.expansion, c.n_slots, self.values.weight.dtype)

    def tucker_loss(self) -> tuple[Tensor, Tensor] | None:
        """(L_aux, singular values (H, R)) of the summed core (U2 eqs. 16-17); None if not tucker."""
        if self.cores is None:
            return None
        core = self.cores.sum(0)                                            # C = sum_c C^(c): (H, R, R)
        if core.dtype in (torch.float16, torch.bfloat16):
            core = core.float()
        lam = torch.linalg.svdvals(core)                                    # (H, R), descending
        R = lam.shape[-1]
        if R < 2:
            return None, lam
        tail = F.relu(lam[:, 1:] - self.cfg.tucker_aux_margin).pow(2)      # (H, R-1)
        return (tail.sum(-1) / (R - 1)).mean(), lam                         # mean over heads

    def _aux(self, x2d: Tensor, y: Tensor, slots: Tensor, scores: Tensor, core_scores: Tensor) -> UltraMemAux:
        """The aux record. ``detailed_aux`` (default True) adds ``counts`` (a bincount over all E*N
        virtual slots) and ``coverage``: O(N_slots) work per call, which dominates a decode step of
        a few tokens; with ``detailed_aux=False`` ``counts`` is None and every stat is O(N_tok)."""
        c = self.cfg
        losses: dict[str, Tensor] = {}
        aux_loss = zero_loss(x2d)
        tl = self._reuse("tucker", (self.cores,), self.tucker_loss) if self.cores is not None else None
        lam = None
        if tl is not None:
            loss, lam = tl
            if loss is not None:
                losses["tucker"] = loss
                if c.tucker_aux:
                    aux_loss = aux_loss + c.tucker_aux_coef * loss.to(aux_loss.dtype)
        with torch.no_grad():
            vals, names = self._score_stats(scores, y)
            counts = None
            if self.detailed_aux:
                counts = torch.bincount(slots.flatten(), minlength=c.n_virtual)  # (E*N,)
                vals.append((counts > 0).float().mean())
                names.append("coverage")
            if lam is not None:
                lam_mean = lam.detach().float().mean(0)                     # (R,), mean over heads
                vals.append(lam_mean[0])
                names.append("lambda1")
                if lam_mean.numel() > 1:
                    vals.append(lam_mean[1])
                    names.append("lambda2")
            stats = dict(zip(names, torch.stack(vals).tolist()))            # one device sync
        return UltraMemAux(aux_loss=aux_loss, indices=slots.detach(), scores=scores.detach(),
                           counts=counts, losses=losses, stats=stats, core_scores=core_scores.detach())

    # ----------------------------------------------------------------------------------------
    # initialisation and the once-per-step refresh
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, init_values: bool = True) -> None:
        """Initialise per ``cfg.init`` (module doc) and refresh the search proxy."""
        c = self.cfg
        nn.init.normal_(self.query.weight, std=1.0 / math.sqrt(c.k_dim))
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)
        nn.init.normal_(self.keys, std=1.0 / math.sqrt(c.k_dim))
        if self.cores is not None:
            nn.init.uniform_(self.cores, 0.0, 1.0)
        if self.value_proj is not None:
            nn.init.normal_(self.value_proj.weight, std=1.0 / math.sqrt(c.expansion * c.d_v))
        if init_values:
            nn.init.normal_(self.values.weight, std=self.value_init_std())
        self._init_proxy_and_gains(release_gain=c.k_dim ** -0.33)

    def value_init_std(self) -> float:
        """Release: 0.02. Paper: sqrt(E / (2*K*H*L))."""
        c = self.cfg
        if c.init == "release":
            return 0.02
        return math.sqrt(c.expansion / (2 * c.top_k * c.heads * c.n_model_layers))

    @torch.no_grad()
    def calibrated_gain(self) -> float:
        """Paper init: the q/k norm gain g making the mean selected score ~1.

        With normalised q and keys, each rank component of a side score is g^2 * (q_hat . k_hat)
        ~ g^2 * sqrt(D_k) * z, z ~ N(0, 1) (LayerNorm: D_k / sqrt(D_k - 1) instead of sqrt(D_k),
        the vectors have zero mean). A Monte-Carlo run (``calib_samples`` draws of S_row, S_col as
        independent standard normals, run through exactly this layer's search with its own initial
        cores, u, t, m and K; a fixed generator seeded by ``cfg.seed``) gives mu = mean selected
        score at unit scale. Tucker scores are quadratic in the side scale sigma = g^2 sqrt(D_k),
        additive ones linear, so sigma = mu^(-1/2) (tucker) or 1/mu (additive).
        """
        c = self.cfg
        gen = torch.Generator().manual_seed(c.seed + 1)
        shape = (c.calib_samples, c.heads, c.key_rank, c.n_side)
        z_row = torch.randn(shape, generator=gen, dtype=torch.float64)     # unit-scale S_row
        z_col = torch.randn(shape, generator=gen, dtype=torch.float64)
        if c.scoring == "tucker":
            z = torch.stack((z_row, z_col))                                 # (2, samples, H, R, n_s)
            core = self.cores.detach().sum(0).cpu()                         # (H, R, R)
            uv = torch.stack((self.u, self.t)).cpu()                        # (2, H, R)
            scores = tucker_search(z, uv.to(torch.float64), core.to(torch.float64), c.m, c.top_k,
                                   c.proxy_search)[1]
        else:
            scores = _search_additive(z_row[..., 0, :], z_col[..., 0, :], c.m, c.top_k)[2]
        mu = score_moments(scores, "UltraMem")[0]
        sigma = mu ** -0.5 if c.scoring == "tucker" else 1.0 / mu         # side-score std wanted
        return qk_gain(sigma, c.k_dim, c.norm_type)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"N={c.n_slots} physical x E={c.expansion} (n_side={c.n_side}), heads={c.heads}, "
                f"k_dim={c.k_dim}, top_k={c.top_k}, m={c.m}, d_value={c.d_v}, scoring={c.scoring!r}, "
                f"rank={c.key_rank}, n_cores={c.n_cores}, activation={c.score_activation!r}")

    # ----------------------------------------------------------------------------------------
    # derived tensors, reused in inference while their sources are unchanged (fast.caches)
    # ----------------------------------------------------------------------------------------
    def _key_matrix(self) -> Tensor:
        """Normalised keys laid out for the side-score matmul.

        share_query: (2, H*R*n_s, D_k) (side-major); otherwise (H*2, R*n_s, D_k) (head, side).
        """
        if self.cfg.share_query:
            return self._laid_out_keys("h s r n d -> s (h r n) d")          # (2, H*R*n_s, D_k)
        return self._laid_out_keys("h s r n d -> (h s) (r n) d")            # (H*2, R*n_s, D_k)

    def _ive_key(self) -> Tensor:
        """(E*N,) ``P[v] * h`` (:func:`labcore.layers.fast.bags.ive_key_table`), built once."""
        return self._reuse("ive_key", (self.perm,), lambda: bags.ive_key_table(self.perm, self.cfg.n_cores),
                           always=True)

    def _proj_weight(self) -> Tensor:
        """The E*D_v -> D projection with its input features in (core, block, d) order, the layout
        :meth:`value_bags` pools into (:func:`labcore.layers.fast.bags.core_major_proj_weight`)."""
        c = self.cfg
        w = self.value_proj.weight                                          # (D, E*D_v), columns (p, c, d)
        if c.expansion == 1 or c.n_cores == 1:
            return w
        return self._reuse("proj", (w,), lambda: bags.core_major_proj_weight(w, c.expansion, c.n_cores))


# ---------------------------------------------------------------------------------------------
# PKM as a special case: copy a labcore PKM into an UltraMem with PKM's switches.
# ---------------------------------------------------------------------------------------------


def ultramem_from_pkm(pkm: nn.Module) -> UltraMem:
    """An UltraMem computing exactly what ``pkm`` (``labcore.layers.pkm.PKM``) computes.

    Switches: scoring "additive", softmax, E = 1, no share_query, no qk_norm, h = R = 1, candidate
    m = K, query bias as PKM, value_proj iff PKM has an output projection (D_v != D). UltraMem's
    k_dim is PKM's half (D_k per side). Weights are copied (the value table too). PKM's query norm
    and dropout have no UltraMem counterpart: only ``query_norm="none"`` and zero dropout convert.
    """
    pc = pkm.cfg
    if pc.query_norm != "none":
        raise ValueError(f"ultramem_from_pkm: PKM query_norm={pc.query_norm!r} has no UltraMem "
                         "counterpart (per-(head, side) affine sub-query norm); use query_norm='none'")
    for name in ("input_dropout", "query_dropout", "value_dropout"):
        if getattr(pc, name) != 0:
            raise ValueError(f"ultramem_from_pkm: PKM {name}={getattr(pc, name)!r}; UltraMem has no dropout")
    cfg = UltraMemConfig(d_model=pc.d_model, n_keys=pc.n_keys, heads=pc.heads, k_dim=pc.half,
                         top_k=pc.top_k, d_value=pc.d_v, rank=1, n_cores=1, expansion=1,
                         scoring="additive", score_activation="softmax", qk_norm=False,
                         share_query=False, value_proj=pc.has_value_proj, query_bias=pc.query_bias,
                         candidate_m=pc.top_k)
    ref = pkm.keys
    layer = UltraMem(cfg).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        layer.query.weight.copy_(pkm.query.weight)                          # same (head, side, d) rows
        if pc.query_bias:
            layer.query.bias.copy_(pkm.query.bias)
        layer.keys.copy_(pkm.keys.unsqueeze(2))                             # (H, 2, n, D_k/2) -> (H, 2, 1, n, D_k/2)
        layer.values.weight.copy_(pkm.values.weight)
        if layer.value_proj is not None:
            layer.value_proj.weight.copy_(pkm.value_proj.weight)
    return layer


# ---------------------------------------------------------------------------------------------
# The slow, obviously-correct reference: score ALL virtual slots with the full cores.
# ---------------------------------------------------------------------------------------------


def search_candidates(layer: UltraMem, head: int, s_row: Tensor, s_col: Tensor) -> Tensor:
    """The grid cells that ``layer``'s search scores exactly, for one token and head: (n_s, n_s) bool.

    s_row, s_col: (R, n_s). Tucker: proxies p = u^T S_row, q = t^T S_col (``layer.u``, ``layer.t``
    of this head); additive: the sub-key scores themselves. Candidates: the m largest p x the m
    largest q; with ``proxy_search="two_sided"`` also the m most negative p x the m most negative q.
    """
    c = layer.cfg
    if c.scoring == "tucker":
        p, q = layer.u[head] @ s_row, layer.t[head] @ s_col                # rank-1 proxies: (n_s,) each
    else:
        p, q = s_row[0], s_col[0]
    keep = torch.zeros(c.n_side, c.n_side, dtype=torch.bool, device=s_row.device)
    rows, cols = p.topk(c.m).indices, q.topk(c.m).indices
    keep[rows[:, None], cols[None, :]] = True                               # I+ x J+
    if c.proxy_search == "two_sided":
        rows, cols = (-p).topk(c.m).indices, (-q).topk(c.m).indices
        keep[rows[:, None], cols[None, :]] = True                           # I- x J-
    return keep


def ultramem_reference(layer: UltraMem, x: Tensor, exact: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Brute-force UltraMem: every head scores all n_s^2 virtual slots with every core.

    Per token and head: dense grids G^(c) = S_row^T C^(c) S_col (n_s x n_s) for every core, the
    exact top-K of their sum (``exact=False``: the top-K among the cells the layer's candidate
    search would score, :func:`search_candidates`, written out with masks), the activation, then an
    explicit python loop that adds
    score^(c) * V[row, chunk c] into block p of a (E, D_v) buffer (row, p from the permutation),
    and the projection. Returns ``(y, slots, scores)``: y shaped like x; slots and summed scores
    (N_tok, H*K) head-major, descending within each head.
    """
    c = layer.cfg
    x2d, lead = flatten_tokens(x, c.d_model, "ultramem_reference")
    H, Dk, K, h, N, E = c.heads, c.k_dim, c.top_k, c.n_cores, c.n_slots, c.expansion
    Dc = c.d_v // h
    q = x2d @ layer.query.weight.T
    if layer.query.bias is not None:
        q = q + layer.query.bias
    q = q.view(-1, c.q_heads, 2, Dk)                                        # (N_tok, Hq, 2, D_k)
    keys = layer.keys                                                       # (H, 2, R, n_s, D_k)

    if c.qk_norm:                                                           # written-out q/k norm
        q = reference_qk_norm(q, layer.query_gain, c.norm_type, c.norm_eps)
        keys = reference_qk_norm(keys, layer.key_gain, c.norm_type, c.norm_eps)
    V = layer.values.weight
    ys, all_slots, all_scores = [], [], []
    for tok in range(x2d.shape[0]):
        pooled = torch.zeros(E, c.d_v, dtype=x2d.dtype, device=x2d.device)
        tok_slots, tok_scores = [], []
        for head in range(H):
            qh = q[tok, 0 if c.share_query else head]                       # (2, D_k)
            s_row = keys[head, 0] @ qh[0]                                   # S_row: (R, n_s)
            s_col = keys[head, 1] @ qh[1]                                   # S_col: (R, n_s)
            if c.scoring == "tucker":
                grids = [s_row.T @ layer.cores[core, head] @ s_col for core in range(h)]  # (n_s, n_s)
            else:
                grids = [s_row[0][:, None] + s_col[0][None, :]]
            total = torch.stack(grids).sum(0)                               # (n_s, n_s)
            if not exact:                                                   # only the search's candidates
                total = total.masked_fill(~search_candidates(layer, head, s_row, s_col), float("-inf"))
            total = total.flatten()                                         # (n_s^2,), slot i*n_s + j
            top, slots = total.topk(K)
            per_core = [g.flatten()[slots] for g in grids]
            if c.score_activation == "softmax":
                top = torch.softmax(top, dim=-1)
                per_core = [top]
            for k in range(K):
                v = int(slots[k])
                shuffled = int(layer.perm[v]) if layer.perm is not None else v
                row, block = shuffled % N, shuffled // N
                for core in range(h):
                    chunk = slice(core * Dc, (core + 1) * Dc)
                    pooled[block, chunk] += per_core[core][k] * V[row, chunk]
            tok_slots.append(slots)
            tok_scores.append(top)
        flat = pooled.flatten()                                             # (E*D_v,), (block, dim)
        ys.append(layer.value_proj(flat) if layer.value_proj is not None else flat)
        all_slots.append(torch.cat(tok_slots))
        all_scores.append(torch.cat(tok_scores))
    y = torch.stack(ys)
    return y.view(*lead, c.d_model), torch.stack(all_slots), torch.stack(all_scores)


# ----------------------------------------------------------------------------------------------
# Registration (labcore.layers.registry): what the rest of the package knows about this layer.
# ----------------------------------------------------------------------------------------------


def _smallest_n_keys(kwargs: Mapping[str, Any]) -> int:
    """The smallest n_keys UltraMemConfig accepts with these other fields (top-k must fit the grid)."""
    for n in range(1, 1 << 14):
        try:
            UltraMemConfig(**{**kwargs, "n_keys": n})
        except ConfigError:
            continue
        return n
    raise ConfigError(f"UltraMemConfig: no n_keys below {1 << 14} works with {dict(kwargs)!r}")


def _release_layout(n_layers: int) -> tuple[int, int]:
    """One memory per 5 blocks (at least one), each spanning 3 blocks or fewer to fit: the release's
    20-block layout 2:5/6:9/10:13/14:17 (docs/mechanisms.md §1.2)."""
    n_mem = max(1, n_layers // 5)
    return n_mem, max(0, min(3, n_layers // n_mem - 1))


def _ultramem_value_read(layer: UltraMem, aux: UltraMemAux) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """One forward's value read replayed (``read`` with its slots and per-core scores: gather, IVE
    pooling, projection), and the gather inside it alone: one ``embedding_bag`` over the value
    chunks with the (token, core, block) bags the forward produced."""
    idx, offsets, w = layer.value_bags(aux.indices, aux.core_scores)
    table = layer.value_chunks()
    return (lambda: layer.read(aux.indices, aux.core_scores),
            lambda: F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=w))


register(LayerSpec(
    name="ultramem", role="memory", config=UltraMemConfig, layer=UltraMem, label="UltraMem", color="#ab63fa",
    size_field="n_keys", min_size=_smallest_n_keys,
    # 2 heads x top-16, k_dim D/4 per side (the release: 192 at D = 768), d_value D/2 ("half vdim +
    # proj"); E, R and the cores keep UltraMemConfig's defaults.
    family_kwargs=lambda D: {"heads": 2, "top_k": 16, "k_dim": max(1, D // 4), "d_value": max(2, 2 * (D // 4))},
    layout=_release_layout, value_read=_ultramem_value_read,
    summary="TDQKR, multi-core scoring, implicit value expansion"))
