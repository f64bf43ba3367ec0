"""A guided tour: follow ONE token through MoE routing, PKM retrieval, TDQKR, topology bias, IVE,
and the memory family (PEER, Memory+, UltraMemV2).

Everything here is small, explicit numpy so that each step of the mechanisms is visible; the
functions return tidy frozen records (and ``.table()`` DataFrames) that ``labcore.viz.tour_plots``
draws and ``notebooks/00_tour.ipynb`` explains. Tests compare these explicit computations with
brute force and with labcore's real layers. Notation as in ``labcore/__init__.py``; section
numbers refer to ``docs/mechanisms.md``, equation numbers to UltraMemV2 (U2, arXiv 2508.18756,
restating UltraMem).

One token ``x`` (D,) goes through five stations:

(a) MoE routing (docs/mechanisms.md §7.1, U2 eqs. 1-2). Router logits ``z = W_r x`` (E,), probabilities
    ``p = softmax(z)``, the top-K experts are kept. ``softmax_topk_renorm`` renormalises the kept
    probabilities to sum 1 (Mixtral), equal to ``topk_softmax`` (softmax over the K kept logits);
    ``softmax_topk`` keeps them raw (Switch, OLMoE).

(b) PKM retrieval (§1.1, U2 eqs. 3-5). The query is split into a row half and a column half;
    ``s_row = K_row q_row`` (n,), ``s_col = K_col q_col`` (n,); the score of slot (i, j) is the SUM
    ``s_row[i] + s_col[j]``: an n x n additive grid over N = n^2 value slots (slot id ``i*n + j``).
    Product-key search takes the top-K rows and the top-K columns, scores only the K^2 pairs and
    keeps the top K: exact, because a slot of the global top-K can only use a top-K row and a top-K
    column. PKM then applies a softmax to the K selected scores.

(c) TDQKR (§1.3, U2 eq. 7). Keys get a rank axis: ``S_row = K_row q_row`` is (R, n), one score per
    key per rank component, likewise ``S_col``; a Tucker core C (R, R) combines them bilinearly:
    ``S_grid = S_row^T C S_col`` (n, n), i.e. ``score(i, j) = sum_ab S_row[a,i] C[a,b] S_col[b,j]``.
    The exact top-K over n^2 cells is too expensive, so retrieval uses the rank-1 SVD proxy
    (§1.3 steps 1-4): ``C ~ lambda_1 u t^T``, row proxy ``u^T S_row`` (n,), column proxy
    ``t^T S_col`` (n,); top-m rows x top-m columns give m^2 candidates, which are scored EXACTLY
    with the full C and the top K kept. Unlike (b) this is an approximation: the exact top-K can fall
    outside the candidate set. The proxy looks only at the top of u^T S_row and t^T S_col, so cells
    whose large positive score comes from two large NEGATIVE proxy factors are never candidates: on
    an untrained random layer about half of the exact top-K is missed (measured in the tour's
    ``tdqkr_mean_recall``); training shapes keys and queries around the proxy.
    PKM is the special case R = 2 (:func:`pkm_as_tucker`): ``S_row = [s_row; 1]``,
    ``S_col = [s_col; 1]``, ``C = [[0, 1], [1, 0]]`` gives ``s_row[i] * 1 + 1 * s_col[j]``.
    (Writing ``S_col = [1; s_col]`` with this C would give ``s_row[i] * s_col[j] + 1``, a product;
    with ``[1; s_col]`` the core must be the identity; docs/mechanisms.md §1.3.)
    The swap core has two equal singular values, so a rank-1 proxy has no preferred direction.
    Multi-core scoring (§1.5) ranks by the SUM of the cores; pass an (h, R, R) stack to sum it.

(d) Topology bias (§1.1 drawback 2). With additive scores the best slot is (argmax s_row, argmax
    s_col) and the second best ALWAYS shares its row or its column: any slot (i, j) with i != i*
    and j != j* is beaten by (i*, j), which is not the best slot either. So the two strongest memory
    slots a token reads are never "independent" - a prior imposed by the key layout.
    :func:`topology_bias` measures, over many random queries, the fraction of queries whose second
    best slot shares a row or a column with the best: 1 for additive scores (by construction),
    lower for the bilinear TDQKR grid, and 2(n-1)/(n^2-1) = 2/(n+1) if the runner-up were a
    uniformly random other cell (the baseline, also measured with i.i.d. random grids).

(e) IVE (§1.4, U2 eqs. 8-9). Implicit value expansion makes E x N virtual slots from N physical
    value rows and E projectors W_p (D_v, D): keys per side grow by sqrt(E) (E a perfect square), a
    fixed random permutation ``perm`` of the virtual slots maps virtual slot v to
    ``physical_row = perm[v] mod N`` and ``block = perm[v] div N``. Each physical row therefore
    serves exactly E virtual slots, one per block. The output is computed by pooling the scores on
    the physical rows per block first and projecting afterwards,
    ``o = sum_p W_p^T (V^T s_p)`` (U2 eq. 9), which equals reading the materialised virtual table
    ``V_p = V W_p`` (:func:`ive_output` vs :func:`ive_output_materialized`). Without the shuffle
    the E copies of a physical row sit at aligned grid positions (when sqrt(E) divides n: the
    same column, N/(sqrt(E) n) rows apart) and each block is a band of consecutive rows.

(f)-(h) The memory family, run as labcore's REAL layers (float64, eval mode) on the same token, each
    returning a small record read from the layer's ``aux`` and documented attributes:
    PEER (docs/mechanisms.md §6, :func:`peer_station`): per head the top-K single-neuron experts,
    their softmax router weights and activations sigma(u_i^T x), and the bytes touched vs dense FFNs;
    Memory+ (§5, :func:`memory_plus_station`): the PKM read m(x), the gate SiLU(W_s x), the output
    W_o(m * gate), and L layers reading ONE value table; UltraMemV2 (§3, :func:`ultramem_v2_station`):
    pre-value weights g = <P_pre[row], W_pre x>, the single projection after summing the E blocks vs
    v1's per-block projections (a twin layer), and the ring windows of a shared pool.

Where the tour differs from the papers and labcore's layers: its query projection has no norm
and no conv (the real layers have them); one head and one Tucker core (the summed core of MCS);
the core is drawn Uniform[0, 1) like the release's init; the SVD proxy's sign is fixed by a
deterministic convention (largest-magnitude entry of u positive) where training keeps it close
to the previous optimiser step's vectors (``UltraMem.refresh_retrieval``). Tests check that the
tour's selections equal those of ``labcore.layers`` (MoE, PKM, UltraMem with the layer's u, t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from labcore.config import ConfigError, check_choice, check_int, is_perfect_square
from labcore.experiments.params import TourParams  # torch-free: the sweep validates it without torch
from labcore.layers.memory_plus import MemoryPlus, MemoryPlusConfig
from labcore.layers.peer import PEER, PEERConfig
from labcore.layers.ultramem_v2 import RingWindow, UltraMemV2, UltraMemV2Config, ring_window, value_pool

ROUTERS = ("softmax_topk_renorm", "topk_softmax", "softmax_topk")
SCORINGS = ("additive", "tucker", "random")

# ----------------------------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------------------------


def topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a 1-D array, best first; ties broken by lower index."""
    return np.argsort(-x, kind="stable")[:k]


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _check_topk(owner: str, name: str, k: int, n: int) -> None:
    check_int(owner, name, k, min_value=1, max_value=n)


# ----------------------------------------------------------------------------------------------
# (a) MoE routing.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoERouting:
    """One token's routing. logits/probs: (E,); chosen: (K,) expert ids best first; weights: (K,)
    what multiplies each chosen expert's output."""

    logits: np.ndarray
    probs: np.ndarray
    chosen: np.ndarray
    weights: np.ndarray
    router: str

    def table(self) -> pd.DataFrame:
        E = len(self.probs)
        rank = np.full(E, -1)
        rank[self.chosen] = np.arange(len(self.chosen))
        weight = np.zeros(E)
        weight[self.chosen] = self.weights
        return pd.DataFrame({"expert": np.arange(E), "logit": self.logits, "prob": self.probs,
                             "chosen": rank >= 0, "rank": rank, "weight": weight})


def route_token(x: np.ndarray, w_router: np.ndarray, top_k: int,
                router: str = "softmax_topk_renorm") -> MoERouting:
    """Route one token ``x`` (D,) with router weight ``w_router`` (E, D)."""
    check_choice("route_token", "router", router, ROUTERS)
    _check_topk("route_token", "top_k", top_k, w_router.shape[0])
    logits = w_router @ x                        # z = W_r x, (E,)
    probs = softmax(logits)                      # p = softmax(z)
    chosen = topk(probs, top_k)                  # I = TopK(p)  (softmax is monotone: = TopK(z))
    w = probs[chosen]
    if router == "softmax_topk_renorm":
        w = w / w.sum()                          # renormalise the kept K to sum 1
    elif router == "topk_softmax":
        w = softmax(logits[chosen])              # softmax over the K kept logits: the same numbers
    return MoERouting(logits=logits, probs=probs, chosen=chosen, weights=w, router=router)


def expert_load(X: np.ndarray, w_router: np.ndarray, top_k: int) -> np.ndarray:
    """Tokens routed to each expert for a batch ``X`` (B, D): counts (E,), summing to B*K."""
    _check_topk("expert_load", "top_k", top_k, w_router.shape[0])
    logits = X @ w_router.T                      # (B, E)
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]  # softmax is monotone: same top-K
    return np.bincount(chosen.ravel(), minlength=w_router.shape[0])


# ----------------------------------------------------------------------------------------------
# (b) PKM: additive product keys.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PKMRetrieval:
    """s_row, s_col: (n,) half-query scores; grid: (n, n) with grid[i, j] = s_row[i] + s_col[j];
    rows, cols: (K,) the top-K rows / columns searched; slots: (K,) selected slot ids i*n + j, best
    first; scores: (K,) their grid scores; weights: (K,) softmax of the scores (PKM)."""

    s_row: np.ndarray
    s_col: np.ndarray
    grid: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    slots: np.ndarray
    scores: np.ndarray
    weights: np.ndarray

    @property
    def n(self) -> int:
        return len(self.s_row)

    @property
    def cells(self) -> list[tuple[int, int]]:
        return [(int(s) // self.n, int(s) % self.n) for s in self.slots]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"rank": np.arange(len(self.slots)), "slot": self.slots,
                             "row": self.slots // self.n, "col": self.slots % self.n,
                             "score": self.scores, "weight": self.weights})


def pkm_retrieve(q_row: np.ndarray, q_col: np.ndarray, k_row: np.ndarray, k_col: np.ndarray,
                 top_k: int) -> PKMRetrieval:
    """Product-key retrieval of one head: q_row, q_col (D_k,); k_row, k_col (n, D_k)."""
    n = k_row.shape[0]
    _check_topk("pkm_retrieve", "top_k", top_k, n)
    s_row = k_row @ q_row                        # U2 eq. 3: s_row = K_row q_row, (n,)
    s_col = k_col @ q_col                        # s_col = K_col q_col, (n,)
    grid = s_row[:, None] + s_col[None, :]       # U2 eq. 4: s_row + s_col^T, (n, n)
    rows, cols = topk(s_row, top_k), topk(s_col, top_k)
    cand = s_row[rows][:, None] + s_col[cols][None, :]   # (K, K) candidate scores
    best = topk(cand.ravel(), top_k)             # top-K of the K^2 candidates
    slots = rows[best // top_k] * n + cols[best % top_k]
    scores = cand.ravel()[best]
    return PKMRetrieval(s_row=s_row, s_col=s_col, grid=grid, rows=rows, cols=cols, slots=slots,
                        scores=scores, weights=softmax(scores))


# ----------------------------------------------------------------------------------------------
# (c) TDQKR: bilinear grid, rank-1 proxy search, exact rescoring.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TDQKRRetrieval:
    """S_row, S_col: (R, n); core: (R, R) (summed over cores); grid: (n, n) exact S_row^T C S_col;
    singular_values: (R,) of the core; u, t: (R,) its leading singular vectors; proxy_row,
    proxy_col: (n,) rank-1 proxy scores; rows, cols: (m,) candidate rows / columns; slots, scores:
    (K,) the proxy search's result (candidates rescored exactly); exact_slots, exact_scores: (K,)
    the exact top-K over the whole grid."""

    S_row: np.ndarray
    S_col: np.ndarray
    core: np.ndarray
    grid: np.ndarray
    singular_values: np.ndarray
    u: np.ndarray
    t: np.ndarray
    proxy_row: np.ndarray
    proxy_col: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    slots: np.ndarray
    scores: np.ndarray
    exact_slots: np.ndarray
    exact_scores: np.ndarray

    @property
    def n(self) -> int:
        return self.grid.shape[0]

    @property
    def candidate_mask(self) -> np.ndarray:
        """(n, n) bool: the m x m cells the proxy search scores exactly."""
        mask = np.zeros_like(self.grid, dtype=bool)
        mask[np.ix_(self.rows, self.cols)] = True
        return mask

    @property
    def exact_in_candidates(self) -> np.ndarray:
        """(K,) bool: is each exact top-K slot inside the candidate set?"""
        return self.candidate_mask.ravel()[self.exact_slots]

    @property
    def recall(self) -> float:
        """Fraction of the exact top-K that the proxy search finds (= inside the candidates)."""
        return float(np.isin(self.exact_slots, self.slots).mean())

    def table(self) -> pd.DataFrame:
        n = self.n
        return pd.DataFrame({"rank": np.arange(len(self.slots)),
                             "proxy_slot": self.slots, "proxy_row": self.slots // n,
                             "proxy_col": self.slots % n, "proxy_score": self.scores,
                             "exact_slot": self.exact_slots, "exact_row": self.exact_slots // n,
                             "exact_col": self.exact_slots % n, "exact_score": self.exact_scores,
                             "exact_in_candidates": self.exact_in_candidates})


def rank1_proxy(core: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of the core C = U diag(lambda) T^T -> (u, t, lambda): leading singular vectors with the
    sign fixed so that u's largest-magnitude entry is positive (deterministic; see module doc)."""
    U, lam, Vt = np.linalg.svd(core)             # §1.3 step 1: C = U Lambda T^T
    u, t = U[:, 0], Vt[0]
    if u[np.argmax(np.abs(u))] < 0:              # flipping both keeps lambda_1 u t^T unchanged
        u, t = -u, -t
    return u, t, lam


def tdqkr_grid(S_row: np.ndarray, core: np.ndarray, S_col: np.ndarray) -> np.ndarray:
    """U2 eq. 7: S_grid = S_row^T C S_col, (R, n) x (R, R) x (R, n) -> (n, n)."""
    return S_row.T @ core @ S_col


def tdqkr_search(S_row: np.ndarray, S_col: np.ndarray, core: np.ndarray, top_k: int, m: int | None = None,
                 proxy: tuple[np.ndarray, np.ndarray] | None = None) -> TDQKRRetrieval:
    """TDQKR on given side scores S_row, S_col (R, n) with core (R, R) or (h, R, R) (multi-core:
    ranked by the sum); m candidates per side (default top_k, as in the release); proxy: (u, t) to
    use instead of the SVD of the core (e.g. a layer's sign-smoothed buffers)."""
    core = core.sum(axis=0) if core.ndim == 3 else core   # §1.5: rank by the summed cores
    R, n = S_row.shape
    if core.shape != (R, R) or S_col.shape != (R, n):
        raise ValueError(f"tdqkr_search: S_row {S_row.shape}, core {core.shape}, S_col {S_col.shape}; "
                         f"expected (R, n), (R, R), (R, n)")
    m = top_k if m is None else m
    _check_topk("tdqkr_search", "m", m, n)
    _check_topk("tdqkr_search", "top_k", top_k, m * m)
    grid = tdqkr_grid(S_row, core, S_col)        # (n, n) exact bilinear scores
    u, t, lam = rank1_proxy(core)
    if proxy is not None:
        u, t = (np.asarray(v, dtype=float) for v in proxy)
    proxy_row = u @ S_row                        # §1.3 step 2: u^T S_row, (n,)
    proxy_col = t @ S_col                        # t^T S_col, (n,)
    rows, cols = topk(proxy_row, m), topk(proxy_col, m)    # step 3: top-m rows and columns
    cand = S_row[:, rows].T @ core @ S_col[:, cols]        # step 4: exact scores of the m^2, (m, m)
    best = topk(cand.ravel(), top_k)
    slots = rows[best // m] * n + cols[best % m]
    exact = topk(grid.ravel(), top_k)
    return TDQKRRetrieval(S_row=S_row, S_col=S_col, core=core, grid=grid, singular_values=lam, u=u, t=t,
                          proxy_row=proxy_row, proxy_col=proxy_col, rows=rows, cols=cols, slots=slots,
                          scores=cand.ravel()[best], exact_slots=exact, exact_scores=grid.ravel()[exact])


def tdqkr_retrieve(q_row: np.ndarray, q_col: np.ndarray, k_row: np.ndarray, k_col: np.ndarray,
                   core: np.ndarray, top_k: int, m: int | None = None) -> TDQKRRetrieval:
    """TDQKR of one head: q_row, q_col (D_k,); k_row, k_col (R, n, D_k) (the same query meets all
    R key components, as in the release); core (R, R) or (h, R, R); see :func:`tdqkr_search`."""
    S_row = k_row @ q_row                        # U2 eq. 6: (R, n, D_k) @ (D_k,) -> (R, n)
    S_col = k_col @ q_col                        # (R, n)
    return tdqkr_search(S_row, S_col, core, top_k, m)


def _topk_rows(x: np.ndarray, k: int) -> np.ndarray:
    """Row-wise :func:`topk`: (B, n) -> (B, k) indices, best first, ties by lower index."""
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def pkm_slots_batch(q_row: np.ndarray, q_col: np.ndarray, k_row: np.ndarray, k_col: np.ndarray,
                    top_k: int) -> np.ndarray:
    """:func:`pkm_retrieve`'s slots for a batch of queries q_row, q_col (B, D_k) -> (B, K)."""
    n = k_row.shape[0]
    _check_topk("pkm_slots_batch", "top_k", top_k, n)
    s_row, s_col = q_row @ k_row.T, q_col @ k_col.T                       # (B, n) each
    rows, cols = _topk_rows(s_row, top_k), _topk_rows(s_col, top_k)       # (B, K) each
    cand = (np.take_along_axis(s_row, rows, 1)[:, :, None]
            + np.take_along_axis(s_col, cols, 1)[:, None, :])             # (B, K, K)
    best = _topk_rows(cand.reshape(len(cand), -1), top_k)                 # (B, K) in the K^2
    return (np.take_along_axis(rows, best // top_k, 1) * n
            + np.take_along_axis(cols, best % top_k, 1))


def tdqkr_slots_batch(q_row: np.ndarray, q_col: np.ndarray, k_row: np.ndarray, k_col: np.ndarray,
                      core: np.ndarray, top_k: int, m: int | None = None,
                      exact: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`tdqkr_retrieve`'s slots for a batch of queries (B, D_k) -> (B, K), plus the exact
    top-K slots (B, K) of the full grids when ``exact`` (None otherwise)."""
    core = core.sum(axis=0) if core.ndim == 3 else core
    R, n, _ = k_row.shape
    m = top_k if m is None else m
    _check_topk("tdqkr_slots_batch", "m", m, n)
    _check_topk("tdqkr_slots_batch", "top_k", top_k, m * m)
    S_row = np.einsum("rnd,bd->brn", k_row, q_row)                        # (B, R, n)
    S_col = np.einsum("rnd,bd->brn", k_col, q_col)                        # (B, R, n)
    u, t, _ = rank1_proxy(core)
    rows = _topk_rows(np.einsum("r,brn->bn", u, S_row), m)                # (B, m) by u^T S_row
    cols = _topk_rows(np.einsum("r,brn->bn", t, S_col), m)                # (B, m) by t^T S_col
    sel_r = np.take_along_axis(S_row, rows[:, None, :], 2)                # (B, R, m)
    sel_c = np.take_along_axis(S_col, cols[:, None, :], 2)                # (B, R, m)
    cand = np.einsum("bai,ac,bcj->bij", sel_r, core, sel_c)              # (B, m, m) exact on I x J
    best = _topk_rows(cand.reshape(len(cand), -1), top_k)                 # (B, K)
    slots = np.take_along_axis(rows, best // m, 1) * n + np.take_along_axis(cols, best % m, 1)
    if not exact:
        return slots, None
    grid = np.einsum("bai,ac,bcj->bij", S_row, core, S_col)               # (B, n, n)
    return slots, _topk_rows(grid.reshape(len(grid), -1), top_k)


def pkm_as_tucker(s_row: np.ndarray, s_col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PKM as TDQKR with R = 2: returns (S_row, C, S_col) with S_row^T C S_col = s_row + s_col^T.

    score(i, j) = S_row[0,i] C[0,1] S_col[1,j] + S_row[1,i] C[1,0] S_col[0,j] = s_row[i]*1 + 1*s_col[j].
    """
    n = len(s_row)
    S_row = np.stack([s_row, np.ones(n)])        # (2, n): [s_row; 1]
    S_col = np.stack([s_col, np.ones(n)])        # (2, n): [s_col; 1]
    C = np.array([[0.0, 1.0], [1.0, 0.0]])       # the swap core pairs each score with the other side's 1
    return S_row, C, S_col


# ----------------------------------------------------------------------------------------------
# (d) Topology bias: does the runner-up share a row or a column with the best slot?
# ----------------------------------------------------------------------------------------------


def second_best_shares_line(grids: np.ndarray) -> np.ndarray:
    """grids (Q, n, n) -> (Q,) bool: the 2nd-best cell is in the best cell's row or column."""
    Q, n, _ = grids.shape
    flat = grids.reshape(Q, n * n).copy()        # (Q, n^2), slot = i*n + j
    best = flat.argmax(axis=1)                   # (Q,) ties: lowest slot id, as in topk()
    flat[np.arange(Q), best] = -np.inf
    second = flat.argmax(axis=1)                 # (Q,) the runner-up
    return (best // n == second // n) | (best % n == second % n)


def random_baseline(n: int) -> float:
    """P(a uniformly random other cell shares the best cell's row or column) = 2(n-1)/(n^2-1)."""
    return 2 * (n - 1) / (n * n - 1)


@dataclass(frozen=True)
class TopologyBias:
    scoring: str
    n: int
    rank: int
    n_queries: int
    shares: int
    baseline: float

    @property
    def fraction(self) -> float:
        return self.shares / self.n_queries

    @property
    def stderr(self) -> float:
        f = self.fraction
        return math.sqrt(max(f * (1 - f), 0.0) / self.n_queries)


def random_grids(scoring: str, n: int, n_queries: int, rank: int = 2, k_dim: int = 8,
                 seed: int = 0) -> np.ndarray:
    """(Q, n, n) score grids of one fixed random layer for Q random queries.

    additive: PKM, s_row[i] + s_col[j] with random keys (n, D_k) per side; tucker: S_row^T C S_col
    with random keys (R, n, D_k) per side and a core drawn like the release's init, Uniform[0, 1)
    (R, R); random: i.i.d. N(0, 1) cells.
    """
    check_choice("random_grids", "scoring", scoring, SCORINGS)
    check_int("random_grids", "n", n, min_value=2)
    check_int("random_grids", "n_queries", n_queries, min_value=1)
    check_int("random_grids", "rank", rank, min_value=1)
    rng = np.random.default_rng(seed)
    if scoring == "random":
        return rng.standard_normal((n_queries, n, n))
    q = rng.standard_normal((n_queries, 2, k_dim))           # (Q, 2, D_k): row and column halves
    if scoring == "additive":
        keys = rng.standard_normal((2, n, k_dim)) / math.sqrt(k_dim)   # (2, n, D_k)
        s_row = q[:, 0] @ keys[0].T                           # (Q, n)
        s_col = q[:, 1] @ keys[1].T                           # (Q, n)
        return s_row[:, :, None] + s_col[:, None, :]          # (Q, n, n)
    keys = rng.standard_normal((2, rank, n, k_dim)) / math.sqrt(k_dim)  # (2, R, n, D_k)
    core = rng.random((rank, rank))                           # release init: Uniform[0, 1)
    S_row = np.einsum("rnd,qd->qrn", keys[0], q[:, 0])        # (Q, R, n)
    S_col = np.einsum("rnd,qd->qrn", keys[1], q[:, 1])        # (Q, R, n)
    return np.einsum("qai,ab,qbj->qij", S_row, core, S_col)   # (Q, n, n)


def topology_bias(scoring: str, n: int, n_queries: int, rank: int = 2, k_dim: int = 8,
                  seed: int = 0) -> TopologyBias:
    """Measure how often the 2nd-best slot shares a row or column with the best one."""
    grids = random_grids(scoring, n, n_queries, rank=rank, k_dim=k_dim, seed=seed)
    shares = int(second_best_shares_line(grids).sum())
    return TopologyBias(scoring=scoring, n=n, rank=rank if scoring == "tucker" else 0,
                        n_queries=n_queries, shares=shares, baseline=random_baseline(n))


def topology_bias_table(n: int, n_queries: int, rank: int = 2, k_dim: int = 8, seed: int = 0) -> pd.DataFrame:
    """One row per scoring (additive, tucker, random): fraction, its standard error, the baseline.
    Cached on its arguments (sliders that do not change them do not re-measure); returns a copy."""
    return _bias_table(n, n_queries, rank, k_dim, seed).copy()


@lru_cache(maxsize=64)
def _bias_table(n: int, n_queries: int, rank: int, k_dim: int, seed: int) -> pd.DataFrame:
    rows = []
    for i, scoring in enumerate(SCORINGS):
        b = topology_bias(scoring, n, n_queries, rank=rank, k_dim=k_dim, seed=seed + i)
        rows.append({"scoring": scoring, "n": n, "rank": b.rank, "n_queries": n_queries,
                     "shares": b.shares, "fraction": b.fraction, "stderr": b.stderr,
                     "random_baseline": b.baseline})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# (e) IVE: virtual slots -> (physical row, block).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IVEMapping:
    """n_keys: physical keys per side (N = n_keys^2 physical rows); expansion: E; perm: (E*N,)
    the fixed permutation of virtual slots (identity when not shuffled)."""

    n_keys: int
    expansion: int
    perm: np.ndarray
    shuffled: bool

    @property
    def n_physical(self) -> int:
        return self.n_keys ** 2

    @property
    def side(self) -> int:
        """Virtual keys per side: sqrt(E) * n."""
        return math.isqrt(self.expansion) * self.n_keys

    @property
    def physical_row(self) -> np.ndarray:
        return self.perm % self.n_physical       # (E*N,)

    @property
    def block(self) -> np.ndarray:
        return self.perm // self.n_physical      # (E*N,)

    def table(self) -> pd.DataFrame:
        v = np.arange(len(self.perm))
        return pd.DataFrame({"virtual_slot": v, "virtual_row": v // self.side, "virtual_col": v % self.side,
                             "physical_row": self.physical_row, "block": self.block})

    def serves(self) -> pd.DataFrame:
        """Per physical row: how many virtual slots it serves and in how many distinct blocks."""
        t = self.table()
        g = t.groupby("physical_row")["block"]
        return pd.DataFrame({"physical_row": np.arange(self.n_physical),
                             "n_virtual": g.size().reindex(range(self.n_physical), fill_value=0).to_numpy(),
                             "n_blocks": g.nunique().reindex(range(self.n_physical), fill_value=0).to_numpy()})

    def route(self, virtual_slots: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
        """Where a token's selected virtual slots land: one row per selected slot."""
        vs = np.asarray(virtual_slots)
        return pd.DataFrame({"rank": np.arange(len(vs)), "virtual_slot": vs, "virtual_row": vs // self.side,
                             "virtual_col": vs % self.side, "physical_row": self.physical_row[vs],
                             "block": self.block[vs], "score": scores})

    def pooled_scores(self, virtual_slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """(E, N) score mass per (block, physical row): U2 eq. 9's s_p laid out on the physical rows."""
        out = np.zeros((self.expansion, self.n_physical))
        np.add.at(out, (self.block[virtual_slots], self.physical_row[virtual_slots]), scores)  # SUM collisions
        return out


def ive_mapping(n_keys: int, expansion: int, seed: int = 0, shuffle: bool = True) -> IVEMapping:
    """The fixed virtual -> physical map of IVE for n_keys physical keys per side."""
    check_int("ive_mapping", "n_keys", n_keys, min_value=1)
    check_int("ive_mapping", "expansion", expansion, min_value=1)
    if not is_perfect_square(expansion):
        raise ConfigError(f"ive_mapping.expansion={expansion!r} is not allowed: must be a perfect square")
    n_virtual = expansion * n_keys ** 2
    perm = np.random.default_rng(seed).permutation(n_virtual) if shuffle else np.arange(n_virtual)
    return IVEMapping(n_keys=n_keys, expansion=expansion, perm=perm, shuffled=shuffle)


def ive_output(mapping: IVEMapping, values: np.ndarray, projectors: np.ndarray,
               virtual_slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """U2 eq. 9, pool first then project: o = sum_p W_p^T (V^T s_p). values (N, D_v); projectors
    (E, D_v, D) -> (D,)."""
    pooled = mapping.pooled_scores(virtual_slots, scores) @ values    # (E, N) @ (N, D_v) -> (E, D_v)
    return np.einsum("pv,pvd->d", pooled, projectors)                 # sum_p pooled_p W_p -> (D,)


def ive_output_materialized(mapping: IVEMapping, values: np.ndarray, projectors: np.ndarray,
                            virtual_slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The slow definition: read rows of the virtual table V~[v] = V[row(v)] W_block(v)."""
    virtual = np.einsum("nv,pvd->pnd", values, projectors)            # (E, N, D): V_p = V W_p
    rows = virtual[mapping.block[virtual_slots], mapping.physical_row[virtual_slots]]  # (K, D)
    return scores @ rows


# ----------------------------------------------------------------------------------------------
# (f)-(h) The memory family: PEER, Memory+, UltraMemV2, each the REAL labcore layer on one token.
# ----------------------------------------------------------------------------------------------
# Unlike stations (a)-(e), these run labcore's layers (float64, eval mode, tiny sizes) and read
# what they did from ``aux`` and the layers' documented attributes (tables, projections,
# ``ring_window``); tests/viz/test_tour.py checks each record against direct layer calls.

FP32_BYTES = 4   # bytes per parameter in the byte counts (fp32 weights)


def _build(seed: int, make):
    """Build torch modules with ``make()`` under a private seed; float64, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods = make()
    for m in mods:
        m.double().eval()
    return mods


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


@dataclass(frozen=True)
class PEERStation:
    """One token through a PEER layer (docs/mechanisms.md §6, arXiv 2407.04153 §2).

    experts, weights, activations: (H, K) per head, sorted by router weight (best first): expert ids
    i = i_row * n + i_col found by product keys, router weights g = softmax over the head's K
    scores (aux.scores), and each neuron's activation sigma(u_i^T x); y: (D,) the layer output
    sum_h sum_i g_i sigma(u_i^T x) v_i. batch_experts: distinct experts hit by the B tokens.
    """

    n_keys: int
    d_model: int
    k_dim: int
    experts: np.ndarray
    weights: np.ndarray
    activations: np.ndarray
    y: np.ndarray
    batch_size: int
    batch_experts: int

    @property
    def heads(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    @property
    def n_experts(self) -> int:
        return self.n_keys ** 2

    @property
    def contributions(self) -> np.ndarray:
        """(H, K) g_i sigma(u_i^T x): the coefficient of v_i in the output."""
        return self.weights * self.activations

    def table(self) -> pd.DataFrame:
        H, K = self.experts.shape
        return pd.DataFrame({"head": np.repeat(np.arange(H), K), "rank": np.tile(np.arange(K), H),
                             "expert": self.experts.ravel(), "row": self.experts.ravel() // self.n_keys,
                             "col": self.experts.ravel() % self.n_keys, "router_weight": self.weights.ravel(),
                             "activation": self.activations.ravel(), "coefficient": self.contributions.ravel()})

    def touched(self) -> pd.DataFrame:
        """What one token reads (fp32 bytes): PEER's H*K neurons (u_i and v_i, 2D numbers each) and
        its sub-keys, vs a dense FFN of equal activated FLOPs (hidden width H*K: the same 2 D H*K
        numbers, but the SAME neurons for every token) and a dense FFN of equal parameters (width N).
        Over the batch the dense FFN still reads H*K neurons; PEER reads ``batch_experts``."""
        H, K, D, n, N = self.heads, self.top_k, self.d_model, self.n_keys, self.n_experts
        per_neuron = 2 * D * FP32_BYTES
        keys = 2 * n * (self.k_dim // 2) * FP32_BYTES                     # shared sub-keys, both sides
        distinct = len(np.unique(self.experts))
        rows = [("PEER (this token)", H * K, distinct, distinct * per_neuron + keys),
                ("dense FFN, equal activated FLOPs (width H*K)", H * K, H * K, H * K * per_neuron),
                ("dense FFN, equal parameters (width N)", N, N, N * per_neuron),
                (f"PEER over the batch (B={self.batch_size})", H * K * self.batch_size, self.batch_experts,
                 self.batch_experts * per_neuron + keys),
                (f"dense FFN width H*K over the batch (B={self.batch_size})", H * K * self.batch_size, H * K,
                 H * K * per_neuron)]
        t = pd.DataFrame(rows, columns=["what", "neuron_uses", "distinct_neurons", "bytes_read"])
        t["fraction_of_pool"] = t["distinct_neurons"] / N
        return t


def peer_layer(params: TourParams) -> PEER:
    """The tour's PEER layer (float64, eval): H heads x top-K of N = n^2 experts, D_k/2 = k_dim per
    half, LayerNorm'd queries, GELU; the same weights for the same params."""
    p = params.resolved()
    cfg = PEERConfig(d_model=p.d_model, n_keys=p.n_keys, heads=p.heads, top_k=p.top_k, k_dim=2 * p.k_dim)
    return _build(p.seed + 11, lambda: [PEER(cfg)])[0]


def peer_station(weights: TourWeights) -> PEERStation:
    """Run labcore's PEER layer (H heads x top-K, LayerNorm'd queries, GELU) on the followed token
    and on the batch (for the distinct experts touched)."""
    p = weights.params
    layer = peer_layer(p)
    cfg = layer.cfg
    with torch.no_grad():
        X = _t(weights.X)
        y, aux = layer(X[p.token:p.token + 1])                              # (1, D), aux over H*K
        _, batch_aux = layer(X)
        experts = aux.indices.view(p.heads, p.top_k)                        # (H, K)
        g = aux.scores.view(p.heads, p.top_k)                               # softmax over each head's K
        order = torch.argsort(g, dim=1, descending=True, stable=True)
        experts, g = experts.gather(1, order), g.gather(1, order)
        h = layer.down.weight[experts] @ X[p.token]                         # u_i^T x: (H, K)
        act = F.gelu(h) if cfg.activation == "gelu" else F.relu(h)
    return PEERStation(n_keys=p.n_keys, d_model=p.d_model, k_dim=cfg.k_dim, experts=_np(experts), weights=_np(g),
                       activations=_np(act), y=_np(y[0]), batch_size=p.batch_size,
                       batch_experts=int(batch_aux.indices.unique().numel()))


@dataclass(frozen=True)
class MemoryPlusStation:
    """One token through Memory+ (docs/mechanisms.md §5, arXiv 2412.09764 §3): m = the PKM read
    (D,), gate = SiLU(W_s x) (D,), gated = m * gate (D,), y = W_o gated (D,); slots / weights
    (H*K,): the pool rows the first layer read and their softmax weights. Shared pool: L layers
    built on ONE value table; layer_slots (L, H*K) the rows each reads for this token, pool_counts
    (L, N) each layer's hits per row over the batch; shared: every layer's ``values`` is that table."""

    n_keys: int
    slots: np.ndarray
    weights: np.ndarray
    read: np.ndarray
    gate: np.ndarray
    gated: np.ndarray
    y: np.ndarray
    layer_slots: np.ndarray
    pool_counts: np.ndarray
    shared: bool

    @property
    def n_layers(self) -> int:
        return self.layer_slots.shape[0]

    def norms(self) -> pd.DataFrame:
        """L2 norms of the read, the gated read and the output, and the fraction of features the
        gate shrinks (|SiLU| < 1) or flips (SiLU < 0)."""
        return pd.DataFrame([{"read |m|": float(np.linalg.norm(self.read)),
                              "gated |m * gate|": float(np.linalg.norm(self.gated)),
                              "output |y|": float(np.linalg.norm(self.y)),
                              "gate shrinks (|gate| < 1)": float((np.abs(self.gate) < 1).mean()),
                              "gate flips sign (gate < 0)": float((self.gate < 0).mean())}])

    def pool_table(self) -> pd.DataFrame:
        """Per layer: rows read by this token, rows hit by the batch, and rows it shares with layer 0."""
        hit = self.pool_counts > 0
        return pd.DataFrame({"layer": np.arange(self.n_layers),
                             "token_rows": [" ".join(map(str, sorted(s))) for s in self.layer_slots.tolist()],
                             "batch_rows_hit": hit.sum(1), "rows_also_hit_by_layer_0": (hit & hit[0]).sum(1)})


def memory_plus_layers(params: TourParams) -> list[MemoryPlus]:
    """The tour's L Memory+ layers (float64, eval), built on ONE value table (the first layer's),
    H heads x top-K of N = n^2 rows, D_k/2 = k_dim per half."""
    p = params.resolved()
    cfg = MemoryPlusConfig(d_model=p.d_model, n_keys=p.n_keys, heads=p.heads, top_k=p.top_k, k_dim=2 * p.k_dim)

    def make():
        first = MemoryPlus(cfg)
        return [first] + [MemoryPlus(cfg, values=first.values) for _ in range(p.memory_layers - 1)]

    return _build(p.seed + 12, make)


def memory_plus_station(weights: TourWeights) -> MemoryPlusStation:
    """Run ``memory_layers`` labcore Memory+ layers that share one value pool (H heads x top-K)."""
    p = weights.params
    layers = memory_plus_layers(p)
    N = p.n_keys ** 2
    with torch.no_grad():
        X = _t(weights.X)
        x = X[p.token:p.token + 1]                                          # (1, D)
        first = layers[0]
        y, aux = first(x)
        m, _ = first.memory(x)                                              # the PKM read m(x): (1, D)
        gate = F.silu(first.gate(x))                                        # SiLU(W_s x): (1, D)
        layer_slots = np.stack([_np(layer(x)[1].indices[0]) for layer in layers])       # (L, H*K)
        counts = np.stack([np.bincount(_np(layer(X)[1].indices).ravel(), minlength=N) for layer in layers])
    shared = all(layer.values.weight is first.values.weight for layer in layers)
    return MemoryPlusStation(n_keys=p.n_keys, slots=_np(aux.indices[0]), weights=_np(aux.scores[0]),
                             read=_np(m[0]), gate=_np(gate[0]), gated=_np((m * gate)[0]), y=_np(y[0]),
                             layer_slots=layer_slots, pool_counts=counts, shared=shared)


@dataclass(frozen=True)
class UltraMemV2Station:
    """One token through UltraMemV2 layers sharing a ring pool (docs/mechanisms.md §3, U2 §3.2).

    For the first layer: slots (K,) virtual slots, rows (K,) pool rows, blocks (K,) IVE block of
    each slot, scores (K,) retrieval scores s (summed over cores, before pre-values), pre (K,)
    pre-value weights g = <P_pre[row], W_pre x>, weights (K,) s * g (aux.scores); pooled (E, D_v)
    the weighted value sums per block; y (D,) the layer output (ONE projection of the sum over
    blocks, U2 eq. 12); y_per_block (D,) v1's per-block projection of the same pooled values by a
    twin layer with ``projection="per_block"`` (U2 eq. 9). Ring: windows (L, 2) (start, n) per
    layer from ``ring_window``; layer_rows (L, K) the pool rows each layer reads for this token.
    """

    pool_size: int
    n_keys: int
    expansion: int
    d_model: int
    d_value: int
    slots: np.ndarray
    rows: np.ndarray
    blocks: np.ndarray
    scores: np.ndarray
    pre: np.ndarray
    weights: np.ndarray
    pooled: np.ndarray
    y: np.ndarray
    y_per_block: np.ndarray
    windows: np.ndarray
    layer_rows: np.ndarray

    @property
    def n_layers(self) -> int:
        return self.windows.shape[0]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"rank": np.arange(len(self.slots)), "virtual_slot": self.slots, "block": self.blocks,
                             "pool_row": self.rows, "score s": self.scores, "pre-value g": self.pre,
                             "weight s*g": self.weights})

    def window_mask(self) -> np.ndarray:
        """(L, N_pool) bool: the pool rows each layer's ring window holds."""
        mask = np.zeros((self.n_layers, self.pool_size), dtype=bool)
        for layer, (start, n) in enumerate(self.windows):
            mask[layer, (start + np.arange(n * n)) % self.pool_size] = True
        return mask

    def projections(self) -> pd.DataFrame:
        """v2's single projection vs v1's per-block projections: parameters and FLOPs per token."""
        D, Dv, E = self.d_model, self.d_value, self.expansion
        return pd.DataFrame([
            {"projection": "single (v2, U2 eq. 12)", "params": D * Dv, "flops_per_token": 2 * D * Dv,
             "|y|": float(np.linalg.norm(self.y))},
            {"projection": "per_block (v1, U2 eq. 9)", "params": E * D * Dv, "flops_per_token": 2 * E * D * Dv,
             "|y|": float(np.linalg.norm(self.y_per_block))}])


def ultramem_v2_config(params: TourParams, n_keys: int, projection: str = "single") -> UltraMemV2Config:
    """The tour's UltraMemV2: one head, Tucker rank R, 2 cores, IVE expansion E, pre-values, D_v = D
    (rounded down to even: 2 cores split it), window of n_keys^2 rows."""
    p = params
    return UltraMemV2Config(d_model=p.d_model, n_keys=n_keys, heads=1, k_dim=p.k_dim, top_k=p.top_k,
                            d_value=max(2, p.d_model - p.d_model % 2), rank=p.rank, n_cores=2,
                            expansion=p.expansion, projection=projection, seed=p.seed)


def ultramem_v2_windows(params: TourParams) -> list[RingWindow]:
    """Ring windows of the tour's L UltraMemV2 layers: a pool of N_pool = L * n^2 rows (n^2 per
    layer's home segment), layer l's window ``ring_window(l, L, N_pool, g / L)`` with g = ring_share."""
    p = params.resolved()
    L = p.memory_layers
    return [ring_window(i, L, L * p.n_keys ** 2, p.ring_share / L) for i in range(L)]


def ultramem_v2_layers(params: TourParams) -> tuple[list[UltraMemV2], UltraMemV2]:
    """The tour's L UltraMemV2 layers on one shared pool (float64, eval), each reading its ring
    window, and a v1 twin of the first layer: the same weights and window but
    ``projection="per_block"`` (its own E*D_v -> D projection)."""
    p = params.resolved()
    wins = ultramem_v2_windows(p)
    pool_size = wins[0].pool_size
    cfg = ultramem_v2_config(p, wins[0].n_keys)

    def make():
        values, pre = value_pool(cfg, pool_size)
        layers = [UltraMemV2(cfg, values=values, pre_values=pre, window_start=w.start) for w in wins]
        twin = UltraMemV2(cfg.replace(projection="per_block"), values=values, pre_values=pre)
        return layers + [twin]

    *layers, twin = _build(p.seed + 13, make)
    twin.load_state_dict({k: v for k, v in layers[0].state_dict().items() if not k.startswith("value_proj.")},
                         strict=False)
    return layers, twin


def ultramem_v2_station(weights: TourWeights) -> UltraMemV2Station:
    """Run ``memory_layers`` labcore UltraMemV2 layers on one pool of L * n^2 rows, layer l reading
    its ring window ``ring_window(l, L, N_pool, ring_share / L)``."""
    p = weights.params
    layers, twin = ultramem_v2_layers(p)
    first, cfg = layers[0], layers[0].cfg
    pool_size = first.pool_size
    wins = ultramem_v2_windows(p)
    with torch.no_grad():
        x = _t(weights.X[p.token:p.token + 1])                              # (1, D)
        y, aux = first(x)
        y_v1, aux_v1 = twin(x)
        if not torch.equal(aux_v1.indices, aux.indices):
            raise RuntimeError("ultramem_v2_station: the per-block twin selected other slots than the layer")
        slots, rows = aux.indices[0], aux.rows[0]                           # (K,) virtual slots, pool rows
        N = cfg.n_slots
        blocks = first.perm[slots] // N if first.perm is not None else torch.zeros_like(slots)
        s_row, s_col = first.side_scores(x)
        _, s, _ = first.search(s_row, s_col)                                # retrieval scores (1, H, K)
        w_core = aux.core_scores[0]                                         # (K, h): w^(c) = s^(c) * g
        h = cfg.n_cores
        chunks = first.values.weight[rows].view(len(rows), h, cfg.d_v // h)   # (K, h, D_v/h)
        pooled = torch.zeros(cfg.expansion, h, cfg.d_v // h, dtype=x.dtype)
        pooled.index_add_(0, blocks, w_core[:, :, None] * chunks)          # per block: sum_k w_k V[row_k]
        layer_rows = np.stack([_np(layer(x)[1].rows[0]) for layer in layers])   # (L, K)
    return UltraMemV2Station(
        pool_size=pool_size, n_keys=cfg.n_keys, expansion=cfg.expansion, d_model=cfg.d_model, d_value=cfg.d_v,
        slots=_np(slots), rows=_np(rows), blocks=_np(blocks), scores=_np(s[0, 0]), pre=_np(aux.pre_scores[0]),
        weights=_np(aux.scores[0]), pooled=_np(pooled.reshape(cfg.expansion, cfg.d_v)), y=_np(y[0]),
        y_per_block=_np(y_v1[0]), windows=np.array([(w.start, w.n_keys) for w in wins]), layer_rows=layer_rows)


# ----------------------------------------------------------------------------------------------
# The whole tour for one token.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TourWeights:
    """A tiny random model: X (B, D) tokens; router (E_moe, D); w_query (2, D_k, D) row/col query
    projections (shared by PKM, TDQKR and IVE, as with UltraMem's shared query); pkm_keys (2, n, D_k);
    tucker_keys (2, R, n, D_k); core (R, R); ive_keys (2, R, sqrt(E) n, D_k); ive: the IVE map."""

    params: TourParams
    X: np.ndarray
    router: np.ndarray
    w_query: np.ndarray
    pkm_keys: np.ndarray
    tucker_keys: np.ndarray
    core: np.ndarray
    ive_keys: np.ndarray
    ive: IVEMapping

    def queries(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) -> q_row, q_col (B, D_k) each."""
        q = np.einsum("hkd,bd->bhk", self.w_query, X)   # (B, 2, D_k)
        return q[:, 0], q[:, 1]


def build_tour(params: TourParams) -> TourWeights:
    """Draw the tour's random model from ``params.seed`` (same seed -> same model and token)."""
    p = params.resolved()
    rng = np.random.default_rng(p.seed)
    D, Dk, n, R = p.d_model, p.k_dim, p.n_keys, p.rank
    side = math.isqrt(p.expansion) * n
    return TourWeights(
        params=p,
        X=rng.standard_normal((p.batch_size, D)),
        router=rng.standard_normal((p.n_experts, D)) / math.sqrt(D),
        w_query=rng.standard_normal((2, Dk, D)) / math.sqrt(D),
        pkm_keys=rng.standard_normal((2, n, Dk)) / math.sqrt(Dk),
        tucker_keys=rng.standard_normal((2, R, n, Dk)) / math.sqrt(Dk),
        core=rng.random((R, R)),                 # release init of the Tucker core: Uniform[0, 1)
        ive_keys=rng.standard_normal((2, R, side, Dk)) / math.sqrt(Dk),
        ive=ive_mapping(n, p.expansion, seed=p.seed + 1, shuffle=p.ive_shuffle),
    )


@dataclass(frozen=True)
class TourRecord:
    """Everything the tour shows for the followed token, plus batch-level counts."""

    params: TourParams
    moe: MoERouting
    pkm: PKMRetrieval
    tdqkr: TDQKRRetrieval
    ive: TDQKRRetrieval               # TDQKR over the virtual grid (sqrt(E) n per side)
    ive_map: IVEMapping
    bias: pd.DataFrame
    expert_counts: np.ndarray         # (E_moe,) tokens per expert over the batch
    slot_counts: np.ndarray           # (N,) PKM slot hits over the batch
    tdqkr_recalls: np.ndarray         # (B,) per token: fraction of the exact top-K the proxy finds
    physical_counts: np.ndarray       # (N,) IVE physical-row hits over the batch
    peer: PEERStation
    memory_plus: MemoryPlusStation
    ultramem_v2: UltraMemV2Station
    extra: dict = field(default_factory=dict)

    def ive_route(self) -> pd.DataFrame:
        return self.ive_map.route(self.ive.slots, self.ive.scores)

    def summary(self) -> pd.DataFrame:
        """One row of the tour's key numbers (saved as the run's summary)."""
        p = self.params
        bias = self.bias.set_index("scoring")["fraction"]
        return pd.DataFrame([{
            "seed": p.seed, "n_keys": p.n_keys, "top_k": p.top_k, "rank": p.rank, "expansion": p.expansion,
            "batch_size": p.batch_size, "n_queries": p.n_queries,
            "moe_experts": " ".join(map(str, self.moe.chosen)),
            "pkm_slots": " ".join(map(str, self.pkm.slots)),
            "tdqkr_recall": self.tdqkr.recall,
            "tdqkr_mean_recall": float(self.tdqkr_recalls.mean()),
            "tdqkr_lambda1": float(self.tdqkr.singular_values[0]),
            "bias_additive": float(bias["additive"]), "bias_tucker": float(bias["tucker"]),
            "bias_random": float(bias["random"]), "bias_random_baseline": random_baseline(p.n_keys),
            "moe_experts_touched": int((self.expert_counts > 0).sum()),
            "pkm_slots_touched": int((self.slot_counts > 0).sum()),
            "ive_physical_touched": int((self.physical_counts > 0).sum()),
            "peer_experts": " ".join(map(str, self.peer.experts.ravel())),
            "peer_batch_experts_touched": self.peer.batch_experts,
            "memory_plus_read_norm": float(np.linalg.norm(self.memory_plus.read)),
            "memory_plus_gated_norm": float(np.linalg.norm(self.memory_plus.gated)),
            "ultramem_v2_pool_rows": " ".join(map(str, self.ultramem_v2.rows)),
        }])


def follow_token(weights: TourWeights) -> TourRecord:
    """Run the token ``params.token`` (and, for the counts, the whole batch) through all stations."""
    p = weights.params
    x = weights.X[p.token]
    q_row, q_col = weights.queries(weights.X)            # (B, D_k) each
    moe = route_token(x, weights.router, p.moe_top_k)
    pkm = pkm_retrieve(q_row[p.token], q_col[p.token], weights.pkm_keys[0], weights.pkm_keys[1], p.top_k)
    td = tdqkr_retrieve(q_row[p.token], q_col[p.token], weights.tucker_keys[0], weights.tucker_keys[1],
                        weights.core, p.top_k)
    ive = tdqkr_retrieve(q_row[p.token], q_col[p.token], weights.ive_keys[0], weights.ive_keys[1],
                         weights.core, p.top_k)
    N = p.n_keys ** 2
    pkm_slots = pkm_slots_batch(q_row, q_col, weights.pkm_keys[0], weights.pkm_keys[1], p.top_k)   # (B, K)
    td_slots, td_exact = tdqkr_slots_batch(q_row, q_col, weights.tucker_keys[0], weights.tucker_keys[1],
                                           weights.core, p.top_k, exact=True)                    # (B, K)
    recalls = np.array([np.isin(e, s).mean() for s, e in zip(td_slots, td_exact)])            # (B,)
    ive_slots, _ = tdqkr_slots_batch(q_row, q_col, weights.ive_keys[0], weights.ive_keys[1], weights.core,
                                     p.top_k)                                                    # (B, K) virtual
    slot_counts = np.bincount(pkm_slots.ravel(), minlength=N)
    phys_counts = np.bincount(weights.ive.physical_row[ive_slots].ravel(), minlength=N)
    bias = topology_bias_table(p.n_keys, p.n_queries, rank=p.rank, k_dim=p.k_dim, seed=p.seed)
    return TourRecord(params=p, moe=moe, pkm=pkm, tdqkr=td, ive=ive, ive_map=weights.ive, bias=bias,
                      expert_counts=expert_load(weights.X, weights.router, p.moe_top_k),
                      slot_counts=slot_counts, tdqkr_recalls=recalls, physical_counts=phys_counts,
                      peer=peer_station(weights), memory_plus=memory_plus_station(weights),
                      ultramem_v2=ultramem_v2_station(weights))


def run_tour(params: TourParams) -> TourRecord:
    """build_tour + follow_token."""
    return follow_token(build_tour(params))
