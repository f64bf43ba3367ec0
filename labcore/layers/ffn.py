"""Dense SwiGLU feed-forward network: the baseline every sparse layer is compared with.

Symbols (docs/notation.md): D model width, I hidden width (``d_hidden``), N_tok = B*T tokens.

The mechanism (Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202; the expert MLP
of UltraMemV2 arXiv 2508.18756 eq. 2 is the same function)::

    FFN(x) = W_out ( SiLU(W_gate x) * (W_up x) )        SiLU(z) = z * sigmoid(z)

    x      (N_tok, D)
    W_gate (I, D), W_up (I, D)   ->  gate, up   (N_tok, I)
    W_out  (D, I)                ->  y          (N_tok, D)

``*`` is the elementwise product. The three matrices are stored as three ``nn.Linear`` modules
named for the equation (``w_gate``, ``w_up``, ``w_out``); they map one-to-one onto Hugging Face's
``gate_proj``, ``up_proj``, ``down_proj`` (e.g. ``Qwen2MoeMLP``, the shared expert of
``labcore.layers.moe``).

Contract: ``y, aux = ffn(x)`` with ``x`` of shape ``(B, T, D)`` or ``(N_tok, D)``; ``y`` has the
shape of ``x``; ``aux`` is a :class:`~labcore.layers.base.LayerAux` with a zero ``aux_loss``.

Cost (``FFNConfig.cost()``): parameters ``3*D*I`` (plus ``2*I + D`` biases when ``bias=True``);
FLOPs per token ``6*D*I`` -- the three matrix products at 2 FLOPs per multiply-add. Elementwise
work (SiLU, the gating product, bias adds) is not counted.

Init: every weight ~ N(0, init_std^2) (default 0.02, the GPT-2/OLMo convention), biases zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from labcore.config import ConfigError, check_float, check_int
from labcore.layers.base import LayerAux, LayerCost, flatten_tokens, zero_loss
from labcore.layers.registry import LayerSpec, register


@dataclass(frozen=True)
class FFNConfig:
    """d_model: D; d_hidden: I (SwiGLU hidden width); bias: add biases to the three projections;
    init_std: standard deviation of the normal weight init."""

    d_model: int
    d_hidden: int
    bias: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_int("FFNConfig", "d_model", self.d_model, min_value=1)
        check_int("FFNConfig", "d_hidden", self.d_hidden, min_value=1)
        if not isinstance(self.bias, bool):
            raise ConfigError(f"FFNConfig.bias={self.bias!r} is not allowed: must be True or False")
        check_float("FFNConfig", "init_std", self.init_std, min_value=0.0, min_inclusive=False)

    def cost(self) -> LayerCost:
        D, I = self.d_model, self.d_hidden
        b = 1 if self.bias else 0
        params = {"w_gate": D * I + b * I, "w_up": D * I + b * I, "w_out": I * D + b * D}
        return LayerCost(params=params, flops_per_token=2 * 3 * D * I)


class DenseFFN(nn.Module):
    """SwiGLU MLP ``w_out(silu(w_gate x) * w_up x)``; returns ``(y, LayerAux)``."""

    def __init__(self, cfg: FFNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_hidden, bias=cfg.bias)  # weight (I, D)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_hidden, bias=cfg.bias)  # weight (I, D)
        self.w_out = nn.Linear(cfg.d_hidden, cfg.d_model, bias=cfg.bias)  # weight (D, I)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.w_gate, self.w_up, self.w_out):
            nn.init.normal_(lin.weight, mean=0.0, std=self.cfg.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def mlp(self, x: Tensor) -> Tensor:
        """The bare function on any ``(..., D)`` tensor, without the aux record."""
        return self.w_out(F.silu(self.w_gate(x)) * self.w_up(x))  # (..., I) -> (..., D)

    def forward(self, x: Tensor) -> tuple[Tensor, LayerAux]:
        x2, lead = flatten_tokens(x, self.cfg.d_model, "DenseFFN")  # (N_tok, D)
        y = self.mlp(x2)  # (N_tok, D)
        return y.reshape(*lead, self.cfg.d_model), LayerAux(aux_loss=zero_loss(x))  # (B, T, D) or (N_tok, D)


# ----------------------------------------------------------------------------------------------
# Registration (labcore.layers.registry): what the rest of the package knows about this layer.
# ----------------------------------------------------------------------------------------------

register(LayerSpec(name="dense", role="ffn", config=FFNConfig, layer=DenseFFN, label="Dense", color="#636efa",
                   size_field="d_hidden", summary="SwiGLU MLP, the dense baseline"))
