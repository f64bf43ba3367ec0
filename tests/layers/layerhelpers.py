"""Helpers the product-key layer tests share (PKM, PEER, Memory+): per-head ordering of selections,
non-trivial query norms, gradients of a layer against its reference, determinism and CUDA checks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def per_head_sorted(indices: Tensor, other: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Each head's K (index, value) pairs in index order, so that a fast path (a head's K come in no
    fixed order) and a reference line up: indices, other (N_tok, H*K) -> (N_tok, H, K) each."""
    s = indices.reshape(indices.shape[0], heads, -1)
    o = other.reshape(other.shape[0], heads, -1)
    s_sorted, order = s.sort(-1)
    return s_sorted, o.gather(-1, order)


def randomize_norm(norm: nn.Module) -> None:
    """Non-trivial query-norm parameters (gain ~ 1 +- 0.3, bias ~ 0 +- 0.3) and, for BatchNorm,
    running statistics, so that the tests exercise them."""
    for name, p in norm.named_parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name == "weight" else 0.0))
    if isinstance(norm, nn.BatchNorm1d):
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)


def grads_of(layer: nn.Module, x: Tensor, r: Tensor,
             *outputs: Callable[[], Tensor]) -> list[dict[str, Tensor]]:
    """For each output function (e.g. the layer and its reference): the gradients of
    ``(output() * r).sum()`` by name, ``"x"`` (when ``x`` requires grad) and every parameter."""
    grads = []
    for fn in outputs:
        layer.zero_grad()
        x.grad = None
        (fn() * r).sum().backward()
        named = {n: p.grad.clone() for n, p in layer.named_parameters()}
        grads.append({"x": x.grad.clone(), **named} if x.requires_grad else named)
    return grads


def assert_bitwise_deterministic(make_layer: Callable[[], nn.Module], x: Tensor) -> None:
    """Two training runs (forward, backward of sum(y^2)) of freshly made layers on ``x``: outputs,
    selections, input and parameter gradients equal to the bit."""
    runs = []
    for _ in range(2):
        layer = make_layer()
        xi = x.clone().requires_grad_(True)
        y, aux = layer(xi)
        (y * y).sum().backward()
        runs.append((y.detach(), aux.indices, xi.grad, [p.grad for p in layer.parameters()]))
    (y0, i0, gx0, g0), (y1, i1, gx1, g1) = runs
    assert torch.equal(y0, y1) and torch.equal(i0, i1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def assert_cuda_matches_cpu(layer: nn.Module, x: Tensor, heads: int):
    """Training forward and backward of sum(y^2) on the CPU, then with the layer moved to CUDA:
    the same output, the same selections per head, the weights and every parameter gradient
    within float32 tolerance. Returns ``(aux_cpu, aux_gpu)`` for layer-specific checks."""
    y_cpu, aux_cpu = layer(x)
    (y_cpu * y_cpu).sum().backward()
    grads_cpu = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer.cuda()
    xg = x.detach().cuda().requires_grad_(True)
    y_gpu, aux_gpu = layer(xg)
    (y_gpu * y_gpu).sum().backward()
    torch.testing.assert_close(y_gpu.cpu(), y_cpu.detach(), atol=1e-5, rtol=1e-4)
    s_gpu, w_gpu = per_head_sorted(aux_gpu.indices.cpu(), aux_gpu.scores.cpu(), heads)
    s_cpu, w_cpu = per_head_sorted(aux_cpu.indices, aux_cpu.scores, heads)
    assert torch.equal(s_gpu, s_cpu)
    torch.testing.assert_close(w_gpu, w_cpu, atol=1e-6, rtol=1e-5)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads_cpu[n], atol=1e-4, rtol=1e-3, msg=n)
    return aux_cpu, aux_gpu
