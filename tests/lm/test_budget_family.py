"""The memory family in labcore.lm.budget: UltraMemV2, Memory+ and PEER sized by the generic matcher
from their registered ``family_kwargs`` / ``layout``, checked by building the models and counting
their parameters, and the family named member by member (the default family stays dense, MoE, PKM,
UltraMem)."""

from __future__ import annotations

import pytest
import torch

from labcore.config import ConfigError
from labcore.layers.memory_plus import MemoryPlusConfig
from labcore.layers.peer import PEERConfig
from labcore.layers.registry import get, names
from labcore.layers.ultramem_v2 import UltraMemV2Config
from labcore.lm.budget import (
    NAMED_ONLY,
    equal_budget_family,
    family_names,
    format_budget_table,
    match_memory,
    memory_family_names,
    model_budget,
    small_base_config,
)
from labcore.lm.model import LM, ModelConfig

BASE = ModelConfig(vocab_size=128, d_model=64, n_layers=4, n_heads=2, d_ff=256, max_seq_len=16)
NEW = ("ultramem_v2", "memory_plus", "peer")


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared tensors once (parameters() dedups)


@pytest.mark.parametrize("name", NEW)
def test_each_new_memory_is_matched_within_2pct_and_its_budget_counts_the_built_model(name):
    dense = model_budget(BASE)
    target = 5 * dense.total_params
    spec = get(name)
    cfg = match_memory(BASE, target, name, **spec.family_kwargs(BASE.d_model), multiple_of=4)
    b = model_budget(cfg)
    assert cfg.plan.memory_type == name and 0 < cfg.d_ff < BASE.d_ff and cfg.d_ff % 4 == 0
    assert rel(b.total_params, target) <= 0.02
    assert rel(b.flops_per_token, dense.flops_per_token) <= 0.02
    torch.manual_seed(0)
    lm = LM(cfg).eval()
    assert count_params(lm) == b.total_params  # the budget counts the built model exactly
    idx = torch.randint(BASE.vocab_size, (2, 8))
    with torch.no_grad():
        out = lm(idx, idx)
    assert torch.isfinite(out.loss)

    # placements from the spec's layout, bytes per token by hand (2 bytes per parameter)
    mem = cfg.plan.memory
    if name == "ultramem_v2":   # one memory beside every block's FFN; H*K rows of D_v + D_p each
        assert isinstance(mem, UltraMemV2Config) and not cfg.plan.shared_values
        assert cfg.plan.placements == ("0:0", "1:1", "2:2", "3:3")
        assert (mem.heads, mem.top_k, mem.k_dim, mem.d_v, mem.d_p) == (1, 32, 16, 16, 16)
        assert b.sparse_bytes_per_token == 2 * 4 * (1 * 32) * (16 + 16)
    elif name == "memory_plus":  # three memories, one shared pool of n^2 rows of width D
        assert isinstance(mem, MemoryPlusConfig) and cfg.plan.shared_values
        assert cfg.plan.placements == ("0:0", "1:1", "2:2")
        assert (mem.heads, mem.top_k, mem.k_dim, mem.d_v) == (4, 32, 32, 64)
        assert sum(p.numel() for n, p in lm.named_parameters() if "values" in n) == mem.n_keys ** 2 * 64
        assert b.sparse_bytes_per_token == 2 * 3 * (4 * 32) * 64
    else:                        # one PEER beside the middle block; H*K experts of u_i and v_i
        assert isinstance(mem, PEERConfig) and cfg.plan.placements == ("2:2",)
        assert (mem.heads, mem.top_k, mem.k_dim) == (8, 16, 32)
        assert b.sparse_bytes_per_token == 2 * (8 * 16) * (2 * 64)


def test_the_default_family_is_unchanged_and_the_new_memories_join_by_name():
    assert family_names() == ("dense", "moe", "pkm", "ultramem")
    assert memory_family_names() == ("dense", "moe", *names("memory"))
    assert set(NAMED_ONLY) == set(NEW) and all(get(n).family_kwargs is not None for n in NEW)
    fam = equal_budget_family(BASE, ratio=4.0, multiple_of=4)
    assert list(fam) == ["dense", "moe", "pkm", "ultramem"]
    with pytest.raises(ConfigError, match=r"layer 'nosuch' is not allowed: must be one of"):
        equal_budget_family(BASE, ratio=4.0, names=("dense", "nosuch"))


def test_the_whole_memory_family_by_name_is_matched_and_counted():
    fam = equal_budget_family(BASE, ratio=4.0, multiple_of=4, names=memory_family_names())
    assert list(fam) == ["dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus", "peer"]
    assert fam["dense"] is BASE
    dense = model_budget(BASE)
    target = 5 * dense.total_params
    for name, cfg in fam.items():
        b = model_budget(cfg)
        assert count_params(LM(cfg)) == b.total_params, name
        assert rel(b.flops_per_token, dense.flops_per_token) <= 0.02, name
        if name != "dense":
            assert rel(b.total_params, target) <= 0.02, name
    # per-name keywords still override a spec's family_kwargs
    only = equal_budget_family(BASE, ratio=4.0, multiple_of=4, names=("peer",), peer={"heads": 2})
    assert list(only) == ["peer"] and only["peer"].plan.memory.heads == 2


def test_the_lab_default_memory_family_within_2pct():
    """The lab's small base (D = 128, L = 8) at the paper's "x12": the configs the memory-family
    notebook trains (budgets only; building them is ~28M parameters each)."""
    base = small_base_config()
    fam = equal_budget_family(base, names=memory_family_names())  # ratio 12
    dense = model_budget(base)
    target = 13 * dense.total_params
    for name in NEW:
        b = model_budget(fam[name])
        assert rel(b.total_params, target) <= 0.02, name
        assert rel(b.flops_per_token, dense.flops_per_token) <= 0.02, name
        assert fam[name].d_ff % 8 == 0 and fam[name].d_ff < base.d_ff
    assert fam["ultramem_v2"].plan.placements == tuple(f"{i}:{i}" for i in range(8))
    table = format_budget_table(fam)
    for name in fam:
        assert f"\n{name} " in table
