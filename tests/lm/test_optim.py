"""labcore.lm.optim: role-based parameter groups, the value-LR schedule, refresh_all."""

import pytest
import torch
from torch import nn

from labcore.config import ConfigError
from labcore.layers.base import tag_param
from labcore.layers.pkm import PKM, PKMConfig
from labcore.lm.optim import ValueLRSchedule, apply_value_lr, build_param_groups, refresh_all

# ---------------------------------------------------------------------------------------------
# ValueLRSchedule
# ---------------------------------------------------------------------------------------------


def test_value_lr_factor_values():
    s = ValueLRSchedule(end_step=100)                     # release default M = 4
    assert s.multiplier == 4.0
    assert s.factor(0) == 4.0
    assert s.factor(25) == pytest.approx(1 + 3 * 0.75)
    assert s.factor(50) == pytest.approx(2.5)
    assert s.factor(100) == 1.0
    assert s.factor(101) == 1.0 and s.factor(10**9) == 1.0   # never below 1, never negative
    paper = ValueLRSchedule(10.0, end_step=8)
    assert [paper.factor(t) for t in (0, 2, 4, 8, 9)] == pytest.approx([10.0, 7.75, 5.5, 1.0, 1.0])
    flat = ValueLRSchedule(1.0, end_step=1)
    assert flat.factor(0) == flat.factor(1) == flat.factor(5) == 1.0
    factors = [s.factor(t) for t in range(0, 150)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


@pytest.mark.parametrize("kw,field", [
    (dict(multiplier=0.5, end_step=10), "multiplier"),
    (dict(multiplier=float("nan"), end_step=10), "multiplier"),
    (dict(end_step=0), "end_step"),
    (dict(end_step=-3), "end_step"),
    (dict(end_step=2.5), "end_step"),
])
def test_value_lr_schedule_validation(kw, field):
    with pytest.raises(ConfigError, match=f"ValueLRSchedule.{field}="):
        ValueLRSchedule(**kw)


def test_value_lr_schedule_bad_step_and_missing_end():
    s = ValueLRSchedule(end_step=10)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="step"):
            s.factor(bad)
    with pytest.raises(TypeError):
        ValueLRSchedule()                                  # end_step is required
    with pytest.raises(AttributeError):
        s.multiplier = 2.0                                 # frozen


# ---------------------------------------------------------------------------------------------
# build_param_groups
# ---------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """Linear + LayerNorm + two PKMs sharing one value table + a frozen matrix."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        cfg = PKMConfig(d_model=16, n_keys=6, heads=2, k_dim=8, top_k=3, d_value=8)
        table = nn.Embedding(cfg.n_slots, 8)
        self.mem1 = PKM(cfg, values=table)
        self.mem2 = PKM(PKMConfig(d_model=16, n_keys=6, heads=2, k_dim=8, top_k=3, d_value=8,
                                  query_norm="batchnorm"), values=table)
        self.frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.cores = tag_param(nn.Parameter(torch.randn(2, 2, 2)), "no_decay")

    def forward(self, x):
        h = self.ln(self.inp(x))
        return h + self.mem1(h)[0] + self.mem2(h)[0]


def test_groups_partition_trainable_parameters_by_role():
    model = Mixed()
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.1, value_lr=5e-3)
    by_role = {g["lr_role"]: g for g in groups}
    assert set(by_role) == {"default", "no_decay", "memory_values"}
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) == len(trainable) and set(ids) == trainable
    names = {id(p): n for n, p in model.named_parameters()}
    role_names = {role: {names[id(p)] for p in g["params"]} for role, g in by_role.items()}
    assert role_names["memory_values"] == {"mem1.values.weight"}          # shared table once
    assert role_names["default"] == {"inp.weight", "mem1.query.weight", "mem1.value_proj.weight",
                                     "mem2.query.weight", "mem2.value_proj.weight"}
    assert role_names["no_decay"] == {"inp.bias", "ln.weight", "ln.bias", "cores",
                                      "mem1.query.bias", "mem1.keys", "mem1.norm.weight", "mem1.norm.bias",
                                      "mem2.query.bias", "mem2.keys", "mem2.norm.weight", "mem2.norm.bias"}
    assert (by_role["default"]["lr"], by_role["default"]["weight_decay"]) == (1e-3, 0.1)
    assert (by_role["no_decay"]["lr"], by_role["no_decay"]["weight_decay"]) == (1e-3, 0.0)
    assert (by_role["memory_values"]["lr"], by_role["memory_values"]["weight_decay"]) == (5e-3, 0.0)
    assert all(g["base_lr"] == g["lr"] for g in groups)
    default_value_lr = build_param_groups(model, lr=2e-3, weight_decay=0.0, value_weight_decay=0.01)
    vg = [g for g in default_value_lr if g["lr_role"] == "memory_values"][0]
    assert (vg["lr"], vg["weight_decay"]) == (2e-3, 0.01)


def test_groups_skip_empty_roles_and_validate():
    groups = build_param_groups(nn.Linear(3, 3, bias=False), lr=0.1, weight_decay=0.0)
    assert [g["lr_role"] for g in groups] == ["default"]
    for kw, field in [(dict(lr=0.0, weight_decay=0.1), "lr"), (dict(lr=1e-3, weight_decay=-1.0), "weight_decay"),
                      (dict(lr=1e-3, weight_decay=0.0, value_lr=-1.0), "value_lr")]:
        with pytest.raises(ConfigError, match=f"{field}="):
            build_param_groups(nn.Linear(3, 3), **kw)


# ---------------------------------------------------------------------------------------------
# apply_value_lr
# ---------------------------------------------------------------------------------------------


def test_apply_value_lr_sets_each_group():
    model = Mixed()
    opt = torch.optim.AdamW(build_param_groups(model, lr=1e-3, weight_decay=0.1, value_lr=2e-3))
    sched = ValueLRSchedule(4.0, end_step=100)
    lrs = lambda: {g["lr_role"]: g["lr"] for g in opt.param_groups}  # noqa: E731
    apply_value_lr(opt, sched, step=0, lr_scale=0.5)
    assert lrs() == pytest.approx({"default": 5e-4, "no_decay": 5e-4, "memory_values": 2e-3 * 0.5 * 4})
    apply_value_lr(opt, sched, step=50)
    assert lrs() == pytest.approx({"default": 1e-3, "no_decay": 1e-3, "memory_values": 2e-3 * 2.5})
    apply_value_lr(opt, sched, step=500, lr_scale=0.1)
    assert lrs() == pytest.approx({"default": 1e-4, "no_decay": 1e-4, "memory_values": 2e-4})
    apply_value_lr(opt, None, step=0)
    assert lrs()["memory_values"] == pytest.approx(2e-3)
    assert all(g["base_lr"] == b for g, b in zip(opt.param_groups, (1e-3, 1e-3, 2e-3)))  # unchanged


def test_apply_value_lr_drives_the_update():
    model = Mixed()
    opt = torch.optim.SGD(build_param_groups(model, lr=0.01, weight_decay=0.0, value_lr=0.1))
    apply_value_lr(opt, ValueLRSchedule(10.0, end_step=4), step=1, lr_scale=0.5)   # factor 7.75
    x = torch.randn(5, 16)
    model(x).square().sum().backward()
    values, w = model.mem1.values.weight, model.inp.weight
    before = (values.detach().clone(), w.detach().clone())
    grads = (values.grad.clone(), w.grad.clone())
    opt.step()
    assert torch.allclose(values.detach(), before[0] - 0.1 * 0.5 * 7.75 * grads[0], atol=1e-7)
    assert torch.allclose(w.detach(), before[1] - 0.01 * 0.5 * grads[1], atol=1e-7)


def test_apply_value_lr_rejects_foreign_groups():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="base_lr"):
        apply_value_lr(opt, ValueLRSchedule(end_step=5), step=0)


# ---------------------------------------------------------------------------------------------
# refresh_all
# ---------------------------------------------------------------------------------------------


class FakeMemory(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calls = 0

    def refresh_retrieval(self):
        self.calls += 1


class FakeLM(nn.Module):
    """A container whose own refresh_retrieval delegates to refresh_all (must not recurse)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), FakeMemory()) for _ in range(3)])
        self.extra = FakeMemory()
        self.pkm = PKM(PKMConfig(d_model=4, n_keys=4, heads=1, k_dim=2, top_k=2))

    def refresh_retrieval(self):
        return refresh_all(self)


def test_refresh_all_calls_each_layer_once():
    lm = FakeLM()
    mems = [b[1] for b in lm.blocks] + [lm.extra]
    assert refresh_all(lm) == 4
    assert [m.calls for m in mems] == [1, 1, 1, 1]
    assert lm.refresh_retrieval() == 4                     # delegation, no recursion
    assert [m.calls for m in mems] == [2, 2, 2, 2]
    assert refresh_all(lm.extra) == 1 and lm.extra.calls == 3
    assert refresh_all(nn.Sequential(nn.Linear(2, 2), lm.pkm)) == 0
    assert refresh_all(nn.ModuleList([FakeMemory(), FakeMemory()])) == 2


# ---------------------------------------------------------------------------------------------
# Weight decay by kind ("default" / "release") and Memory+'s fixed value lr
# ---------------------------------------------------------------------------------------------


def _um_lm():
    from labcore.layers.ultramem import UltraMemConfig
    from labcore.lm.model import LM, ModelConfig, SparsePlan

    mem = UltraMemConfig(d_model=16, n_keys=4, heads=2, k_dim=4, top_k=2, d_value=8, n_cores=2, query_bias=True)
    return LM(ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=16, max_seq_len=8,
                          plan=SparsePlan(kind="memory", memory=mem, placements="0:1")))


def _wd_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}


def _expected_kind(name):
    last = name.rsplit(".", 1)[-1]
    if last in ("keys", "cores"):
        return last
    if last == "bias":
        return "bias"
    if last in ("query_gain", "key_gain") or "norm" in name:
        return "norms"
    if "values" in name:
        return "values"
    return "matrix"


@pytest.mark.parametrize("decay, decayed", [("default", {"matrix"}),
                                            ("release", {"matrix", "keys", "cores", "norms", "values"}),
                                            (["keys", "values"], {"matrix", "keys", "values"})])
def test_weight_decay_per_kind(decay, decayed):
    lm = _um_lm()
    groups = build_param_groups(lm, lr=1e-3, weight_decay=0.1, value_lr=4e-3, decay=decay)
    wd = _wd_by_name(lm, groups)
    kinds = {n: _expected_kind(n) for n in wd}
    assert set(kinds.values()) == {"keys", "cores", "norms", "values", "matrix", "bias"}
    assert "memories.0.query_gain" in wd and "blocks.0.norm_ffn.weight" in wd
    for name, kind in kinds.items():
        assert wd[name] == (0.1 if kind in decayed else 0.0), (name, kind)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(lm.parameters()))
    for g in groups:                                           # values keep the value lr, decayed or not
        assert g["lr"] == (4e-3 if g["lr_role"] == "memory_values" else 1e-3)
    if decay == "default":                                     # today's groups: exactly the three roles
        assert [g["lr_role"] for g in groups] == ["default", "no_decay", "memory_values"]


def test_release_decay_acts_at_each_groups_lr():
    """AdamW with zero gradients only decays: p <- p * (1 - lr * wd), values at the value lr."""
    lm = _um_lm()
    opt = torch.optim.AdamW(build_param_groups(lm, lr=1e-2, weight_decay=0.1, value_lr=5e-2, decay="release"))
    mem = lm.memories[0]
    before = {n: t.detach().clone() for n, t in (("values", mem.values.weight), ("keys", mem.keys),
                                                 ("gain", mem.query_gain), ("bias", mem.query.bias))}
    for p in lm.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(mem.values.weight.detach(), before["values"] * (1 - 5e-2 * 0.1))
    torch.testing.assert_close(mem.keys.detach(), before["keys"] * (1 - 1e-2 * 0.1))
    torch.testing.assert_close(mem.query_gain.detach(), before["gain"] * (1 - 1e-2 * 0.1))
    torch.testing.assert_close(mem.query.bias.detach(), before["bias"])       # biases never decayed


def test_value_weight_decay_override_and_bad_decay():
    lm = _um_lm()
    g = build_param_groups(lm, lr=1e-3, weight_decay=0.1, decay="release", value_weight_decay=0.0)
    assert [x["weight_decay"] for x in g if x["lr_role"] == "memory_values"] == [0.0]
    for bad in ("nosuch", ["keys", "bogus"], ["keys", "keys"], 3):
        with pytest.raises(ConfigError, match="decay="):
            build_param_groups(lm, lr=1e-3, weight_decay=0.1, decay=bad)


def test_train_config_weight_decay_kinds_reaches_the_optimizer():
    from labcore.lm.train import TrainConfig, build_optimizer

    lm = _um_lm()
    assert TrainConfig().weight_decay_kinds == "default"
    for kinds, key_wd in (("default", 0.0), ("release", 0.1), (["keys"], 0.1)):
        cfg = TrainConfig(weight_decay_kinds=kinds)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        opt = build_optimizer(lm, cfg, torch.device("cpu"))
        assert _wd_by_name(lm, opt.param_groups)["memories.0.keys"] == key_wd
    with pytest.raises(ConfigError, match="TrainConfig.weight_decay_kinds"):
        TrainConfig(weight_decay_kinds="paper")


def test_memory_plus_fixed_value_lr_group_ignores_every_schedule():
    from labcore.layers.memory_plus import MemoryPlus, MemoryPlusConfig

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fixed = MemoryPlus(MemoryPlusConfig(d_model=16, n_keys=4, heads=2, k_dim=8, top_k=2,
                                                     value_lr=1e-3))
            self.free = PKM(PKMConfig(d_model=16, n_keys=4, heads=2, k_dim=8, top_k=2))

    model = Two()
    groups = build_param_groups(model, lr=3e-4, weight_decay=0.1, value_lr=6e-4)
    by_role = {g["lr_role"]: g for g in groups}
    assert by_role["memory_values_fixed_lr"]["params"] == [model.fixed.values.weight]
    assert by_role["memory_values"]["params"] == [model.free.values.weight]
    assert by_role["memory_values_fixed_lr"]["lr"] == 1e-3
    opt = torch.optim.AdamW(groups)
    for step, scale in ((0, 0.01), (7, 0.5), (500, 0.1)):
        apply_value_lr(opt, ValueLRSchedule(4.0, end_step=10), step=step, lr_scale=scale)
        lrs = {g["lr_role"]: g["lr"] for g in opt.param_groups}
        assert lrs["memory_values_fixed_lr"] == 1e-3                          # constant
        assert lrs["memory_values"] == pytest.approx(6e-4 * scale * ValueLRSchedule(4.0, end_step=10).factor(step))
        assert lrs["default"] == pytest.approx(3e-4 * scale)
