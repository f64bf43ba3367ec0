"""The ablation walks build exactly the configs their notebooks claim."""

import dataclasses

import pytest

from labcore.experiments.paper_table import ROWS, PaperTableParams, table2_variants
from labcore.experiments.splitting import SplittingParams, split_variants
from labcore.experiments.virtual_memory import VirtualMemoryParams, ive_variants
from labcore.lm.model import LM


def _mem(v):
    return dataclasses.asdict(v.model.plan.memory)


# What each Table 2 row changes relative to the previous row (memory config fields, placements, value LR).
EXPECTED_CHANGES = {
    "+rm softmax": {"score_activation"},
    "+half vdim + proj": {"d_value", "value_proj", "n_keys"},
    "+share query": {"share_query"},
    "+split big mem & skip": {"n_keys", "placements"},
    "+query/key LN": {"qk_norm"},
    "+IVE": {"expansion"},
    "+TDQKR": {"scoring", "rank"},
    "+MCS": {"n_cores"},
    "+improved init": {"init"},
    "+value lr decay": {"value_lr_multiplier"},
}


def test_table2_walk_changes_one_switch_per_row():
    P = PaperTableParams()
    vs = table2_variants(P)
    assert [v.name for v in vs] == list(ROWS)
    first = vs[0].model.plan.memory
    assert (first.scoring, first.score_activation, first.expansion, first.value_proj, first.share_query,
            first.qk_norm, first.n_cores) == ("additive", "softmax", 1, False, False, False, 1)
    for prev, cur in zip(vs, vs[1:]):
        changed = {k for k, v in _mem(cur).items() if _mem(prev)[k] != v}
        if cur.model.plan.placements != prev.model.plan.placements:
            changed.add("placements")
        if cur.train_overrides != prev.train_overrides:
            changed.add("value_lr_multiplier")
        assert changed == EXPECTED_CHANGES[cur.name], cur.name
    # half vdim + proj doubles the values (within rounding of n*sqrt(2)); split halves them per memory.
    n0, n1, n2 = (vs[i].model.plan.memory.n_keys for i in (1, 2, 4))
    assert abs(n1**2 / n0**2 - 2) < 0.1
    assert len(vs[4].model.plan.placements) == 2 and abs(2 * n2**2 - n1**2) / n1**2 < 0.1
    last = vs[-1]
    assert last.train_overrides["value_lr_multiplier"] == 4.0
    assert all(v.train_overrides["value_lr_multiplier"] == 1.0 for v in vs[:-1])


def test_table2_subset_and_bad_rows():
    vs = table2_variants(PaperTableParams(rows=["PKM", "+IVE"]))
    assert [v.name for v in vs] == ["PKM", "+IVE"]
    # The +IVE row keeps every earlier change even when the rows in between are not trained.
    m = vs[1].model.plan.memory
    assert (m.expansion, m.qk_norm, m.share_query, m.score_activation) == (4, True, True, "none")
    with pytest.raises(ValueError, match="rows"):
        PaperTableParams(rows=["+IVE"])
    with pytest.raises(ValueError, match="rows"):
        PaperTableParams(rows=["PKM", "+nope"])


def test_ive_variants_keep_physical_values_fixed():
    vs = ive_variants(VirtualMemoryParams(expansions=[1, 4, 9]))
    mems = [v.model.plan.memory for v in vs]
    assert [m.expansion for m in mems] == [1, 4, 9]
    costs = [m.cost() for m in mems]
    assert len({c.params["values"] for c in costs}) == 1   # physical values identical
    assert costs[2].flops_per_token > costs[1].flops_per_token > costs[0].flops_per_token
    with pytest.raises(ValueError, match="expansions"):
        VirtualMemoryParams(expansions=[4, 8])


def test_split_variants_keep_total_values_and_build():
    P = SplittingParams(total_values=576, splits=[1, 4], spans=[0, 1])
    vs = split_variants(P)
    for v in vs:
        plan = v.model.plan
        assert len(plan.placements) * plan.memory.n_keys ** 2 == 576
        LM(v.model)  # every plan is buildable
    with pytest.raises(ValueError, match="perfect square"):
        SplittingParams(total_values=576, splits=[2])
