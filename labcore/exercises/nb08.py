"""Exercises of notebooks/08_facts_task.ipynb: the knowledge load, the capacity line, the schedule.

Every right answer is computed from labcore (``labcore.data.facts.FactsConfig.knowledge_bits``, the
trunk's parameter count from ``labcore.lm.budget.model_budget``, ``FactsTaskParams.steps_for``), not
stored.
"""

from __future__ import annotations

from typing import Any

from labcore.exercises import as_number, exercise
from labcore.experiments.facts_task import capacity_facts, load_kbit, trunk_params
from labcore.experiments.params import FactsTaskParams, LabParams


def _close(x: float, target: float, rel: float) -> bool:
    return abs(x - target) <= rel * abs(target)


@exercise("08.1", "How many bits does a load of 2,000 facts over 128 objects carry? (answer in bits)",
          solution="Every object is drawn uniformly from A = 128, independently of everything else, so one "
                   "fact carries log2 128 = 7 bits that can only be stored, never inferred. The load is "
                   "2,000 x 7 = **14,000 bits** (14 kbit): `labcore.experiments.facts_task.load_kbit(2000, 128)` "
                   "or `FactsConfig(n_subjects=500, n_relations=4, n_objects=128).knowledge_bits`.")
def _(answer: Any) -> tuple[bool, str]:
    x = as_number("08.1", answer)
    bits = load_kbit(2000, 128) * 1e3
    if _close(x, bits, 0.01):
        return True, f"{bits:,.0f} bits: 2,000 facts x log2 128 = 7 bits each"
    if _close(x, bits / 1e3, 0.01):
        return False, f"{x:g} is the load in kbit; the question asks for bits"
    if _close(x, 2000 * 128, 0.01):
        return False, "that counts the answer space, not the information: one of 128 equally likely answers is log2 128 bits"
    return False, f"{x:g} bits is not it: each fact is one of 128 equally likely objects; how many bits is that?"


@exercise("08.2", "At 2 bits per parameter, how many facts over 128 objects can the lab's default trunk "
                  "(LabParams: D = 32, L = 2) hold? (count its parameters with labcore)",
          solution="The trunk has `model_budget(LabParams().model(), context_len=5).total_params` = 41,216 "
                   "parameters (the embedding is tied to the output head). At 2 bits per parameter it holds "
                   "2 x 41,216 = 82,432 bits; at 7 bits per fact that is 82,432 / 7 = **11,776 facts** "
                   "(`labcore.experiments.facts_task.capacity_facts(41216, 2.0, 128)`). The quick ablations "
                   "use 2,000 facts: far below this trunk's capacity, which is why the quick dense-vs-memory "
                   "comparison measures speed of storage, not capacity.")
def _(answer: Any) -> tuple[bool, str]:
    x = as_number("08.2", answer)
    P = LabParams()
    n_params = trunk_params(FactsTaskParams(n_layers=P.n_layers), P.d_model)
    facts = capacity_facts(n_params, 2.0, P.n_objects)
    if _close(x, facts, 0.02):
        return True, f"about {facts:,} facts: 2 bits x {n_params:,} parameters / 7 bits per fact"
    if _close(x, 2 * n_params, 0.02):
        return False, f"{x:,.0f} is the capacity in bits; divide by the bits one fact carries"
    if _close(x, n_params, 0.02):
        return False, f"{x:,.0f} is the parameter count; the capacity is 2 bits per parameter, in facts"
    return False, f"{x:,.0f} facts is not it: count the parameters (model_budget), x 2 bits, / log2 128 bits per fact"


@exercise("08.3", "This notebook keeps the exposures per fact equal across loads. At 192 exposures per fact "
                  "and 256 rows per step, how many optimiser steps does a load of 3,200 facts train for?",
          solution="Each step shows 256 fact rows, so 3,200 facts x 192 exposures = 614,400 rows take "
                   "614,400 / 256 = **2,400 steps** (`FactsTaskParams(exposures=192, batch_size=256).steps_for(3200)`). A "
                   "400-fact load gets 300 steps: a larger load is trained longer so that every fact is seen as often, and "
                   "a plateau in stored bits cannot be blamed on fewer exposures.")
def _(answer: Any) -> tuple[bool, str]:
    x = as_number("08.3", answer)
    P = FactsTaskParams(exposures=192, batch_size=256)
    steps = P.steps_for(3200)
    if _close(x, steps, 0.005):
        return True, f"{steps:,} steps = 3,200 facts x {P.exposures} exposures / {P.batch_size} rows per step"
    if _close(x, 3200 * P.exposures, 0.005):
        return False, f"{x:,.0f} is the number of rows; each step trains {P.batch_size} of them"
    return False, f"{x:,.0f} steps is not it: rows needed = facts x exposures; steps = rows / rows per step"
