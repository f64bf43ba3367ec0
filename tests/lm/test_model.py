"""Tests of labcore.lm.model: wiring of the plan (skip-layer, full, shared pool), causality, loss, ties,
layer splitting and config validation. Tiny sizes; every test seeded by conftest."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labcore.config import ConfigError
from labcore.layers.base import param_role
from labcore.layers.moe import MoEConfig
from labcore.layers.peer import PEERConfig
from labcore.layers.pkm import PKMConfig
from labcore.layers.ultramem import UltraMemConfig
from labcore.layers.ultramem_v2 import UltraMemV2Config
from labcore.lm.model import (
    LM,
    ModelConfig,
    SparsePlan,
    parse_placement,
    split_memory,
    spread_placements,
)
from labcore.lm.optim import build_param_groups, refresh_all

V, D, L, T_MAX = 61, 32, 4, 16


def cfg_with(plan: SparsePlan | None = None, **kw) -> ModelConfig:
    fields = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=2, d_ff=48, max_seq_len=T_MAX)
    fields.update(kw)
    return ModelConfig(plan=plan or SparsePlan(), **fields)


def pkm_cfg(**kw) -> PKMConfig:
    return PKMConfig(**{"d_model": D, "n_keys": 8, "heads": 2, "k_dim": 16, "top_k": 4, **kw})


def um_cfg(**kw) -> UltraMemConfig:
    return UltraMemConfig(**{"d_model": D, "n_keys": 6, "heads": 2, "k_dim": 8, "top_k": 4,
                             "d_value": 16, **kw})


PLANS = {
    "dense": SparsePlan(),
    "moe": SparsePlan(kind="moe", moe=MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=2)),
    "moe_some_blocks": SparsePlan(kind="moe", moe=MoEConfig(d_model=D, d_expert=16, n_experts=4, top_k=1),
                                  moe_blocks=(1, 3)),
    "pkm_skip": SparsePlan(kind="memory", memory=pkm_cfg(), placements=("1:2",)),
    "ultramem_skip_shared": SparsePlan(kind="memory", memory=um_cfg(), placements="0:2/1:3",
                                       shared_values=True),
    "ultramem_full": SparsePlan(kind="memory", memory=um_cfg(expansion=1), placements="full"),
    "pkm_replaces_ffn": SparsePlan(kind="memory", memory=pkm_cfg(), placements="1:1/3:3",
                                   memory_replaces_ffn=True),
    "ultramem_v2_ring_pool": SparsePlan(kind="memory", memory=UltraMemV2Config(
        d_model=D, n_keys=6, heads=1, k_dim=8, top_k=4, d_value=12, d_pre=4), placements="0:2/1:3",
        shared_values=True, share_ratio=0.5),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_causal_future_tokens_never_change_past_logits(name):
    lm = LM(cfg_with(PLANS[name])).eval()
    idx = torch.randint(0, V, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1 + torch.randint(0, V - 1, (2, 5))) % V  # every future token differs
    with torch.no_grad():
        a, b = lm(idx).logits, lm(changed).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-3  # the change is visible where it should be


def _capture(lm: LM):
    """Hooks recording each block's input/output/FFN input and each memory's input/output."""
    rec: dict = {}
    for i, block in enumerate(lm.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: rec.__setitem__(("in", i), args[0].clone()))
        block.register_forward_hook(lambda m, args, out, i=i: rec.__setitem__(("out", i), out[0].clone()))
        block.norm_ffn.register_forward_hook(lambda m, args, out, i=i: rec.__setitem__(("u", i), out.clone()))
    for j, mem in enumerate(lm.memories):
        mem.register_forward_hook(
            lambda m, args, out, j=j: rec.update({("mem_in", j): args[0].clone(), ("mem_out", j): out[0].clone()}))
    return rec


def test_skip_layer_reads_ffn_input_of_k_and_adds_after_v():
    plan = SparsePlan(kind="memory", memory=pkm_cfg(), placements=("1:2", "0:0"))
    lm = LM(cfg_with(plan)).eval()
    rec = _capture(lm)
    with torch.no_grad():
        lm(torch.randint(0, V, (2, 9)))
    # memory 0 (1:2) reads u_1, the normalised tensor fed to block 1's FFN ...
    assert torch.equal(rec[("mem_in", 0)], rec[("u", 1)])
    # ... memory 1 (0:0) reads u_0
    assert torch.equal(rec[("mem_in", 1)], rec[("u", 0)])
    m0, m1 = rec[("mem_out", 0)], rec[("mem_out", 1)]
    assert m0.abs().amax() > 1e-4 and m1.abs().amax() > 1e-4
    # memory 1 is parallel to block 0's FFN: added right after block 0
    assert torch.allclose(rec[("in", 1)], rec[("out", 0)] + m1, atol=1e-6)
    # memory 0 skips: NOT added after block 1 (block 2 sees block 1's output unchanged) ...
    assert torch.equal(rec[("in", 2)], rec[("out", 1)])
    # ... but after block 2
    assert torch.allclose(rec[("in", 3)], rec[("out", 2)] + m0, atol=1e-6)


def test_full_placement_is_one_memory_per_block_parallel_to_its_ffn():
    lm = LM(cfg_with(PLANS["ultramem_full"])).eval()
    assert [n for n, _ in lm.memory_layers()] == [f"mem{i}({i}:{i})" for i in range(L)]
    rec = _capture(lm)
    with torch.no_grad():
        lm(torch.randint(0, V, (1, 5)))
    for i in range(L - 1):
        assert torch.equal(rec[("mem_in", i)], rec[("u", i)])
        assert torch.allclose(rec[("in", i + 1)], rec[("out", i)] + rec[("mem_out", i)], atol=1e-6)


def test_zero_memory_gives_the_dense_trunk_exactly():
    """Memories keep the FFNs: with a zero value table (PKM, D_v = D, no projection) the memory
    model is the dense model with the same trunk weights."""
    mem_lm = LM(cfg_with(PLANS["pkm_skip"])).eval()
    with torch.no_grad():
        mem_lm.memories[0].values.weight.zero_()
    dense_lm = LM(cfg_with()).eval()
    missing, unexpected = dense_lm.load_state_dict(mem_lm.state_dict(), strict=False)
    assert not missing and all(k.startswith("memories.") for k in unexpected)
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(mem_lm(idx).logits, dense_lm(idx).logits)
        mem_lm.memories[0].values.weight.normal_()
        assert not torch.allclose(mem_lm(idx).logits, dense_lm(idx).logits)


def test_tied_embeddings_share_one_matrix_and_gradients_add():
    tied = LM(cfg_with(tie_embeddings=True))
    untied = LM(cfg_with(tie_embeddings=False))
    assert tied.head is None and untied.head is not None
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == V * D
    # same weights everywhere, head = copy of the embedding: logits agree, and the tied gradient
    # is the sum of the untied embedding and head gradients
    sd = tied.state_dict()
    sd["head.weight"] = sd["tok_emb.weight"].clone()
    untied.load_state_dict(sd)
    idx, tgt = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    out_t, out_u = tied(idx, tgt), untied(idx, tgt)
    assert torch.allclose(out_t.logits, out_u.logits, atol=1e-6)
    out_t.loss.backward()
    out_u.loss.backward()
    expect = untied.tok_emb.weight.grad + untied.head.weight.grad
    assert torch.allclose(tied.tok_emb.weight.grad, expect, atol=1e-7)
    # the tied head really is the embedding matrix: changing one row changes that logit
    with torch.no_grad():
        tied.tok_emb.weight[5] += 1.0
        assert not torch.allclose(tied(idx).logits[..., 5], out_t.logits[..., 5])


def test_loss_is_mean_cross_entropy_over_non_ignored_targets():
    lm = LM(cfg_with(PLANS["moe"]))
    idx, tgt = torch.randint(0, V, (3, 11)), torch.randint(0, V, (3, 11))
    tgt[0, :4] = -100
    tgt[2, -1] = -100
    out = lm(idx, tgt)
    logp = out.logits.double().log_softmax(-1)  # (B, T, V)
    mask = tgt != -100
    nll = -logp[mask].gather(-1, tgt[mask].unsqueeze(-1)).squeeze(-1)  # written out
    assert torch.allclose(out.loss.double(), nll.sum() / mask.sum(), atol=1e-6)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, V), tgt.reshape(-1)), atol=1e-6)
    assert lm(idx).loss is None


def test_aux_records_names_and_aux_loss_mean_over_moe_layers():
    lm = LM(cfg_with(PLANS["moe_some_blocks"]))
    out = lm(torch.randint(0, V, (2, 6)))
    assert list(out.aux) == ["block1.moe", "block3.moe"]
    assert [n for n, _ in lm.sparse_layers()] == ["block1.moe", "block3.moe"]
    total = out.aux["block1.moe"].aux_loss + out.aux["block3.moe"].aux_loss
    assert out.aux_loss.item() > 0 and torch.allclose(out.aux_loss, total / 2)  # default "mean"
    assert out.aux["block3.moe"].indices.shape == (12, 1)

    lm = LM(cfg_with(PLANS["ultramem_skip_shared"]))
    out = lm(torch.randint(0, V, (2, 6)))
    assert list(out.aux) == ["mem0(0:2)", "mem1(1:3)"]
    assert [n for n, _ in lm.memory_layers()] == ["mem0(0:2)", "mem1(1:3)"]
    assert out.aux["mem1(1:3)"].indices.shape == (12, 2 * 4)
    assert LM(cfg_with()).forward(torch.randint(0, V, (1, 3))).aux == {}


def test_shared_values_rejected_for_a_memory_without_one_value_table():
    peer = PEERConfig(d_model=16, n_keys=8, heads=2, k_dim=8, top_k=4)
    with pytest.raises(ConfigError, match=r"shared_values=True is not allowed with memory type 'peer'"):
        SparsePlan(kind="memory", memory=peer, placements="0:0/1:1", shared_values=True)
    SparsePlan(kind="memory", memory=peer, placements="0:0/1:1")             # unshared: fine


def test_shared_value_pool_is_one_tensor():
    mem = um_cfg(n_keys=16)  # N = 256 rows, so that the two memories hit different rows
    shared = LM(cfg_with(SparsePlan(kind="memory", memory=mem, placements="0:2/1:3", shared_values=True)))
    own = LM(cfg_with(SparsePlan(kind="memory", memory=mem, placements="0:2/1:3")))
    a, b = shared.memories[0].values, shared.memories[1].values
    assert a is b and param_role(a.weight) == "memory_values"
    assert own.memories[0].values is not own.memories[1].values
    pool = 256 * 16
    assert (sum(p.numel() for p in own.parameters()) - sum(p.numel() for p in shared.parameters())) == pool
    # both memories write their gradient into the same table: exactly the rows either one read
    out = shared(torch.randint(0, V, (1, 3)))
    rows0 = out.aux["mem0(0:2)"].indices.flatten()
    rows1 = out.aux["mem1(1:3)"].indices.flatten()
    out.logits.square().mean().backward()
    g = a.weight.grad
    hit0 = set((shared.memories[0].perm[rows0] % 256).tolist())  # virtual slot -> physical row
    hit1 = set((shared.memories[1].perm[rows1] % 256).tolist())
    assert hit0 - hit1 and hit1 - hit0  # each memory has rows of its own in this batch
    assert set(torch.nonzero(g.abs().sum(1)).flatten().tolist()) == hit0 | hit1


def test_refresh_retrieval_reaches_every_memory(monkeypatch):
    lm = LM(cfg_with(PLANS["ultramem_skip_shared"]))
    calls = []
    for name, layer in lm.memory_layers():
        monkeypatch.setattr(layer, "refresh_retrieval", lambda name=name: calls.append(name))
    lm.refresh_retrieval()
    assert calls == ["mem0(0:2)", "mem1(1:3)"]
    LM(cfg_with(PLANS["pkm_skip"])).refresh_retrieval()  # PKM has no refresh: a no-op, no error


def test_ultramem_paper_init_gets_number_of_memory_layers():
    plan = SparsePlan(kind="memory", memory=um_cfg(init="paper", n_keys=16, calib_samples=8),
                      placements="0:1/1:2/2:3")
    cfg = cfg_with(plan)
    assert cfg.memory_layer_config().n_model_layers == 3 and plan.memory.n_model_layers == 1
    lm = LM(cfg)
    E, K, H, Lm = 4, 4, 2, 3
    expect = math.sqrt(E / (2 * K * H * Lm))  # values ~ N(0, E / (2 K H L)), L = memory layers
    for _, layer in lm.memory_layers():
        assert layer.cfg.n_model_layers == 3
        assert abs(layer.values.weight.std().item() / expect - 1) < 0.05  # 4096 draws


def test_parameter_roles():
    lm = LM(cfg_with(PLANS["pkm_skip"]))
    roles = {n: param_role(p) for n, p in lm.named_parameters()}
    assert roles["tok_emb.weight"] == "default"
    assert roles["blocks.0.attn.qkv.weight"] == "default"
    assert roles["blocks.0.norm_attn.weight"] == "no_decay" and roles["norm_f.weight"] == "no_decay"
    assert roles["memories.0.values.weight"] == "memory_values"


def test_init_std_of_trunk():
    lm = LM(cfg_with(init_std=0.05, d_model=64, n_layers=8, d_ff=64))
    assert abs(lm.tok_emb.weight.std().item() / 0.05 - 1) < 0.05
    assert abs(lm.blocks[0].attn.qkv.weight.std().item() / 0.05 - 1) < 0.05
    assert abs(lm.blocks[0].attn.proj.weight.std().item() / (0.05 / 4) - 1) < 0.05  # / sqrt(2L)
    assert abs(lm.blocks[0].ffn.w_up.weight.std().item() / 0.05 - 1) < 0.05


def test_dropout_only_in_training():
    lm = LM(cfg_with(dropout=0.5))
    idx = torch.randint(0, V, (2, 8))
    lm.eval()
    with torch.no_grad():
        assert torch.equal(lm(idx).logits, lm(idx).logits)
        lm.train()
        assert not torch.allclose(lm(idx).logits, lm(idx).logits)


# ----------------------------------------------------------------------------------------------
# Layer splitting.
# ----------------------------------------------------------------------------------------------


def test_split_memory_release_layout_and_totals():
    n, places = split_memory(4 * 808**2, 4, 20, 3)
    assert (n, places) == (808, ("2:5", "6:9", "10:13", "14:17"))
    assert split_memory(10_000, 1, 6, 0) == (100, ("2:2",))  # one big memory, centred
    assert split_memory(36, 4, 6, 2) == (3, ("0:2", "1:3", "2:4", "3:5"))  # do not fit: overlap
    for n_mem in (1, 2, 3, 5):
        for n_layers in (5, 8, 12):
            for span in range(0, 4):
                if span >= n_layers:
                    continue
                total = n_mem * 7**2
                n, places = split_memory(total, n_mem, n_layers, span)
                assert n_mem * n * n == total and len(places) == n_mem
                pairs = [parse_placement(p) for p in places]
                assert all(0 <= k <= v < n_layers and v - k == span for k, v in pairs)
                starts = [k for k, _ in pairs]
                assert starts == sorted(starts)
                if n_mem * (span + 1) <= n_layers:  # end to end, centred
                    assert all(b[0] == a[1] + 1 for a, b in zip(pairs, pairs[1:]))
                    assert abs(starts[0] - (n_layers - 1 - pairs[-1][1])) <= 1


def test_split_memory_rejects_non_square_with_nearest():
    with pytest.raises(ConfigError, match=r"30 values per memory.*50 \(n_keys=5\) or 72 \(n_keys=6\)"):
        split_memory(60, 2, 8, 1)
    with pytest.raises(ConfigError, match="25.5"):
        split_memory(51, 2, 8, 1)
    with pytest.raises(ConfigError, match="span=8"):
        split_memory(50, 2, 8, 8)
    assert spread_placements(1, 1, 0) == ("0:0",)


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: cfg_with(n_heads=3), r"n_heads=3"),
    (lambda: cfg_with(n_heads=32), r"n_heads=32.*even head dimension"),
    (lambda: cfg_with(vocab_size=1), r"vocab_size=1"),
    (lambda: cfg_with(dropout=1.0), r"dropout=1.0"),
    (lambda: SparsePlan(kind="sparse"), r"SparsePlan.kind='sparse'"),
    (lambda: SparsePlan(kind="moe"), r"SparsePlan.moe=None"),
    (lambda: SparsePlan(kind="memory", memory=pkm_cfg(), placements=("3:1",)), r"'3:1' has k=3 > v=1"),
    (lambda: SparsePlan(kind="memory", memory=pkm_cfg(), placements=("2-5",)), r"placement '2-5'"),
    (lambda: SparsePlan(kind="memory", memory=pkm_cfg(), placements=("a:3",)), r"placement 'a:3'"),
    (lambda: SparsePlan(kind="memory", memory=pkm_cfg(), placements=()), r"placements=\(\)"),
    (lambda: SparsePlan(kind="memory", memory=pkm_cfg(), placements=("full", "0:1")), r"'full'"),
    (lambda: SparsePlan(kind="dense", memory=pkm_cfg()), r"kind='dense'"),
    (lambda: cfg_with(SparsePlan(kind="memory", memory=pkm_cfg(), placements=("1:2", "2:4"))),
     r"placement '2:4'.*n_layers=4"),
    (lambda: cfg_with(SparsePlan(kind="memory", memory=pkm_cfg(d_model=16), placements=("1:2",))),
     r"plan.memory.d_model=16"),
    (lambda: cfg_with(SparsePlan(kind="moe", moe=MoEConfig(d_model=D, d_expert=8, n_experts=2, top_k=1),
                                 moe_blocks=(0, 4))), r"moe_blocks=\(0, 4\).*block 4"),
    (lambda: ModelConfig.from_dict({**cfg_with().to_dict(), "n_layer": 3}), r"unknown key.*n_layer"),
    (lambda: SparsePlan.from_dict({"kind": "memory", "memory": {"type": "nosuch"}, "placements": "0:0"}),
     r"type='nosuch' is not allowed: must be a registered memory layer \(one of \['pkm', 'ultramem'"),
    (lambda: SparsePlan.from_dict({"kind": "memory", "memory": {"type": "moe"}, "placements": "0:0"}),
     r"type='moe' is not allowed: must be a registered memory"),
])
def test_bad_configs_raise_naming_the_field(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_bad_forward_inputs():
    lm = LM(cfg_with())
    with pytest.raises(ValueError, match=r"T=17.*max_seq_len=16"):
        lm(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) torch.long"):
        lm(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[0, 61\].*vocab_size-1=60"):
        lm(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="targets"):
        lm(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_from_dict_round_trip_and_yaml_forms():
    for plan in PLANS.values():
        cfg = cfg_with(plan)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    data = {"vocab_size": V, "d_model": D, "n_layers": L, "n_heads": 2, "d_ff": 48, "max_seq_len": 16,
            "plan": {"kind": "memory", "placements": "0:2/1:3", "shared_values": True,
                     "memory": {"type": "ultramem", "n_keys": 6, "heads": 2, "k_dim": 8, "top_k": 4,
                                "d_value": 16}}}
    cfg = ModelConfig.from_dict(data)  # d_model filled into the memory config
    assert cfg == cfg_with(PLANS["ultramem_skip_shared"])
    assert cfg.memory_pairs() == ((0, 2), (1, 3))


# ----------------------------------------------------------------------------------------------
# Training: gradients reach every part, optimiser groups by role, a few steps fit a batch.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moe_some_blocks", "pkm_skip", "ultramem_skip_shared", "pkm_replaces_ffn",
                                  "ultramem_v2_ring_pool"])
def test_every_parameter_gets_a_gradient_and_a_few_steps_fit_a_batch(name):
    lm = LM(cfg_with(PLANS[name]))
    groups = build_param_groups(lm, lr=2e-2, weight_decay=0.0)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(lm.parameters()))  # each once
    roles = {g["lr_role"]: g["params"] for g in groups}
    assert any(p is lm.tok_emb.weight for p in roles["default"])
    if lm.memories:
        assert {id(layer.values.weight) for _, layer in lm.memory_layers()} <= {
            id(p) for p in roles["memory_values"]}
    opt = torch.optim.Adam(groups)
    idx = torch.randint(0, V, (4, 12))
    tgt = torch.roll(idx, -1, dims=1)
    losses = []
    for step in range(12):
        out = lm(idx, tgt)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        if step == 0:
            for n, p in lm.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        opt.step()
        n_refreshed = refresh_all(lm)
        if PLANS[name].memory_type == "ultramem":
            assert n_refreshed == len(lm.memories)  # each UltraMem once (the LM is a container)
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses  # ln(61) = 4.1 at the start


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PLANS))
def test_cuda_bf16_autocast_forward_backward(name):
    cfg = cfg_with(PLANS[name])
    torch.manual_seed(0)
    cpu = LM(cfg).eval()
    gpu = LM(cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    idx = torch.randint(0, V, (2, 12))
    tgt = torch.roll(idx, -1, dims=1)
    with torch.no_grad():
        ref = cpu(idx, tgt)
        fp32 = gpu(idx.cuda(), tgt.cuda())
    assert torch.allclose(fp32.logits.cpu(), ref.logits, atol=1e-4)
    gpu.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(idx.cuda(), tgt.cuda())
    assert out.loss.dtype == torch.float32 and abs(out.loss.item() - ref.loss.item()) < 0.05
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
    gpu.refresh_retrieval()
