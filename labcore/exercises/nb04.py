"""Exercises of notebook 04_architectures (dense vs MoE vs memories at equal activated FLOPs).

Each checker computes the right answer from labcore: the notebook's equal-budget family
(:func:`labcore.experiments.architectures.family` at the default parameters), the layers' cost
models and the decode-step cost model (docs/mechanisms.md §7.2, eqs. 7.2a-b).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from labcore.exercises import as_choice, as_number, exercise
from labcore.lm.budget import model_budget
from labcore.profiling.cost_model import expected_distinct, layer_step_cost

__all__: list[str] = []


@cache
def _family() -> dict[str, Any]:
    from labcore.experiments.architectures import ArchitecturesParams, family

    return family(ArchitecturesParams())


@exercise("04.1", "The family's MoE routes each token to K of its E experts. In one decode step of B = 16 "
          "tokens (routing uniform and independent), how many distinct experts of one MoE layer are touched, "
          "in expectation? (Within 5%.)",
          solution="Each expert is missed by one token with probability 1 - K/E, by all B tokens with "
                   "(1 - K/E)^B, so the expected number touched is U(B) = E [1 - (1 - K/E)^B] "
                   "(docs/mechanisms.md §7.2, eq. 7.2a). Read E and K from "
                   "`architectures.family(P)['moe'].plan.moe` and use "
                   "`labcore.profiling.cost_model.expected_distinct(E, K, 16)`. With a few dozen experts and "
                   "K = 2, 16 tokens already touch a large fraction of them: the MoE reads most of its "
                   "parameters at small batch sizes.")
def _(answer: Any) -> tuple[bool, str]:
    moe = _family()["moe"].plan.moe
    E, K = moe.n_experts, moe.top_k
    right = expected_distinct(E, K, 16)
    got = as_number("04.1", answer)
    ok = abs(got - right) <= 0.05 * right
    return ok, (f"U(16) = E [1 - (1 - K/E)^16] = {right:.1f} of E = {E} experts (K = {K})" if ok else
                f"{got:g} is off: with E = {E}, K = {K}, the chance an expert is missed by all 16 tokens is "
                f"(1 - K/E)^16 = {(1 - K / E) ** 16:.3f}")


@exercise("04.2", "Which sparse layer reads fewer bytes in one decode step of B = 64 tokens: one MoE layer "
          "of the family or its UltraMem layer? Answer 'moe' or 'ultramem'.",
          solution="Use the cost model: `layer_step_cost(cfg.cost(), 64).bytes_total` for "
                   "`family(P)['moe'].plan.moe` and `family(P)['ultramem'].plan.memory`. The MoE reads every "
                   "expert at least one token picked (eq. 7.2a with whole experts as the unit); UltraMem reads "
                   "its query network and keys plus at most B·H·K value rows of D_v numbers each, a small slice "
                   "of its N rows. At equal total parameters the memory reads far fewer bytes, which is the "
                   "paper's inference argument (docs/mechanisms.md §7.2).")
def _(answer: Any) -> tuple[bool, str]:
    fam = _family()
    moe = layer_step_cost(fam["moe"].plan.moe.cost(), 64).bytes_total
    um = layer_step_cost(fam["ultramem"].plan.memory.cost(), 64).bytes_total
    right = "moe" if moe < um else "ultramem"
    got = as_choice("04.2", answer, ("moe", "ultramem"))
    why = f"at B = 64 one MoE layer reads {moe / 1e3:.0f} kB, the UltraMem layer {um / 1e3:.0f} kB (fp32)"
    return got == right, why if got == right else f"not {got}: {why}"


@exercise("04.3", "The sparse arms have (1 + ratio) x the dense model's parameters. At the notebook's default "
          "ratio = 10, how many total parameters does each sparse arm have? (Within 2%.)",
          solution="`model_budget(family(P)['dense'], context_len=P.context_len).total_params` is the dense "
                   "count; the sparse arms are sized to (1 + 10) times it within 2% "
                   "(`labcore.lm.budget.equal_budget_family`). Their FLOPs per token stay at the dense model's: "
                   "the extra parameters are experts or value rows a token does not all use.")
def _(answer: Any) -> tuple[bool, str]:
    from labcore.experiments.architectures import ArchitecturesParams

    P = ArchitecturesParams()
    dense = model_budget(_family()["dense"], context_len=P.context_len).total_params
    right = (1 + P.ratio) * dense
    got = as_number("04.3", answer)
    ok = abs(got - right) <= 0.02 * right
    return ok, (f"(1 + {P.ratio:g}) x {dense:,} = {right:,.0f}" if ok else
                f"{got:,.0f} is off: the dense model has {dense:,} parameters; the sparse arms (1 + ratio) times that")
