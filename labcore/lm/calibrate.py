"""Memory init calibrated to a stated output std at step 0.

Why: an init ablation ("release" values N(0, 0.02^2) against the paper's init, UltraMem arXiv
2411.12364 §3.4 / docs/mechanisms.md §1.6, UltraMemV2 arXiv 2508.18756 App. A / docs/mechanisms.md
§3.2) changes two things at once: the *absolute* size of the memory output at step 0 and the
*relative* scaling the paper derives (q/k norm gains, value std against the value projection and
the number of memory layers). Both papers aim the memory output at an FFN's output variance; the
closed forms get there only approximately (they assume unit-variance inputs and an idealised
search). :func:`calibrate_memory_init` pins the absolute size to a stated target on a fixed batch, so
that what remains of "paper" vs "release" is the paper's relative scaling under that target.

The procedure (deterministic, no gradient)::

    target   = mean over blocks with an FFN (dense or MoE) of std(FFN_i(u_i))     unless given
    repeat:  for every value table V (shared tables once):
                 s_V = target / geometric mean of std(Mem_j(u_j)) over the memories j reading V
                 V  <- s_V * V
             until every |std(Mem_j) / target - 1| <= tol   (or max_iter passes)

std is taken over all elements of the output on the calibration batch (B*T*D values), with the
model in eval mode (dropout off). Every registered memory's output is linear in its value table
for a fixed input (PKM, UltraMem, Memory+, UltraMemV2 whose pre-values are left as they are; PEER
in its up experts v_i, the table rescaled there), so one
pass sets each memory exactly when its input does not move; the passes repeat because rescaling
memory j changes the residual stream that later memories read. Memories sharing one table get one
scale (their stds can then differ from the target; the report shows them).

The report (:class:`MemoryCalibration`) holds one row per memory: its name, output std before and
after, the scale applied to its table, and the target; :func:`output_stds` measures the same stds on
any other batch (the notebooks report both).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from labcore.config import ConfigError, check_float, check_int
from labcore.lm.model import LM


@dataclass(frozen=True)
class MemoryCalibration:
    """Result of :func:`calibrate_memory_init`.

    target: the output std aimed at; target_source: "ffn" (the blocks' mean FFN output std) or
    "given"; ffn_std: FFN output std per block name ("block3.ffn", "block1.moe") at step 0;
    rows: one dict per memory with keys "memory", "std_before", "std_after", "scale", "target";
    passes: rescaling passes run; converged: every memory within ``tol`` of the target.
    """

    target: float
    target_source: str
    ffn_std: dict[str, float]
    rows: tuple[dict[str, Any], ...]
    passes: int
    converged: bool

    def table(self) -> str:
        """A plain-text table of the rows."""
        lines = [f"{'memory':<14} {'std before':>11} {'std after':>10} {'scale':>8}   target {self.target:.4g} "
                 f"({self.target_source})"]
        for r in self.rows:
            lines.append(f"{r['memory']:<14} {r['std_before']:>11.4g} {r['std_after']:>10.4g} {r['scale']:>8.4g}")
        return "\n".join(lines)


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def output_stds(model: LM, idx: Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """``(ffn_std, memory_std)`` on the batch ``idx`` (B, T), model in eval mode, no gradient:
    the std over all elements of each block's FFN output (blocks with an FFN, by block name) and of
    each memory's output (by memory name)."""
    if not isinstance(model, LM):
        raise ConfigError(f"output_stds: model of type {type(model).__name__} is not allowed: must be a "
                          "labcore.lm.model.LM")
    ffn_std: dict[str, float] = {}
    mem_std: dict[str, float] = {}

    def record(store: dict[str, float], name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output
            store[name] = y.double().std().item()
        return hook

    handles = []
    for name, block in zip(model.block_names, model.blocks):
        if block.ffn is not None:
            handles.append(block.ffn.register_forward_hook(record(ffn_std, name)))
    for name, layer in model.memory_layers():
        handles.append(layer.register_forward_hook(record(mem_std, name)))
    try:
        with _eval_no_grad(model):
            model(idx)
    finally:
        for h in handles:
            h.remove()
    return ffn_std, mem_std


# The table a memory's output is linear in, by attribute: ``values`` (PKM, UltraMem, UltraMemV2,
# Memory+), else ``up`` (PEER: y = Σ_i w_i σ(u_iᵀx) v_i is linear in its up experts v_i).
OUTPUT_TABLES = ("values", "up")


def _value_table(name: str, layer: nn.Module) -> nn.Parameter:
    for attr in OUTPUT_TABLES:
        table = getattr(layer, attr, None)
        if isinstance(table, nn.Embedding):
            return table.weight
    raise ConfigError(f"calibrate_memory_init: memory {name!r} ({type(layer).__name__}) is not allowed: "
                      f"must have an output table (an nn.Embedding named one of {list(OUTPUT_TABLES)}) to rescale")


def calibrate_memory_init(model: LM, idx: Tensor, target: float | None = None, *, tol: float = 1e-3,
                          max_iter: int = 10) -> MemoryCalibration:
    """Rescale every memory's value table in place so that its output std on the batch ``idx``
    equals ``target`` (default: the mean FFN output std of the model's blocks); see the module doc.

    Call it right after building the model, before the optimiser sees the parameters (it changes
    them in place and keeps their identity). ConfigError for a model without memories, a default
    target with no FFN to measure, or a memory without a ``values`` table.
    """
    fn = "calibrate_memory_init"
    if not isinstance(model, LM):
        raise ConfigError(f"{fn}: model of type {type(model).__name__} is not allowed: must be a "
                          "labcore.lm.model.LM")
    if target is not None:
        check_float(fn, "target", target, min_value=0.0, min_inclusive=False)
    check_float(fn, "tol", tol, min_value=0.0, min_inclusive=False)
    check_int(fn, "max_iter", max_iter, min_value=1)
    memories = list(model.memory_layers())
    if not memories:
        raise ConfigError(f"{fn}: the model has no memory layers (plan kind {model.cfg.plan.kind!r}): nothing "
                          "to calibrate")
    tables: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, layer in memories:
        w = _value_table(name, layer)
        tables.setdefault(id(w), (w, []))[1].append(name)

    ffn_std, before = output_stds(model, idx)
    if target is None:
        if not ffn_std:
            raise ConfigError(f"{fn}: target=None is not allowed for a model without FFNs (every FFN replaced "
                              "by a memory): must give a number")
        target, source = sum(ffn_std.values()) / len(ffn_std), "ffn"
    else:
        source = "given"
    scale = {name: 1.0 for name, _ in memories}
    current, passes = before, 0
    while passes < max_iter and max(abs(current[n] / target - 1) for n in current) > tol:
        with torch.no_grad():
            for w, names in tables.values():
                s = math.exp(sum(math.log(target / current[n]) for n in names) / len(names))
                w.mul_(s)
                for n in names:
                    scale[n] *= s
        passes += 1
        current = output_stds(model, idx)[1]
    rows = tuple({"memory": n, "std_before": before[n], "std_after": current[n], "scale": scale[n],
                  "target": target} for n, _ in memories)
    converged = max(abs(current[n] / target - 1) for n in current) <= tol
    return MemoryCalibration(target=target, target_source=source, ffn_std=ffn_std, rows=rows, passes=passes,
                             converged=converged)
