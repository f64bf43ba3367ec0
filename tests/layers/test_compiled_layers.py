"""The memory layers (PKM, UltraMem, UltraMemV2, PEER, Memory+) with the compiled top-k (``LABCORE_COMPILED`` unset) against the PyTorch path
(``LABCORE_COMPILED=0``): the same selected slots per token and head (in any order: the final top-K
of PKM / PEER is unsorted), outputs, scores and gradients within 1e-6 relative.

Shapes: the inference benchmark's layers (``labcore.bench.inference`` defaults), the layer benchmark's
(``labcore.bench.layers``), odd sizes, a single token; training (forward + backward) and inference.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from labcore.layers.fast import compiled
from labcore.layers.memory_plus import MemoryPlus, MemoryPlusConfig
from labcore.layers.peer import PEER, PEERConfig
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.layers.ultramem_v2 import UltraMemV2, UltraMemV2Config


@pytest.fixture(scope="module", autouse=True)
def need_extension():
    if compiled.disabled() or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("compiled extension disabled or no C++ compiler")
    assert compiled.available(), compiled.unavailable_reason()  # a compiler but no build is a bug


def _pkm(**kw):
    return lambda: PKM(PKMConfig(**kw))


def _um(**kw):
    return lambda: UltraMem(UltraMemConfig(**kw))


CASES = {
    # the inference bench's equal-budget layers (labcore.bench.inference.default_configs, ratio 12)
    "pkm_inference_bench": (_pkm(d_model=128, n_keys=451, heads=4, k_dim=64, top_k=32), 128, 37),
    "um_inference_bench": (_um(d_model=128, n_keys=638, heads=2, k_dim=32, top_k=16, d_value=64, rank=2,
                               n_cores=2, expansion=4), 128, 37),
    # the layer bench's pairs (labcore.bench.layers)
    "pkm_layer_bench": (_pkm(d_model=256, n_keys=128, heads=4, k_dim=128, top_k=32), 256, 64),
    "um_layer_bench": (_um(d_model=256, n_keys=128, heads=2, k_dim=128, top_k=32, d_value=256, rank=2,
                           n_cores=2, expansion=4), 256, 64),
    # odd sizes and variants
    "pkm_odd": (_pkm(d_model=24, n_keys=37, heads=3, k_dim=10, top_k=5, query_norm="none"), 24, 21),
    "pkm_k_equals_n": (_pkm(d_model=16, n_keys=6, heads=2, k_dim=8, top_k=6, query_norm="none"), 16, 9),
    "um_odd_two_sided": (_um(d_model=24, n_keys=37, heads=3, k_dim=10, top_k=5, d_value=12, rank=3, n_cores=3,
                             expansion=4, proxy_search="two_sided", share_query=False), 24, 21),
    "um_additive": (_um(d_model=24, n_keys=23, heads=2, k_dim=8, top_k=7, d_value=12, scoring="additive",
                        rank=1, n_cores=1, expansion=1, score_activation="softmax"), 24, 13),
    "ultramem_v2": (lambda: UltraMemV2(UltraMemV2Config(d_model=32, n_keys=16, heads=2, k_dim=16, top_k=5,
                                                         d_value=16, d_pre=8)), 32, 19),
    "peer": (lambda: PEER(PEERConfig(d_model=32, n_keys=29, heads=3, top_k=6, k_dim=16)), 32, 17),
    "memory_plus": (lambda: MemoryPlus(MemoryPlusConfig(d_model=32, n_keys=29, heads=2, k_dim=16, top_k=7,
                                                        qk_norm=True)), 32, 17),
}


def _run(build, d_model: int, n_tok: int, training: bool, on: bool, monkeypatch) -> dict[str, torch.Tensor]:
    """Build under a fixed seed, run on a seeded input with the compiled path on or off; return the
    outputs (and the gradients of a seeded projection of y when ``training``)."""
    if on:
        monkeypatch.delenv(compiled.ENV_DISABLE, raising=False)
    else:
        monkeypatch.setenv(compiled.ENV_DISABLE, "0")
    assert compiled.available() == on
    torch.manual_seed(1234)
    layer = build()
    if hasattr(layer, "refresh_retrieval"):
        layer.refresh_retrieval()
    layer.train(training)
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(n_tok, d_model, generator=gen)
    out = {}
    if training:
        x.requires_grad_(True)
        y, aux = layer(x)
        (y * torch.randn(y.shape, generator=gen)).sum().backward()
        out["grad.x"] = x.grad
        out.update({f"grad.{n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    else:
        with torch.inference_mode():
            layer(x)                                                        # first call fills caches
            y, aux = layer(x)
    out["y"] = y.detach()
    out["indices"], out["scores"] = aux.indices, aux.scores
    if getattr(aux, "core_scores", None) is not None:
        out["core_scores"] = aux.core_scores
    out["K"] = torch.tensor(layer.cfg.top_k)
    return out


def _canonical(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each head's K selected slots sorted by slot id, their scores permuted alike."""
    K = int(out["K"])
    idx = out["indices"].unflatten(-1, (-1, K))                             # (N_tok, H, K)
    order = idx.argsort(-1)
    res = {"indices": idx.gather(-1, order), "scores": out["scores"].unflatten(-1, (-1, K)).gather(-1, order)}
    if "core_scores" in out:
        cs = out["core_scores"].unflatten(1, (-1, K))                       # (N_tok, H, K, h)
        res["core_scores"] = cs.gather(2, order.unsqueeze(-1).expand_as(cs))
    return res


def _close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-6, atol=max(1e-6 * scale, 1e-7), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_pytorch_path(name, training, monkeypatch):
    build, d_model, n_tok = CASES[name]
    ref = _run(build, d_model, n_tok, training, False, monkeypatch)
    got = _run(build, d_model, n_tok, training, True, monkeypatch)
    assert set(got) == set(ref)
    cr, cg = _canonical(ref), _canonical(got)
    assert torch.equal(cg["indices"], cr["indices"])                       # the same slots per token and head
    for key in cr:
        if key != "indices":
            _close(cg[key], cr[key], key)
    for key in ref:
        if key.startswith("grad.") or key == "y":
            _close(got[key], ref[key], key)
    assert ref["y"].abs().max() > 1e-4                                      # not trivially zero


@pytest.mark.parametrize("name", ["pkm_inference_bench", "um_inference_bench", "pkm_odd", "um_odd_two_sided"])
def test_single_token(name, monkeypatch):
    build, d_model, _ = CASES[name]
    for training in (False, True):
        ref = _canonical(_run(build, d_model, 1, training, False, monkeypatch))
        got = _canonical(_run(build, d_model, 1, training, True, monkeypatch))
        assert torch.equal(got["indices"], ref["indices"])
        _close(got["scores"], ref["scores"], "scores")


def test_side_search_paths_agree(monkeypatch):
    """fast.search.side_search: the fused compiled search (inference) and bmm + top-k (training, or
    LABCORE_COMPILED=0) select the same sub-keys; values equal to rounding; gradients flow."""
    from labcore.layers.fast.search import side_search

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 203, 24, generator=gen)
    keys = torch.randn(6, 24, 301, generator=gen)                           # (G, D, n) as torch.bmm's operand
    ref_v, ref_i = torch.bmm(q, keys).topk(17, dim=-1)
    with torch.no_grad():
        v, i = side_search(q, keys, 17)                                     # compiled side_topk
    assert torch.equal(i, ref_i)
    _close(v, ref_v, "values")
    qg = q.clone().requires_grad_(True)
    v, i = side_search(qg, keys, 17)                                        # training: bmm + top-k
    assert torch.equal(i, ref_i) and torch.equal(v.detach(), ref_v)
    v.sum().backward()
    expected = torch.zeros(6, 203, 301).scatter_(-1, ref_i, 1.0) @ keys.transpose(1, 2)   # d sum / dq
    _close(qg.grad, expected, "grad q")
    monkeypatch.setenv(compiled.ENV_DISABLE, "0")
    with torch.no_grad():
        v0, i0 = side_search(q, keys, 17)
    assert torch.equal(i0, ref_i) and torch.equal(v0, ref_v)
