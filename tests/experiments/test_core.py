"""Statistics and the variant loop of labcore.experiments.core, against independent computations."""

import math

import numpy as np
import pandas as pd
import pytest

from labcore.config import ConfigError
from labcore.experiments import stats
from labcore.experiments.common import lab_run
from labcore.experiments.core import (
    Variant,
    describe_deltas,
    knowledge_data,
    mean_ci,
    memory_metric,
    paired_deltas,
    refresh_paper_columns,
    run_variants,
    summarize,
)
from labcore.experiments.params import LabParams
from labcore.lm.model import ModelConfig


def test_t_quantiles_match_known_values():
    # Two-sided 95% Student t quantiles (standard tables).
    for dof, q in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (11, 2.201), (30, 2.042)]:
        assert stats.t_quantile_975(dof) == pytest.approx(q, abs=1e-3)
    assert 1.96 < stats.t_quantile_975(100) < 1.99


def test_mean_ci_against_direct_formula():
    x = [1.0, 2.0, 4.0, 7.0]
    mean, std, ci, n = mean_ci(x)
    assert n == 4 and mean == pytest.approx(3.5)
    assert std == pytest.approx(np.std(x, ddof=1))
    assert ci == pytest.approx(3.182446 * np.std(x, ddof=1) / 2.0, rel=1e-6)   # t_0.975,3
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
    diff_b = (wide["B"] - wide["A"]).to_numpy()
    assert d.loc["B", "delta_mean"] == pytest.approx(diff_b.mean())
    assert d.loc["B", "sd"] == pytest.approx(diff_b.std(ddof=1))
    half = 2.776 * diff_b.std(ddof=1) / math.sqrt(5)              # t_0.975,4 from the table
    assert d.loc["B", "delta_ci95"] == pytest.approx(half, rel=1e-3)
    assert (d.loc["B", "ci_low"], d.loc["B", "ci_high"]) == pytest.approx((diff_b.mean() - half,
                                                                          diff_b.mean() + half), rel=1e-3)
    assert d.loc["B", "verdict"].startswith("resolved: B better than A")   # a 0.05 drop with ~0.001 noise
    assert d.loc["C", "verdict"].startswith("inside seed noise")          # pure noise
    # resolution: the effect a paired t-test at n=5 detects with 80% power (noncentral t, by hand)
    for v in "BC":
        sd, res = d.loc[v, "sd"], d.loc[v, "resolution"]
        assert stats.power_at(res, sd, 5) == pytest.approx(0.8, abs=1e-3)
        assert stats.power_at(0.9 * res, sd, 5) < 0.8
    assert d.loc["C", "resolution"] > 100 * d.loc["B", "resolution"]
    assert d["paper_delta"].isna().all() and d["seeds_needed"].isna().all()
    with pytest.raises(KeyError, match="baseline='Z'"):
        paired_deltas(df, "val_loss", baseline="Z")
    text = describe_deltas(d.reset_index())
    assert "B vs A" in text and "resolved: B better than A" in text and "resolution" in text


def test_chained_deltas_are_holm_adjusted_and_read_against_the_paper():
    df = _table()
    chain = paired_deltas(df, "val_loss", chain=True, order=["A", "B", "C"],
                          paper={"C": -0.015}).set_index("variant")
    wide = df.pivot(index="seed", columns="variant", values="val_loss")
    assert list(chain.index) == ["B", "C"] and chain.loc["C", "reference"] == "B"
    assert chain.loc["C", "delta_mean"] == pytest.approx((wide["C"] - wide["B"]).mean())
    # Holm with two tests: the smaller p doubled, the larger max(itself, that); by hand
    p = chain["p_value"].to_numpy()
    lo, hi = np.argmin(p), np.argmax(p)
    assert chain["p_holm"].iloc[lo] == pytest.approx(min(1.0, 2 * p[lo]))
    assert chain["p_holm"].iloc[hi] == pytest.approx(max(p[hi], min(1.0, 2 * p[lo])))
    # C's noise (sd ~0.2) cannot resolve the paper's 0.015: the verdict says so, with the seeds needed
    sd_c = chain.loc["C", "sd"]
    need = int(chain.loc["C", "seeds_needed"])
    assert stats.power_at(-0.015, sd_c, need) >= 0.8 > stats.power_at(-0.015, sd_c, need - 1)
    assert chain.loc["C", "verdict"].startswith("not resolvable at this n")
    assert f"about {need} seeds" in chain.loc["C", "verdict"]
    assert chain.loc["C", "paper_delta"] == -0.015 and math.isnan(chain.loc["B", "paper_delta"])
    assert f"paper -0.015, resolved by ~{need} seeds" in describe_deltas(chain.reset_index())
    # the paper column filled afterwards (as the notebooks do) gives the same table once refreshed
    late = paired_deltas(df, "val_loss", chain=True, order=["A", "B", "C"])
    late["paper_delta"] = late["variant"].map({"C": -0.015})
    pd.testing.assert_frame_equal(refresh_paper_columns(late).set_index("variant")[chain.columns], chain)
    other = pd.DataFrame({"variant": ["x"], "paper_delta": [0.1]})
    assert refresh_paper_columns(other) is other                     # not a deltas table: untouched


def test_a_higher_is_better_verdict_keeps_its_direction_through_the_refresh():
    # accuracy: B is clearly higher than A in every seed, so "B better than A" - before and after the
    # refresh that save_outputs applies to every key table
    df = pd.DataFrame({"variant": ["A"] * 4 + ["B"] * 4, "seed": list(range(4)) * 2,
                       "acc": [0.20, 0.25, 0.22, 0.30, 0.90, 0.93, 0.91, 0.95]})
    d = paired_deltas(df, "acc", baseline="A", higher_is_better=True)
    assert bool(d.iloc[0]["higher_is_better"]) and d.iloc[0]["verdict"].startswith("resolved: B better than A")
    again = refresh_paper_columns(d)
    assert again.iloc[0]["verdict"] == d.iloc[0]["verdict"]
    loss = paired_deltas(df, "acc", baseline="A")                    # read as a loss: A is better
    assert refresh_paper_columns(loss).iloc[0]["verdict"].startswith("resolved: A better than B")


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


# ----------------------------------------------------------------------------------------------
# Checkpoints of a finished ablation run are dropped unless asked; an interrupted run keeps them.
# ----------------------------------------------------------------------------------------------

TINY = ModelConfig(vocab_size=259, d_model=16, n_layers=2, n_heads=1, d_ff=32, max_seq_len=32)


def _train_tiny(run_dir, *, resume=False):
    from labcore.lm.train import TrainConfig, train

    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=1, eval_every=0,
                      checkpoint_every=0, eval_batches=1, recall_max_people=4, device="cpu", progress=False)
    return train(TINY, cfg, knowledge_data(6), run_dir, resume=resume)


def _ckpts(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.pt"))


@pytest.mark.parametrize("keep", [False, True])
def test_finished_run_drops_its_checkpoints_unless_asked(tmp_path, keep):
    params = LabParams(out_dir=str(tmp_path / "run"), keep_checkpoints=keep)
    with lab_run(params, "x.ipynb") as rd:
        _train_tiny(rd.path / "train" / "a" / "seed-0")
        assert _ckpts(rd.path) == ["train/a/seed-0/checkpoints/step-000002.pt"]   # written while running
    assert rd.status == "done"
    assert _ckpts(rd.path) == (["train/a/seed-0/checkpoints/step-000002.pt"] if keep else [])
    assert (rd.read()["checkpoint_bytes_dropped"] > 0) is not keep
    assert (rd.path / "train" / "a" / "seed-0" / "history.jsonl").exists()     # the reader's record stays


def test_interrupted_run_keeps_its_checkpoints_and_resumes(tmp_path):
    params = LabParams(out_dir=str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt), lab_run(params, "x.ipynb") as rd:
        _train_tiny(rd.path / "train" / "a" / "seed-0")
        raise KeyboardInterrupt
    assert rd.status == "failed"
    assert _ckpts(rd.path) == ["train/a/seed-0/checkpoints/step-000002.pt"]
    res = _train_tiny(rd.path / "train" / "a" / "seed-0", resume=True)
    assert res.resumed_from == 2


def test_keep_checkpoints_is_validated():
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        LabParams(keep_checkpoints="yes")
