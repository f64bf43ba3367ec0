"""Exercises of notebooks/02_layer_splitting.ipynb: the split rule and what a decode step reads.

Every checker computes its answer from labcore (:func:`labcore.lm.model.split_memory_plan`, the
layer configs' ``cost()`` and :func:`labcore.profiling.cost_model.layer_step_cost`), not from a
stored number.
"""

from __future__ import annotations

from typing import Any

from labcore.config import ConfigError
from labcore.exercises import as_number, as_whole, exercise
from labcore.layers.ultramem import UltraMemConfig
from labcore.lm.model import split_memory_plan
from labcore.profiling.cost_model import layer_step_cost

# The memory the exercises split: the notebook's default (N = 96^2 values, 2 heads x top-32, D = 32).
N_KEYS, HEADS, TOP_K, D_MODEL, N_LAYERS, S = 96, 2, 32, 32, 4, 4
DECODE_BATCH = 256


def _memory() -> UltraMemConfig:
    return UltraMemConfig(d_model=D_MODEL, n_keys=N_KEYS, heads=HEADS, k_dim=D_MODEL // 4, top_k=TOP_K,
                          d_value=D_MODEL, value_proj=False, expansion=1, rank=2, n_cores=2)


@exercise("02.1", f"One memory of N = {N_KEYS}^2 = {N_KEYS ** 2} values with H = {HEADS} heads x top-{TOP_K} is "
          f"split into S = {S} memories at equal total and activated values. Give (values per memory, "
          f"top-K per head of each memory) as a tuple.",
          solution=f"Total values stay N: each memory holds N / S = {N_KEYS ** 2} / {S} = {N_KEYS ** 2 // S} "
          f"values ({N_KEYS // 2}^2 on the product-key grid). Activated values stay H*K: each memory reads "
          f"K / S = {TOP_K} / {S} = {TOP_K // S} per head, so S * H * K/S = {HEADS * TOP_K} rows per token, "
          "as before (`labcore.lm.model.split_memory_plan`).")
def _split_rule(answer: Any) -> tuple[bool, str]:
    if not isinstance(answer, tuple | list) or len(answer) != 2:
        raise ConfigError(f"exercise 02.1: answer={answer!r} is not allowed: must be a tuple "
                          "(values per memory, top-K per head)")
    values, k = as_whole("02.1", answer[0], "values per memory"), as_whole("02.1", answer[1], "top-K")
    small = split_memory_plan(_memory(), S, N_LAYERS, 0).memory
    want = (small.n_keys ** 2, small.top_k)
    if (values, k) == want:
        return True, (f"{S} x {want[0]} = {S * want[0]} values in all and {S} x {HEADS} x {want[1]} = "
                      f"{S * HEADS * want[1]} read per token: both equal to the single memory's")
    why = []
    if values != want[0]:
        why.append(f"{S} memories of {values} values hold {S * values}, not N = {N_KEYS ** 2}")
    if k != want[1]:
        why.append(f"with top-{k} each, a token reads {S} x {HEADS} x {k} = {S * HEADS * k} values, "
                   f"not H*K = {HEADS * TOP_K}")
    return False, "; ".join(why)


@exercise("02.2", f"If each of the S = {S} memories kept the full top-{TOP_K} per head (the rule without its "
          "second half), by what factor would the values read per token grow?",
          solution=f"S memories x H heads x K each = {S} x {HEADS} x {TOP_K} = {S * HEADS * TOP_K} rows, against "
          f"H x K = {HEADS * TOP_K} for one memory: a factor S = {S}. A quality gain of such a split could then "
          "come from reading more values, not from splitting: that is why the notebook divides top-K by S.")
def _confound(answer: Any) -> tuple[bool, str]:
    x = as_number("02.2", answer, "answer (a factor)")
    one = _memory().cost().units_per_token                      # H*K of the single memory
    full = S * _memory().cost().units_per_token                 # S memories, each with the full top-K
    want = full / one
    if abs(x - want) < 1e-9:
        return True, f"{S} x {one} = {full} rows instead of {one}: the read grows S-fold"
    return False, f"each memory would read H*K = {one} rows, and there are {S} of them: {full} / {one}, not {answer}"


@exercise("02.3", f"At a decode step of B = {DECODE_BATCH} tokens, which reads more memory bytes according to the "
          "cost model: 'one' (the single memory) or 'split' (the S memories)? Answer 'one', 'split' or 'equal'.",
          solution="The expected distinct value rows are N[1 - (1 - m/N)^B] for one memory and S * (N/S)[1 - "
          "(1 - (m/S)/(N/S))^B] for the split: the same, because m/N is unchanged. What differs is what every "
          "step reads once, whatever B: each memory has its own query projection and keys, and S memories of "
          "n/sqrt(S) keys per side have sqrt(S) times more keys in all. So the split reads slightly more bytes "
          "(`labcore.profiling.cost_model.layer_step_cost`).")
def _decode_bytes(answer: Any) -> tuple[bool, str]:
    if not isinstance(answer, str) or answer.strip().lower() not in ("one", "split", "equal"):
        raise ConfigError(f"exercise 02.3: answer={answer!r} is not allowed: must be 'one', 'split' or 'equal'")
    one = layer_step_cost(_memory().cost(), DECODE_BATCH)
    small = split_memory_plan(_memory(), S, N_LAYERS, 0).memory
    split = layer_step_cost(small.cost(), DECODE_BATCH)
    b_one, b_split = one.bytes_total, S * split.bytes_total
    want = "equal" if abs(b_one - b_split) < 1e-6 * b_one else ("one" if b_one > b_split else "split")
    detail = (f"one memory {b_one / 1e6:.3f} MB, split {b_split / 1e6:.3f} MB per step; the value rows alone: "
              f"{one.bytes_sparse / 1e6:.3f} vs {S * split.bytes_sparse / 1e6:.3f} MB (equal: m/N is the same), "
              "the difference is the keys and queries of S memories")
    return answer.strip().lower() == want, detail
