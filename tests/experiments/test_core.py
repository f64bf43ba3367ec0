"""Statistics and the variant loop of labcore.experiments.core, against independent computations."""

import math

import numpy as np
import pandas as pd
import pytest

from labcore.experiments.core import (
    Variant,
    _t_quantile_975,
    describe_deltas,
    mean_ci,
    memory_metric,
    paired_deltas,
    run_variants,
    summarize,
)
from labcore.layers.base import ConfigError
from labcore.lm.model import ModelConfig


def test_t_quantiles_match_known_values():
    # Two-sided 95% Student t quantiles (standard tables).
    for dof, q in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert _t_quantile_975(dof) == pytest.approx(q, abs=1e-3)
    # Interpolated entries stay between their neighbours and close to the true value (t_0.975,11 = 2.201).
    assert _t_quantile_975(11) == pytest.approx(2.201, abs=5e-3)
    assert 1.96 < _t_quantile_975(100) < 2.0


def test_mean_ci_against_direct_formula():
    x = [1.0, 2.0, 4.0, 7.0]
    mean, std, ci, n = mean_ci(x)
    assert n == 4 and mean == pytest.approx(3.5)
    assert std == pytest.approx(np.std(x, ddof=1))
    assert ci == pytest.approx(3.182 * np.std(x, ddof=1) / 2.0, rel=1e-4)
    m1, s1, c1, n1 = mean_ci([5.0, float("nan")])
    assert (m1, n1) == (5.0, 1) and math.isnan(s1) and math.isnan(c1)
    assert mean_ci([])[3] == 0


def _table():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(5):
        base = 3.0 + rng.normal(0, 0.1)          # seed effect shared by all variants (pairing removes it)
        rows.append({"variant": "A", "seed": s, "val_loss": base})
        rows.append({"variant": "B", "seed": s, "val_loss": base - 0.05 + rng.normal(0, 0.001)})
        rows.append({"variant": "C", "seed": s, "val_loss": base + rng.normal(0, 0.2)})
    return pd.DataFrame(rows)


def test_paired_deltas_pairing_removes_the_seed_effect():
    df = _table()
    d = paired_deltas(df, "val_loss", baseline="A").set_index("variant")
    wide = df.pivot(index="seed", columns="variant", values="val_loss")
    assert d.loc["B", "delta_mean"] == pytest.approx((wide["B"] - wide["A"]).mean())
    assert d.loc["B", "verdict"] == "lower"            # a 0.05 drop with ~0.001 noise is real
    assert d.loc["C", "verdict"] == "inside seed noise"  # pure noise
    chain = paired_deltas(df, "val_loss", chain=True, order=["A", "B", "C"]).set_index("variant")
    assert chain.loc["C", "reference"] == "B"
    assert chain.loc["C", "delta_mean"] == pytest.approx((wide["C"] - wide["B"]).mean())
    with pytest.raises(KeyError, match="baseline='Z'"):
        paired_deltas(df, "val_loss", baseline="Z")
    text = describe_deltas(d.reset_index())
    assert "B vs A" in text and "lower" in text


def test_summarize_groups_in_order_and_rejects_unknown_columns():
    df = _table()
    s = summarize(df, ["val_loss"])
    assert list(s["variant"]) == ["A", "B", "C"]
    assert s.loc[1, "val_loss_mean"] == pytest.approx(df[df.variant == "B"].val_loss.mean())
    assert (s["n"] == 5).all()
    df.loc[df.variant == "A", "val_loss"] = float("nan")     # a metric missing for one variant
    s = summarize(df, ["val_loss", "seed"])
    assert list(s["n"]) == [5, 5, 5] and list(s["val_loss_n"]) == [0, 5, 5]
    assert s.loc[0, "seed_mean"] == 2.0
    with pytest.raises(KeyError, match="nope"):
        summarize(df, ["nope"])


def test_memory_metric_averages_layers_only():
    row = {"mem0(1:1)/coverage": 0.5, "mem1(2:3)/coverage": 0.7, "coverage_other": 9.0, "x/coverage": True}
    assert memory_metric(row, "coverage") == pytest.approx(0.6)
    assert math.isnan(memory_metric(row, "kl_uniform"))


def test_run_variants_rejects_bad_input_before_training(tmp_path):
    cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32)
    with pytest.raises(ConfigError, match="unique"):
        run_variants([Variant("a", cfg), Variant("a", cfg)], [0], None, None, tmp_path)
    with pytest.raises(ConfigError, match="seeds"):
        run_variants([Variant("a", cfg)], [], None, None, tmp_path)
    assert not any(tmp_path.iterdir())
