"""The ablation walks build exactly the configs their notebooks claim (Table 2's walk:
tests/experiments/test_paper_table.py)."""

import dataclasses

import pytest

from labcore.experiments.splitting import SplittingParams, split_variants
from labcore.experiments.virtual_memory import VirtualMemoryParams, ive_variants
from labcore.lm.model import LM


def _mem(v):
    return dataclasses.asdict(v.model.plan.memory)


def test_ive_variants_keep_physical_values_fixed():
    vs = ive_variants(VirtualMemoryParams(expansions=[1, 4, 9], references=[]))
    mems = [v.model.plan.memory for v in vs]
    assert [m.expansion for m in mems] == [1, 4, 9]
    costs = [m.cost() for m in mems]
    assert len({c.params["values"] for c in costs}) == 1   # physical values identical
    assert costs[2].flops_per_token > costs[1].flops_per_token > costs[0].flops_per_token
    with pytest.raises(ValueError, match="expansions"):
        VirtualMemoryParams(expansions=[4, 8])


def test_split_variants_keep_total_values_and_build():
    P = SplittingParams(total_values=576, top_k=8, splits=[1, 4], spans=[0, 1])
    vs = split_variants(P)
    for v in vs:
        plan = v.model.plan
        assert len(plan.placements) * plan.memory.n_keys ** 2 == 576
        assert len(plan.placements) * plan.memory.top_k == 8   # activated values equal too
        LM(v.model)  # every plan is buildable
    with pytest.raises(ValueError, match="perfect square"):
        SplittingParams(total_values=576, top_k=8, splits=[1, 2])
