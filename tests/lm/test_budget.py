"""Tests of labcore.lm.budget: budgets checked against built models (parameters exactly, FLOPs with
torch.utils.flop_counter), and the equal-budget matchers checked by building and counting.

FLOP counting method: ``FlopCounterMode`` counts matrix products (mm/addmm/bmm) only. Attention runs
through the MATH SDPA backend so that its Q Kᵀ and A V products are visible as bmm (the fused CPU
kernel is not counted). MoE uses ``expert_impl="loop"`` (the counter has no formula for
``grouped_mm``; both paths compute the same products). Memories: the counter sees the query
projection, the key scores and the output projection, not the weighted value gather
(``embedding_bag``), so the test adds that by hand: 2 * H * K * D_v FLOPs per token per memory; the
remaining terms of the layers' cost (top-k candidate sums/scores, softmax, bias adds) are small and
covered by the 5% tolerance. The counted forward runs with autograd on (the training path): without
a graph to record, PKM's per-side search on CPU uses a compiled kernel (``fast.search.side_search``)
whose products the counter cannot see.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from labcore.config import ConfigError
from labcore.layers.moe import MoE, MoEConfig
from labcore.layers.pkm import PKMConfig
from labcore.layers.ultramem import UltraMemConfig
from labcore.lm.budget import (
    Budget,
    equal_budget_family,
    format_budget_table,
    match_moe,
    match_pkm,
    match_ultramem,
    model_budget,
    small_base_config,
)
from labcore.lm.model import LM, ModelConfig, SparsePlan

V, D, L, T = 61, 32, 4, 16


def cfg_with(plan: SparsePlan | None = None, **kw) -> ModelConfig:
    fields = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=2, d_ff=48, max_seq_len=T)
    fields.update(kw)
    return ModelConfig(plan=plan or SparsePlan(), **fields)


MOE = MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2, expert_impl="loop")
PKM = PKMConfig(d_model=D, n_keys=8, heads=2, k_dim=16, top_k=4)
UM = UltraMemConfig(d_model=D, n_keys=6, heads=2, k_dim=8, top_k=4, d_value=16)

CONFIGS = {
    "dense_tied": cfg_with(),
    "dense_untied": cfg_with(tie_embeddings=False),
    "moe_all": cfg_with(SparsePlan(kind="moe", moe=MOE)),
    "moe_shared_some": cfg_with(SparsePlan(
        kind="moe", moe=dataclasses.replace(MOE, n_shared_experts=1, shared_gate=True), moe_blocks=(0, 2))),
    "pkm_skip": cfg_with(SparsePlan(kind="memory", memory=PKM, placements="1:2")),
    "pkm_proj_shared": cfg_with(SparsePlan(kind="memory", memory=dataclasses.replace(PKM, d_value=16),
                                           placements="0:1/2:3", shared_values=True)),
    "ultramem_skip": cfg_with(SparsePlan(kind="memory", memory=UM, placements="0:2/1:3")),
    "ultramem_full_shared": cfg_with(SparsePlan(kind="memory", memory=UM, placements="full",
                                                shared_values=True)),
}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared tensors once


def counted_flops_per_token(cfg: ModelConfig, B: int = 2, T_run: int = T) -> float:
    """FlopCounterMode on a forward pass (MATH attention) + the value gathers it cannot see."""
    if cfg.plan.kind == "moe":  # grouped_mm is invisible to the counter; the loop computes the same
        cfg = dataclasses.replace(cfg, plan=dataclasses.replace(
            cfg.plan, moe=dataclasses.replace(cfg.plan.moe, expert_impl="loop")))
    lm = LM(cfg).eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # autograd on: see doc
        lm(torch.randint(0, cfg.vocab_size, (B, T_run)))
    flops = counter.get_total_flops() / (B * T_run)
    for _, layer in lm.sparse_layers():  # the weighted K-way combine is elementwise (uncounted)
        if isinstance(layer, MoE):
            flops += 2 * layer.cfg.top_k * layer.cfg.d_model
    for _, layer in lm.memory_layers():
        c = layer.cfg
        d_v = c.d_v
        flops += 2 * c.heads * c.top_k * d_v  # embedding_bag: weighted sum of H*K value rows
    return flops


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_exact_against_built_model(name):
    cfg = CONFIGS[name]
    lm = LM(cfg)
    b = model_budget(cfg)
    assert b.total_params == count_params(lm)
    assert b.params_by_part["embedding"] == lm.tok_emb.weight.numel()
    assert b.params_by_part["head"] == (0 if lm.head is None else lm.head.weight.numel())
    # sparse parts counted from the module: expert tensors, unique value tables
    experts = sum(layer.gate_up_proj.numel() + layer.down_proj.numel() for n, layer in lm.sparse_layers()
                  if n.endswith(".moe"))
    tables = {id(layer.values.weight): layer.values.weight.numel() for _, layer in lm.memory_layers()}
    assert b.sparse_params == experts + sum(tables.values())
    # activated: everything dense + K experts per MoE layer / H*K value rows per memory
    touched = 0
    for n, layer in lm.sparse_layers():
        c = layer.cfg
        touched += c.top_k * 3 * D * c.d_expert if n.endswith(".moe") else c.heads * c.top_k * c.d_v
    assert b.active_params == count_params(lm) - b.sparse_params + touched
    assert b.sparse_bytes_per_token == 2 * touched
    assert model_budget(cfg, dtype_bytes=4).sparse_bytes_per_token == 4 * touched


def test_shared_pool_counted_once():
    shared, own = CONFIGS["ultramem_full_shared"], dataclasses.replace(
        CONFIGS["ultramem_full_shared"], plan=dataclasses.replace(CONFIGS["ultramem_full_shared"].plan,
                                                                  shared_values=False))
    diff = model_budget(own).total_params - model_budget(shared).total_params
    assert diff == (L - 1) * 36 * 16 == count_params(LM(own)) - count_params(LM(shared))
    assert model_budget(own).active_params == model_budget(shared).active_params


@pytest.mark.parametrize("name", ["dense_tied", "dense_untied", "moe_all", "moe_shared_some"])
def test_flops_dense_and_moe_match_flop_counter(name):
    cfg = CONFIGS[name]
    counted = counted_flops_per_token(cfg)
    budget = model_budget(cfg, context_len=T).flops_per_token
    assert abs(budget - counted) / counted < 0.005  # all matmuls, incl. QKᵀ/AV over the full T x T


@pytest.mark.parametrize("name", ["pkm_skip", "pkm_proj_shared", "ultramem_skip", "ultramem_full_shared"])
def test_flops_memory_models_match_counter_plus_gathers(name):
    cfg = CONFIGS[name]
    counted = counted_flops_per_token(cfg)
    b = model_budget(cfg, context_len=T)
    assert abs(b.flops_per_token - counted) / counted < 0.05
    # the memory part alone (counted minus the dense trunk counted the same way) is within 5% too
    trunk = counted_flops_per_token(dataclasses.replace(cfg, plan=SparsePlan()))
    mem = counted - trunk
    assert mem > 0 and abs(b.flops_by_part["memory"] - mem) / mem < 0.05


def test_attention_scores_train_flops_and_record():
    cfg = CONFIGS["dense_tied"]
    b8, b16 = model_budget(cfg, context_len=8), model_budget(cfg, context_len=16)
    assert b16.flops_by_part["attention_scores"] == L * 4 * 16 * D  # QKᵀ and AV: 2*C*D each
    assert b16.flops_per_token - b8.flops_per_token == L * 4 * 8 * D
    assert b16.flops_by_part["attention"] == L * 8 * D * D and b16.flops_by_part["head"] == 2 * D * V
    assert b16.train_flops_per_token == 3 * b16.flops_per_token
    assert model_budget(cfg).context_len == T  # default: max_seq_len
    assert isinstance(b16, Budget) and b16.dense_params == b16.total_params
    with pytest.raises(dataclasses.FrozenInstanceError):
        b16.total_params = 0
    with pytest.raises(ConfigError, match="context_len=0"):
        model_budget(cfg, context_len=0)


# ----------------------------------------------------------------------------------------------
# Matchers: build every matched model and count.
# ----------------------------------------------------------------------------------------------

BASE = ModelConfig(vocab_size=96, d_model=32, n_layers=5, n_heads=2, d_ff=96, max_seq_len=16)


def _check_matched(cfg: ModelConfig, target_params: int, dense_flops: float, tol: float = 0.02) -> None:
    params = count_params(LM(cfg))
    assert abs(params - target_params) / target_params <= tol, (params, target_params)
    flops = counted_flops_per_token(cfg)
    assert abs(flops - dense_flops) / dense_flops <= tol, (flops, dense_flops)


def test_equal_budget_family_by_building_and_counting():
    fam = equal_budget_family(BASE, ratio=4.0, multiple_of=1)
    assert list(fam) == ["dense", "moe", "pkm", "ultramem"]
    assert fam["dense"] is BASE
    target = 5 * count_params(LM(BASE))  # (1 + ratio) x dense
    dense_flops = counted_flops_per_token(BASE)
    assert fam["moe"].plan.kind == "moe" and fam["moe"].plan.moe.top_k == 2
    assert fam["pkm"].plan.memory_type == "pkm" and fam["ultramem"].plan.memory_type == "ultramem"
    for name in ("moe", "pkm", "ultramem"):
        _check_matched(fam[name], target, dense_flops)
    assert fam["pkm"].d_ff < BASE.d_ff and fam["ultramem"].d_ff < BASE.d_ff  # memories pay in FFN width


def test_matchers_with_explicit_choices():
    dense_flops = counted_flops_per_token(BASE)
    # with n_experts fixed only d_expert moves, and equal FLOPs fix it: only some targets are reachable
    moe = match_moe(BASE, 330_000, top_k=1, n_experts=10, multiple_of=1, n_shared_experts=1, d_shared=32)
    assert moe.plan.moe.n_experts == 10 and moe.plan.moe.n_shared_experts == 1
    _check_matched(moe, 330_000, dense_flops)
    # 300k is not: the flop-matched d_expert is 60, giving (by hand) the parameters below
    closest = (5 * (10 * 3 * 32 * 60 + 10 * 32 + 3 * 32 * 32)  # experts, router, shared MLP per block
               + 96 * 32 + 5 * 4 * 32 * 32 + 11 * 32)        # embedding, attention, norms
    with pytest.raises(ConfigError, match=rf"closest: params off by {(closest - 300_000) / 300_000:.2%}"):
        match_moe(BASE, 300_000, top_k=1, n_experts=10, multiple_of=1, n_shared_experts=1, d_shared=32)
    target = 300_000
    pkm = match_pkm(BASE, target, placements="1:3/2:4", heads=2, k_dim=16, top_k=8, shared_values=True,
                    multiple_of=4)
    assert pkm.plan.placements == ("1:3", "2:4") and pkm.plan.shared_values and pkm.d_ff % 4 == 0
    _check_matched(pkm, target, dense_flops)
    um = match_ultramem(BASE, target, n_memories=2, span=1, heads=1, k_dim=8, top_k=8, d_value=16,
                        multiple_of=1)
    assert um.plan.placements == ("0:1", "2:3")  # spread_placements: 2 x 2 blocks centred in 5
    _check_matched(um, target, dense_flops)


def test_default_small_family_within_2pct():
    base = small_base_config()
    fam = equal_budget_family(base)  # ratio 12, the paper's "x12"
    dense = model_budget(base)
    target = 13 * dense.total_params
    for name in ("moe", "pkm", "ultramem"):
        b = model_budget(fam[name])
        assert abs(b.total_params - target) / target <= 0.02
        assert abs(b.flops_per_token - dense.flops_per_token) / dense.flops_per_token <= 0.02
    assert fam["moe"].plan.moe.d_expert % 8 == 0 and fam["ultramem"].d_ff % 8 == 0  # aligned widths
    table = format_budget_table(fam)
    assert table.count("\n") == len(fam) + 2
    for name in fam:
        assert f"\n{name} " in table


def test_matcher_errors_are_clear():
    with pytest.raises(ConfigError, match=r"target_total_params=1,000 is not allowed: must exceed"):
        match_moe(BASE, 1_000)
    with pytest.raises(ConfigError, match=r"base \(a ModelConfig with plan kind 'moe'\).*dense plan"):
        match_pkm(CONFIGS["moe_all"], 10**6)
    with pytest.raises(ConfigError, match=r"match_moe: cannot match .*closest: params off by"):
        match_moe(BASE, 30 * 70_000, multiple_of=1)  # the router would eat the FLOP budget
    with pytest.raises(ConfigError, match=r"match_memory\(.ultramem.\): cannot match .*closest.*lower k_dim"):
        match_ultramem(BASE, 400_000, k_dim=64, heads=4, top_k=8)  # key scores cost more than the FFNs
    with pytest.raises(ConfigError, match=r"tol=0"):
        match_moe(BASE, 400_000, tol=0)
