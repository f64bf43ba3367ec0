"""The value read's single-pass backward (labcore.layers.fast.compiled.bag_backward, fast.bags.weighted_bag)
against PyTorch's own embedding-bag autograd."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from labcore.layers.base import set_sparse_value_grads
from labcore.layers.fast import compiled
from labcore.layers.fast.bags import weighted_bag
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.ultramem import UltraMem, UltraMemConfig

HAS_EXT = not compiled.disabled() and shutil.which(os.environ.get("CXX", "c++")) is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="no C++ compiler (or LABCORE_COMPILED=0)")


def _case(n, S, D, N, seed=0, repeat=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (n, S), generator=g)
    if repeat and n * S:  # many hits on a few rows, duplicates inside one bag too
        idx = idx % 3
    return idx, torch.randn(n, S, generator=g), torch.randn(n, D, generator=g), torch.randn(N, D, generator=g)


def _close(a, b):
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-6, atol=max(2e-6 * scale, 1e-7))


@needs_ext
@pytest.mark.parametrize("n,S,D,N,repeat", [(1, 1, 1, 1, False), (1, 7, 5, 3, False), (37, 16, 33, 101, False),
                                            (64, 128, 32, 12996, False), (50, 9, 8, 40, True), (0, 4, 8, 10, False)])
def test_compiled_equals_pytorch_autograd(n, S, D, N, repeat):
    assert compiled.available(), compiled.unavailable_reason()
    idx, w, gy, table = _case(n, S, D, N, repeat=repeat)
    rt, rw = compiled.reference_bag_backward(gy, idx, w, table)
    gt, gw = compiled.bag_backward(gy, idx, w, table)
    _close(gt, rt)
    _close(gw, rw)


@needs_ext
def test_thread_count_does_not_change_a_bit():
    idx, w, gy, table = _case(300, 64, 24, 5000)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.bag_backward(gy, idx, w, table)
        torch.set_num_threads(max(2, old))
        many = compiled.bag_backward(gy, idx, w, table)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_ext
def test_only_the_requested_gradients_and_range_checks():
    idx, w, gy, table = _case(5, 3, 4, 6)
    gt, gw = compiled.bag_backward(gy, idx, w, table, need_table=False)
    assert gt is None and gw.shape == (5, 3)
    gt, gw = compiled.bag_backward(gy, idx, w, table, need_w=False)
    assert gw is None and gt.shape == (6, 4)
    bad = idx.clone()
    bad[2, 1] = 6
    with pytest.raises(RuntimeError, match="out of range"):
        compiled.bag_backward(gy, bad, w, table)


def test_float64_and_disabled_extension_use_the_reference(monkeypatch):
    idx, w, gy, table = _case(9, 4, 6, 11)
    rt, rw = compiled.reference_bag_backward(gy.double(), idx, w.double(), table.double())
    gt, gw = compiled.bag_backward(gy.double(), idx, w.double(), table.double())
    assert gt.dtype == torch.float64 and torch.equal(gt, rt) and torch.equal(gw, rw)
    monkeypatch.setenv(compiled.ENV_DISABLE, "0")
    gt, gw = compiled.bag_backward(gy, idx, w, table)
    rt, rw = compiled.reference_bag_backward(gy, idx, w, table)
    assert torch.equal(gt, rt) and torch.equal(gw, rw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_bag_is_embedding_bag_forward_and_backward(dtype):
    idx, w, gy, table = _case(23, 11, 7, 31)
    table, w, gy = table.to(dtype), w.to(dtype), gy.to(dtype)
    t1, w1 = table.clone().requires_grad_(True), w.clone().requires_grad_(True)
    t2, w2 = table.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y1 = weighted_bag(idx, t1, w1)
    y2 = F.embedding_bag(idx, t2, mode="sum", per_sample_weights=w2)
    assert torch.equal(y1, y2)
    y1.backward(gy)
    y2.backward(gy)
    _close(t1.grad, t2.grad)
    _close(w1.grad, w2.grad)
    with torch.no_grad():  # no graph: the plain call
        assert torch.equal(weighted_bag(idx, table, w), F.embedding_bag(idx, table, mode="sum", per_sample_weights=w))


def _offsets_case(lengths, D, N, seed=0):
    """Bags of the given lengths (empty ones too) over 1-D indices, as UltraMem's IVE read makes them."""
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()]) if lengths else torch.zeros(0)
    idx = torch.randint(0, N, (L,), generator=g)
    return (idx, offsets.long(), torch.randn(L, generator=g), torch.randn(len(lengths), D, generator=g),
            torch.randn(N, D, generator=g))


@needs_ext
@pytest.mark.parametrize("lengths,D,N", [([3], 5, 4), ([2, 0, 5, 1, 0], 7, 6), ([0, 0, 4], 3, 2),
                                         ([4] * 300 + [0, 9] * 40, 16, 517)])
def test_offsets_compiled_equals_pytorch_autograd(lengths, D, N):
    idx, offsets, w, gy, table = _offsets_case(lengths, D, N)
    rt, rw = compiled.reference_bag_backward(gy, idx, w, table, offsets)
    gt, gw = compiled.bag_backward(gy, idx, w, table, offsets=offsets)
    _close(gt, rt)
    _close(gw, rw)


@needs_ext
def test_offsets_thread_count_is_bitwise_irrelevant():
    idx, offsets, w, gy, table = _offsets_case([5, 0, 7] * 200, 24, 300, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.bag_backward(gy, idx, w, table, offsets=offsets)
        torch.set_num_threads(2)
        many = compiled.bag_backward(gy, idx, w, table, offsets=offsets)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_ext
def test_offsets_must_start_at_zero_and_not_decrease():
    idx, offsets, w, gy, table = _offsets_case([2, 3], 4, 5)
    with pytest.raises(RuntimeError, match="offsets\\[0\\] must be 0"):
        compiled.bag_backward(gy, idx, w, table, offsets=offsets + 1)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        compiled.bag_backward(gy, idx, w, table, offsets=torch.tensor([0, 9]))


def test_weighted_bag_with_offsets_matches_plain_embedding_bag(monkeypatch):
    """Forward bitwise, gradients to rounding; the same with the extension disabled."""
    idx, offsets, w, gy, table = _offsets_case([3, 0, 6, 2], 8, 11, seed=4)
    for disable in (False, True):
        if disable:
            monkeypatch.setenv(compiled.ENV_DISABLE, "0")
        t1, w1 = table.clone().requires_grad_(True), w.clone().requires_grad_(True)
        t2, w2 = table.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y1 = weighted_bag(idx, t1, w1, offsets)
        y2 = F.embedding_bag(idx, t2, offsets, mode="sum", per_sample_weights=w2)
        assert torch.equal(y1, y2)
        (y1 * gy).sum().backward()
        (y2 * gy).sum().backward()
        _close(t1.grad, t2.grad)
        _close(w1.grad, w2.grad)


# ---------------------------------------------------------------------------------------------
# Sparse table gradients (sparse_bag_backward; weighted_bag(..., sparse=True); the layers' switch)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disable", [False, True], ids=["compiled", "reference"])
@pytest.mark.parametrize("layout,n_chunks", [("2d", 1), ("2d", 2), ("offsets", 1), ("offsets", 3)])
def test_sparse_gradient_equals_the_dense_one_on_the_rows_read(layout, n_chunks, disable, monkeypatch):
    if disable:
        monkeypatch.setenv(compiled.ENV_DISABLE, "0")
    elif not HAS_EXT:
        pytest.skip("no C++ compiler (or LABCORE_COMPILED=0)")
    N, F = 40, 6 * n_chunks
    if layout == "2d":
        idx, w, gy, _ = _case(23, 7, F // n_chunks, N * n_chunks, seed=6)
        offsets = None
    else:
        idx, offsets, w, gy, _ = _offsets_case([3, 0, 5, 2, 7] * 6, F // n_chunks, N * n_chunks, seed=6)
    table = torch.randn(N, F, generator=torch.Generator().manual_seed(7))
    view = table.view(N * n_chunks, F // n_chunks)
    gs, gws = compiled.sparse_bag_backward(gy, idx, w, view, offsets=offsets, n_chunks=n_chunks)
    gd, gwd = compiled.bag_backward(gy, idx, w, view, offsets=offsets)
    assert gs.is_sparse and gs.is_coalesced() and tuple(gs.shape) == (N, F)
    rows = gs.indices()[0]
    assert torch.equal(rows, torch.unique(idx.reshape(-1) // n_chunks))   # every row read, sorted, once
    _close(gs.to_dense(), gd.reshape(N, F))
    _close(gws, gwd)


@needs_ext
def test_sparse_gradient_is_bitwise_the_same_for_any_thread_count():
    idx, offsets, w, gy, _ = _offsets_case([5, 0, 7] * 300, 8, 2 * 500, seed=8)
    table = torch.randn(1000, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.sparse_bag_backward(gy, idx, w, table, offsets=offsets, n_chunks=2)
        torch.set_num_threads(2)
        many = compiled.sparse_bag_backward(gy, idx, w, table, offsets=offsets, n_chunks=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0].to_dense(), many[0].to_dense()) and torch.equal(one[1], many[1])


def _layer_grads(build, sparse):
    torch.manual_seed(0)
    layer = build()
    set_sparse_value_grads(layer, sparse)
    x = torch.randn(13, layer.cfg.d_model, generator=torch.Generator().manual_seed(1))
    y, _ = layer(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [
    lambda: PKM(PKMConfig(d_model=16, n_keys=9, heads=2, k_dim=8, top_k=4)),
    lambda: UltraMem(UltraMemConfig(d_model=16, n_keys=9, heads=2, k_dim=8, top_k=4, d_value=12, n_cores=2,
                                    expansion=4)),
    lambda: UltraMem(UltraMemConfig(d_model=16, n_keys=9, heads=2, k_dim=8, top_k=4, d_value=12, n_cores=3,
                                    expansion=1)),
], ids=["pkm", "ultramem_ive", "ultramem_e1"])
def test_layers_sparse_value_gradient_equals_the_dense_one(build):
    dense, sparse = _layer_grads(build, False), _layer_grads(build, True)
    assert set(dense) == set(sparse)
    assert sparse["values.weight"].is_sparse and not dense["values.weight"].is_sparse
    for name in dense:
        got = sparse[name].to_dense() if sparse[name].is_sparse else sparse[name]
        _close(got, dense[name])
