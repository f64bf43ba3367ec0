"""Analytical cost of one decode step: FLOPs, bytes moved and a roofline time (docs/mechanisms.md §7.2).

Decoding one new token for each of B sequences, a layer reads its weights from memory. Dense
weights are read **once per step**, whatever B is (all B tokens share them). A sparse part (MoE
experts, memory value rows) is read only where at least one token looked. With b bytes per parameter
and a layer described by its :class:`~labcore.layers.base.LayerCost` (``n_units`` sparse units of
``unit_params`` parameters, ``units_per_token`` = k units touched per token, ``dense_params`` the rest):

    (7.2a)  U(B)  = n * [1 - (1 - k/n)^B]                  expected distinct units touched by B tokens
    (7.2b)  A(B)  = b * dense_params + b * unit_params * U(B)        bytes read by one step

U(B) assumes each token picks k *distinct* units uniformly at random, independently of the others:
a given unit is missed by one token with probability 1 - k/n, by all B with (1 - k/n)^B. It grows
like k*B while k*B << n and saturates at n. For independent tokens, uniform routing *maximises* the
expected coverage, so U(B) is an upper bound: a layer with skewed usage touches fewer units where
k*B ~ n (a freshly initialised PKM, whose random product keys are used unevenly, reaches ~75-85% of
U(B) there; tests/profiling/test_cost_model.py measures it), and the bound is tight in the linear
regime and at saturation. Instances (docs/mechanisms.md §7.2):

* MoE, E experts, top-k, P_e params per expert: A_MoE(B) = b P_e E [1 - (1 - k/E)^B] + b (router, shared).
  Whole experts are the unit of sparsity, so a handful of tokens touches almost every expert.
* PKM / UltraMem, N physical value rows of width D_v, m = H*K rows per token:
  A_UM(B) = b D_v N [1 - (1 - m/N)^B] + b (keys, cores, query and value projections, norms).
  The key tables and projections are dense: read once per step. With IVE the H*K selections are
  *virtual* slots; they map to physical rows, which is what is read (labcore's LayerCost counts
  physical rows, so n = N physical).

FLOPs of a step are B * flops_per_token (2 per multiply-add). The roofline time is

    (7.2c)  t(B) = max( A(B) / bandwidth , FLOPs(B) / peak )

with the machine's *measured* copy bandwidth and matmul throughput (labcore.profiling.ceilings).

Two other byte counts are reported because kernels do not behave like the ideal model:

* ``bytes_streamed``: the bytes a gather kernel reads when it does not deduplicate, i.e. every
  selection re-reads its unit: b*dense_params + b*unit_params*k*B. This is the traffic against which an EmbeddingBag-style gather's
  achieved bytes/s is meaningful (repeat reads may hit cache).
* ``bytes_activations`` (optional): the step's input and output activations, 2*B*D*b_act.

The whole-model version (:func:`model_step_cost`) sums parts and adds the KV cache: each attention
layer reads 2 (K and V) * context_len * d_kv values per sequence, B sequences, b_kv bytes each, and
does 2 * 2 * context_len * d_kv FLOPs per token (scores and the weighted sum). A token-embedding
table is a sparse part with n = vocab rows, k = 1 row per token (see :func:`embedding_cost`); the
output head (or a tied embedding) is dense.

Where this differs from the paper: the paper's Fig. 1 numbers were measured on A100 kernels; this
model is the idealised count (uniform routing, perfect deduplication, no launch overheads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from labcore.config import check_float, check_int
from labcore.layers.base import LayerCost


def expected_distinct(n_units: int, per_token: int, batch: int | float) -> float:
    """(7.2a) U(B) = n * [1 - (1 - k/n)^B]: expected distinct units touched by ``batch`` tokens."""
    check_int("expected_distinct", "n_units", n_units, min_value=0)
    check_int("expected_distinct", "per_token", per_token, min_value=0, max_value=max(n_units, 0))
    if n_units == 0 or per_token == 0 or batch == 0:
        return 0.0
    return n_units * (1.0 - (1.0 - per_token / n_units) ** batch)


@dataclass(frozen=True)
class StepCost:
    """Cost of one decode step of ``batch`` tokens (one per sequence). Bytes and FLOPs are totals.

    bytes_total = bytes_dense + bytes_sparse + bytes_activations + bytes_kv  (eq. 7.2b + extras).
    distinct_units: expected distinct sparse units read (eq. 7.2a), summed over parts.
    bytes_streamed: bytes read if every selection re-reads its unit (no deduplication), + dense + kv.
    time_s / bound: roofline time (eq. 7.2c) and which limit sets it ("memory" or "compute"),
    None when no ceilings were given.
    """

    batch: int
    flops: float
    bytes_dense: float
    bytes_sparse: float
    bytes_activations: float = 0.0
    bytes_kv: float = 0.0
    distinct_units: float = 0.0
    bytes_streamed: float = 0.0
    time_s: float | None = None
    bound: str | None = None
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_total(self) -> float:
        return self.bytes_dense + self.bytes_sparse + self.bytes_activations + self.bytes_kv

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes_total if self.bytes_total > 0 else float("inf")


def roofline(n_bytes: float, flops: float, bandwidth: float, peak_flops: float) -> tuple[float, str]:
    """(7.2c) ``max(bytes / bandwidth, flops / peak)`` and which term wins."""
    check_float("roofline", "bandwidth", bandwidth, min_value=0.0, min_inclusive=False)
    check_float("roofline", "peak_flops", peak_flops, min_value=0.0, min_inclusive=False)
    t_mem, t_flop = n_bytes / bandwidth, flops / peak_flops
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")


def _ceiling_numbers(ceilings) -> tuple[float, float] | None:
    if ceilings is None:
        return None
    if isinstance(ceilings, tuple):
        return float(ceilings[0]), float(ceilings[1])
    return float(ceilings.copy_bytes_per_s), float(ceilings.matmul_flops_per_s)


def layer_step_cost(cost: LayerCost, batch: int, *, bytes_per_param: float = 4,
                    d_model: int | None = None, activation_bytes: float | None = None,
                    ceilings=None) -> StepCost:
    """Cost of one layer for a decode step of ``batch`` tokens (eqs. 7.2a-c).

    bytes_per_param: b (4 for fp32, 2 for bf16). d_model: when given, the input and output
    activations (2*B*D values of ``activation_bytes``, default b) are counted. ceilings: a
    :class:`~labcore.profiling.ceilings.Ceilings` or ``(bytes_per_s, flops_per_s)`` for the roofline.
    """
    check_int("layer_step_cost", "batch", batch, min_value=1)
    check_float("layer_step_cost", "bytes_per_param", bytes_per_param, min_value=0.0, min_inclusive=False)
    if not isinstance(cost, LayerCost):
        raise TypeError(f"layer_step_cost: cost={cost!r} is not a LayerCost")
    b = float(bytes_per_param)
    distinct = expected_distinct(cost.n_units, cost.units_per_token, batch) if cost.sparse_part else 0.0
    bytes_dense = b * cost.dense_params                          # read once per step
    bytes_sparse = b * cost.unit_params * distinct                # (7.2b)
    bytes_act = 0.0
    if d_model is not None:
        check_int("layer_step_cost", "d_model", d_model, min_value=1)
        bytes_act = 2.0 * batch * d_model * (b if activation_bytes is None else activation_bytes)
    streamed = bytes_dense + b * cost.unit_params * cost.units_per_token * batch
    flops = float(batch * cost.flops_per_token)
    time_s = bound = None
    nums = _ceiling_numbers(ceilings)
    if nums is not None:
        time_s, bound = roofline(bytes_dense + bytes_sparse + bytes_act, flops, *nums)
    return StepCost(batch=batch, flops=flops, bytes_dense=bytes_dense, bytes_sparse=bytes_sparse,
                    bytes_activations=bytes_act, distinct_units=distinct, bytes_streamed=streamed,
                    time_s=time_s, bound=bound)


def embedding_cost(vocab_size: int, d_model: int) -> LayerCost:
    """A token-embedding lookup as a sparse part: n = vocab rows, one row (k = 1) per token."""
    check_int("embedding_cost", "vocab_size", vocab_size)
    check_int("embedding_cost", "d_model", d_model)
    return LayerCost(params={"embedding": vocab_size * d_model}, sparse_part="embedding",
                     n_units=vocab_size, unit_params=d_model, units_per_token=1, flops_per_token=0)


def kv_cache_bytes(batch: int, context_len: int, n_attn_layers: int, d_kv: int,
                   bytes_per_value: float = 2) -> float:
    """Bytes of K and V read by one decode step: layers * 2 * context_len * d_kv * B * b_kv."""
    check_int("kv_cache_bytes", "batch", batch, min_value=1)
    check_int("kv_cache_bytes", "context_len", context_len, min_value=0)
    check_int("kv_cache_bytes", "n_attn_layers", n_attn_layers, min_value=0)
    check_int("kv_cache_bytes", "d_kv", d_kv, min_value=0)
    return float(n_attn_layers * 2 * context_len * d_kv * batch * bytes_per_value)


def model_step_cost(parts: Sequence[LayerCost] | dict[str, LayerCost], batch: int, *,
                    bytes_per_param: float = 4, n_attn_layers: int = 0, d_kv: int = 0,
                    context_len: int = 0, kv_bytes_per_value: float | None = None,
                    d_model: int | None = None, ceilings=None) -> StepCost:
    """Whole-model decode step: the sum of :func:`layer_step_cost` over ``parts`` (dense trunk parts
    as LayerCosts without a sparse part, sparse layers, :func:`embedding_cost`) plus the KV cache of
    ``n_attn_layers`` attention layers at ``context_len`` (bytes and attention FLOPs).

    ``parts`` may be a dict name -> LayerCost; ``StepCost.parts`` then maps each name to its bytes.
    """
    check_int("model_step_cost", "batch", batch, min_value=1)
    named = dict(parts) if isinstance(parts, dict) else {f"part{i}": p for i, p in enumerate(parts)}
    if not named:
        raise ValueError("model_step_cost: parts is empty; give at least one LayerCost")
    steps = {name: layer_step_cost(c, batch, bytes_per_param=bytes_per_param, d_model=d_model)
             for name, c in named.items()}
    kv_b = bytes_per_param if kv_bytes_per_value is None else kv_bytes_per_value
    bytes_kv = kv_cache_bytes(batch, context_len, n_attn_layers, d_kv, kv_b) if n_attn_layers else 0.0
    flops = sum(s.flops for s in steps.values()) + batch * n_attn_layers * 2.0 * 2 * context_len * d_kv
    bytes_dense = sum(s.bytes_dense for s in steps.values())
    bytes_sparse = sum(s.bytes_sparse for s in steps.values())
    bytes_act = sum(s.bytes_activations for s in steps.values())
    total = bytes_dense + bytes_sparse + bytes_act + bytes_kv
    time_s = bound = None
    nums = _ceiling_numbers(ceilings)
    if nums is not None:
        time_s, bound = roofline(total, flops, *nums)
    part_bytes = {name: s.bytes_total for name, s in steps.items()}
    if bytes_kv:
        part_bytes["kv_cache"] = bytes_kv
    return StepCost(batch=batch, flops=flops, bytes_dense=bytes_dense, bytes_sparse=bytes_sparse,
                    bytes_activations=bytes_act, bytes_kv=bytes_kv,
                    distinct_units=sum(s.distinct_units for s in steps.values()),
                    bytes_streamed=sum(s.bytes_streamed for s in steps.values()) + bytes_kv,
                    time_s=time_s, bound=bound, parts=part_bytes)


def touched_bytes(cost: LayerCost, indices: torch.Tensor | None, *, bytes_per_param: float = 4,
                  to_units: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Bytes a step *actually* touched, counted from what the tokens selected (``aux.indices``):
    b * dense_params + b * unit_params * (number of distinct units in ``indices``).

    ``to_units`` maps selection ids to physical units when they differ (UltraMem's virtual slots ->
    physical value rows). A dense layer (``indices`` None) touches its dense params only.
    """
    b = float(bytes_per_param)
    if indices is None or not cost.sparse_part:
        return b * cost.total_params
    units = to_units(indices) if to_units is not None else indices
    n_distinct = int(torch.unique(units.reshape(-1)).numel())
    return b * cost.dense_params + b * cost.unit_params * n_distinct
