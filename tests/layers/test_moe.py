"""MoE: fast path vs the per-token reference (every router, capacity mode, shared experts), router
identities, aux losses against hand-computed values, determinism, cost and config errors."""

import math

import pytest
import torch

import labcore.layers.fast.experts as fast_experts
from labcore.config import ConfigError
from labcore.layers.base import LayerAux
from labcore.layers.moe import (
    ROUTERS,
    MoE,
    MoEConfig,
    expert_blocks,
    expert_capacity,
    moe_reference,
    plan_padded_groups,
)

D, I, E, K = 16, 8, 6, 2


def make(**kw) -> MoE:
    base = dict(d_model=D, d_expert=I, n_experts=E, top_k=K, init_std=0.3)
    base.update(kw)
    return MoE(MoEConfig(**base))


def grads(layer, x, out):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    params = [p for _, p in layer.named_parameters()]
    return torch.autograd.grad(out, [x, *params], g)


# ---------------------------------------------------------------------------------------------
# Fast path == per-token reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("impl", ["auto", "padded_bmm", "grouped_mm", "loop"])
def test_fast_path_matches_reference(router, capacity_factor, impl):
    layer = make(router=router, capacity_factor=capacity_factor, routed_scaling=1.7, n_shared_experts=1,
                 shared_gate=True, expert_impl=impl)
    x = torch.randn(3, 8, D, requires_grad=True)
    y, aux = layer(x)
    ref = moe_reference(layer, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref.y, rtol=1e-5, atol=1e-5)
    assert torch.equal(aux.indices, ref.indices)
    torch.testing.assert_close(aux.scores, ref.scores, rtol=1e-6, atol=1e-6)
    assert aux.stats["dropped_tokens"] == ref.dropped
    if capacity_factor is not None:
        assert ref.dropped > 0  # the case really drops something
    for gf, gr in zip(grads(layer, x, y), grads(layer, x, ref.y)):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [dict(), dict(n_shared_experts=2), dict(n_shared_experts=1, d_shared=24)])
def test_shared_variants_match_reference(shared):
    layer = make(**shared)
    x = torch.randn(20, D)
    torch.testing.assert_close(layer(x)[0], moe_reference(layer, x).y, rtol=1e-5, atol=1e-5)
    if shared:
        want = shared.get("d_shared", 2 * I)
        assert layer.shared.w_gate.weight.shape == (want, D)


@pytest.mark.parametrize("impl", ["auto", "padded_bmm", "grouped_mm", "loop"])
def test_wide_experts_match_reference(impl):
    """I > D: the routing weight scales the (rows, D) output instead of the (rows, I) activation."""
    layer = make(d_expert=24, expert_impl=impl, capacity_factor=0.9)
    x = torch.randn(2, 9, D, requires_grad=True)
    y, aux = layer(x)
    ref = moe_reference(layer, x)
    torch.testing.assert_close(y, ref.y, rtol=1e-5, atol=1e-5)
    for gf, gr in zip(grads(layer, x, y), grads(layer, x, ref.y)):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5)


def test_impl_resolution_on_cpu():
    x32, x64 = torch.randn(30, D), torch.randn(30, D, dtype=torch.float64)
    layer, layer64 = make(), make().double()
    with torch.no_grad():  # inference: auto -> padded_bmm (bmm has float64 kernels too)
        assert layer._resolve_impl(x32) == "padded_bmm"
        assert layer64._resolve_impl(x64) == "padded_bmm"
    with torch.inference_mode():
        assert layer._resolve_impl(x32) == "padded_bmm"
    # training (an autograd graph is recorded): auto -> grouped_mm, or loop where it has no kernel
    assert layer._resolve_impl(x32) == "grouped_mm"
    assert layer64._resolve_impl(x64) == "loop"
    assert make(expert_impl="padded_bmm")._resolve_impl(x32) == "padded_bmm"
    assert make(expert_impl="grouped_mm")._resolve_impl(x32) == "grouped_mm"
    with torch.no_grad():
        assert make(expert_impl="loop")._resolve_impl(x32) == "loop"
    with pytest.raises(RuntimeError, match="grouped_mm"):  # no float64 grouped_mm kernel
        make(expert_impl="grouped_mm").double()(x64)


@pytest.mark.parametrize("router", ROUTERS)
def test_inference_path_matches_reference(router):
    """auto under inference_mode (the padded_bmm path) equals the reference and the training path."""
    layer = make(router=router, capacity_factor=0.8, n_shared_experts=1)
    x = torch.randn(4, 16, D)
    train_y = layer(x)[0]
    with torch.inference_mode():
        y, aux = layer(x)
    ref = moe_reference(layer, x)
    torch.testing.assert_close(y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, train_y, rtol=1e-6, atol=1e-6)
    assert torch.equal(aux.indices, ref.indices) and aux.stats["dropped_tokens"] == ref.dropped


@pytest.mark.parametrize("impl", ["auto", "loop"])
def test_float64_matches_reference_tightly(impl):
    layer = make(capacity_factor=1.0, expert_impl=impl).double()
    x = torch.randn(30, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], moe_reference(layer, x).y, rtol=1e-12, atol=1e-12)


def test_expert_paths_agree():
    """padded_bmm (CPU default), grouped_mm and the one-expert loop: same outputs and gradients."""
    torch.manual_seed(3)
    layers = {impl: make(expert_impl=impl) for impl in ("padded_bmm", "grouped_mm", "loop")}
    for layer in layers.values():
        layer.load_state_dict(layers["loop"].state_dict())
    x = torch.randn(64, D, requires_grad=True)
    outs = {impl: layer(x)[0] for impl, layer in layers.items()}
    want = grads(layers["loop"], x, outs["loop"])
    for impl in ("padded_bmm", "grouped_mm"):
        torch.testing.assert_close(outs[impl], outs["loop"], rtol=1e-6, atol=1e-6)
        for ga, gb in zip(grads(layers[impl], x, outs[impl]), want):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_expert_blocks_hand_example():
    sizes = [3, 0, 4, 2, 0, 5]  # rows per expert, 14 in all
    assert expert_blocks(6, 14, None, None) == [(0, 6, 0, 14)]
    assert expert_blocks(6, 14, sizes, 0) == [(0, 1, 0, 3), (2, 3, 3, 7), (3, 4, 7, 9), (5, 6, 9, 14)]
    # greedy: add experts while the block has <= 6 rows; an expert larger than that gets its own block
    assert expert_blocks(6, 14, sizes, 6) == [(0, 2, 0, 3), (2, 5, 3, 9), (5, 6, 9, 14)]
    assert expert_blocks(6, 14, sizes, 2) == [(0, 1, 0, 3), (2, 3, 3, 7), (3, 5, 7, 9), (5, 6, 9, 14)]
    assert expert_blocks(3, 0, [0, 0, 0], 4) == []


@pytest.mark.parametrize("impl", ["padded_bmm", "grouped_mm"])
@pytest.mark.parametrize("block_rows", [1, 5, 13])
def test_cpu_blocks_match_reference(monkeypatch, block_rows, impl):
    """Small CPU blocks (several GEMM groups per product) give the same outputs and gradients."""
    monkeypatch.setattr(fast_experts, "CPU_BLOCK_BYTES", block_rows * 2 * I * 4)
    monkeypatch.setattr(fast_experts, "PADDED_BLOCK_BYTES", block_rows * 2 * I * 4 // torch.get_num_threads())
    layer = make(capacity_factor=1.2, expert_impl=impl)
    x = torch.randn(3, 8, D, requires_grad=True)
    with torch.no_grad():  # inference: the blocked paths
        y, aux = layer(x)
    ref = moe_reference(layer, x)
    torch.testing.assert_close(y, ref.y, rtol=1e-5, atol=1e-5)
    assert aux.stats["dropped_tokens"] == ref.dropped
    y, aux = layer(x)  # training: padded_bmm still blocked, grouped_mm in one block
    for gf, gr in zip(grads(layer, x, y), grads(layer, x, ref.y)):
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5)


def test_grouped_mm_blocks_only_in_cpu_inference(monkeypatch):
    calls = []
    real = fast_experts.expert_blocks
    monkeypatch.setattr(fast_experts, "expert_blocks", lambda *a: calls.append(a[3]) or real(*a))
    layer = make(expert_impl="grouped_mm")
    x = torch.randn(40, D)
    layer(x)
    with torch.inference_mode():
        layer(x)
    assert calls[0] is None and calls[1] == fast_experts.CPU_BLOCK_BYTES // (2 * I * 4)


def test_padded_groups_hand_example():
    sizes = [3, 0, 4, 4, 0, 5, 1]
    # one thread, no fixed cost: padding only costs, so every expert is its own group ...
    assert plan_padded_groups(sizes, 100, threads=1, overhead_rows=0) == [
        (0, 1, 3), (2, 3, 4), (3, 4, 4), (5, 6, 5), (6, 7, 1)]
    # ... a fixed cost per group merges neighbours of similar size ...
    assert plan_padded_groups(sizes, 100, threads=1, overhead_rows=2) == [
        (0, 1, 3), (2, 4, 4), (5, 6, 5), (6, 7, 1)]  # [4, 4]: 8 + 2 < 2 * (4 + 2); [5, 1]: 10 + 2 > 6 + 4
    assert plan_padded_groups(sizes, 100, threads=1, overhead_rows=5) == [
        (0, 1, 3), (2, 4, 4), (5, 7, 5)]  # [5, 1]: 10 + 5 < 6 + 10
    # ... two threads: a pair costs R * 2, a single 1.15 R: [4, 4] pairs, [5, 1] stays split ...
    assert plan_padded_groups(sizes, 100, threads=2, overhead_rows=0) == [
        (0, 1, 3), (2, 4, 4), (5, 6, 5), (6, 7, 1)]
    # ... unless single GEMMs are large enough to split well (R >= split_rows: cost R, a tie)
    assert plan_padded_groups([4, 4], 100, threads=2, overhead_rows=0, split_rows=3) == [(0, 1, 4), (1, 2, 4)]
    # ... and the row cap: a group's n * R <= max_rows (a lone expert may exceed it)
    assert plan_padded_groups(sizes, 7, threads=2, overhead_rows=0) == [
        (0, 1, 3), (2, 3, 4), (3, 4, 4), (5, 6, 5), (6, 7, 1)]
    # few tokens, many empty experts: one group pads the empty ones (6 rows + 10 < 3 * 11.15) ...
    assert plan_padded_groups([1, 0, 0, 1, 0, 1, 0, 0], 100, threads=2, overhead_rows=10) == [(0, 6, 1)]
    # ... within max_group experts per group
    assert plan_padded_groups([1, 0, 0, 1, 0, 1, 0, 0], 100, threads=2, overhead_rows=10, max_group=4) == [
        (0, 4, 1), (5, 6, 1)]
    assert plan_padded_groups([0, 0], 8, threads=2) == []


def _plan_cost(groups, sizes, threads, overhead, split_rows):
    cost = 0.0
    for e0, e1 in groups:
        n, R = e1 - e0, max(sizes[e0:e1])
        if R:
            single = 1.15 if threads > 1 and R < split_rows else 1.0
            cost += R * (single if n == 1 else -(-n // threads) * threads) + overhead
    return cost


def _brute_force_plan_cost(sizes, max_rows, threads, max_group, overhead, split_rows):
    """Cheapest cost over every split of the experts into consecutive runs (slow, obviously right);
    a run of empty experts is no group and costs nothing."""
    import itertools
    E, best = len(sizes), math.inf
    for cuts in itertools.product([False, True], repeat=max(E - 1, 0)):
        bounds = [0] + [e for e, cut in enumerate(cuts, start=1) if cut] + [E]
        runs = list(zip(bounds[:-1], bounds[1:]))
        ok = all(max(sizes[a:b]) == 0 or (b - a <= max_group and (b - a == 1 or (b - a) * max(sizes[a:b]) <= max_rows))
                 for a, b in runs)
        if ok:
            best = min(best, _plan_cost(runs, sizes, threads, overhead, split_rows))
    return best


@pytest.mark.parametrize("seed", range(16))
def test_padded_groups_are_optimal_and_cover_every_row(seed):
    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 10, (), generator=g))
    sizes = torch.randint(0, 12, (E,), generator=g).tolist()
    sizes = [0 if torch.rand((), generator=g) < 0.3 else s for s in sizes]
    threads, overhead = int(torch.randint(1, 4, (), generator=g)), float(torch.randint(0, 12, (), generator=g))
    max_rows, max_group = int(torch.randint(4, 40, (), generator=g)), int(torch.randint(1, 6, (), generator=g))
    split_rows = [math.inf, 6.0][seed % 2]
    groups = plan_padded_groups(sizes, max_rows, threads, max_group=max_group, overhead_rows=overhead,
                                split_rows=split_rows)
    covered = [e for e0, e1, _ in groups for e in range(e0, e1) if sizes[e] > 0]
    assert covered == [e for e in range(E) if sizes[e] > 0]  # every expert with rows once, in order
    assert all(a0 < a1 <= b0 for (a0, a1, _), (b0, _, _) in zip(groups, groups[1:]))  # disjoint, in order
    for e0, e1, R in groups:
        n = e1 - e0
        assert R == max(sizes[e0:e1]) > 0 and n <= max_group and (n == 1 or n * R <= max_rows)
    cost = _plan_cost([(e0, e1) for e0, e1, _ in groups], sizes, threads, overhead, split_rows)
    assert cost == pytest.approx(_brute_force_plan_cost(sizes, max_rows, threads, max_group, overhead, split_rows))


# ---------------------------------------------------------------------------------------------
# Capacity mode
# ---------------------------------------------------------------------------------------------

def test_capacity_formula():
    cfg = MoEConfig(d_model=D, d_expert=I, n_experts=6, top_k=2, capacity_factor=1.25)
    assert expert_capacity(cfg, 24) == 10  # 1.25 * 24 * 2 / 6 = 10 exactly
    assert expert_capacity(cfg, 25) == 11  # 10.42 -> 11
    assert expert_capacity(MoEConfig(d_model=D, d_expert=I, n_experts=E, top_k=K), 24) is None


@pytest.mark.parametrize("cf", [0.3, 0.8, 1.0, 2.0])
def test_dropped_count_and_earlier_tokens_win(cf):
    layer = make(capacity_factor=cf)
    x = torch.randn(2, 20, D)
    _, aux = layer(x)
    N = 40
    C = math.ceil(cf * N * K / E)
    assert aux.stats["capacity"] == C
    # independent count: every expert beyond its capacity drops its surplus
    per_expert = [0] * E
    for t in range(N):
        for j in range(K):
            per_expert[int(aux.indices[t, j])] += 1
    assert aux.stats["dropped_tokens"] == sum(max(0, c - C) for c in per_expert)
    assert aux.counts.tolist() == per_expert
    # which assignments were dropped: for every expert, exactly those after its first C (token order)
    seen = [0] * E
    for t in range(N):
        for j in range(K):
            e = int(aux.indices[t, j])
            seen[e] += 1
            assert (aux.scores[t, j] == 0).item() == (seen[e] > C), (t, j, e)


def test_capacity_drop_on_a_forced_routing():
    """All tokens prefer expert 0 (then 1): with C = 2 only tokens 0 and 1 reach expert 0."""
    layer = make(n_experts=4, top_k=1, capacity_factor=1.0)  # C = ceil(1 * 8 * 1 / 4) = 2
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(8, D).abs() + 0.1  # positive first feature: logit of expert 0 is largest
    y, aux = layer(x)
    assert aux.indices[:, 0].tolist() == [0] * 8
    assert aux.stats["dropped_tokens"] == 6.0
    assert (aux.scores[:2, 0] > 0).all() and (aux.scores[2:, 0] == 0).all()
    assert (y[2:] == 0).all() and (y[:2].abs().sum(-1) > 0).all()  # residual passthrough: zero output


def test_dropless_never_drops():
    layer = make()
    _, aux = layer(torch.randn(50, D))
    assert aux.stats["dropped_tokens"] == 0.0 and "capacity" not in aux.stats
    assert (aux.scores > 0).all()


# ---------------------------------------------------------------------------------------------
# Router conventions
# ---------------------------------------------------------------------------------------------

def test_topk_softmax_equals_softmax_topk_renorm_forward_and_backward():
    a = make(router="softmax_topk_renorm", n_shared_experts=1, shared_gate=True)
    b = make(router="topk_softmax", n_shared_experts=1, shared_gate=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 6, D, requires_grad=True)
    ya, auxa = a(x)
    yb, auxb = b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    assert torch.equal(auxa.indices, auxb.indices)
    torch.testing.assert_close(auxa.scores, auxb.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(auxa.scores.sum(-1), torch.ones(24), rtol=0, atol=1e-6)
    for ga, gb in zip(grads(a, x, ya), grads(b, x, yb)):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_softmax_topk_is_the_unrenormalised_probability():
    layer = make(router="softmax_topk", routed_scaling=2.5)
    x = torch.randn(12, D)
    _, aux = layer(x)
    probs = torch.softmax(x.double() @ layer.router.weight.double().T, -1)
    want = 2.5 * probs.gather(1, aux.indices)
    torch.testing.assert_close(aux.scores.double(), want, rtol=1e-5, atol=1e-6)
    assert (aux.scores.sum(-1) < 2.5).all()
    # the chosen experts are the K most probable ones
    assert torch.equal(aux.indices.sort(-1).values, probs.topk(K, -1).indices.sort(-1).values)


@pytest.mark.parametrize("router", ROUTERS)
def test_routed_scaling_scales_the_routed_output(router):
    a = make(router=router)
    b = make(router=router, routed_scaling=3.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, D)
    torch.testing.assert_close(b(x)[0], 3.0 * a(x)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Aux losses
# ---------------------------------------------------------------------------------------------

def _two_expert_layer(balance_coef=0.01, z_coef=0.001) -> MoE:
    layer = MoE(MoEConfig(d_model=2, d_expert=4, n_experts=2, top_k=1, balance_coef=balance_coef, z_coef=z_coef))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))  # logits = x
    return layer


def test_balance_and_z_loss_hand_computed():
    layer = _two_expert_layer()
    ln3 = math.log(3.0)
    x = torch.tensor([[ln3, 0.0], [ln3, 0.0]])  # probs (3/4, 1/4) twice: both tokens pick expert 0
    _, aux = layer(x)
    # f = (1, 0), P = (3/4, 1/4): L_bal = E * sum f_i P_i = 2 * 3/4
    assert aux.losses["balance"].item() == pytest.approx(1.5, abs=1e-6)
    # logsumexp(ln 3, 0) = ln 4 for both tokens
    assert aux.losses["z"].item() == pytest.approx(math.log(4.0) ** 2, abs=1e-6)
    assert aux.aux_loss.item() == pytest.approx(0.01 * 1.5 + 0.001 * math.log(4.0) ** 2, abs=1e-7)


def test_balance_minimum_alpha_at_uniform_routing():
    layer = _two_expert_layer(balance_coef=0.05, z_coef=0.0)
    ln3 = math.log(3.0)
    x = torch.tensor([[ln3, 0.0], [0.0, ln3]])  # one token per expert: f = P = (1/2, 1/2)
    _, aux = layer(x)
    assert aux.losses["balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert aux.aux_loss.item() == pytest.approx(0.05, abs=1e-8)
    # uniform router probabilities for many experts and K: value 1 whatever the tie-breaking gives
    big = make(n_experts=8, top_k=3, balance_coef=0.02, z_coef=0.0)
    with torch.no_grad():
        big.router.weight.zero_()
    _, aux = big(torch.randn(40, D))
    assert aux.losses["balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert aux.aux_loss.item() == pytest.approx(0.02, abs=1e-8)
    assert aux.losses["z"].item() == pytest.approx(math.log(8.0) ** 2, abs=1e-5)


def test_z_loss_value_and_balance_formula_on_random_input():
    layer = make(n_experts=5, top_k=2, balance_coef=0.3, z_coef=0.7)
    x = torch.randn(33, D)
    _, aux = layer(x)
    logits = x.double() @ layer.router.weight.double().T
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    assert aux.losses["z"].item() == pytest.approx(z.item(), rel=1e-5)
    f = torch.bincount(logits.topk(2, -1).indices.flatten(), minlength=5).double() / (33 * 2)
    P = torch.softmax(logits, -1).mean(0)
    bal = 5 * (f * P).sum()
    assert aux.losses["balance"].item() == pytest.approx(bal.item(), rel=1e-5)
    assert aux.aux_loss.item() == pytest.approx(0.3 * bal.item() + 0.7 * z.item(), rel=1e-5)


def test_z_loss_equals_logsumexp_in_value_and_gradient_even_for_large_logits():
    """labcore computes logsumexp as l_top1 - log p_top1 (reusing the softmax): same value and
    gradient (p) as torch.logsumexp, also where exp(l) overflows float32."""
    for scale, router in ((1.0, "softmax_topk_renorm"), (400.0, "topk_softmax"), (300.0, "softmax_topk")):
        layer = make(n_experts=6, top_k=2, router=router)
        with torch.no_grad():
            layer.router.weight.mul_(scale)
        x = torch.randn(17, D)
        _, aux = layer(x)
        logits = (x @ layer.router.weight.T).double()
        assert logits.abs().max() > 89 or scale == 1.0  # exp overflows float32 beyond ~88.7
        z_ref = (torch.logsumexp(logits, -1) ** 2).mean()
        assert aux.losses["z"].item() == pytest.approx(z_ref.item(), rel=1e-5)
        g = torch.autograd.grad(aux.losses["z"], layer.router.weight)[0]
        w = layer.router.weight.detach().double().requires_grad_(True)
        g_ref = torch.autograd.grad((torch.logsumexp(x.double() @ w.T, -1) ** 2).mean(), w)[0]
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())


def test_aux_losses_are_differentiable():
    layer = make()
    x = torch.randn(20, D, requires_grad=True)
    _, aux = layer(x)
    for name in ("balance", "z"):
        g_w, g_x = torch.autograd.grad(aux.losses[name], [layer.router.weight, x], retain_graph=True)
        assert g_w.abs().sum() > 0 and g_x.abs().sum() > 0, name
    # the balance gradient flows through P only: check it against finite differences of E*sum f_i P_i
    w = layer.router.weight.detach().double()
    f = aux.counts.double() / (20 * K)
    def bal(wd):
        return E * (f * torch.softmax(x.detach().double() @ wd.T, -1).mean(0)).sum()
    g_ref = torch.autograd.functional.jacobian(bal, w)
    g_w = torch.autograd.grad(aux.losses["balance"], layer.router.weight)[0]
    torch.testing.assert_close(g_w.double(), g_ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Gradients, determinism, layouts, record
# ---------------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    layer = make(n_shared_experts=1, shared_gate=True, capacity_factor=1.5)
    x = torch.randn(4, 16, D, requires_grad=True)
    y, aux = layer(x)
    (y.square().mean() + aux.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # every expert was used, so every expert's slice received gradient
    assert (layer.gate_up_proj.grad.flatten(1).abs().sum(1) > 0).all()
    assert (layer.down_proj.grad.flatten(1).abs().sum(1) > 0).all()


def test_same_seed_bitwise_identical_and_eval_equals_train():
    def run():
        torch.manual_seed(123)
        layer = make(n_shared_experts=1, shared_gate=True)
        x = torch.randn(3, 9, D)
        return layer, x, layer(x)
    l1, x, (y1, a1) = run()
    _, _, (y2, a2) = run()
    assert torch.equal(y1, y2) and torch.equal(a1.indices, a2.indices) and torch.equal(a1.scores, a2.scores)
    assert torch.equal(a1.aux_loss, a2.aux_loss)
    l1.eval()
    y3, _ = l1(x)
    y4, _ = l1(x)
    assert torch.equal(y1, y3) and torch.equal(y3, y4)  # no random routing or noise, in eval or train


def test_input_layouts_and_record():
    layer = make()
    x = torch.randn(2, 7, D)
    y3, aux3 = layer(x)
    y2, aux2 = layer(x.reshape(14, D))
    assert y3.shape == (2, 7, D) and y2.shape == (14, D)
    torch.testing.assert_close(y3.reshape(14, D), y2, rtol=0, atol=1e-7)
    assert isinstance(aux3, LayerAux)
    assert aux3.indices.shape == (14, K) and aux3.indices.dtype == torch.long
    assert aux3.scores.shape == (14, K) and aux3.counts.shape == (E,)
    assert torch.equal(aux3.counts, torch.bincount(aux3.indices.flatten(), minlength=E))
    assert aux3.counts.sum().item() == 14 * K
    assert aux3.aux_loss.shape == () and aux3.aux_loss.requires_grad
    assert set(aux3.losses) == {"balance", "z"}
    assert (aux3.indices[:, 0] != aux3.indices[:, 1]).all()
    with pytest.raises(ValueError, match="MoE"):
        layer(torch.randn(2, 7, D + 1))


def test_cost_matches_module():
    for kw in (dict(), dict(n_shared_experts=2), dict(n_shared_experts=1, d_shared=40, shared_gate=True)):
        cfg = MoEConfig(d_model=D, d_expert=I, n_experts=E, top_k=K, **kw)
        layer = MoE(cfg)
        c = cfg.cost()
        assert c.total_params == sum(p.numel() for p in layer.parameters())
        assert c.params["experts"] == E * 3 * D * I and c.unit_params == 3 * D * I
        assert c.sparse_part == "experts" and c.n_units == E and c.units_per_token == K
        assert c.active_params_per_token == c.total_params - (E - K) * 3 * D * I
        Is = cfg.shared_hidden
        gate = D if cfg.shared_gate else 0
        assert c.flops_per_token == 2 * (D * E + K * 3 * D * I + 3 * D * Is + gate + K * D)


@pytest.mark.parametrize("field,value", [
    ("top_k", 7),  # > n_experts = 6
    ("top_k", 0),
    ("router", "softmax_renorm"),
    ("d_model", 0),
    ("d_expert", -8),
    ("n_experts", 0),
    ("capacity_factor", 0.0),
    ("capacity_factor", -1.25),
    ("routed_scaling", 0.0),
    ("n_shared_experts", -1),
    ("d_shared", 32),  # without shared experts
    ("shared_gate", True),  # without shared experts
    ("balance_coef", -0.01),
    ("z_coef", math.inf),
    ("expert_impl", "triton"),
])
def test_bad_config(field, value):
    kwargs = dict(d_model=D, d_expert=I, n_experts=E, top_k=K)
    kwargs[field] = value
    with pytest.raises(ConfigError) as err:
        MoEConfig(**kwargs)
    assert f"MoEConfig.{field}={value!r}" in str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity_factor", [None, 0.7])
def test_cuda_path_matches_reference_and_is_deterministic(capacity_factor):
    layer = make(capacity_factor=capacity_factor, n_shared_experts=1, shared_gate=True).cuda()
    x = torch.randn(4, 16, D, device="cuda")
    y1, aux = layer(x)
    y2, _ = layer(x)
    assert torch.equal(y1, y2)
    ref = moe_reference(layer, x)
    torch.testing.assert_close(y1, ref.y, rtol=1e-4, atol=1e-4)
    assert aux.stats["dropped_tokens"] == ref.dropped
    with torch.inference_mode():  # auto never picks the CPU-only padded path on a GPU
        assert layer._resolve_impl(x) in ("grouped_mm", "loop")
        assert torch.equal(layer(x)[0], y1)
    with pytest.raises(RuntimeError, match="CPU only"):
        make(expert_impl="padded_bmm").cuda()(x)
