"""Exercises of notebooks/07_memory_family.ipynb: training reads per value row, bytes per token at a
decode batch, and stored bits. Each checker computes the answer from labcore (the notebook's own
family sizing, the cost model of docs/mechanisms.md §7.2, the stored-bits formula)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from labcore.exercises import as_choice, as_number, exercise
from labcore.experiments.facts_pilot import memory_reads
from labcore.experiments.knowledge_metrics import stored_bits
from labcore.experiments.memory_family import family
from labcore.experiments.params import MemoryFamilyParams
from labcore.profiling.cost_model import layer_step_cost


@lru_cache(maxsize=1)
def _family() -> dict:
    return family(MemoryFamilyParams())


def reads_per_row() -> tuple[float, int, int]:
    """(training reads per value row, N, H*K) of the default notebook's PKM."""
    P = MemoryFamilyParams()
    n_values, reads = memory_reads(_family()["pkm"])
    return P.steps * P.batch_size * reads / n_values, n_values, reads


@exercise("07.1", "With the notebook's default parameters, the PKM (ratio 10) has N value rows and every "
          "token reads H*K of them. Over training, how many answer-token reads does one value row get on "
          "average (steps x batch_size x H*K / N)? Answer a number (within 5%).",
          solution="`memory_family.family(P)['pkm'].plan.memory` has `n_keys` = n (N = n²), `heads` H and "
                   "`top_k` K. Training shows `steps x batch_size` answer tokens, each reading H·K rows, spread "
                   "over N rows: reads per row = steps · batch_size · H·K / N. At the defaults that is "
                   "150 · 128 · (4·32) / 12,996 ≈ 189. A row read ~190 times in training is written by a few "
                   "facts only; at ratio 40 (N four times larger) each row gets a quarter of that.")
def _reads(answer: Any) -> tuple[bool, str]:
    x = as_number("07.1", answer)
    right, n_values, reads = reads_per_row()
    ok = abs(x - right) <= 0.05 * right
    why = (f"{right:.0f} reads per row: steps x batch x H*K / N with N = {n_values:,}, H*K = {reads}"
           if ok else f"{x:g} is not within 5% of the answer; count reads per token (H*K, not K) and divide by N")
    return ok, why


def _bytes_per_token(batch: int) -> dict[str, float]:
    fam = _family()
    costs = {"moe": fam["moe"].plan.moe.cost(), "pkm": fam["pkm"].memory_layer_config().cost()}
    return {k: layer_step_cost(c, batch).bytes_total / batch for k, c in costs.items()}


@exercise("07.2", "At decode batch B = 64 (fp32), which sparse layer of this notebook's family reads fewer "
          "bytes per token according to labcore's cost model (docs/mechanisms.md §7.2): 'moe' or 'pkm'?",
          solution="`labcore.profiling.cost_model.layer_step_cost(cfg.cost(), 64).bytes_total / 64` for "
                   "`family(P)['moe'].plan.moe` and `family(P)['pkm'].memory_layer_config()`. A batch of 64 "
                   "tokens choosing 2 of the MoE's experts each touches essentially every expert (U(B) = "
                   "E[1 - (1 - K/E)^B]), so the step reads the whole MoE; the PKM's 64 tokens read at most "
                   "64·H·K of its N value rows plus its keys and query network. Divide by B for bytes per token.")
def _bytes(answer: Any) -> tuple[bool, str]:
    a = as_choice("07.2", answer, ("moe", "pkm"))
    b = _bytes_per_token(64)
    right = min(b, key=b.get)
    why = f"moe {b['moe']:,.0f} B/token, pkm {b['pkm']:,.0f} B/token at B = 64"
    return a == right, why


@exercise("07.3", "800 facts with 128 possible objects. After training, the answer cross-entropy is 1.5 bits "
          "on 600 facts and 8 bits (worse than chance) on the other 200. How many kbit are stored?",
          solution="Stored bits = Σ_f max(0, log2 A − ce_f) (Allen-Zhu & Li, arXiv 2404.05405): log2 128 = 7 "
                   "bits per fact. 600 facts give 600 · (7 − 1.5) = 3,300 bits; a fact worse than chance counts "
                   "0, not a negative number. Total 3.3 kbit "
                   "(`labcore.experiments.knowledge_metrics.stored_bits`).")
def _stored(answer: Any) -> tuple[bool, str]:
    x = as_number("07.3", answer)
    ce_nats = np.array([1.5] * 600 + [8.0] * 200) * math.log(2)
    right = stored_bits(ce_nats, 128).bits / 1e3
    ok = abs(x - right) <= 0.01
    if ok:
        return True, f"{right:.1f} kbit: a fact below chance stores 0 bits, not a negative amount"
    if abs(x - (600 * 5.5 - 200 * 1.0) / 1e3) <= 0.01:
        return False, "facts worse than chance are floored at 0 bits: they do not subtract"
    return False, f"{x:g} kbit is not it; bits per fact = log2(128) - cross-entropy, floored at 0"
