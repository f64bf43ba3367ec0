"""labcore MoE == Hugging Face transformers MoE blocks with copied weights: outputs and gradients
(w.r.t. the input and every weight) within 1e-5 in float32, in both conversion directions."""

import pytest
import torch

pytest.importorskip("transformers")

from labcore.interop import HF_TRANSPOSED, hf_parameter_names, moe_config_from_hf, moe_from_hf, moe_to_hf  # noqa: E402
from labcore.layers.moe import MoE, MoEConfig  # noqa: E402

D, I, E, K = 16, 8, 6, 2
TOL = dict(rtol=1e-5, atol=1e-5)

# labcore name -> HF name, written out here independently of interop's own table
MAPS = {
    "mixtral": {"router.weight": "gate.weight", "gate_up_proj": "experts.gate_up_proj",
                "down_proj": "experts.down_proj"},
    "olmoe": {"router.weight": "gate.weight", "gate_up_proj": "experts.gate_up_proj",
              "down_proj": "experts.down_proj"},
    "granitemoe": {"router.weight": "router.weight", "gate_up_proj": "experts.gate_up_proj",
                   "down_proj": "experts.down_proj"},
    "qwen2_moe": {"router.weight": "gate.weight", "gate_up_proj": "experts.gate_up_proj",
                  "down_proj": "experts.down_proj", "shared.w_gate.weight": "shared_expert.gate_proj.weight",
                  "shared.w_up.weight": "shared_expert.up_proj.weight",
                  "shared.w_out.weight": "shared_expert.down_proj.weight",
                  "shared_gate.weight": "shared_expert_gate.weight"},
}
ROUTER = {"mixtral": "softmax_topk_renorm", "granitemoe": "topk_softmax", "olmoe": "softmax_topk",
          "qwen2_moe": "softmax_topk"}


def hf_block(kind: str, norm_topk_prob: bool = False):
    """A tiny HF block with uninitialised (torch.empty) experts, eager experts implementation."""
    common = dict(hidden_size=D, num_experts_per_tok=K, experts_implementation="eager")
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        return MixtralSparseMoeBlock(MixtralConfig(intermediate_size=I, num_local_experts=E, **common))
    if kind == "granitemoe":
        from transformers import GraniteMoeConfig
        from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE
        return GraniteMoeMoE(GraniteMoeConfig(intermediate_size=I, num_local_experts=E, **common))
    if kind == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
        return OlmoeSparseMoeBlock(OlmoeConfig(intermediate_size=I, num_experts=E, norm_topk_prob=norm_topk_prob,
                                               **common))
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(moe_intermediate_size=I, shared_expert_intermediate_size=12,
                                                 num_experts=E, norm_topk_prob=norm_topk_prob, **common))


def randomise(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def compare(moe: MoE, block, kind: str):
    """Same input and upstream gradient through both; outputs and all gradients must agree."""
    x = torch.randn(2, 9, D)
    g = torch.randn(2, 9, D)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, aux = moe(xa)
    yb = block(xb)
    torch.testing.assert_close(ya, yb, **TOL)
    assert aux.stats["dropped_tokens"] == 0.0
    names = MAPS[kind]
    ours = dict(moe.named_parameters())
    theirs = dict(block.named_parameters())
    assert set(ours) == set(names) and set(theirs) == set(names.values())
    ga = torch.autograd.grad(ya, [xa, *(ours[n] for n in names)], g)
    gb = torch.autograd.grad(yb, [xb, *(theirs[names[n]] for n in names)], g)
    for label, a, b in zip(["input", *names], ga, gb):
        assert a.abs().sum() > 0, label
        if label in HF_TRANSPOSED:  # labcore keeps these as x @ W, HF as nn.Linear weights
            b = b.transpose(1, 2)
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, label=label: f"{label}: {m}")
    return aux


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "granitemoe", "olmoe"])
def test_from_hf(kind):
    block = hf_block(kind)
    randomise(block)
    moe = moe_from_hf(block)
    assert moe.cfg.router == ROUTER[kind]
    assert (moe.cfg.n_experts, moe.cfg.top_k, moe.cfg.d_expert, moe.cfg.d_model) == (E, K, I, D)
    assert moe.cfg.shared_gate == (kind == "qwen2_moe")
    assert hf_parameter_names(block) == MAPS[kind]
    compare(moe, block, kind)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "granitemoe", "olmoe"])
def test_to_hf(kind):
    block = hf_block(kind)  # experts hold whatever torch.empty left there until moe_to_hf overwrites them
    moe = MoE(moe_config_from_hf(block, init_std=0.3))
    assert moe_to_hf(moe, block) is block
    compare(moe, block, kind)


@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe"])
def test_norm_topk_prob_true_is_renorm(kind):
    block = hf_block(kind, norm_topk_prob=True)
    randomise(block)
    moe = moe_from_hf(block)
    assert moe.cfg.router == "softmax_topk_renorm"
    compare(moe, block, kind)


def test_topk_softmax_layer_copies_into_mixtral():
    """topk_softmax and softmax_topk_renorm are the same function: allowed, and outputs agree."""
    moe = MoE(MoEConfig(d_model=D, d_expert=I, n_experts=E, top_k=K, router="topk_softmax", init_std=0.3))
    block = moe_to_hf(moe, hf_block("mixtral"))
    compare(moe, block, "mixtral")


def test_to_hf_refuses_a_different_function():
    block = hf_block("mixtral")
    for kw, word in [(dict(router="softmax_topk"), "router"), (dict(capacity_factor=1.25), "capacity_factor"),
                     (dict(routed_scaling=2.0), "routed_scaling"), (dict(n_experts=E + 1), "n_experts"),
                     (dict(n_shared_experts=1), "shared_hidden")]:
        moe = MoE(MoEConfig(**{**dict(d_model=D, d_expert=I, n_experts=E, top_k=K), **kw}))
        with pytest.raises(ValueError, match=word):
            moe_to_hf(moe, block)
    with pytest.raises(ValueError, match="shared_gate"):
        moe_to_hf(MoE(MoEConfig(d_model=D, d_expert=I, n_experts=E, top_k=K, n_shared_experts=1, d_shared=12)),
                  hf_block("qwen2_moe"))
    with pytest.raises(ValueError, match="not supported"):
        moe_from_hf(torch.nn.Linear(D, D))


def test_overrides_and_capacity_from_hf():
    block = hf_block("mixtral")
    randomise(block)
    moe = moe_from_hf(block, balance_coef=0.1, capacity_factor=0.5)
    assert moe.cfg.balance_coef == 0.1 and moe.cfg.capacity_factor == 0.5
    _, aux = moe(torch.randn(20, D))
    assert aux.stats["dropped_tokens"] > 0


def test_balance_loss_is_hf_value_divided_by_k():
    """HF's load_balancing_loss_func normalises f per top-k slot: its value is K times labcore's."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    block = hf_block("mixtral")
    randomise(block)
    moe = moe_from_hf(block)
    x = torch.randn(40, D)
    _, aux = moe(x)
    logits = x @ block.gate.weight.T
    hf = load_balancing_loss_func((logits,), num_experts=E, top_k=K)
    assert aux.losses["balance"].item() == pytest.approx(hf.item() / K, rel=1e-5)
