"""The product-key searches, written for speed (docs/performance.md, "Search").

* :func:`side_search` is the per-side product-key search, top-K of ``q @ keys``: in inference on CPU
  float32 the compiled ``side_topk`` (scores in cache-resident tiles, never written), otherwise
  ``torch.bmm`` + :func:`~labcore.layers.fast.topk.exact_topk`.
* :func:`in_token_chunks` runs a per-token search over a large batch in chunks whose biggest
  intermediate fits in cache (the search is per token, so the result is the same).
* :func:`pruned_pair_topk` is PKM's candidate step on the pruned grid: only rank pairs (i, j) with
  (i+1)(j+1) <= K can hold a top-K sum (:func:`pruned_candidates`).
* :func:`fused_pkm_search` is PKM's whole search (both halves, pruned grid, top-K) in one compiled
  pass, for inference.
* :func:`fused_tucker_search` is UltraMem's TDQKR search in one compiled pass for inference: each
  side's rank-1 proxy scored against the "proxy keys" u^T K (:func:`proxy_keys`), S only at the m
  selected sub-keys (:func:`fused_search_ok` says when it runs).
* :func:`tucker_search` is UltraMem's TDQKR search with rows and columns stacked in one tensor, so
  both sides go through one proxy product, one top-m and one gather; ``proxy_search="two_sided"``
  runs :func:`two_sided_tucker_search` (the m largest AND the m most negative proxies per side).
* :func:`tucker_exact_topk` and :func:`topk_recall` measure a search against the brute-force top-K
  of the whole grid (a diagnostic, not a training path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from labcore.layers.fast import compiled
from labcore.layers.fast.topk import exact_topk

SEARCH_CHUNK_BYTES = 8 << 20
"""Memory layers search large batches in token chunks whose biggest intermediate (PKM's sub-key
scores, UltraMem's side scores) is at most this many bytes, so that it stays in cache and its
allocation is reused. The search is per token, so chunking does not change the result."""


def search_chunk(values_per_token: int, element_size: int) -> int:
    """Tokens per search chunk: SEARCH_CHUNK_BYTES of ``values_per_token`` scores each (>= 1)."""
    return max(1, SEARCH_CHUNK_BYTES // max(1, values_per_token * element_size))


def in_token_chunks(search: Callable[[Tensor], tuple[Tensor, ...]], q: Tensor,
                    values_per_token: int) -> tuple[Tensor, ...]:
    """``search(q)`` for per-token queries ``q (N_tok, ...)``, run on chunks of
    :func:`search_chunk` tokens and concatenated along the token axis."""
    parts = [search(qc) for qc in q.split(search_chunk(values_per_token, q.element_size()))]
    return parts[0] if len(parts) == 1 else tuple(torch.cat(p) for p in zip(*parts))


def side_search(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k of the sub-key scores ``torch.bmm(q, keys)`` per row, descending.

    q (G, T, D) queries, keys (G, D, n) sub-keys (G = heads x sides) -> scores (G, T, k) and sub-key
    ids (G, T, k). Without an autograd graph to record (inference), on CPU float32 with the
    compiled extension: ``compiled.side_topk``, which scores tiles of 8 queries into a cache-resident
    buffer and ranks them there (the (G, T, n) scores are never written). Its dot products are
    summed in another order than ``torch.bmm``'s, so the scores agree to float32 rounding and only a
    near-tie (within rounding) at the k-th place can be resolved differently. With a graph to record
    (training): ``torch.bmm`` + :func:`exact_topk` (faster forward + backward than recomputing the
    selected scores from the fused search's indices)."""
    records = torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad)
    if (not records and q.device.type == "cpu" and q.dtype == keys.dtype == torch.float32
            and compiled.available()):
        return compiled.side_topk(q, keys.transpose(1, 2), k, sorted=True)   # keys^T: (G, n, D)
    return exact_topk(torch.bmm(q, keys), k, sorted=True)                     # (G, T, n) -> (G, T, k)


def pruned_candidates(k: int) -> tuple[Tensor, Tensor]:
    """Rank pairs (i, j) with (i+1)(j+1) <= k: the only ones that can be in the top k of sums.

    With both lists sorted descending, the pair of ranks (i, j) is beaten by the (i+1)(j+1)-1 pairs
    (i' <= i, j' <= j), so a pair with (i+1)(j+1) > k has k better pairs. For k = 32: 119 pairs
    instead of 1024."""
    rows = [i for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
    cols = [j for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def pruned_pair_topk(s_row: Tensor, s_col: Tensor, i_row: Tensor, i_col: Tensor, cand_row: Tensor,
                     cand_col: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k of ``s_row[a] + s_col[b]`` over all rank pairs, from the per-side top-K lists.

    s_row, s_col (..., K): each side's best scores, sorted descending; i_row, i_col (..., K): their
    sub-key ids; cand_row, cand_col (C,): :func:`pruned_candidates`. Returns the k best sums
    (..., k) (in no particular order) and their row and column sub-key ids (..., k)."""
    lead, C = s_row.shape[:-1], cand_row.numel()
    cand_row = cand_row.expand(*lead, C)                                    # (..., C)
    cand_col = cand_col.expand(*lead, C)                                    # (..., C)
    cand = s_row.gather(-1, cand_row) + s_col.gather(-1, cand_col)          # (..., C) S[i, j] = s_row[i] + s_col[j]
    scores, best = exact_topk(cand, k, sorted=False)                        # (..., k)
    return scores, i_row.gather(-1, cand_row.gather(-1, best)), i_col.gather(-1, cand_col.gather(-1, best))


def fused_pkm_search(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """PKM's whole product-key search, :func:`side_search` on both halves and :func:`pruned_pair_topk`,
    in one compiled pass (inference, when :func:`fused_search_ok` holds for q and keys).

    q (N_tok, H, 2, D_k/2) queries ([:, h, 0] rows, [:, h, 1] columns); keys (H, 2, n, D_k/2)
    sub-keys. Returns scores (N_tok, H, K), descending, and slots (N_tok, H, K) = i_row * n + i_col.
    The sub-key scores are the fused side search's (``compiled.side_topk``), the sums the same, so the
    result equals the unfused compiled path up to the order of the K results."""
    scores, slots = compiled.pkm_topk(q.permute(1, 2, 0, 3).contiguous(), keys, k)  # (N_tok, H, K) each
    return scores, slots


PROXY_SEARCHES = ("signed", "two_sided")
"""Candidate sets of the TDQKR search (docs/mechanisms.md §1.3): "signed" (the release) keeps the m
largest proxies per side, I+ x J+; "two_sided" adds the m most negative, (I+ x J+) U (I- x J-)."""


def tucker_search(s: Tensor, uv: Tensor, core: Tensor, m: int, k: int,
                  proxy_search: str = "signed") -> tuple[Tensor, Tensor, Tensor]:
    """TDQKR candidate search on BOTH sides' scores at once.

    s: (2, ..., H, R, n_s), [0] = S_row, [1] = S_col; uv: (2, H, R) = (u, t); core: (H, R, R).
    Returns the selected cells (2, ..., H, K) ([0] rows i_k, [1] columns j_k), their summed scores
    (..., H, K) in descending order, and the selected side-score columns (2, ..., H, R, K)
    ([0] = S_row[:, i_k], [1] = S_col[:, j_k], for the per-core rescoring).

    Per side it is ``TopM(u^T S_row)``, ``TopM(t^T S_col)``, then the exact summed-core score of the
    m x m candidate cells and their top K; stacking the two sides halves the operator calls.
    ``proxy_search="two_sided"``: :func:`two_sided_tucker_search` (same arguments and results).
    """
    if proxy_search == "two_sided":
        return two_sided_tucker_search(s, uv, core, m, k)
    if proxy_search != "signed":
        raise ValueError(f"tucker_search: proxy_search={proxy_search!r}; must be one of {PROXY_SEARCHES}")
    R = s.shape[-2]
    lead = s.shape[1:-3]                                                    # token dims "..."
    uv = uv.reshape(2, *([1] * len(lead)), uv.shape[1], 1, R)              # (2, 1.., H, 1, R)
    proxy = (uv @ s).squeeze(-2)                                            # [u^T S_row; t^T S_col]: (2, ..., H, n_s)
    top = exact_topk(proxy, m, sorted=False)[1]                             # (2, ..., H, m), any order
    sel = s.gather(-1, top.unsqueeze(-2).expand(*top.shape[:-1], R, m))     # [S_row[:, I]; S_col[:, J]]: (2, ..., H, R, m)
    grid = (sel[0].transpose(-1, -2) @ core) @ sel[1]                      # U2 eq. 7 on I x J: (..., H, m, m)
    scores, flat = exact_topk(grid.flatten(-2), k, sorted=True)             # (..., H, K), descending
    ij = torch.stack((flat // m, flat % m))                                 # candidate coordinates: (2, ..., H, K)
    cells = top.gather(-1, ij)                                              # [i_k; j_k]: (2, ..., H, K)
    vecs = sel.gather(-1, ij.unsqueeze(-2).expand(*ij.shape[:-1], R, k))    # (2, ..., H, R, K)
    return cells, scores, vecs


def two_sided_tucker_search(s: Tensor, uv: Tensor, core: Tensor, m: int,
                            k: int) -> tuple[Tensor, Tensor, Tensor]:
    """TDQKR search over the candidates (I+ x J+) U (I- x J-); arguments and results as
    :func:`tucker_search`.

    I+ / J+ are the m rows / columns with the largest proxies u^T S_row / t^T S_col, I- / J- the m
    with the most negative ones. With a rank-1 summed core, C = lambda u t^T, every cell scores
    lambda * p_i * q_j (p, q the proxies), so a cell with a positive score has proxies of equal
    sign, and it is beaten by every cell whose two proxies are larger in magnitude with the same
    sign: when m >= K and the top-K scores are positive the search is exact (the signed search
    misses the cells in the (-, -) quadrant). The 2 m^2 candidates are scored exactly with the full
    core. When I+ and I- overlap (2m > n_s, or ties) a cell can lie in both quadrants: its
    (-, -) copy is masked to -inf, so no cell is selected twice (m^2 >= K candidates stay finite).
    """
    R = s.shape[-2]
    lead = s.shape[1:-3]                                                    # token dims "..."
    uv = uv.reshape(2, *([1] * len(lead)), uv.shape[1], 1, R)              # (2, 1.., H, 1, R)
    proxy = (uv @ s).squeeze(-2)                                            # [u^T S_row; t^T S_col]: (2, ..., H, n_s)
    plus = exact_topk(proxy, m, sorted=False)[1]                            # [I+; J+]: (2, ..., H, m)
    minus = exact_topk(proxy.neg(), m, sorted=False)[1]                     # [I-; J-]: (2, ..., H, m)
    top = torch.cat((plus, minus), -1)                                      # (2, ..., H, 2m): [+ | -]
    sel = s.gather(-1, top.unsqueeze(-2).expand(*top.shape[:-1], R, 2 * m))  # (2, ..., H, R, 2m)
    quad = sel.unflatten(-1, (2, m)).transpose(-3, -2)                      # (2, ..., H, 2, R, m): [+, -]
    grid = (quad[0].transpose(-1, -2) @ core.unsqueeze(-3)) @ quad[1]       # U2 eq. 7 on I+xJ+, I-xJ-: (..., H, 2, m, m)
    in_plus = torch.zeros_like(proxy, dtype=torch.bool).scatter_(-1, plus, True)  # (2, ..., H, n_s)
    dup = in_plus.gather(-1, minus)                                         # I- rows in I+, J- cols in J+: (2, ..., H, m)
    grid[..., 1, :, :].masked_fill_(dup[0].unsqueeze(-1) & dup[1].unsqueeze(-2), float("-inf"))
    scores, flat = exact_topk(grid.flatten(-3), k, sorted=True)             # (..., H, K), descending
    half, cell = flat // (m * m), flat % (m * m)                            # quadrant (0 = +, 1 = -), cell
    ij = torch.stack((half * m + cell // m, half * m + cell % m))           # positions in top: (2, ..., H, K)
    cells = top.gather(-1, ij)                                              # [i_k; j_k]: (2, ..., H, K)
    vecs = sel.gather(-1, ij.unsqueeze(-2).expand(*ij.shape[:-1], R, k))    # (2, ..., H, R, K)
    return cells, scores, vecs


def fused_search_ok(*tensors: Tensor) -> bool:
    """True when the fused searches (:func:`fused_pkm_search`, :func:`fused_tucker_search`) can run
    for these tensors: no autograd graph to record (inference), CPU float32, and the extension built."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and compiled.available())


def proxy_keys(keys: Tensor, uv: Tensor) -> Tensor:
    """The rank-1 proxy folded into the keys: u^T K_row and t^T K_col, one "proxy key" per sub-key,
    so that u^T (K_row q) = (u^T K_row) q. keys (H, 2, R, n_s, D_k), uv (2, H, R) -> (H, 2, n_s, D_k)."""
    return torch.einsum("shr,hsrnd->hsnd", uv, keys)


def fused_tucker_search(q: Tensor, keys: Tensor, uv: Tensor, core: Tensor, cores: Tensor | None, m: int,
                        k: int, proxy_search: str = "signed") -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`tucker_search` from the queries, in one compiled pass that never forms S (inference,
    when :func:`fused_search_ok`).

    q (N_tok, H, 2, D_k) queries ([:, h, 0] rows, [:, h, 1] columns); keys (H, 2, R, n_s, D_k)
    normalised; uv (2, H, R); core (H, R, R) the summed core; cores (h, H, R, R) for the per-core
    scores, or None. Each side's proxy is scored against :func:`proxy_keys` (linear in q, so the same
    proxy up to rounding), S only at the m selected sub-keys, then the grid and its top-K as
    :func:`tucker_search`. Returns its cells (2, N_tok, H, K), scores (N_tok, H, K) and vecs
    (2, N_tok, H, R, K), plus the per-core scores (N_tok, H, K, h) (None without ``cores``).
    A near-tie (within float32 rounding) at the m-th proxy or the K-th cell may resolve differently.
    """
    if proxy_search not in PROXY_SEARCHES:
        raise ValueError(f"fused_tucker_search: proxy_search={proxy_search!r}; must be one of {PROXY_SEARCHES}")
    qh = q.permute(1, 2, 0, 3).contiguous()                                 # (H, 2, N_tok, D_k)
    return compiled.tucker_topk(qh, keys, proxy_keys(keys, uv), core, cores, m, k,
                                two_sided=proxy_search == "two_sided")


def tucker_exact_topk(s: Tensor, core: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Brute-force TDQKR: the top-K of S_row^T C S_col over ALL n_s^2 cells.

    s: (2, ..., H, R, n_s); core (H, R, R). Returns cells (2, ..., H, K) ([0] rows, [1] columns) and
    scores (..., H, K), descending. O(n_s^2) per token and head: a measuring stick for the search.
    """
    n_s = s.shape[-1]
    grid = (s[0].transpose(-1, -2) @ core) @ s[1]                          # (..., H, n_s, n_s)
    scores, flat = grid.flatten(-2).topk(k, dim=-1)                         # (..., H, K)
    return torch.stack((flat // n_s, flat % n_s)), scores


def topk_recall(found: Tensor, exact: Tensor) -> Tensor:
    """Per row, the fraction of the ``exact`` ids (..., K) that appear among the ``found`` ids
    (..., K'): |found ∩ exact| / K (ids distinct within a row). Returns (...,) float."""
    return (exact.unsqueeze(-1) == found.unsqueeze(-2)).any(-1).float().mean(-1)
