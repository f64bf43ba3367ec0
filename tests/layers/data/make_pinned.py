"""Pinned layer outputs: fixed seeds, fixed inputs, the outputs saved as reference tensors.

``python tests/layers/data/make_pinned.py`` rewrites ``pinned.pt`` next to this file from the layers
as they are now; ``tests/layers/test_pinned_outputs.py`` recomputes every case and compares. Run
it only when a layer's numbers are MEANT to change (and say why in the commit).

Each case builds a layer under ``torch.manual_seed``, runs it on a seeded input and records ``y``
and a few aux fields; cases marked ``grad`` also record the gradients of ``(y * r).sum()`` (r a
seeded random tensor) with respect to the input and every parameter (parameters above
``MAX_STORED`` elements as three sums: of the gradient, of its absolute value, of its square).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from labcore.layers.ffn import DenseFFN, FFNConfig
from labcore.layers.moe import MoE, MoEConfig
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.ultramem import UltraMem, UltraMemConfig

PINNED = Path(__file__).with_name("pinned.pt")
MAX_STORED = 2048                                                          # larger gradients: summaries only
AUX_FIELDS = ("aux_loss", "indices", "scores", "counts", "core_scores")


def _ffn():
    return DenseFFN(FFNConfig(d_model=16, d_hidden=24, bias=True, init_std=0.2))


def _moe(**kw):
    base = dict(d_model=16, d_expert=8, n_experts=6, top_k=2, init_std=0.3)
    return lambda: MoE(MoEConfig(**{**base, **kw}))


def _pkm(**kw):
    base = dict(d_model=16, n_keys=8, heads=2, k_dim=8, top_k=4)
    return lambda: PKM(PKMConfig(**{**base, **kw}))


def _um(**kw):
    base = dict(d_model=16, n_keys=6, heads=2, k_dim=8, top_k=4, d_value=8)
    return lambda: UltraMem(UltraMemConfig(**{**base, **kw}))


# name: (builder, training, grad, tokens, dtype)
CASES: dict[str, tuple[Callable[[], torch.nn.Module], bool, bool, tuple[int, ...], torch.dtype]] = {
    "ffn": (_ffn, True, True, (2, 5), torch.float32),
    "moe_renorm_dropless_train": (_moe(), True, True, (3, 7), torch.float32),
    "moe_renorm_dropless_eval": (_moe(), False, False, (3, 7), torch.float32),
    "moe_softmax_topk_capacity_train": (_moe(router="softmax_topk", capacity_factor=1.0, routed_scaling=2.0),
                                        True, True, (3, 7), torch.float32),
    "moe_softmax_topk_capacity_eval": (_moe(router="softmax_topk", capacity_factor=0.75), False, False,
                                       (3, 7), torch.float32),
    "moe_shared_gate_loop": (_moe(n_shared_experts=1, shared_gate=True, expert_impl="loop", top_k=3,
                                  capacity_factor=1.25), True, True, (2, 9), torch.float32),
    "moe_padded_wide": (_moe(d_expert=24, n_experts=8, top_k=3, expert_impl="padded_bmm"), False, False,
                        (4, 16), torch.float32),
    "moe_float64_grouped": (_moe(expert_impl="loop"), True, True, (2, 5), torch.float64),
    "pkm_layernorm_train": (_pkm(), True, True, (2, 6), torch.float32),
    "pkm_batchnorm_train": (_pkm(query_norm="batchnorm", d_value=12), True, True, (2, 6), torch.float32),
    "pkm_batchnorm_eval": (_pkm(query_norm="batchnorm"), False, False, (2, 6), torch.float32),
    "pkm_none_long_rows_eval": (_pkm(n_keys=128, top_k=4, heads=2, query_norm="none", query_bias=False),
                                False, False, (4, 16), torch.float32),
    "pkm_long_rows_train": (_pkm(n_keys=128, top_k=4, heads=2), True, True, (4, 16), torch.float32),
    "um_tdqkr_mcs_ive_train": (_um(rank=2, n_cores=2, expansion=4), True, True, (2, 5), torch.float32),
    "um_tdqkr_mcs_ive_eval": (_um(rank=2, n_cores=2, expansion=4), False, False, (2, 5), torch.float32),
    "um_tdqkr_noshare_rms_eval": (_um(rank=3, n_cores=2, expansion=1, share_query=False, norm_type="rmsnorm",
                                      tucker_aux=True, candidate_m=6), False, False, (2, 5), torch.float32),
    "um_ive4_h1_train": (_um(rank=2, n_cores=1, expansion=4, candidate_m=8), True, True, (2, 5), torch.float32),
    "um_additive_softmax_train": (_um(scoring="additive", rank=1, n_cores=1, expansion=1,
                                      score_activation="softmax", value_proj=False, d_value=16, qk_norm=False,
                                      query_bias=True), True, True, (2, 5), torch.float32),
    "um_additive_nosoftmax_ive_eval": (_um(scoring="additive", rank=1, n_cores=1, expansion=4), False, False,
                                       (2, 5), torch.float32),
    "um_paper_init_train": (_um(init="paper", n_model_layers=4, calib_samples=16, tucker_aux=True), True, True,
                            (2, 5), torch.float32),
    "um_long_rows_eval": (_um(n_keys=32, k_dim=8, top_k=4, rank=2, n_cores=2, expansion=4, candidate_m=16),
                          False, False, (8, 16), torch.float32),
    "um_float64_train": (_um(rank=2, n_cores=2, expansion=4), True, True, (2, 5), torch.float64),
}


def run_case(name: str) -> dict[str, torch.Tensor]:
    """Build case ``name`` and return its recorded tensors (flat dict, names like ``y``, ``aux.indices``)."""
    build, training, grad, tokens, dtype = CASES[name]
    torch.manual_seed(1234)
    layer = build().to(dtype)
    if hasattr(layer, "refresh_retrieval"):
        layer.refresh_retrieval()
    layer.train(training)
    d_model = layer.cfg.d_model
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(*tokens, d_model, generator=gen, dtype=dtype)
    out: dict[str, torch.Tensor] = {}
    if grad:
        x.requires_grad_(True)
        y, aux = layer(x)
        r = torch.randn(y.shape, generator=gen, dtype=dtype)
        loss = (y * r).sum() + aux.aux_loss
        loss.backward()
        out["grad.x"] = x.grad
        for pname, p in layer.named_parameters():
            if p.grad is None:
                continue
            if p.grad.numel() <= MAX_STORED:
                out[f"grad.{pname}"] = p.grad
            else:                                                           # big tables: three summaries
                g = p.grad.double()
                out[f"grad.{pname}.summary"] = torch.stack((g.sum(), g.abs().sum(), g.square().sum()))
    else:
        with torch.no_grad():
            layer(x)                                                        # first call fills caches
            y, aux = layer(x)
    out["y"] = y
    for field in AUX_FIELDS:
        value = getattr(aux, field, None)
        if isinstance(value, torch.Tensor) and value.numel() > MAX_STORED:   # long slot counts: sparse
            nz = value.nonzero().flatten()
            out[f"aux.{field}.nonzero"], out[f"aux.{field}.values"] = nz, value[nz]
        elif isinstance(value, torch.Tensor):
            out[f"aux.{field}"] = value
    for key, value in (getattr(aux, "losses", None) or {}).items():
        out[f"aux.losses.{key}"] = value
    return {k: v.detach().clone() for k, v in out.items()}


def main() -> None:
    data = {name: run_case(name) for name in CASES}
    tmp = PINNED.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(PINNED)                                                     # atomic
    print(f"wrote {PINNED} ({PINNED.stat().st_size} bytes, {len(data)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
