"""Parameter, FLOP and byte budgets of an LM, and matchers that size sparse models to equal budgets.

The UltraMem paper compares models at *equal compute* (forward FLOPs per token) and, among the sparse
ones, at *equal total parameters*: Dense-151M vs MoE-151M-2in32 vs UltraMem-151M-x12, where "x12"
means the sparse parameters are about 12 times the dense model's (total about 13x; docs/mechanisms.md §2.1).
This module counts those quantities for any :class:`~labcore.lm.model.ModelConfig` without building the
model, and sizes MoE and memory plans so that such comparisons hold within a tolerance.

What is counted (per token; L blocks, D model dim, V vocabulary, C context length)
----------------------------------------------------------------------------------

===================  ====================================  ======================================
part                 parameters (exact)                     forward FLOPs (2 per multiply-add)
===================  ====================================  ======================================
embedding            V*D (one matrix when tied)             0 (a row lookup)
attention            L * 4 D^2 (q, k, v, out; no biases)    L * 2 * 4 D^2 (projections)
attention scores     --                                     L * (2 C D + 2 C D)  (Q Kᵀ and A V)
norms                (2L + 1) * D                           not counted (elementwise)
ffn / moe / memory   each layer config's ``cost()``         each layer config's ``cost()``
head                 V*D if untied, else 0 (shared)         2 D V
===================  ====================================  ======================================

Not counted as FLOPs: norms, rotary, attention softmax and masking, residual adds, the loss; they are
elementwise (a few FLOPs per element, under 1% here) and ``torch.utils.flop_counter`` ignores them
too. Attention scores are counted for a token attending to ``context_len`` keys: pass the sequence
length T to compare with a dense forward over T tokens (the kernel computes the whole T x T score
matrix and masks half of it; ``FlopCounterMode`` counts the full matrix too), or ``(T + 1) / 2``
(rounded) for the average number of keys a causal token really needs.

Training FLOPs per token ~= 3 x forward: the backward pass computes, for every matmul, one product
for the input gradient and one for the weight gradient, each as large as the forward product. This
is the usual 6N rule (forward 2N + backward 4N). It is an approximation for memories: the backward of
a value gather is a scatter-add into the touched rows (about as costly as the forward gather, not
twice) and there is no input gradient of the embedding lookup; ``train_flops_per_token`` uses the
plain 3x for every part.

Activated parameters per token: every parameter except the sparse parts (MoE experts, memory value
tables), plus the units a token touches: K experts per MoE layer, H*K value rows per memory (each
memory reads its own rows even from a shared pool). The embedding and head matrices count fully (the
tied head reads the whole matrix). Sparse bytes per token: ``dtype_bytes`` times the parameters of
those touched units (the expert weights / value rows a single decoded token reads; keys and query
networks are dense and not included).

Matchers
--------
:func:`match_moe` and :func:`match_memory` take a *dense* base config and a target
total parameter count, and return a config whose total parameters and forward FLOPs per token are
both within ``tol`` (default 2%) of the target and of the base model:

- MoE: the MoE replaces every FFN; ``d_expert`` is solved for equal FLOPs (K experts plus the router
  cost what the dense FFN cost) and ``n_experts`` for the parameter target.
- memories (:func:`match_memory`, any layer registered with role "memory"; :func:`match_pkm` and
  :func:`match_ultramem` name one): the memories are added to the dense trunk, so they add compute
  (query network, key scores, value reads). To keep compute equal the trunk's FFN hidden size
  ``d_ff`` is reduced (the paper's UltraMem models likewise have a smaller dense part than the dense
  baseline, Table 2), and the spec's ``size_field`` (``n_keys``: N = n_keys^2 values per memory) is
  solved for the parameter target, starting from the spec's ``min_size``.

A matcher that cannot get within ``tol`` raises ConfigError saying the closest it got.
:func:`equal_budget_family` builds the matched configs (dense, MoE, the memories of
:func:`family_names`, or any registered ones by name) from one dense base.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from labcore.config import ConfigError, check_float, check_int
from labcore.layers.base import LayerCost
from labcore.layers.moe import MoEConfig
from labcore.layers.registry import get, memory_spec, specs
from labcore.lm.model import ModelConfig, SparsePlan, spread_placements

# ----------------------------------------------------------------------------------------------
# The budget record.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Static costs of one model config (all per token unless named otherwise).

    total_params: every parameter, shared tensors once (tied embedding/head, shared value pool:
        N_pool rows, ``ModelConfig.pool_rows()``); blocks whose FFN a memory replaces count no FFN.
    active_params: parameters a token uses (see module docstring).
    sparse_params: parameters in sparse parts (MoE experts, memory value tables).
    flops_per_token: forward FLOPs at ``context_len``; train_flops_per_token = 3 x forward.
    sparse_bytes_per_token: bytes of sparse parameters one token reads, at ``dtype_bytes`` each.
    params_by_part / flops_by_part: the breakdown (keys "embedding", "head", "attention", "norms",
        "ffn", "moe", "memory"; FLOPs also "attention_scores").
    """

    total_params: int
    active_params: int
    sparse_params: int
    flops_per_token: int
    train_flops_per_token: int
    sparse_bytes_per_token: int
    context_len: int
    dtype_bytes: int
    params_by_part: Mapping[str, int]
    flops_by_part: Mapping[str, int]

    @property
    def dense_params(self) -> int:
        """Parameters outside the sparse parts (read for every token)."""
        return self.total_params - self.sparse_params

    def row(self) -> dict[str, float | int]:
        """A flat dict for tables (pandas / results)."""
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "sparse_params": self.sparse_params,
            "dense_params": self.dense_params,
            "flops_per_token": self.flops_per_token,
            "train_flops_per_token": self.train_flops_per_token,
            "sparse_bytes_per_token": self.sparse_bytes_per_token,
            "context_len": self.context_len,
        }


def _layer_costs(cfg: ModelConfig) -> tuple[list[LayerCost], list[LayerCost], list[LayerCost]]:
    """(dense FFN costs, MoE costs, memory costs), one entry per layer."""
    moe_ids = cfg.moe_block_ids()
    # blocks whose FFN a memory replaces (SparsePlan.memory_replaces_ffn) have none
    ffn = [cfg.ffn_config().cost()] * (cfg.n_layers - len(moe_ids) - len(cfg.replaced_ffn_blocks()))
    moe = [cfg.plan.moe.cost()] * len(moe_ids) if moe_ids else []
    mem_cfg = cfg.memory_layer_config()
    mem = [mem_cfg.cost()] * len(cfg.memory_pairs()) if mem_cfg is not None else []
    return ffn, moe, mem


def _sparse(c: LayerCost) -> int:
    return int(c.params.get(c.sparse_part, 0)) if c.sparse_part else 0


def model_budget(cfg: ModelConfig, *, context_len: int | None = None, dtype_bytes: int = 2) -> Budget:
    """The :class:`Budget` of ``cfg`` (no model is built). ``context_len`` defaults to max_seq_len."""
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"model_budget: cfg={cfg!r} is not allowed: must be a ModelConfig")
    C = cfg.max_seq_len if context_len is None else context_len
    check_int("model_budget", "context_len", C, min_value=1)
    check_int("model_budget", "dtype_bytes", dtype_bytes, min_value=1)
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    ffn, moe, mem = _layer_costs(cfg)

    mem_params = sum(c.total_params for c in mem)
    mem_sparse = sum(_sparse(c) for c in mem)
    if cfg.plan.shared_values and mem:  # one pool of N_pool rows (ring windows: N / share_ratio), counted once
        pool = cfg.pool_rows() * mem[0].unit_params
        mem_params += pool - sum(_sparse(c) for c in mem)
        mem_sparse = pool
    params = {
        "embedding": V * D,
        "head": 0 if cfg.tie_embeddings else V * D,
        "attention": L * 4 * D * D,
        "norms": (2 * L + 1) * D,
        "ffn": sum(c.total_params for c in ffn),
        "moe": sum(c.total_params for c in moe),
        "memory": mem_params,
    }
    flops = {
        "attention": L * 2 * 4 * D * D,
        "attention_scores": L * 4 * C * D,  # Q Kᵀ: 2 C D, A V: 2 C D per token
        "ffn": sum(c.flops_per_token for c in ffn),
        "moe": sum(c.flops_per_token for c in moe),
        "memory": sum(c.flops_per_token for c in mem),
        "head": 2 * D * V,
    }
    total = sum(params.values())
    sparse = sum(_sparse(c) for c in moe) + mem_sparse
    touched = sum(c.units_per_token * c.unit_params for c in moe + mem)
    fwd = sum(flops.values())
    return Budget(total_params=total, active_params=total - sparse + touched, sparse_params=sparse,
                  flops_per_token=fwd, train_flops_per_token=3 * fwd,
                  sparse_bytes_per_token=dtype_bytes * touched, context_len=C, dtype_bytes=dtype_bytes,
                  params_by_part=params, flops_by_part=flops)


def format_budget_table(configs: Mapping[str, ModelConfig], *, context_len: int | None = None,
                        dtype_bytes: int = 2) -> str:
    """A plain-text table of the budgets of several configs (first one = the reference for ratios)."""
    rows = [(name, model_budget(c, context_len=context_len, dtype_bytes=dtype_bytes))
            for name, c in configs.items()]
    if not rows:
        return ""
    ref = rows[0][1]
    w = max(10, *(len(name) for name in configs))  # "ultramem_v2", "memory_plus" are 11 wide
    head = (f"{'model':<{w}} {'total':>12} {'x ref':>6} {'active':>11} {'sparse':>12} {'fwd FLOPs/tok':>14} "
            f"{'x ref':>6} {'sparse B/tok':>12}  plan")
    lines = [head, "-" * len(head)]
    for name, b in rows:
        c = configs[name]
        lines.append(f"{name:<{w}} {b.total_params:>12,} {b.total_params / ref.total_params:>6.2f} "
                     f"{b.active_params:>11,} {b.sparse_params:>12,} {b.flops_per_token:>14,} "
                     f"{b.flops_per_token / ref.flops_per_token:>6.3f} {b.sparse_bytes_per_token:>12,}  "
                     f"{describe_plan(c)}")
    lines.append(f"(context_len={rows[0][1].context_len}, {dtype_bytes} bytes/param; FLOPs forward, "
                 f"training ~= 3x)")
    return "\n".join(lines)


def describe_plan(cfg: ModelConfig) -> str:
    """One line saying what the sparse layers are."""
    p = cfg.plan
    if p.kind == "dense":
        return f"dense d_ff={cfg.d_ff}"
    if p.kind == "moe":
        m = p.moe
        shared = f" + shared {m.shared_hidden}" if m.shared_hidden else ""
        return (f"MoE top-{m.top_k} of {m.n_experts} experts, d_expert={m.d_expert}{shared}, "
                f"blocks={len(cfg.moe_block_ids())}")
    m, spec = p.memory, memory_spec(p.memory)
    shown = [(f, f) for f in (spec.size_field, "heads", "top_k", "k_dim") if f] + [("expansion", "E")]
    fields = " ".join(f"{short}={getattr(m, f)}" for f, short in shown if hasattr(m, f))
    return (f"{p.memory_type} {fields} @ {'/'.join(p.placements)}{' shared' if p.shared_values else ''}, "
            f"d_ff={cfg.d_ff}")


# ----------------------------------------------------------------------------------------------
# Matchers.
# ----------------------------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def last_at_most(f: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """Largest x in [lo, hi] with f(x) <= target for nondecreasing f (lo if none)."""
    if f(lo) > target:
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if f(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class _Best:
    err: float = math.inf
    cfg: ModelConfig | None = None
    p_err: float = math.inf
    f_err: float = math.inf

    def offer(self, cfg: ModelConfig, target_params: int, target_flops: int, context_len: int) -> None:
        b = model_budget(cfg, context_len=context_len)
        p_err, f_err = _rel(b.total_params, target_params), _rel(b.flops_per_token, target_flops)
        if max(p_err, f_err) < self.err:
            self.err, self.cfg, self.p_err, self.f_err = max(p_err, f_err), cfg, p_err, f_err


def _check_base(fn: str, base: ModelConfig, target_total_params: int, tol: float,
                context_len: int | None) -> tuple[int, int]:
    if not isinstance(base, ModelConfig) or base.plan.kind != "dense":
        got = f"a ModelConfig with plan kind {base.plan.kind!r}" if isinstance(base, ModelConfig) else (
            type(base).__name__)
        raise ConfigError(f"{fn}: base ({got}) is not allowed: must be a ModelConfig with a dense plan")
    check_int(fn, "target_total_params", target_total_params, min_value=1)
    check_float(fn, "tol", tol, min_value=0.0, max_value=1.0, min_inclusive=False)
    C = base.max_seq_len if context_len is None else context_len
    check_int(fn, "context_len", C, min_value=1)
    b = model_budget(base, context_len=C)
    if target_total_params <= b.total_params:
        raise ConfigError(f"{fn}: target_total_params={target_total_params:,} is not allowed: must exceed "
                          f"the dense base's {b.total_params:,} parameters")
    return b.flops_per_token, C


def _done(fn: str, best: _Best, tol: float, target_params: int, what: str) -> ModelConfig:
    if best.cfg is None or best.err > tol:
        got = "no valid config" if best.cfg is None else (
            f"closest: params off by {best.p_err:.2%}, FLOPs off by {best.f_err:.2%} with "
            f"{describe_plan(best.cfg)}")
        raise ConfigError(f"{fn}: cannot match target_total_params={target_params:,} and the dense FLOPs "
                          f"within tol={tol:.1%} ({got}); {what}")
    return best.cfg


def match_moe(base: ModelConfig, target_total_params: int, *, top_k: int = 2, n_experts: int | None = None,
              d_expert: int | None = None, context_len: int | None = None, tol: float = 0.02,
              multiple_of: int = 8, max_experts: int = 4096, **moe_kwargs: Any) -> ModelConfig:
    """An MoE version of the dense ``base`` (MoE in every block) with ``target_total_params`` total
    parameters and the base's forward FLOPs per token, both within ``tol``.

    Searches ``n_experts`` (unless given) and, for each, the ``d_expert`` (a multiple of
    ``multiple_of``, unless given) whose top-k compute plus router matches the dense FFN's;
    ``moe_kwargs`` go to MoEConfig (router, shared experts, loss coefficients...). ``multiple_of``
    keeps expert widths aligned for the grouped GEMM (16-byte rows) and GPU tiles; use 1 for the
    finest match.
    """
    fn = "match_moe"
    target_flops, C = _check_base(fn, base, target_total_params, tol, context_len)
    check_int(fn, "top_k", top_k, min_value=1)
    check_int(fn, "multiple_of", multiple_of, min_value=1)

    def cfg_of(e: int, d: int) -> ModelConfig:
        moe = MoEConfig(d_model=base.d_model, d_expert=d, n_experts=e, top_k=top_k, **moe_kwargs)
        return dataclasses.replace(base, plan=SparsePlan(kind="moe", moe=moe))

    def flops(e: int, d: int) -> int:
        return model_budget(cfg_of(e, d), context_len=C).flops_per_token

    def params(e: int, d: int) -> int:
        return model_budget(cfg_of(e, d), context_len=C).total_params

    def d_for(e: int) -> list[int]:
        if d_expert is not None:
            return [d_expert]
        j = last_at_most(lambda j: flops(e, j * multiple_of), target_flops, 1,
                          max(1, 8 * base.d_ff // multiple_of))
        return [j * multiple_of, (j + 1) * multiple_of]

    best = _Best()
    if n_experts is not None:
        e_candidates = [n_experts]
    else:
        # With d_expert flop-matched, d(E) ~ (F - 2 D E) / (6 D K) shrinks as the router grows, so the
        # expert parameters E * d(E) rise up to about half of the largest feasible E, then fall:
        # search below that peak, where params grow with E.
        e_feasible = last_at_most(lambda e: flops(e, d_expert or multiple_of), target_flops, top_k,
                                   max_experts)
        e_hi = max(top_k, e_feasible // 2) if d_expert is None else e_feasible
        e0 = last_at_most(lambda e: params(e, d_for(e)[0]), target_total_params, top_k, e_hi)
        e_candidates = range(max(top_k, e0 - 1), min(max_experts, e0 + 2) + 1)
    for e in e_candidates:
        for d in d_for(e):
            best.offer(cfg_of(e, d), target_total_params, target_flops, C)
    return _done(fn, best, tol, target_total_params,
                 "try a smaller multiple_of, another top_k, other n_experts/d_expert, or a larger tol")


def match_memory(base: ModelConfig, target_total_params: int, memory: str, *,
                 placements: tuple[str, ...] | str | None = None, n_memories: int | None = None,
                 span: int | None = None, shared_values: bool = False, context_len: int | None = None,
                 tol: float = 0.02, multiple_of: int = 8, max_size: int = 1 << 14,
                 **memory_kwargs: Any) -> ModelConfig:
    """A version of the dense ``base`` with memories of the registered type ``memory`` ("pkm",
    "ultramem", ...): the spec's ``size_field`` (``n_keys``: N = n_keys^2 values per memory) sized for
    ``target_total_params``, and the trunk's ``d_ff`` reduced (in multiples of ``multiple_of``) so
    that forward FLOPs per token equal the base's, both within ``tol``.

    Placements: given; else ``n_memories`` memories with skip ``span`` spread by
    :func:`~labcore.lm.model.spread_placements`; else the spec's ``layout(L)`` (UltraMem: one memory
    per 5 blocks, span 3 or less: the release's 20-block layout 2:5/6:9/10:13/14:17; UltraMemV2: one
    beside every block's FFN; Memory+: three, span 0); else one memory beside the middle block's FFN (``"L//2:L//2"``; PKM is best at an intermediate layer,
    docs/mechanisms.md §4). ``memory_kwargs`` go to the memory's config (heads, k_dim, top_k, ...);
    a ``n_model_layers`` field is set by the model (number of memories). The search starts at the
    spec's ``min_size`` for those fields.
    """
    fn = f"match_memory({memory!r})"
    spec = memory_spec(memory, owner="match_memory.memory")
    if spec.size_field is None:
        raise ConfigError(f"{fn}: layer {spec.name!r} has no size_field in its LayerSpec: nothing to solve for")
    if placements is None:
        if n_memories is None and span is None and spec.layout is not None:
            n_memories, span = spec.layout(base.n_layers)
        if n_memories is None and span is None:
            placements = (f"{base.n_layers // 2}:{base.n_layers // 2}",)
        else:
            n_mem = n_memories or (spec.layout(base.n_layers)[0] if spec.layout is not None else 1)
            sp = min(3, base.n_layers // n_mem - 1) if span is None else span
            placements = spread_placements(n_mem, base.n_layers, max(0, sp))
    kwargs = {"d_model": base.d_model, **memory_kwargs}

    def make(n: int) -> Any:
        return spec.config(**{**kwargs, spec.size_field: n})

    min_size = spec.min_size(kwargs) if spec.min_size is not None else 1
    # Validates the memory fields and normalises the placements before the search.
    placements = SparsePlan(kind="memory", memory=make(min_size), placements=placements).placements
    target_flops, C = _check_base(fn, base, target_total_params, tol, context_len)
    check_int(fn, "multiple_of", multiple_of, min_value=1)
    step = multiple_of

    def cfg_of(n: int, d_ff: int) -> ModelConfig:
        plan = SparsePlan(kind="memory", memory=make(n), placements=placements, shared_values=shared_values)
        return dataclasses.replace(base, d_ff=d_ff, plan=plan)

    def d_ff_for(n: int) -> int:  # the largest d_ff (a multiple of step) within the FLOP target
        j = last_at_most(lambda j: model_budget(cfg_of(n, j * step), context_len=C).flops_per_token,
                          target_flops, 1, max(1, base.d_ff // step))
        return j * step

    def params_at(n: int) -> int:
        return model_budget(cfg_of(n, d_ff_for(n)), context_len=C).total_params

    n0 = last_at_most(params_at, target_total_params, min_size, max_size)
    best = _Best()
    for n in (n0, n0 + 1):
        if n > max_size:
            continue
        d = d_ff_for(n)
        for dd in (d, d + step):
            best.offer(cfg_of(n, dd), target_total_params, target_flops, C)
    return _done(fn, best, tol, target_total_params,
                 "the memories' own compute (query network, key scores) may exceed what reducing d_ff can "
                 "give back: lower k_dim / heads / top_k, use fewer memories, a smaller multiple_of, or raise "
                 "the target")


def match_pkm(base: ModelConfig, target_total_params: int, **kwargs: Any) -> ModelConfig:
    """:func:`match_memory` for PKM (``kwargs``: its keywords and PKMConfig fields)."""
    return match_memory(base, target_total_params, "pkm", **kwargs)


def match_ultramem(base: ModelConfig, target_total_params: int, **kwargs: Any) -> ModelConfig:
    """:func:`match_memory` for UltraMem (``kwargs``: its keywords and UltraMemConfig fields)."""
    return match_memory(base, target_total_params, "ultramem", **kwargs)


# ----------------------------------------------------------------------------------------------
# The equal-budget family.
# ----------------------------------------------------------------------------------------------


def small_base_config(**overrides: Any) -> ModelConfig:
    """The lab's small default dense model (CPU-trainable in minutes): V=512, D=128, L=8, 4 heads,
    d_ff=512, T<=128. Keyword overrides replace fields."""
    fields = dict(vocab_size=512, d_model=128, n_layers=8, n_heads=4, d_ff=512, max_seq_len=128)
    fields.update(overrides)
    return ModelConfig(**fields)


NAMED_ONLY = ("ultramem_v2", "memory_plus", "peer")
"""Memories whose spec says how the family sizes them (``family_kwargs``) but which join the family
only when named (``equal_budget_family(base, names=...)``, :func:`memory_family_names`): the default
family stays the UltraMem paper's comparison (dense, MoE, PKM, UltraMem), which the architectures
notebook and the benchmarks' default model lists train and time."""


def family_names(every_memory: bool = False) -> tuple[str, ...]:
    """Names in the default equal-budget family, in registration order: "dense", "moe", then every
    memory whose spec has ``family_kwargs`` and is not in :data:`NAMED_ONLY` ("pkm", "ultramem", ...);
    with ``every_memory``, every layer registered with role "memory" (the names
    :func:`equal_budget_family` accepts)."""
    return ("dense", "moe", *(s.name for s in specs("memory") if every_memory or (
        s.family_kwargs is not None and s.name not in NAMED_ONLY)))


def memory_family_names() -> tuple[str, ...]:
    """"dense", "moe" and every memory whose spec has ``family_kwargs``, in registration order: the
    whole memory family (``equal_budget_family(base, names=memory_family_names())``)."""
    return ("dense", "moe", *(s.name for s in specs("memory") if s.family_kwargs is not None))


def equal_budget_family(base: ModelConfig, ratio: float = 12.0, *, context_len: int | None = None,
                        tol: float = 0.02, multiple_of: int = 8, names: Sequence[str] | None = None,
                        **layer_kwargs: Mapping[str, Any]) -> dict[str, ModelConfig]:
    """The dense ``base`` and, for every registered sparse layer (MoE and each memory type, in
    registration order), a config at equal forward FLOPs per token (all of them) and equal total
    parameters (the sparse ones), within ``tol``. Keys are the registered names; by default
    :func:`family_names` ("dense", "moe", "pkm", "ultramem", ...); ``names`` picks others, any
    registered memory included (:func:`memory_family_names`: every memory with family sizing,
    UltraMemV2, Memory+ and PEER too).

    ``ratio`` = sparse / dense parameters as in the paper's "x12": the sparse models' total is
    ``(1 + ratio) * dense total``. ``layer_kwargs``: per registered name, keyword arguments for its
    matcher (``moe={...}`` for :func:`match_moe`, ``pkm={...}`` for :func:`match_memory`, ...).
    Defaults: MoE top-2 (the paper's "2inN"); each memory's ``LayerSpec.family_kwargs(D)`` (PKM 4
    heads x top-32, k_dim = D/2; UltraMem 2 heads x top-16, k_dim D/4 per side, d_value D/2, E=4,
    R=2, 2 cores: the release's 192 at D = 768 and Memory Layers at Scale's 2 x 256 at D = 1024;
    UltraMemV2 1 head x top-32 in every block, k_dim = D_v = D_p = D/4; Memory+ as PKM with D_v = D,
    three memories sharing one value pool; PEER 8 heads x top-16, k_dim = D/2, beside the middle
    block's FFN). A memory's ``family_kwargs`` may also hold :func:`match_memory` keywords
    (Memory+'s ``shared_values``).
    ``multiple_of``: alignment of the searched widths (d_expert, d_ff).
    """
    fn = "equal_budget_family"
    check_float(fn, "ratio", ratio, min_value=0.0, min_inclusive=False)
    registered = family_names(every_memory=True)
    wanted = family_names() if names is None else list(names)
    for n in (*wanted, *layer_kwargs):
        if n not in registered:
            raise ConfigError(f"{fn}: layer {n!r} is not allowed: must be one of {list(registered)}")
    dense_total = model_budget(base, context_len=context_len).total_params
    target = round((1 + ratio) * dense_total)
    common = {"context_len": context_len, "tol": tol, "multiple_of": multiple_of}
    family: dict[str, ModelConfig] = {}
    for name in [n for n in registered if n in wanted]:
        spec, own = get(name), dict(layer_kwargs.get(name) or {})
        if name == "dense":
            family[name] = base
        elif name == "moe":
            family[name] = match_moe(base, target, **{"top_k": 2, **common, **own})
        else:
            defaults = dict(spec.family_kwargs(base.d_model)) if spec.family_kwargs is not None else {}
            family[name] = match_memory(base, target, name, **{**defaults, **common, **own})
    return family
