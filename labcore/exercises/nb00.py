"""Exercises of notebooks/00_tour.ipynb: how many experts a batch touches, when MoE touches them all,
and bytes per token of an MoE vs a PKM of the same size at a decode batch. The checkers use the
tour's own defaults (:class:`labcore.experiments.params.TourParams`) and labcore's decode-step cost
model (:mod:`labcore.profiling.cost_model`, docs/mechanisms.md §7.2)."""

from __future__ import annotations

from typing import Any

from labcore.exercises import as_number, exercise
from labcore.experiments.params import TourParams
from labcore.layers.moe import MoEConfig
from labcore.layers.pkm import PKMConfig
from labcore.profiling.cost_model import expected_distinct, layer_step_cost

# 00.2's two layers, about the same parameters (~24.7k) at D = 16: 8 SwiGLU experts of width 64,
# top-2; a PKM of 39² value rows, 1 head x top-4.
MOE = MoEConfig(d_model=16, d_expert=64, n_experts=8, top_k=2)
PKM = PKMConfig(d_model=16, n_keys=39, heads=1, k_dim=8, top_k=4)


@exercise("00.1", "The tour's MoE has E = n_experts experts and sends each token to K = moe_top_k of them "
          "(defaults 8 and 2). How many distinct experts does labcore's cost model expect a batch of B = 4 "
          "tokens to touch? Answer a number (2 decimals).",
          solution="Eq. 7.2a (docs/mechanisms.md §7.2): U(B) = E·[1 − (1 − K/E)^B]. One token misses a given "
                   "expert with probability 1 − K/E = 0.75, four tokens with 0.75⁴ ≈ 0.316, so the expected "
                   "count is 8 · (1 − 0.316) ≈ 5.47 of 8 experts — already two thirds of the MoE for 4 tokens "
                   "(`labcore.profiling.cost_model.expected_distinct(8, 2, 4)`).")
def _distinct(answer: Any) -> tuple[bool, str]:
    x = as_number("00.1", answer)
    P = TourParams()
    right = expected_distinct(P.n_experts, P.moe_top_k, 4)
    ok = abs(x - right) <= 0.01
    why = (f"U(4) = {P.n_experts}·(1 − (1 − {P.moe_top_k}/{P.n_experts})^4) = {right:.2f}" if ok
           else f"{x:g} is not it: a token misses one expert with probability 1 − K/E; use U(B) = E·[1 − (1 − K/E)^B]")
    return ok, why


def saturation_batch(n_units: int, per_token: int, fraction: float = 0.9) -> int:
    """The smallest B at which the expected distinct units U(B) reach ``fraction`` of ``n_units``."""
    B = 1
    while expected_distinct(n_units, per_token, B) < fraction * n_units:
        B += 1
    return B


@exercise("00.2", "Same MoE (E = 8, K = 2): what is the smallest decode batch B at which the cost model "
          "expects it to touch at least 90% of its experts? Answer an integer.",
          solution="Solve 1 − (1 − K/E)^B ≥ 0.9: 0.75^B ≤ 0.1, B ≥ ln 0.1 / ln 0.75 ≈ 8.004, so B = 9 "
                   "(0.75⁸ = 0.1001 is just short). From B ≈ 9 on, every decode step of this MoE reads almost "
                   "all its experts: its bytes per token fall only as 1/B, like a dense layer of its total size.")
def _saturation(answer: Any) -> tuple[bool, str]:
    x = as_number("00.2", answer)
    P = TourParams()
    right = saturation_batch(P.n_experts, P.moe_top_k)
    ok = x == right
    u = expected_distinct(P.n_experts, P.moe_top_k, right)
    why = (f"B = {right}: U({right}) = {u:.3f} of {P.n_experts} (U({right - 1}) = "
           f"{expected_distinct(P.n_experts, P.moe_top_k, right - 1):.3f} is just below 90% = {0.9 * P.n_experts:.1f})")
    if not ok:
        why = f"{x:g} is not it ({'too small' if x < right else 'not the smallest'}); " + why
    return ok, why


def bytes_per_token(batch: int) -> dict[str, float]:
    """fp32 bytes one decode step of ``batch`` tokens reads, per token, for 00.2's MoE and PKM."""
    return {name: layer_step_cost(cfg.cost(), batch).bytes_total / batch for name, cfg in (("moe", MOE), ("pkm", PKM))}


@exercise("00.3", "An MoE (8 experts of width 64, top-2, D = 16) and a PKM (39² value rows of width 16, "
          "1 head x top-4) have about the same parameters (~24.7k). At decode batch B = 64 (fp32), how many "
          "times more bytes per token does the MoE read than the PKM? Answer a number (within 10%).",
          solution="`labcore.profiling.cost_model.layer_step_cost(cfg.cost(), 64).bytes_total / 64` for "
                   "`labcore.exercises.nb00.MOE` and `PKM`. The MoE's 64 tokens touch all 8 experts "
                   "(U(64) ≈ 8), i.e. all ~24.7k parameters, ≈ 1,540 bytes per token; the PKM's 64 tokens "
                   "touch ≈ 236 distinct rows of 1,521 (U(64) with K = 4) plus its 408 dense parameters "
                   "(query, keys, norm), ≈ 265 bytes per token: about 6x fewer. At B = 1 the gap is larger "
                   "(2 whole experts vs 4 rows); at B = 4096 both have read everything once and the gap closes.")
def _bytes(answer: Any) -> tuple[bool, str]:
    x = as_number("00.3", answer)
    b = bytes_per_token(64)
    right = b["moe"] / b["pkm"]
    ok = abs(x - right) <= 0.1 * right
    why = f"moe {b['moe']:,.0f} vs pkm {b['pkm']:,.0f} bytes per token at B = 64: {right:.1f}x"
    return ok, why if ok else f"{x:g} is not within 10% of it; " + why
