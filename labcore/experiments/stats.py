"""Statistics of an ablation: paired differences by seed, the design's resolution, Holm correction.

Two variants A and B trained with the same seeds (same init seed, same batch order) give paired
results a_i, b_i, i = 1..n. Everything here works on the differences d_i = a_i - b_i:

    mean     = (1/n) sum d_i                    sd = sqrt(sum (d_i - mean)^2 / (n - 1))
    95% CI   = mean ± t_{0.975, n-1} * sd / sqrt(n)                   (Student t, paired)
    p        = two-sided p-value of the paired t-test (scipy.stats.ttest_rel)

Resolution of the design (the minimum detectable effect): the smallest true |mean difference| that a
paired t-test at two-sided level alpha (0.05) detects with probability ``power`` (0.8) given the
measured paired sd and n seeds. With Cohen's d = delta / sd, statsmodels' ``TTestPower`` (noncentral
t with n - 1 degrees of freedom) solves power(d, n, alpha) = 0.8 for d, so

    resolution       = d*(n, alpha, power) * sd
    seeds_needed(D)  = the smallest n with power(|D| / sd, n, alpha) >= power

An effect smaller than the resolution is not reliably visible at this n; asking whether the lab
reproduces a paper's delta D only makes sense when resolution <= |D|.

A family of comparisons (a chain of variants, each adding one change, as in the UltraMem paper's
Table 2) is corrected with Holm's step-down method (statsmodels ``multipletests``, method "holm"):
it controls the family-wise error rate at alpha without assuming independence.

:func:`verdict` turns one comparison into a sentence; :func:`compare` does a whole table of runs
(one row per (variant, seed), as :func:`labcore.experiments.core.run_variants` returns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from labcore.config import ConfigError

ALPHA = 0.05
POWER = 0.8


def t_quantile_975(dof: int | float) -> float:
    """Two-sided 95% Student-t quantile t_{0.975, dof}; NaN for dof < 1."""
    if not dof >= 1:
        return float("nan")
    return float(sps.t.ppf(0.975, dof))


@dataclass(frozen=True)
class PairedDifference:
    """Paired differences a - b: ``n`` pairs, ``mean``, ``sd`` (n - 1 in the denominator; NaN for
    n < 2), the 95% CI ``ci_low`` .. ``ci_high`` and the two-sided paired t-test ``p_value`` (NaN
    when undefined)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Paired differences ``a[i] - b[i]`` (pairs where either value is missing or not finite are
    dropped), their mean, sd, 95% t-interval and paired t-test p-value."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(f"paired_difference: a and b must be 1-D of equal length, got {a_arr.shape}, "
                         f"{b_arr.shape}")
    d = (a_arr - b_arr)[np.isfinite(a_arr) & np.isfinite(b_arr)]
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return PairedDifference(0, nan, nan, nan, nan, nan)
    mean = float(d.mean())
    if n == 1:
        return PairedDifference(1, mean, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    if sd == 0.0:  # identical differences: the t statistic is 0/0 or ±inf
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(sps.ttest_1samp(d, 0.0).pvalue)
    return PairedDifference(n, mean, sd, mean - half, mean + half, p)


def min_detectable_effect(sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The design's resolution: the smallest |mean difference| a paired two-sided t-test at level
    ``alpha`` detects with probability ``power``, given the paired ``sd`` and ``n`` seeds (inf for
    n < 2 or an unknown sd)."""
    _check_alpha_power(alpha, power)
    if n < 2 or not math.isfinite(sd):
        return float("inf")
    if sd == 0.0:
        return 0.0
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(d) * sd


def power_at(delta: float, sd: float, n: int, *, alpha: float = ALPHA) -> float:
    """Probability that a paired two-sided t-test at level ``alpha`` with ``n`` seeds detects a true
    mean difference ``delta`` when the paired sd is ``sd``."""
    if n < 2:
        return float("nan")
    if sd == 0.0:
        return 1.0 if delta != 0.0 else alpha
    d = abs(delta) / sd
    p = float(TTestPower().power(effect_size=d, nobs=n, alpha=alpha, alternative="two-sided"))
    if not math.isfinite(p):
        # scipy's noncentral t returns NaN for large noncentrality d * sqrt(n) (where the power is ~1);
        # there the normal approximation Phi(nc - c) + Phi(-nc - c) is accurate.
        nc, c = d * math.sqrt(n), float(sps.t.ppf(1 - alpha / 2, n - 1))
        p = float(sps.norm.cdf(nc - c) + sps.norm.cdf(-nc - c))
    return p


def seeds_needed(delta: float, sd: float, *, alpha: float = ALPHA, power: float = POWER,
                 max_n: int = 100_000) -> int | None:
    """The smallest number of seeds n >= 2 whose paired t-test detects ``delta`` with probability
    ``power`` given the paired ``sd``; None when ``delta`` is 0 or more than ``max_n`` would be needed."""
    _check_alpha_power(alpha, power)
    if not (math.isfinite(delta) and math.isfinite(sd)) or sd < 0:
        raise ConfigError(f"seeds_needed: delta={delta!r}, sd={sd!r} must be finite (sd >= 0)")
    if delta == 0.0:
        return None
    if sd == 0.0:
        return 2
    if power_at(delta, sd, 2, alpha=alpha) >= power:
        return 2
    if power_at(delta, sd, max_n, alpha=alpha) < power:
        return None
    lo, hi = 2, max_n  # power(lo) < target <= power(hi); power grows with n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if power_at(delta, sd, mid, alpha=alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def holm(p_values: Sequence[float], *, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Holm step-down correction: (reject, adjusted p-values). NaN p-values stay NaN (not rejected)
    and do not count in the family."""
    p = np.asarray(p_values, dtype=float)
    reject = np.zeros(p.shape, dtype=bool)
    adjusted = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        r, padj, _, _ = multipletests(p[ok], alpha=alpha, method="holm")
        reject[ok], adjusted[ok] = r, padj
    return reject, adjusted


def verdict(diff: PairedDifference, *, name: str = "A", reference: str = "B", higher_is_better: bool = False,
            p_adjusted: float | None = None, delta_of_interest: float | None = None, alpha: float = ALPHA,
            power: float = POWER, fmt: str = ".4g") -> str:
    """One comparison in plain words (``diff`` is ``name - reference``):

    - "resolved: <better> better by x (95% CI lo .. hi)": the (Holm-adjusted, if given) p < alpha;
    - "not resolvable at this n: ...": fewer than 2 seeds, or the resolution is coarser than
      ``delta_of_interest`` (e.g. the paper's delta), with the seeds that would resolve it;
    - "inside seed noise (resolution r)": not resolved, and effects of size r or more would have been
      detected with probability ``power``.
    """
    if diff.n < 2:
        return f"not resolvable at this n: n={diff.n} seed(s) give no estimate of the seed noise"
    p = diff.p_value if p_adjusted is None else p_adjusted
    ci = f"95% CI {diff.ci_low:{fmt}} .. {diff.ci_high:{fmt}}"
    if math.isfinite(p) and p < alpha:
        a_wins = (diff.mean > 0) == higher_is_better
        better, worse = (name, reference) if a_wins else (reference, name)
        holm_txt = "" if p_adjusted is None else f", Holm p={p_adjusted:.3g}"
        return f"resolved: {better} better than {worse} by {abs(diff.mean):{fmt}} ({ci}{holm_txt})"
    res = min_detectable_effect(diff.sd, diff.n, alpha=alpha, power=power)
    if delta_of_interest is not None and delta_of_interest != 0 and res > abs(delta_of_interest):
        need = seeds_needed(delta_of_interest, diff.sd, alpha=alpha, power=power)
        need_txt = f"about {need} seeds would" if need is not None else "no practical number of seeds would"
        return (f"not resolvable at this n: resolution {res:{fmt}} at n={diff.n} > |delta of interest| "
                f"{abs(delta_of_interest):{fmt}}; {need_txt} resolve it ({ci})")
    return f"inside seed noise (resolution {res:{fmt}} at n={diff.n}; {ci})"


def compare(df: pd.DataFrame, metric: str, *, baseline: str | None = None, chain: bool = False,
            order: Sequence[str] | None = None, higher_is_better: bool = False,
            delta_of_interest: Mapping[str, float] | None = None, alpha: float = ALPHA,
            power: float = POWER, variant_col: str = "variant", seed_col: str = "seed") -> pd.DataFrame:
    """Paired comparisons of ``metric`` in a runs table (one row per (variant, seed)).

    ``baseline``: every variant against it; ``chain=True``: each variant against the previous one in
    ``order`` (default: order of first appearance). The comparisons form one family, Holm-corrected.
    ``delta_of_interest[variant]``: the effect worth resolving (e.g. the paper's delta, same sign
    convention: variant - reference). Columns: variant, reference, metric, n, delta_mean, sd,
    ci_low, ci_high, p_value, p_holm, resolution, delta_of_interest, seeds_needed, verdict.
    """
    _check_alpha_power(alpha, power)
    for col in (variant_col, seed_col, metric):
        if col not in df.columns:
            raise KeyError(f"compare: column {col!r} not in the table (have {list(df.columns)})")
    order = list(order) if order is not None else list(dict.fromkeys(df[variant_col]))
    if not chain and baseline not in order:
        raise KeyError(f"compare: baseline={baseline!r} is not one of the variants {order}")
    wide = df.pivot_table(index=seed_col, columns=variant_col, values=metric, aggfunc="mean")
    pairs = [(v, order[i - 1] if chain else baseline) for i, v in enumerate(order)
             if (i > 0 if chain else v != baseline)]
    missing = sorted({x for p in pairs for x in p} - set(wide.columns))
    if missing:
        raise KeyError(f"compare: variants {missing} have no {metric!r} values")
    diffs = [paired_difference(wide[v].to_numpy(), wide[r].to_numpy()) for v, r in pairs]
    _, p_holm = holm([d.p_value for d in diffs], alpha=alpha)
    rows = []
    for (v, r), d, ph in zip(pairs, diffs, p_holm):
        target = (delta_of_interest or {}).get(v)
        rows.append({
            "variant": v, "reference": r, "metric": metric, "n": d.n, "delta_mean": d.mean, "sd": d.sd,
            "ci_low": d.ci_low, "ci_high": d.ci_high, "p_value": d.p_value, "p_holm": float(ph),
            "resolution": min_detectable_effect(d.sd, d.n, alpha=alpha, power=power) if d.n >= 2 else math.inf,
            "delta_of_interest": float("nan") if target is None else float(target),
            "seeds_needed": (seeds_needed(target, d.sd, alpha=alpha, power=power)
                             if target is not None and d.n >= 2 and math.isfinite(d.sd) else None),
            "verdict": verdict(d, name=v, reference=r, higher_is_better=higher_is_better,
                               p_adjusted=None if not math.isfinite(ph) else float(ph),
                               delta_of_interest=target, alpha=alpha, power=power),
        })
    return pd.DataFrame(rows)


def _check_alpha_power(alpha: float, power: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} is not allowed: must be in (0, 1)")
    if not alpha < power < 1.0:
        raise ConfigError(f"power={power!r} is not allowed: must be in (alpha, 1)")
