"""Ablation statistics against scipy / statsmodels and hand-computed examples."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from labcore.config import ConfigError
from labcore.experiments.stats import (
    compare,
    holm,
    min_detectable_effect,
    paired_difference,
    power_at,
    seeds_needed,
    t_quantile_975,
    verdict,
)


def test_t_quantiles_match_tables():
    for dof, q in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (11, 2.201), (30, 2.042)]:
        assert t_quantile_975(dof) == pytest.approx(q, abs=1e-3)
    assert math.isnan(t_quantile_975(0))


def test_paired_difference_by_hand():
    # d = (0.5, 1.0, 1.5): mean 1, sd 0.5, half-width t_{0.975,2} * 0.5 / sqrt(3) = 4.3027 * 0.288675 = 1.24207
    d = paired_difference([1.0, 2.0, 3.5], [0.5, 1.0, 2.0])
    assert (d.n, d.mean, d.sd) == (3, pytest.approx(1.0), pytest.approx(0.5))
    assert d.ci_low == pytest.approx(1 - 1.24207, abs=1e-4) and d.ci_high == pytest.approx(1 + 1.24207, abs=1e-4)
    # t = 1 / (0.5 / sqrt 3) = 3.4641, two-sided p with 2 dof = 0.07418
    assert d.p_value == pytest.approx(0.07418, abs=1e-4)
    assert d.half_width == pytest.approx(1.24207, abs=1e-4)


def test_paired_difference_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=7), rng.normal(size=7)
    d = paired_difference(a, b)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert (d.ci_low, d.ci_high) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))


def test_paired_difference_edge_cases():
    one = paired_difference([1.0], [0.0])
    assert one.n == 1 and one.mean == 1.0 and math.isnan(one.sd) and math.isnan(one.p_value)
    same = paired_difference([1.0, 2.0], [0.5, 1.5])  # identical differences: sd 0
    assert same.sd == 0 and same.p_value == 0.0 and same.ci_low == same.ci_high == 0.5
    assert paired_difference([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    nan_pair = paired_difference([1.0, float("nan"), 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])  # the NaN pair is dropped
    assert nan_pair.n == 3 and nan_pair.mean == pytest.approx(2.0)
    assert paired_difference([], []).n == 0
    with pytest.raises(ValueError, match="equal length"):
        paired_difference([1.0, 2.0], [1.0])


def test_resolution_matches_statsmodels():
    for n in (2, 3, 5, 10):
        d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
        assert min_detectable_effect(0.02, n) == pytest.approx(d * 0.02, rel=1e-8)
        # at the resolution the power is 0.8 by definition
        assert power_at(min_detectable_effect(0.02, n), 0.02, n) == pytest.approx(0.8, abs=1e-6)
    # a hand example: with n = 5 the paired test detects d = 1.68 sd (noncentral t, 4 dof)
    assert min_detectable_effect(1.0, 5) == pytest.approx(1.682, abs=1e-3)
    assert min_detectable_effect(0.0, 5) == 0.0
    assert min_detectable_effect(1.0, 1) == math.inf
    # more seeds resolve finer effects
    assert min_detectable_effect(1.0, 20) < min_detectable_effect(1.0, 5) < min_detectable_effect(1.0, 3)


def test_seeds_needed_matches_statsmodels():
    for delta, sd in [(0.3, 0.5), (0.015, 0.02), (0.001, 0.02), (2.0, 1.0)]:
        n_float = TTestPower().solve_power(effect_size=delta / sd, nobs=None, alpha=0.05, power=0.8)
        n = seeds_needed(delta, sd)
        assert n == max(2, math.ceil(n_float))
        assert power_at(delta, sd, n) >= 0.8 and (n == 2 or power_at(delta, sd, n - 1) < 0.8)
    assert seeds_needed(-0.3, 0.5) == seeds_needed(0.3, 0.5)  # the sign does not matter
    assert seeds_needed(0.0, 1.0) is None
    assert seeds_needed(1.0, 0.0) == 2
    assert seeds_needed(1e-6, 1.0, max_n=1000) is None
    with pytest.raises(ConfigError, match="power=0.01"):
        seeds_needed(1.0, 1.0, power=0.01)
    with pytest.raises(ConfigError, match="alpha=1.5"):
        min_detectable_effect(1.0, 5, alpha=1.5)


def test_power_stays_finite_where_the_noncentral_t_fails():
    # scipy's noncentral t gives NaN near nc ~ 12..40; the normal fallback must give ~1 there
    for n in (391, 1563, 3126):
        p = power_at(0.3, 0.5, n)
        assert math.isfinite(p) and p == pytest.approx(1.0, abs=1e-9)


def test_holm_matches_statsmodels_and_by_hand():
    p = [0.01, 0.04, 0.03]
    reject, adj = holm(p)
    # sorted 0.01, 0.03, 0.04 -> 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06
    assert adj.tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert reject.tolist() == [True, False, False]
    ref = multipletests(p, alpha=0.05, method="holm")
    np.testing.assert_allclose(adj, ref[1])
    r2, a2 = holm([0.01, float("nan"), 0.02])  # NaN does not count in the family
    assert a2[0] == pytest.approx(0.02) and math.isnan(a2[1]) and a2[2] == pytest.approx(0.02)
    assert r2.tolist() == [True, False, True]


def test_verdicts():
    # a clear loss improvement of A over B (lower is better)
    d = paired_difference([2.90, 2.91, 2.92, 2.90, 2.91], [3.00, 3.02, 3.01, 3.00, 3.02])
    v = verdict(d, name="ultramem", reference="dense")
    assert v.startswith("resolved: ultramem better than dense by 0.1")
    # higher is better (accuracy): the same numbers mean the reference wins
    assert verdict(d, name="a", reference="b", higher_is_better=True).startswith("resolved: b better than a")
    # noise: differences around 0
    noisy = paired_difference([1.0, 1.2, 0.9, 1.1], [1.1, 1.0, 1.0, 1.05])
    v = verdict(noisy)
    res = min_detectable_effect(noisy.sd, 4)
    assert v.startswith(f"inside seed noise (resolution {res:.4g} at n=4")
    # the same noise against a paper delta far below the resolution
    v = verdict(noisy, delta_of_interest=-0.015)
    need = seeds_needed(0.015, noisy.sd)
    assert v.startswith("not resolvable at this n") and f"about {need} seeds" in v
    assert verdict(paired_difference([1.0], [0.0])).startswith("not resolvable at this n: n=1")
    # a Holm-adjusted p above alpha overrides a raw p below it
    assert d.p_value < 0.05
    assert verdict(d, p_adjusted=0.2).startswith("inside seed noise")


def _runs(effects, sd_seed=0.1, sd_noise=0.01, n_seeds=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_seeds):
        base = rng.normal(3.0, sd_seed)  # shared by the variants of a seed: pairing removes it
        for v, off in effects.items():
            rows.append({"variant": v, "seed": s, "val_loss": base + off + rng.normal(0, sd_noise)})
    return pd.DataFrame(rows)


def test_compare_chain_with_holm():
    df = _runs({"dense": 0.0, "pkm": -0.2, "ultramem": -0.2})
    out = compare(df, "val_loss", chain=True, delta_of_interest={"ultramem": -0.015})
    assert out["variant"].tolist() == ["pkm", "ultramem"] and out["reference"].tolist() == ["dense", "pkm"]
    # values equal an independent paired computation, Holm over the family of 2
    wide = df.pivot(index="seed", columns="variant", values="val_loss")
    ref = sps.ttest_rel(wide["pkm"], wide["dense"])
    assert out.loc[0, "delta_mean"] == pytest.approx(float((wide["pkm"] - wide["dense"]).mean()))
    assert out.loc[0, "p_value"] == pytest.approx(ref.pvalue)
    np.testing.assert_allclose(out["p_holm"], multipletests(out["p_value"], method="holm")[1])
    assert out.loc[0, "verdict"].startswith("resolved: pkm better than dense")
    assert not out.loc[1, "verdict"].startswith("resolved")
    assert out.loc[1, "seeds_needed"] == seeds_needed(-0.015, out.loc[1, "sd"])
    assert out.loc[0, "resolution"] == pytest.approx(min_detectable_effect(out.loc[0, "sd"], 5))


def test_compare_baseline_and_errors():
    df = _runs({"dense": 0.0, "a": 0.1, "b": -0.1})
    out = compare(df, "val_loss", baseline="dense")
    assert out["variant"].tolist() == ["a", "b"] and set(out["reference"]) == {"dense"}
    with pytest.raises(KeyError, match="baseline='nope'"):
        compare(df, "val_loss", baseline="nope")
    with pytest.raises(KeyError, match="'acc'"):
        compare(df, "acc", baseline="dense")
