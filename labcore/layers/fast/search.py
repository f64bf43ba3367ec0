"""The product-key searches, written for speed (docs/performance.md, "Search").

* :func:`in_token_chunks` runs a per-token search over a large batch in chunks whose biggest
  intermediate fits in cache (the search is per token, so the result is the same).
* :func:`pruned_pair_topk` is PKM's candidate step on the pruned grid: only rank pairs (i, j) with
  (i+1)(j+1) <= K can hold a top-K sum (:func:`pruned_candidates`).
* :func:`tucker_search` is UltraMem's TDQKR search with rows and columns stacked in one tensor, so
  both sides go through one proxy product, one top-m and one gather.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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


def tucker_search(s: Tensor, uv: Tensor, core: Tensor, m: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """TDQKR candidate search on BOTH sides' scores at once.

    s: (2, ..., H, R, n_s), [0] = S_row, [1] = S_col; uv: (2, H, R) = (u, t); core: (H, R, R).
    Returns the selected cells (2, ..., H, K) ([0] rows i_k, [1] columns j_k), their summed scores
    (..., H, K) in descending order, and the selected side-score columns (2, ..., H, R, K)
    ([0] = S_row[:, i_k], [1] = S_col[:, j_k], for the per-core rescoring).

    Per side it is ``TopM(u^T S_row)``, ``TopM(t^T S_col)``, then the exact summed-core score of the
    m x m candidate cells and their top K; stacking the two sides halves the operator calls.
    """
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
