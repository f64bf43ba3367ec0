"""Weights from and to other implementations: Hugging Face transformers 5.x MoE blocks <-> labcore MoE.

Hugging Face blocks are the lab's trusted oracle for the MoE layer: same weights in, same outputs
and gradients out (``tests/test_interop.py`` checks forward and backward within 1e-5 in float32).
``transformers`` is a dev/test dependency only, imported lazily inside these functions.

Supported blocks (module structure of transformers 5.x, read from ``modeling_*.py``)
--------------------------------------------------------------------------------------
==========================  ===========================  =====================================================
HF block                    labcore router               parameters (HF name -> labcore name)
==========================  ===========================  =====================================================
``MixtralSparseMoeBlock``   ``softmax_topk_renorm``      ``gate.weight`` (E, D) -> ``router.weight``
``Qwen2MoeSparseMoeBlock``  ``softmax_topk_renorm`` if   ``gate.weight`` -> ``router.weight``;
                            ``norm_topk_prob`` else      ``shared_expert.{gate,up,down}_proj.weight`` ->
                            ``softmax_topk``             ``shared.w_{gate,up,out}.weight``;
                                                         ``shared_expert_gate.weight`` (1, D) ->
                                                         ``shared_gate.weight``
``OlmoeSparseMoeBlock``     as Qwen2-MoE, no shared      ``gate.weight`` -> ``router.weight``
``GraniteMoeMoE``           ``topk_softmax``             ``router.weight`` -> ``router.weight``
==========================  ===========================  =====================================================

All of them store the experts fused in the ``nn.Linear`` layout: ``experts.gate_up_proj`` (E, 2I, D),
gate rows first, and ``experts.down_proj`` (E, D, I). labcore stores the same tensors transposed in
their last two dimensions (``x @ W``: (E, D, 2I), gate columns first, and (E, I, D); see the MoE
module docstring for why), so the converters copy ``W.transpose(1, 2)``. ``HF_TRANSPOSED`` names
the labcore parameters concerned: everything else copies over as it is.

Caveats
-------
- A block built directly from a config has ``torch.empty`` expert tensors (uninitialised memory):
  copy or initialise weights before using it. On CPU build the config with
  ``experts_implementation="eager"`` (a keyword of every ``PretrainedConfig``).
- Mixtral's ``router_jitter_noise`` (training only) has no labcore counterpart; labcore routing is
  deterministic. Converting a block with jitter > 0 keeps the eval behaviour only.
- Only SiLU experts (SwiGLU) are supported; other activations raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from labcore.layers.moe import MoE, MoEConfig


def _kind(block: nn.Module) -> str:
    """'mixtral' | 'qwen2_moe' | 'olmoe' | 'granitemoe' for a supported HF block, else ValueError."""
    # transformers is a dev/test dependency (module docstring): imported only when a block is converted.
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    kinds = ((MixtralSparseMoeBlock, "mixtral"), (Qwen2MoeSparseMoeBlock, "qwen2_moe"),
             (OlmoeSparseMoeBlock, "olmoe"), (GraniteMoeMoE, "granitemoe"))
    for cls, name in kinds:
        if isinstance(block, cls):
            return name
    raise ValueError(f"block of type {type(block).__name__} is not supported: must be one of "
                     + ", ".join(cls.__name__ for cls, _ in kinds))


def _router_module(block: nn.Module, kind: str) -> nn.Module:
    return block.router if kind == "granitemoe" else block.gate


def _check_silu(block: nn.Module) -> None:
    act = getattr(block.experts.config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{type(block).__name__}: hidden_act={act!r} is not supported: labcore experts are "
                         "SwiGLU, must be 'silu'")


def moe_config_from_hf(block: nn.Module, **overrides: Any) -> MoEConfig:
    """The MoEConfig matching a supported HF block; ``overrides`` set other fields (e.g. balance_coef)."""
    kind = _kind(block)
    _check_silu(block)
    router = _router_module(block, kind)
    E, D = router.weight.shape
    experts = block.experts
    fields: dict[str, Any] = dict(d_model=int(D), d_expert=int(experts.intermediate_dim), n_experts=int(E),
                                  top_k=int(router.top_k))
    if kind == "mixtral":
        fields["router"] = "softmax_topk_renorm"
    elif kind == "granitemoe":
        fields["router"] = "topk_softmax"
    else:  # qwen2_moe, olmoe
        fields["router"] = "softmax_topk_renorm" if router.norm_topk_prob else "softmax_topk"
    if kind == "qwen2_moe":
        fields.update(n_shared_experts=1, d_shared=int(block.shared_expert.intermediate_size), shared_gate=True)
    fields.update(overrides)
    return MoEConfig(**fields)


# labcore parameters stored as the transpose (last two dimensions) of their HF counterparts
HF_TRANSPOSED = frozenset({"gate_up_proj", "down_proj"})


def _pairs(moe: MoE, block: nn.Module, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(labcore tensor, HF tensor viewed in labcore's layout) for every parameter, in a fixed order."""
    pairs = [(moe.router.weight, _router_module(block, kind).weight),
             (moe.gate_up_proj, block.experts.gate_up_proj.transpose(1, 2)),  # (E, 2I, D) -> (E, D, 2I)
             (moe.down_proj, block.experts.down_proj.transpose(1, 2))]  # (E, D, I) -> (E, I, D)
    if kind == "qwen2_moe":
        se = block.shared_expert
        pairs += [(moe.shared.w_gate.weight, se.gate_proj.weight), (moe.shared.w_up.weight, se.up_proj.weight),
                  (moe.shared.w_out.weight, se.down_proj.weight),
                  (moe.shared_gate.weight, block.shared_expert_gate.weight)]
    return pairs


def hf_parameter_names(block: nn.Module) -> dict[str, str]:
    """labcore parameter name -> HF parameter name for a supported block (see the module table).
    The tensors of the names in ``HF_TRANSPOSED`` are each other's transpose in the last two
    dimensions."""
    kind = _kind(block)
    r = "router.weight" if kind == "granitemoe" else "gate.weight"
    names = {"router.weight": r, "gate_up_proj": "experts.gate_up_proj", "down_proj": "experts.down_proj"}
    if kind == "qwen2_moe":
        names.update({"shared.w_gate.weight": "shared_expert.gate_proj.weight",
                      "shared.w_up.weight": "shared_expert.up_proj.weight",
                      "shared.w_out.weight": "shared_expert.down_proj.weight",
                      "shared_gate.weight": "shared_expert_gate.weight"})
    return names


def moe_from_hf(block: nn.Module, **overrides: Any) -> MoE:
    """A labcore MoE with the HF block's configuration and a copy of its weights (same device and
    dtype). ``overrides`` set fields the block has no notion of (balance_coef, z_coef,
    capacity_factor, expert_impl...); overriding routing fields makes a different layer."""
    kind = _kind(block)
    cfg = moe_config_from_hf(block, **overrides)
    ref = _router_module(block, kind).weight
    moe = MoE(cfg).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for ours, theirs in _pairs(moe, block, kind):
            ours.copy_(theirs)
    return moe


def moe_to_hf(moe: MoE, block: nn.Module) -> nn.Module:
    """Copy a labcore MoE's weights into an existing HF block (in place; returned for chaining).

    Raises ValueError if the block cannot compute the same function: different sizes, another
    router convention, routed_scaling != 1, a capacity factor (HF blocks are dropless), or shared
    experts on a block without them (or the other way round)."""
    kind = _kind(block)
    want = moe_config_from_hf(block)
    cfg = moe.cfg
    same_router = cfg.router == want.router or {cfg.router, want.router} == {"softmax_topk_renorm", "topk_softmax"}
    problems = [f"{f}={getattr(cfg, f)!r} (block has {getattr(want, f)!r})"
                for f in ("d_model", "d_expert", "n_experts", "top_k", "shared_hidden", "shared_gate")
                if getattr(cfg, f) != getattr(want, f)]
    if not same_router:
        problems.append(f"router={cfg.router!r} (block computes {want.router!r})")
    if cfg.routed_scaling != 1.0:
        problems.append(f"routed_scaling={cfg.routed_scaling!r} (block has none)")
    if cfg.capacity_factor is not None:
        problems.append(f"capacity_factor={cfg.capacity_factor!r} (block is dropless)")
    if problems:
        raise ValueError(f"moe_to_hf: cannot copy into {type(block).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for ours, theirs in _pairs(moe, block, kind):
            theirs.copy_(ours)
    return block
