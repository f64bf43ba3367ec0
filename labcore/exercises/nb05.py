"""Exercises of notebook 05_paper_table (Table 2 walked on the facts task).

Each checker computes the right answer from labcore: the walk's configs
(:func:`labcore.experiments.paper_table.table2_variants` at the default parameters) and the power
calculation of :mod:`labcore.experiments.stats`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from labcore.exercises import as_whole, exercise
from labcore.experiments import stats

__all__: list[str] = []


@cache
def _walk() -> dict[str, Any]:
    from labcore.experiments.paper_table import PaperTableParams, table2_variants

    return {v.name: v for v in table2_variants(PaperTableParams())}


def _memory(row: str) -> tuple[Any, int]:
    v = _walk()[row]
    return v.model.plan.memory, len(v.model.plan.placements)


@exercise("05.1", "The '+half vdim + proj' row halves the value width and doubles the number of values. The PKM "
          "row has n keys per side (N = n^2 values). How many keys per side does the '+half vdim + proj' row "
          "use at the default n_keys?",
          solution="Twice the values means N' = 2 n^2 = (n √2)^2, so n' = round(n √2): 29 -> 41 at the "
                   "default (41^2 = 1,681 against 2 x 841 = 1,682). Read it off "
                   "`table2_variants(P)[2].model.plan.memory.n_keys`.")
def _(answer: Any) -> tuple[bool, str]:
    pkm, _ = _memory("PKM")
    half, _ = _memory("+half vdim + proj")
    got = as_whole("05.1", answer)
    why = f"round({pkm.n_keys} x √2) = {half.n_keys}: {half.n_keys ** 2:,} values vs 2 x {pkm.n_keys ** 2:,}"
    return got == half.n_keys, why if got == half.n_keys else f"{got} is off: {why}"


@exercise("05.2", "The split row replaces one memory by two. How many value rows does one token read in the "
          "'+split big mem & skip' row, over both memories (H heads x top-K each)?",
          solution="Each of the S = 2 memories keeps H heads but top-K / S slots per head, so a token reads "
                   "S x H x K / S = H x K rows: the same as before the split (equal activated values, "
                   "`labcore.lm.model.split_memory_plan`'s rule). Without that rule each memory would keep the "
                   "full top-K and the split would double the activated values: 'split helps' would then mean "
                   "'more activation helps'.")
def _(answer: Any) -> tuple[bool, str]:
    mem, S = _memory("+split big mem & skip")
    before, _ = _memory("+share query")
    right = S * mem.heads * mem.top_k
    got = as_whole("05.2", answer)
    why = (f"{S} memories x {mem.heads} heads x top-{mem.top_k} = {right}, as before the split "
           f"({before.heads} x {before.top_k} = {before.heads * before.top_k})")
    return got == right, why if got == right else f"{got} is off: {why}"


@exercise("05.3", "With IVE (E = 4) each physical value row serves E virtual rows. How many VIRTUAL value rows "
          "does the '+IVE' row have over both memories?",
          solution="Virtual rows = memories x E x n_s^2: 2 x 4 x 29^2 = 6,728 at the defaults "
                   "(`cfg.n_virtual` per memory). The physical table is unchanged (2 x 841 rows of D_v); the "
                   "projection grows to E·D_v -> D, which is where IVE's extra parameters and FLOPs are.")
def _(answer: Any) -> tuple[bool, str]:
    mem, S = _memory("+IVE")
    right = S * mem.n_virtual
    got = as_whole("05.3", answer)
    why = f"{S} x E = {mem.expansion} x {mem.n_slots:,} physical rows = {right:,} virtual rows"
    return got == right, why if got == right else f"{got:,} is off: {why}"


@exercise("05.4", "Power: the paper's '+value lr decay' row gains 0.022 nats. If the paired differences of the "
          "answer loss between two rows have a standard deviation of 0.05 nats across seeds, how many seeds "
          "does a paired t-test need to detect 0.022 with 80% power at alpha = 0.05?",
          solution="`labcore.experiments.stats.seeds_needed(0.022, 0.05)`: Cohen's d = 0.022 / 0.05 = 0.44, and "
                   "the noncentral t power of a paired test reaches 0.8 at about 43 seeds. Resolution shrinks "
                   "like 1/√n: halving the seed noise (longer runs, a fixed evaluation set) cuts the seeds four-fold.")
def _(answer: Any) -> tuple[bool, str]:
    right = stats.seeds_needed(0.022, 0.05)
    got = as_whole("05.4", answer)
    ok = right is not None and abs(got - right) <= 1
    return ok, (f"about {right} seeds (d = 0.44)" if ok else
                f"{got} is off: the paired test reaches 80% power at n = {right} for d = 0.022 / 0.05 = 0.44")
