"""Exercises of notebook 01_tdqkr (TDQKR vs additive scoring). Each checker computes the right answer
from labcore: the notebook's arms (:func:`labcore.experiments.tdqkr.model_for`), UltraMemConfig's
cost model and the bilinear score itself (docs/mechanisms.md §1.3)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from labcore.config import ConfigError
from labcore.exercises import exercise
from labcore.experiments.params import TDQKRParams
from labcore.layers.ultramem import UltraMemConfig


def _int(id: str, answer: Any) -> int:
    if isinstance(answer, bool) or not isinstance(answer, int | np.integer):
        raise ConfigError(f"exercise {id}: answer={answer!r} is not allowed: must be an integer")
    return int(answer)


def _release_memory() -> UltraMemConfig:
    """The R=2 arm's memory at the notebook's defaults."""
    from labcore.experiments.tdqkr import model_for  # here: tdqkr imports torch and the LM stack

    return model_for(TDQKRParams(), "R=2").plan.memory


@exercise("01.1", "The R=2 arm searches a grid of n x n slots with the signed proxy search (m = K). How many "
          "cells does ONE head score exactly with the full core, per token? (an integer)",
          solution="The signed search keeps the m best rows by uᵀS_row and the m best columns by tᵀS_col and "
                   "scores the m x m candidate cells exactly: m² = 16² = 256 cells per head, against n² (the "
                   "whole grid) for a brute-force search. `UltraMemConfig.m` is m (`candidate_m`, default K).")
def _(answer):
    m = _release_memory()
    a, right = _int("01.1", answer), m.m ** 2
    if a == right:
        return True, f"m² = {m.m}² = {right} candidates, {right / m.n_slots:.1%} of the n² = {m.n_slots} grid cells"
    if a == m.n_slots:
        return False, f"{a} is the whole grid n²: that is brute force; the proxy search keeps only m rows and m columns"
    if a == 2 * right:
        return False, f"{a} is the two-sided search (I+ x J+ and I- x J-); the signed search has one quadrant"
    return False, f"{a} is not it: the candidates are m rows x m columns with m = K = {m.m}"


@exercise("01.2", "PKM is TDQKR with R = 2: with S_row = [s_row; 1] and S_col = [s_col; 1] (each column a "
          "2-vector), give the 2x2 core C (a nested list) for which S_row[:, i]ᵀ C S_col[:, j] = s_row[i] + s_col[j].",
          solution="[[0, 1], [1, 0]], the swap core: [s_row, 1] C [s_col, 1]ᵀ = s_row·C[0,0]·s_col + "
                   "s_row·C[0,1] + C[1,0]·s_col + C[1,1] = s_row + s_col. Its two singular values are equal, "
                   "so its rank-1 proxy has no preferred direction (docs/mechanisms.md §1.3).")
def _(answer):
    try:
        C = np.asarray(answer, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"exercise 01.2: answer={answer!r} is not allowed: must be a 2x2 nested list of "
                          "numbers") from None
    if C.shape != (2, 2):
        raise ConfigError(f"exercise 01.2: answer={answer!r} is not allowed: must be a 2x2 nested list of numbers")
    rng = np.random.default_rng(0)
    s_row, s_col = rng.normal(size=5), rng.normal(size=5)
    S_row, S_col = np.stack([s_row, np.ones(5)]), np.stack([s_col, np.ones(5)])   # (R=2, n)
    grid = S_row.T @ C @ S_col                                                     # (n, n)
    want = s_row[:, None] + s_col[None, :]
    if np.allclose(grid, want):
        return True, "the swap core turns the bilinear form into PKM's sum s_row[i] + s_col[j]"
    if np.allclose(grid, s_row[:, None] * s_col[None, :] + 1):
        return False, "that core gives s_row[i]·s_col[j] + 1, a product, not a sum"
    return False, "S_rowᵀ C S_col with that core is not s_row[i] + s_col[j]; expand [s_row, 1] C [s_col, 1]ᵀ term by term"


@exercise("01.3", "How many forward FLOPs per token does the two-sided search add to the R=2 memory "
          "(H = 2 heads, m = K = 16, R = 2), by UltraMemConfig.cost()? (an integer)",
          solution="The two-sided search scores a second quadrant of candidates, I- x J-: per head m·R² MACs "
                   "for S_row[:, I]ᵀ C and m²·R for the product with S_col[:, J], at 2 FLOPs per MAC: "
                   "2·H·(m·R² + m²·R) = 2·2·(16·4 + 256·2) = 2,304 FLOPs per token. The notebook's equal-FLOPs "
                   "matching pays for them with a narrower trunk FFN (its d_ff column).")
def _(answer):
    m = _release_memory()
    signed = dataclasses.replace(m, proxy_search="signed").cost().flops_per_token
    two = dataclasses.replace(m, proxy_search="two_sided").cost().flops_per_token
    a, right = _int("01.3", answer), two - signed
    if a == right:
        return True, f"{two:,} - {signed:,} = {right:,} FLOPs per token ({right / signed:.1%} of the memory's)"
    if a == right // 2:
        return False, f"{a} counts multiply-adds; the cost model counts 2 FLOPs per multiply-add"
    return False, f"{a} is not it: count the second quadrant's candidate scoring, 2·H·(m·R² + m²·R)"


@exercise("01.4", "The notebook gives the additive arm wider keys so that its key parameters equal the rank-R "
          "arm's. For a rank-3 arm with k_dim = 8 per side, which additive k_dim gives equal key parameters? "
          "(an integer)",
          solution="Keys are H·2·n·D_k·R parameters (R components of D_k features per side); additive keys have "
                   "one component. Equal keys: D_k(additive) = R·D_k = 3·8 = 24. The key-score FLOPs "
                   "(2·H·2·n·D_k·R) are then equal too; the query is wider for the additive arm.")
def _(answer):
    m = _release_memory()
    a = _int("01.4", answer)
    if a < 1:
        raise ConfigError(f"exercise 01.4: answer={answer!r} is not allowed: must be an integer >= 1")
    r3 = dataclasses.replace(m, rank=3, k_dim=8).cost().params["keys"]
    add = dataclasses.replace(m, scoring="additive", rank=1, n_cores=1, k_dim=a).cost().params["keys"]
    if add == r3:
        return True, f"{add:,} key parameters in both arms (R·D_k = 3·8 = 24 features per side)"
    return False, (f"additive k_dim {a} gives {add:,} key parameters, the rank-3 arm has {r3:,}: "
                   f"{'too few' if add < r3 else 'too many'}")
