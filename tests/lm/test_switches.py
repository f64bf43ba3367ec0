"""Switches that remove confounds from the lab's comparisons: memory replacing the FFN, the MoE aux
loss averaged over layers, UltraMemV2's ring-window pool in the LM, splitting at equal total and
activated values, and the step-0 output-std calibration of memory value tables. Tiny sizes; seeded
by conftest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from labcore.config import ConfigError
from labcore.layers.moe import MoEConfig
from labcore.layers.peer import PEERConfig
from labcore.layers.pkm import PKMConfig
from labcore.layers.ultramem import UltraMemConfig
from labcore.layers.ultramem_v2 import UltraMemV2Config, ring_window
from labcore.lm.budget import model_budget
from labcore.lm.calibrate import calibrate_memory_init, output_stds
from labcore.lm.model import LM, ModelConfig, SparsePlan, split_memory_plan

V, D, L, T = 61, 32, 4, 16


def cfg_with(plan: SparsePlan | None = None, **kw) -> ModelConfig:
    fields = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=2, d_ff=48, max_seq_len=T)
    fields.update(kw)
    return ModelConfig(plan=plan or SparsePlan(), **fields)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


PKM = PKMConfig(d_model=D, n_keys=8, heads=2, k_dim=16, top_k=4)
UM = UltraMemConfig(d_model=D, n_keys=6, heads=2, k_dim=8, top_k=4, d_value=16)
V2 = UltraMemV2Config(d_model=D, n_keys=6, heads=1, k_dim=8, top_k=4, d_value=12, d_pre=4)


def counted_flops(cfg: ModelConfig, B: int = 2) -> float:
    """Forward matmul FLOPs per token seen by FlopCounterMode (MATH attention), plus the weighted
    value gathers (embedding_bag) it cannot see: 2 * H * K * D_v per token per memory. Autograd on,
    so that PKM's side search runs as torch.bmm (the compiled inference kernel is invisible to it)."""
    lm = LM(cfg).eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # autograd on: see doc
        lm(torch.randint(0, V, (B, T)))
    flops = counter.get_total_flops() / (B * T)
    for _, layer in lm.memory_layers():
        flops += 2 * layer.cfg.heads * layer.cfg.top_k * layer.cfg.d_v
    return flops


# ----------------------------------------------------------------------------------------------
# 1. Memory replaces the FFN.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placements", ["1:1/3:3", "full"])
def test_memory_replacing_ffn_budget_matches_built_model(placements):
    parallel = cfg_with(SparsePlan(kind="memory", memory=PKM, placements=placements))
    replaced = cfg_with(SparsePlan(kind="memory", memory=PKM, placements=placements, memory_replaces_ffn=True))
    lm_par, lm_rep = LM(parallel), LM(replaced)
    n_mem = len(parallel.memory_pairs())
    ffn_params = n_params(lm_par.blocks[0].ffn)           # one DenseFFN, counted from the module
    assert ffn_params == 3 * D * 48                        # SwiGLU: gate, up, down; no biases
    assert n_params(lm_par) - n_params(lm_rep) == n_mem * ffn_params
    b_par, b_rep = model_budget(parallel, context_len=T), model_budget(replaced, context_len=T)
    assert b_rep.total_params == n_params(lm_rep)
    assert b_rep.params_by_part["ffn"] == (L - n_mem) * ffn_params
    assert b_par.flops_per_token - b_rep.flops_per_token == n_mem * 2 * ffn_params
    counted = counted_flops(replaced)
    assert abs(b_rep.flops_per_token - counted) / counted < 0.05
    assert abs((counted_flops(parallel) - counted) - n_mem * 2 * ffn_params) <= 1e-6 * counted


def test_memory_replacing_ffn_computes_h_plus_mem_of_u():
    cfg = cfg_with(SparsePlan(kind="memory", memory=PKM, placements="2:2", memory_replaces_ffn=True))
    lm = LM(cfg).eval()
    assert lm.blocks[2].ffn is None and lm.blocks[1].ffn is not None
    assert lm.block_names[2] == "block2.no_ffn"
    seen = {}
    lm.blocks[3].register_forward_hook(lambda m, i, o: seen.__setitem__("x3", i[0]))
    lm.blocks[2].register_forward_hook(lambda m, i, o: seen.__setitem__("b2", (i[0], o)))
    idx = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        lm(idx)
        x2, (h, u, aux) = seen["b2"]
        assert aux is None
        h_ref = x2 + lm.blocks[2].attn(lm.blocks[2].norm_attn(x2), *lm.rotary(7))
        torch.testing.assert_close(h, h_ref)
        torch.testing.assert_close(seen["x3"], h + lm.memories[0](u)[0])   # x' = h + Mem(u), no FFN


@pytest.mark.parametrize("plan, match", [
    (dict(placements="1:2", memory_replaces_ffn=True), "'k:k' placements"),
    (dict(placements="1:1/1:1", memory_replaces_ffn=True), "each block at most once"),
])
def test_memory_replacing_ffn_rejects_bad_placements(plan, match):
    with pytest.raises(ConfigError, match=match):
        SparsePlan(kind="memory", memory=PKM, **plan)
    with pytest.raises(ConfigError, match="memory_replaces_ffn=True is not allowed with kind='dense'"):
        SparsePlan(memory_replaces_ffn=True)


def test_switch_fields_round_trip_through_dict():
    plan = SparsePlan(kind="memory", memory=V2, placements="full", shared_values=True, share_ratio=0.5,
                      memory_replaces_ffn=True)
    assert SparsePlan.from_dict(plan.to_dict()) == plan
    moe = SparsePlan(kind="moe", moe=MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2),
                     moe_aux_reduction="sum")
    assert SparsePlan.from_dict(moe.to_dict()) == moe


# ----------------------------------------------------------------------------------------------
# 3. MoE aux loss: mean over layers (default) or sum.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_moe", [2, 4])
def test_moe_aux_loss_mean_is_layer_count_free_sum_grows(n_moe):
    moe = MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2)
    blocks = tuple(range(n_moe))
    mean_cfg = cfg_with(SparsePlan(kind="moe", moe=moe, moe_blocks=blocks))
    sum_cfg = cfg_with(SparsePlan(kind="moe", moe=moe, moe_blocks=blocks, moe_aux_reduction="sum"))
    assert mean_cfg.plan.moe_aux_reduction == "mean"
    lm = LM(mean_cfg)
    idx = torch.randint(0, V, (2, 8))
    out = lm(idx)
    per_layer = torch.stack([out.aux[f"block{i}.moe"].aux_loss for i in blocks])
    assert per_layer.min() > 0
    torch.testing.assert_close(out.aux_loss, per_layer.mean())
    lm_sum = LM(sum_cfg)
    lm_sum.load_state_dict(lm.state_dict())
    out_sum = lm_sum(idx)
    torch.testing.assert_close(out_sum.aux_loss, per_layer.sum())
    torch.testing.assert_close(out_sum.aux_loss, n_moe * out.aux_loss)
    # with the mean, the coefficient keeps its meaning: the loss stays at one layer's scale
    assert per_layer.min() <= out.aux_loss <= per_layer.max()
    with pytest.raises(ConfigError, match="moe_aux_reduction='max'"):
        SparsePlan(kind="moe", moe=moe, moe_aux_reduction="max")


# ----------------------------------------------------------------------------------------------
# 5. Splitting at equal total values and equal activated values per token.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory, S", [(UltraMemConfig(d_model=D, n_keys=8, heads=2, k_dim=8, top_k=8,
                                                       d_value=16), 4),
                                       (PKMConfig(d_model=D, n_keys=8, heads=2, k_dim=16, top_k=8), 4),
                                       (UltraMemConfig(d_model=D, n_keys=6, heads=2, k_dim=8, top_k=4,
                                                       candidate_m=4, d_value=16), 4)])
def test_split_memory_plan_keeps_total_and_activated_values(memory, S):
    big = cfg_with(SparsePlan(kind="memory", memory=memory, placements="1:1"), n_layers=8)
    small = cfg_with(split_memory_plan(memory, S, 8, 1), n_layers=8)
    assert len(small.memory_pairs()) == S
    assert small.plan.memory.n_keys ** 2 * S == memory.n_keys ** 2
    assert small.plan.memory.top_k * S == memory.top_k
    b_big, b_small = model_budget(big), model_budget(small)
    assert b_small.sparse_params == b_big.sparse_params                      # total values
    assert b_small.sparse_bytes_per_token == b_big.sparse_bytes_per_token    # activated value rows
    # the same counts from the built models: value rows, and value rows read per token (aux.indices)
    lm_big, lm_small = LM(big), LM(small)
    rows = lambda lm: sum(layer.values.weight.shape[0] for _, layer in lm.memory_layers())  # noqa: E731
    assert rows(lm_big) == rows(lm_small) == memory.n_keys ** 2
    idx = torch.randint(0, V, (2, 5))
    reads = lambda lm: sum(a.indices.shape[1] for a in lm(idx).aux.values())  # noqa: E731
    assert reads(lm_big) == reads(lm_small) == memory.heads * memory.top_k
    if memory.__class__ is UltraMemConfig and memory.candidate_m is not None:
        assert small.plan.memory.candidate_m * S == memory.candidate_m


def test_split_memory_plan_rejects_indivisible():
    with pytest.raises(ConfigError, match="top_k=6 is not allowed with n_memories=4"):
        split_memory_plan(UltraMemConfig(d_model=D, n_keys=8, heads=2, k_dim=8, top_k=6), 4, 8, 1)
    with pytest.raises(ConfigError, match="not a perfect square"):
        split_memory_plan(UltraMemConfig(d_model=D, n_keys=8, heads=2, k_dim=8, top_k=6), 3, 8, 1)
    assert split_memory_plan(PKM, 1, 4, 0).memory == PKM


# ----------------------------------------------------------------------------------------------
# 7. UltraMemV2's shared pool with ring windows.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share_ratio", [1.0, 0.5])
def test_ultramem_v2_shared_pool_in_the_lm(share_ratio):
    cfg = cfg_with(SparsePlan(kind="memory", memory=V2, placements="full", shared_values=True,
                              share_ratio=share_ratio))
    lm = LM(cfg)
    pool_rows = round(36 / share_ratio)
    assert cfg.pool_rows() == pool_rows
    layers = [layer for _, layer in lm.memory_layers()]
    assert all(layer.values is layers[0].values and layer.pre_values is layers[0].pre_values for layer in layers)
    assert layers[0].values.weight.shape == (pool_rows, 12) and layers[0].pre_values.weight.shape == (pool_rows, 4)
    assert [layer.window_start for layer in layers] == [ring_window(j, L, pool_rows, share_ratio).start
                                                        for j in range(L)]
    # the budget counts the pool once: values and pre-values, N_pool * (D_v + D_p)
    b = model_budget(cfg)
    assert b.total_params == n_params(lm)
    assert b.sparse_params == pool_rows * (12 + 4)
    own = cfg_with(SparsePlan(kind="memory", memory=V2, placements="full"))
    assert model_budget(own).total_params == n_params(LM(own))
    assert n_params(LM(own)) - n_params(lm) == L * 36 * 16 - pool_rows * 16
    assert b.active_params == model_budget(own).active_params
    # each layer reads its window only: pool rows in aux.rows lie in [start, start + N) mod N_pool
    out = lm(torch.randint(0, V, (2, 6)))
    for name, layer in lm.memory_layers():
        offs = (out.aux[name].rows - layer.window_start) % pool_rows
        assert int(offs.max()) < 36
    (out.logits.square().mean()).backward()
    assert layers[0].values.weight.grad is not None and layers[0].pre_values.weight.grad is not None


def test_ultramem_v2_share_ratio_validation():
    with pytest.raises(ConfigError, match="share_ratio=0.5 is not allowed with shared_values=False"):
        SparsePlan(kind="memory", memory=V2, placements="full", share_ratio=0.5)
    with pytest.raises(ConfigError, match="share_ratio=0.5 is not allowed for memory 'pkm'"):
        SparsePlan(kind="memory", memory=PKM, placements="full", shared_values=True, share_ratio=0.5)
    with pytest.raises(ConfigError, match="equal home segments"):   # 36 / 0.9 = 40 rows over 3 memories
        cfg_with(SparsePlan(kind="memory", memory=V2, placements="0:0/1:1/2:2", shared_values=True,
                            share_ratio=0.9))


# ----------------------------------------------------------------------------------------------
# 4. Step-0 calibration of the memories' output std.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", [dataclasses.replace(UM, n_keys=12), dataclasses.replace(UM, n_keys=12,
                                                                                          init="paper",
                                                                                          calib_samples=16),
                                    dataclasses.replace(PKM, n_keys=12),
                                    PEERConfig(d_model=D, n_keys=12, heads=2, top_k=4, k_dim=16)])
def test_calibration_hits_the_target_on_the_batch_and_a_fresh_one(memory):
    cfg = cfg_with(SparsePlan(kind="memory", memory=memory, placements="0:1/1:2/2:3"), max_seq_len=64)
    lm = LM(cfg)
    calib, fresh = torch.randint(0, V, (8, 64)), torch.randint(0, V, (8, 64))
    ffn_before, mem_before = output_stds(lm, calib)
    result = calibrate_memory_init(lm, calib)
    target = sum(ffn_before.values()) / len(ffn_before)
    assert result.target_source == "ffn" and result.target == pytest.approx(target)
    assert result.converged
    assert [r["memory"] for r in result.rows] == list(mem_before)
    assert [r["std_before"] for r in result.rows] == pytest.approx(list(mem_before.values()))
    assert max(abs(mem_before[n] / target - 1) for n in mem_before) > 0.2    # the init was off target
    _, on_calib = output_stds(lm, calib)
    _, on_fresh = output_stds(lm, fresh)
    for r in result.rows:
        assert on_calib[r["memory"]] == pytest.approx(target, rel=2e-3)
        assert r["std_after"] == pytest.approx(on_calib[r["memory"]])
        # another batch: PEER's few, gated experts make its std a noisier estimate on 8 x 64 tokens
        assert on_fresh[r["memory"]] == pytest.approx(target, rel=0.1 if isinstance(memory, PEERConfig) else 0.05)
    assert "std before" in result.table()


def test_calibration_to_a_given_number_and_errors():
    lm = LM(cfg_with(SparsePlan(kind="memory", memory=PKM, placements="full", memory_replaces_ffn=True)))
    calib = torch.randint(0, V, (4, 16))
    with pytest.raises(ConfigError, match="target=None is not allowed for a model without FFNs"):
        calibrate_memory_init(lm, calib)
    table = lm.memories[0].values.weight
    result = calibrate_memory_init(lm, calib, target=0.05)
    assert lm.memories[0].values.weight is table                            # rescaled in place
    assert result.target_source == "given" and result.ffn_std == {}
    assert all(abs(s / 0.05 - 1) <= 1e-3 for s in output_stds(lm, calib)[1].values())
    with pytest.raises(ConfigError, match="no memory layers"):
        calibrate_memory_init(LM(cfg_with()), calib)
    with pytest.raises(ConfigError, match="target=-1"):
        calibrate_memory_init(lm, calib, target=-1.0)
