"""The ablation walks build exactly the configs their notebooks claim (Table 2's walk:
tests/experiments/test_paper_table.py)."""

import dataclasses

import pytest

from labcore.experiments.splitting import SplittingParams, split_variants
from labcore.experiments.tdqkr import TDQKRParams, tdqkr_variants
from labcore.experiments.virtual_memory import VirtualMemoryParams, ive_variants
from labcore.lm.model import LM


def _mem(v):
    return dataclasses.asdict(v.model.plan.memory)


def test_tdqkr_variants():
    vs = {v.name: v for v in tdqkr_variants(TDQKRParams(ranks=[1, 3], cores=[1, 2]))}
    assert list(vs) == ["additive", "R=1", "R=3", "R=2 h=2", "R=2 +aux", "R=2 exact", "R=2 two-sided"]
    assert vs["additive"].model.plan.memory.scoring == "additive"
    assert vs["R=3"].model.plan.memory.rank == 3
    assert vs["R=2 +aux"].model.plan.memory.tucker_aux is True
    assert vs["R=2 exact"].model.plan.memory.candidate_m == 16
    assert vs["R=2 two-sided"].model.plan.memory.proxy_search == "two_sided"
    assert vs["R=2 h=2"].model.plan.memory.proxy_search == "signed"
    assert "R=2 two-sided" not in [v.name for v in tdqkr_variants(TDQKRParams(two_sided=False))]
    with pytest.raises(ValueError, match="ranks"):
        TDQKRParams(ranks=[])


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
