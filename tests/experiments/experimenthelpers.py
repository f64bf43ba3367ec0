"""Helpers shared by the experiment tests (imported by name; ``conftest.py`` puts this folder on the path)."""

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd


def synthetic_facts_table(effects: Mapping[str, float], sd: float, *, n: int = 4, base: float = 0.5,
                          rng_seed: int = 0, coverage: float = 0.5,
                          extra: Callable[[str], Mapping[str, Any]] = lambda variant: {}) -> pd.DataFrame:
    """A facts-run table with known accuracy effects: per seed a shared base accuracy (sd 0.05), per
    variant ``base + effects[variant]`` plus N(0, sd) noise, clipped to [0, 1]; answer loss, stored kbit
    and the step-0 init columns derived from it; ``extra(variant)`` adds columns."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for s in range(n):
        b = base + rng.normal(0, 0.05)
        for v, e in effects.items():
            acc = float(np.clip(b + e + rng.normal(0, sd), 0, 1))
            rows.append({"variant": v, "seed": s, "answer_accuracy": acc, "answer_loss": 4.0 * (1 - acc),
                         "stored_kbit": 7 * acc, "coverage": coverage, **extra(v), "init_std_before": 0.3,
                         "init_std": 0.0015, "init_target": 0.0015})
    return pd.DataFrame(rows)


def assert_exercise_checks(ex: str, right: Any, wrong: Any) -> None:
    """Exercise ``ex`` accepts ``right``, rejects ``wrong`` with a reason, and has a solution."""
    from labcore import exercises

    assert exercises.check(ex, right).right
    v = exercises.check(ex, wrong)
    assert not v.right and v.why
    assert exercises.solution(ex)
