"""The layer registry: every registered config builds its layer, which honours the contract; and a
memory variant registered in this file alone goes through the plan, the model, the budget matcher,
the equal-budget family and the inference bench."""

import dataclasses

import pytest
import torch

import labcore.bench.inference as inf
from labcore.config import ConfigError
from labcore.layers import (
    FFNConfig,
    LayerAux,
    MoEConfig,
    PKMConfig,
    UltraMemConfig,
    build,
)
from labcore.layers.pkm import PKM
from labcore.layers.registry import LAYERS, LayerSpec, get, names, register, spec_for, unregister
from labcore.lm.budget import describe_plan, equal_budget_family, family_names, match_memory, model_budget
from labcore.lm.model import LM, ModelConfig, SparsePlan
from labcore.profiling.ceilings import Ceilings

CONFIGS = [
    FFNConfig(d_model=16, d_hidden=32),
    MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2),
    PKMConfig(d_model=16, n_keys=8, heads=2, k_dim=8, top_k=4),
    UltraMemConfig(d_model=16, n_keys=8, heads=2, k_dim=8, top_k=4, d_value=8, expansion=4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_build_and_contract(cfg):
    torch.manual_seed(0)
    layer = build(cfg).eval()
    assert isinstance(layer, spec_for(cfg).layer)
    x = torch.randn(2, 3, 16)
    y, aux = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert isinstance(aux, LayerAux) and aux.aux_loss.dim() == 0
    # (N, D) input gives the same rows as (B, T, D).
    y2, _ = layer(x.reshape(6, 16))
    torch.testing.assert_close(y2, y.reshape(6, 16))
    # cost() counts the built layer's parameters exactly.
    assert cfg.cost().total_params == sum(p.numel() for p in layer.parameters())


def test_the_layers_register_in_order_with_distinct_colours_and_the_family_is_opt_in():
    assert names() == ("dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus", "peer")
    assert names("memory") == ("pkm", "ultramem", "ultramem_v2", "memory_plus", "peer")
    assert names("ffn") == ("dense", "moe")
    assert [get(n).label for n in names()[:4]] == ["Dense", "MoE", "PKM", "UltraMem"]
    assert len({get(n).color for n in names()}) == len(names())
    # Memories without family_kwargs are left out of the default family, but can be named.
    assert family_names() == ("dense", "moe", "pkm", "ultramem")
    assert family_names(every_memory=True) == ("dense", "moe", *names("memory"))


def test_unknown_configs_names_and_specs_are_rejected():
    with pytest.raises(ConfigError, match="dict"):
        build({"d_model": 16})
    with pytest.raises(ConfigError, match=r"'nope' is not allowed: must be one of"):
        get("nope")
    with pytest.raises(ConfigError, match="lower-case identifier"):
        LayerSpec(name="Bad-Name", role="memory", config=PKMConfig, layer=PKM, label="x", color="#000000")
    with pytest.raises(ConfigError, match="role='attention' is not allowed"):
        LayerSpec(name="x", role="attention", config=PKMConfig, layer=PKM, label="x", color="#000000")
    with pytest.raises(ConfigError, match="size_field='n_rows' is not allowed"):
        LayerSpec(name="x", role="memory", config=PKMConfig, layer=PKM, label="x", color="#000000",
                  size_field="n_rows")
    with pytest.raises(ConfigError, match="already registered as 'pkm'"):
        register(dataclasses.replace(get("pkm"), name="pkm_again"))
    with pytest.raises(ConfigError, match="SparsePlan.memory='FFNConfig' is not allowed: must be a registered "
                                          "memory"):
        SparsePlan(kind="memory", memory=CONFIGS[0], placements="0:0")


# ----------------------------------------------------------------------------------------------
# A variant registered here, and nowhere else.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyMemConfig(PKMConfig):
    """PKM under another name: enough to be a distinct registered memory."""


class TinyMem(PKM):
    pass


@pytest.fixture
def tinymem():
    spec = register(LayerSpec(name="tinymem", role="memory", config=TinyMemConfig, layer=TinyMem,
                              label="TinyMem", color="#123456", size_field="n_keys",
                              min_size=lambda kw: kw.get("top_k", 32),
                              family_kwargs=lambda D: {"heads": 1, "top_k": 4, "k_dim": D}))
    yield spec
    unregister("tinymem")
    assert "tinymem" not in LAYERS


BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, d_ff=128, max_seq_len=16)


def test_a_registered_variant_flows_through_plan_model_budget_and_bench(tinymem):
    # YAML / notebook parameters -> plan -> plain data -> the same plan.
    plan = SparsePlan.from_dict({"kind": "memory", "memory": {"type": "tinymem", "n_keys": 8, "heads": 2,
                                                               "k_dim": 16, "top_k": 4},
                                 "placements": "1:2"}, d_model=32)
    assert type(plan.memory) is TinyMemConfig and plan.memory_type == "tinymem"
    assert plan.to_dict()["memory"]["type"] == "tinymem"
    assert SparsePlan.from_dict(plan.to_dict()) == plan

    # The model builds the variant's layer and its parameters are what the budget counts.
    cfg = dataclasses.replace(BASE, plan=plan)
    torch.manual_seed(0)
    lm = LM(cfg).eval()
    assert [type(m) for _, m in lm.memory_layers()] == [TinyMem]
    out = lm(torch.randint(64, (2, 5)), torch.randint(64, (2, 5)))
    assert out.logits.shape == (2, 5, 64) and torch.isfinite(out.loss) and "mem0(1:2)" in out.aux
    assert model_budget(cfg).total_params == sum(p.numel() for p in lm.parameters())
    assert describe_plan(cfg).startswith("tinymem n_keys=8 heads=2 top_k=4 k_dim=16 @ 1:2")

    # The generic matcher sizes it; the equal-budget family and the bench list include it.
    target = 3 * model_budget(BASE).total_params
    matched = match_memory(BASE, target, "tinymem", heads=1, k_dim=16, top_k=4, multiple_of=4, tol=0.05)
    b = model_budget(matched)
    assert type(matched.plan.memory) is TinyMemConfig and matched.plan.placements == ("2:2",)
    assert abs(b.total_params - target) / target <= 0.05
    assert abs(b.flops_per_token - model_budget(BASE).flops_per_token) / model_budget(BASE).flops_per_token <= 0.05
    fam = equal_budget_family(BASE, ratio=2.0, multiple_of=4, tol=0.05, names=("dense", "tinymem"))
    assert list(fam) == ["dense", "tinymem"] and type(fam["tinymem"].plan.memory) is TinyMemConfig
    assert inf.model_names()[-1] == "tinymem"

    # The inference bench measures it (no value_read hook: the read columns stay empty).
    ceil = Ceilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e10, dtype="float32", device="cpu", fingerprint={},
                    copy_bytes=1, matmul_n=1, measured_at=0.0)
    df = inf.run_inference_bench([1, 2], configs={"tinymem": matched}, warmup=0, repeats=1, ceilings=ceil,
                                 log=None)
    assert set(df["model"]) == {"tinymem"} and (df["latency_s"] > 0).all() and df["read_s"].isna().all()
    assert "TinyMem ms" in inf.format_table(df)


def test_unregistered_variant_is_gone(tinymem):
    unregister("tinymem")
    with pytest.raises(ConfigError, match="'tinymem' is not allowed"):
        SparsePlan.from_dict({"kind": "memory", "memory": {"type": "tinymem", "n_keys": 8}, "placements": "0:0"},
                             d_model=32)
    register(tinymem)  # for the fixture's teardown
