"""Inference-cost lab: decode-step latency and memory access of Dense, MoE and the memory layers vs batch size.

The UltraMem paper's Figure 1 (docs/mechanisms.md §2.2): at equal compute, an MoE with ~12x the parameters
of a dense model decodes 2-6x slower, because a decode step of B tokens touches almost all experts
(whole experts are the unit of sparsity), while UltraMem touches only ~B*H*K value rows of millions
and stays close to dense. ``labcore bench inference`` measures that on this machine.

The models
----------
"dense", "moe" and the memories of the equal-budget family (``labcore.layers.registry``: "pkm",
"ultramem" and any memory whose spec says how the family sizes it; :func:`model_names`; any other
registered memory on request). :func:`labcore.lm.budget.equal_budget_family` sizes them from one dense base (default the lab's small
model, :func:`labcore.lm.budget.small_base_config`): all four at equal forward FLOPs per token (equal
*activated* compute) and the sparse ones at equal *total* parameters, ``(1 + ratio)`` times the
dense model's (``ratio`` = 12 as in the paper's "x12").

What is timed (one decode step: one new token for each of B sequences)
----------------------------------------------------------------------
* ``scope="layer"``: one sparse layer alone on B token vectors: the dense model's FFN, one MoE layer,
  the memory layer (the memory models' trunk FFNs are not in this number).
* Memory layers run with ``detailed_aux=False`` (:func:`labcore.layers.base.set_detailed_aux`): their
  per-call diagnostics over ALL value slots (``aux.counts``, a bincount of N or E*N entries, coverage,
  KL) cost time proportional to the memory size, not to B, and a decode step does not need them
  (at B=1 they were most of the layer's time). ``aux.indices``, which the byte counts use, stay.
* ``scope="model"``: the whole LM on ``idx`` of shape (B, 1): embedding, L blocks, memories, head.
  **No KV cache** (stated, as allowed): attention sees only the new token, so the number is the
  sparse layers + the dense trunk's per-token cost. The cost model can add the KV traffic
  (``context_len``), but the default prediction matches what is measured (``context_len=0``).
  Without a context, a token's hidden state would be a function of its id alone, so B sequences
  could never route more diversely than the (small) vocabulary allows. To stand in for the
  context, a fixed random vector per sequence, N(0, 1) per feature, is added to the token
  embedding (a forward hook on ``tok_emb``); the sparse layers then see B distinct inputs, as in a
  real decode step.

Columns of the result (one row per model x scope x batch size)
--------------------------------------------------------------
latency_s, latency_iqr_s   median and interquartile range of the step's wall time (labcore.profiling)
predicted_s                roofline of the cost model, max(bytes / copy bandwidth, FLOPs / matmul peak),
                           with this machine's measured ceilings (labcore.profiling.ceilings)
bytes_accessed             bytes the step actually touched: dense parameters once + the distinct
                           experts / value rows counted from ``aux.indices`` (docs/mechanisms.md §7.2's quantity,
                           the paper's "memory access")
bytes_predicted            the cost model's expectation of the same (eq. 7.2b)
bytes_streamed             bytes a non-deduplicating gather reads: dense + every selected unit, repeats
                           counted (B*K experts, B*H*K value rows)
achieved_bytes_per_s       bytes_accessed / latency_s;  frac_copy = that / copy bandwidth
streamed_bytes_per_s       bytes_streamed / latency_s;  frac_copy_streamed = that / copy bandwidth
read_s, read_bytes_per_s   memory layers, layer scope: the value read alone (the layer's ``read``:
                           ``embedding_bag`` gather-sum, plus IVE pooling and projection for UltraMem)
                           and the value bytes it streams per second; read_frac = read_s / latency_s.
                           Replayed by the spec's ``value_read`` hook; NaN for a memory without one
gather_s, gather_*         the gather inside the read alone (one ``F.embedding_bag`` with the bags the
                           forward produced; for PKM it is the whole read): the value bytes it streams
                           per second and gather_frac_copy = that / copy bandwidth. This is the part of
                           the layer whose speed is set by memory bandwidth; the rest (query, sub-key
                           scores, top-k search, IVE bookkeeping, projection) is compute
overlap_*                  GPU only, memory models with a skip-layer placement (UltraMem's "k:v", v > k):
                           the skip-layer overlap (below); NaN elsewhere

Skip-layer overlap (docs/mechanisms.md §1.2). An UltraMem memory placed at "k:v" reads block k's FFN input
and is added after block v, so its (memory-bound) lookup may run concurrently with the (compute-bound)
blocks k..v. On a GPU the bench times the memory alone, blocks k..v alone, and both launched on two
CUDA streams; ``overlap_frac = (t_mem + t_dense - t_both) / min(t_mem, t_dense)`` is 1 for perfect
overlap and 0 for none. On CPU it is not measured (one stream of execution; PyTorch CPU ops already
use the cores), and the bench says so.

Outputs: ``inference.parquet`` (the tidy table, atomic write) and ``inference.html`` (the interactive
plotly figure of :func:`labcore.viz.bench.inference_figure`: (a) latency vs B, (b) memory access vs
B, both log-log, measured and predicted; (c) the MoE / UltraMem latency ratio per batch size), in
``out_dir``. The command line is
:mod:`labcore.bench.inference_cli` (``labcore bench inference``).

Bad input (non-positive batch size, unknown model name, unknown dtype, an unavailable device, or
models that would not fit in memory: parameters + activations at the largest B, estimated before
anything is allocated) raises :class:`~labcore.layers.base.ConfigError` before any work.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from labcore.config import ConfigError, check_choice, check_float, check_int
from labcore.layers.base import LayerCost, set_detailed_aux
from labcore.layers.registry import get, memory_spec
from labcore.lm.budget import (
    describe_plan,
    equal_budget_family,
    family_names,
    model_budget,
    small_base_config,
)
from labcore.lm.model import LM
from labcore.profiling.ceilings import DTYPES, Ceilings, dtype_name, get_ceilings
from labcore.profiling.cost_model import layer_step_cost, model_step_cost, touched_bytes
from labcore.profiling.memory import available_memory_bytes
from labcore.profiling.timer import resolve_device, time_fn
from labcore.viz.bench import inference_figure

DEFAULT_BATCHES = tuple(2**i for i in range(13))  # 1, 2, 4, ..., 4096
COLUMNS = [
    "model", "scope", "batch", "latency_s", "latency_iqr_s", "predicted_s", "bound", "flops",
    "bytes_accessed", "bytes_predicted", "bytes_streamed", "achieved_bytes_per_s", "frac_copy",
    "streamed_bytes_per_s", "frac_copy_streamed", "read_s", "read_frac", "read_bytes_per_s",
    "gather_s", "gather_bytes_per_s", "gather_frac_copy",
    "overlap_mem_s", "overlap_dense_s", "overlap_both_s", "overlap_frac",
    "total_params", "active_params", "copy_bytes_per_s", "matmul_flops_per_s", "device", "dtype", "threads",
    "plan",
]
MEMORY_FIT_FRACTION = 0.8  # refuse configs whose estimate exceeds this share of the free memory




def model_names(every_memory: bool = False) -> tuple[str, ...]:
    """The bench's default models, in registration order: "dense", "moe", then the memories of the
    equal-budget family ("pkm", "ultramem", ...; :func:`labcore.lm.budget.family_names`); with
    ``every_memory``, every registered memory (the names the bench accepts)."""
    return family_names(every_memory)


# ----------------------------------------------------------------------------------------------
# Validation and the memory estimate (before anything is allocated).
# ----------------------------------------------------------------------------------------------


def sparse_layer_cfg(cfg) -> Any:
    """The config of the layer timed at scope "layer"."""
    if cfg.plan.kind == "moe":
        return cfg.plan.moe
    if cfg.plan.kind == "memory":
        return cfg.memory_layer_config()
    return cfg.ffn_config()


def sparse_layer(lm: LM, cfg) -> torch.nn.Module:
    """The layer timed at scope "layer" in the built model: the first MoE layer, the first memory or
    block 0's dense FFN."""
    if cfg.plan.kind == "moe":
        return lm.blocks[cfg.moe_block_ids()[0]].ffn
    if cfg.plan.kind == "memory":
        return lm.memories[0]
    return lm.blocks[0].ffn


def _activation_values_per_token(cfg) -> float:
    """A generous count of the floats alive per token in a decode step (logits, trunk, sparse layer)."""
    D, V = cfg.d_model, cfg.vocab_size
    per = 4 * V + 32 * D + 8 * cfg.d_ff
    lc = sparse_layer_cfg(cfg)
    if cfg.plan.kind == "moe":
        per += 8 * lc.top_k * (D + lc.d_expert) + 4 * lc.n_experts
    elif cfg.plan.kind == "memory":
        side = getattr(lc, "n_side", lc.n_keys) * getattr(lc, "key_rank", 1)
        m = getattr(lc, "m", lc.top_k)
        per += 4 * lc.heads * 2 * side + 4 * lc.heads * m * m + 16 * lc.heads * lc.top_k * 2
        per += 4 * getattr(lc, "expansion", 1) * getattr(lc, "d_v", D)          # PEER: no value table, D out
    return float(per)


def estimate_bytes(cfg, batch: int, dtype_bytes: int) -> int:
    """Parameters + activations of one model at batch ``batch`` (an over-estimate, not exact)."""
    params = model_budget(cfg, context_len=1, dtype_bytes=dtype_bytes).total_params
    return int(params * dtype_bytes + batch * _activation_values_per_token(cfg) * max(dtype_bytes, 4))


def validate(batch_sizes: Sequence[int], models: Sequence[str], device: torch.device, dtype: str,
             repeats: int, warmup: int, owner: str = "run_inference_bench") -> None:
    """Raise ConfigError (naming ``owner``, the parameter and what is allowed) on bad input."""
    if len(batch_sizes) == 0:
        raise ConfigError(f"{owner}.batch_sizes=() is not allowed: must list at least one batch size")
    for b in batch_sizes:
        check_int(owner, "batch_sizes", b, min_value=1)
    if len(models) == 0:
        raise ConfigError(f"{owner}.models=() is not allowed: must list at least one of "
                          + ", ".join(model_names(every_memory=True)))
    for m in models:
        check_choice(owner, "models", m, model_names(every_memory=True))
    check_choice(owner, "dtype", dtype, tuple(DTYPES))
    check_int(owner, "repeats", repeats, min_value=1)
    check_int(owner, "warmup", warmup, min_value=0)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{owner}.device={str(device)!r} is not allowed: CUDA is not available "
                          "here; use 'cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{owner}.device={str(device)!r} is not allowed: must be 'cpu' or 'cuda'")


def check_fits(configs: Mapping[str, Any], max_batch: int, device: torch.device, dtype_bytes: int,
               available: int | None = None) -> dict[str, int]:
    """Raise ConfigError if any model (built one at a time) would not fit; return the estimates."""
    avail = available_memory_bytes(device) if available is None else available
    est = {name: estimate_bytes(cfg, max_batch, dtype_bytes) for name, cfg in configs.items()}
    for name, need in est.items():
        if need > MEMORY_FIT_FRACTION * avail:
            raise ConfigError(
                f"run_inference_bench: model {name!r} needs about {need / 2**30:.2f} GiB at batch {max_batch} "
                f"(parameters + activations, {dtype_bytes} bytes/param) but only {avail / 2**30:.2f} GiB is "
                f"free on {device} (limit {MEMORY_FIT_FRACTION:.0%} of it): lower the ratio, the base "
                "model size or the largest batch size")
    return est


# ----------------------------------------------------------------------------------------------
# Building the models and the cost-model parts.
# ----------------------------------------------------------------------------------------------


def default_configs(base=None, ratio: float = 12.0, models: Sequence[str] | None = None, tol: float = 0.02,
                    **family_kwargs: Any) -> dict[str, Any]:
    """The equal-budget family (labcore.lm.budget.equal_budget_family) restricted to ``models``
    (default: :func:`model_names`)."""
    check_float("run_inference_bench", "ratio", ratio, min_value=0.0, min_inclusive=False)
    base = small_base_config() if base is None else base
    models = model_names() if models is None else tuple(models)
    fam = equal_budget_family(base, ratio, tol=tol, names=models, **family_kwargs)
    return {m: fam[m] for m in models}


def _layer_cost(layer_cfg) -> LayerCost:
    return layer_cfg.cost()


def _model_parts(cfg) -> dict[str, LayerCost]:
    """The model as cost-model parts: the dense trunk (read once per step) + each sparse layer."""
    budget = model_budget(cfg, context_len=1, dtype_bytes=4)
    parts: dict[str, LayerCost] = {}
    sparse_total = 0
    if cfg.plan.kind == "moe":
        c = cfg.plan.moe.cost()
        for i in cfg.moe_block_ids():
            parts[f"block{i}.moe"] = c
            sparse_total += c.total_params
    elif cfg.plan.kind == "memory":
        c = cfg.memory_layer_config().cost()
        for name in cfg.memory_names():
            parts[name] = c
            sparse_total += c.total_params
        if cfg.plan.shared_values and len(parts) > 1:
            raise ConfigError("run_inference_bench: shared value pools are not supported by the cost "
                              "comparison (one pool read by several memories); use shared_values=False")
    trunk_flops = budget.flops_per_token - sum(p.flops_per_token for p in parts.values())
    trunk = LayerCost(params={"trunk": budget.total_params - sparse_total}, flops_per_token=int(trunk_flops))
    return {"trunk": trunk, **parts}


def to_units(layer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """UltraMem with IVE selects virtual slots; the permutation maps them to physical rows."""
    perm = getattr(layer, "perm", None)
    if perm is None:
        return None
    n = layer.cfg.n_slots
    return lambda v: perm[v] % n


def _model_touched_bytes(lm, parts: Mapping[str, LayerCost], aux: Mapping[str, Any], b: float) -> float:
    layers = dict(lm.sparse_layers())
    total = b * parts["trunk"].total_params
    for name, cost in parts.items():
        if name == "trunk":
            continue
        a = aux.get(name)
        total += touched_bytes(cost, None if a is None else a.indices, bytes_per_param=b,
                               to_units=to_units(layers[name]))
    return total


# ----------------------------------------------------------------------------------------------
# Skip-layer overlap (GPU only).
# ----------------------------------------------------------------------------------------------


def _has_skip_layer(cfg) -> bool:
    """A memory model whose first memory reads block k and is added after a later block v > k."""
    pairs = cfg.memory_pairs()
    return bool(pairs) and pairs[0][0] < pairs[0][1]


def measure_overlap(lm, batch: int, *, warmup: int, repeats: int, device: torch.device,
                    dtype: torch.dtype) -> dict[str, float]:
    """Time memory 0 alone, blocks k..v alone and both on two CUDA streams (module docstring)."""
    if device.type != "cuda":
        raise ConfigError("measure_overlap: device must be a CUDA device (two streams)")
    (k, v), mem = lm.mem_pairs[0], lm.memories[0]
    D = lm.cfg.d_model
    gen = torch.Generator(device="cpu").manual_seed(1)
    u = torch.randn(batch, 1, D, generator=gen).to(device=device, dtype=dtype)   # block k's FFN input
    x = torch.randn(batch, 1, D, generator=gen).to(device=device, dtype=dtype)   # residual stream
    cos, sin = lm.rotary(1)
    blocks = list(lm.blocks[k:v + 1])

    def run_mem():
        return mem(u)

    def run_dense():
        h = x
        for blk in blocks:
            h = blk(h, cos, sin)[0]
        return h

    s_mem, s_dense = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def run_both():
        cur = torch.cuda.current_stream(device)
        s_mem.wait_stream(cur)
        s_dense.wait_stream(cur)
        with torch.cuda.stream(s_mem):
            run_mem()
        with torch.cuda.stream(s_dense):
            run_dense()
        cur.wait_stream(s_mem)
        cur.wait_stream(s_dense)

    t_mem = time_fn(run_mem, warmup=warmup, repeats=repeats, device=device).median_s
    t_dense = time_fn(run_dense, warmup=warmup, repeats=repeats, device=device).median_s
    t_both = time_fn(run_both, warmup=warmup, repeats=repeats, device=device).median_s
    frac = (t_mem + t_dense - t_both) / min(t_mem, t_dense)
    return {"overlap_mem_s": t_mem, "overlap_dense_s": t_dense, "overlap_both_s": t_both, "overlap_frac": frac}


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def run_inference_bench(batch_sizes: Sequence[int] = DEFAULT_BATCHES, models: Sequence[str] | None = None, *,
                        base=None, ratio: float = 12.0, configs: Mapping[str, Any] | None = None,
                        family_kwargs: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "float32", warmup: int = 2, repeats: int = 5,
                        threads: int | None = None, scopes: Sequence[str] = ("layer", "model"),
                        overlap: bool = True, context_len: int = 0, ceilings: Ceilings | None = None,
                        remeasure_ceilings: bool = False, out_dir: str | os.PathLike | None = None, seed: int = 0,
                        log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Measure decode-step latency and memory access vs batch size; return the tidy table.

    ``models``: names from ``model_names(every_memory=True)`` (default: :func:`model_names`, or the
    keys of ``configs``).
    ``configs`` (name -> ModelConfig) replaces the equal-budget family built from
    ``base`` and ``ratio`` (``family_kwargs`` go to equal_budget_family). ``context_len`` > 0 adds the
    KV cache of that length to the *prediction* only (nothing here reads a KV cache). ``ceilings``:
    use these instead of the machine's cached ones; ``remeasure_ceilings``: measure them again now
    (do this on a quiet machine if the cache was filled on a busy one). ``out_dir``: write
    ``inference.parquet`` and ``inference.html`` there.
    """
    say = log or (lambda s: None)
    dev = resolve_device(device)
    dt_name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    batch_sizes = tuple(batch_sizes)
    if models is None:
        models = tuple(configs) if configs is not None else model_names()
    models = tuple(models)
    validate(batch_sizes, models, dev, dt_name, repeats, warmup)
    for s in scopes:
        check_choice("run_inference_bench", "scopes", s, ("layer", "model"))
    check_int("run_inference_bench", "context_len", context_len, min_value=0)
    if threads is not None:
        check_int("run_inference_bench", "threads", threads, min_value=1)
    if configs is None:
        configs = default_configs(base, ratio, models, **dict(family_kwargs or {}))
    else:
        missing = [m for m in models if m not in configs]
        if missing:
            raise ConfigError(f"run_inference_bench: configs lacks {missing}; it has {sorted(configs)}")
        unknown = [m for m in configs if m not in model_names(every_memory=True)]
        if unknown:
            raise ConfigError(f"run_inference_bench: configs has unknown model name(s) {unknown}; allowed: "
                              + ", ".join(model_names(every_memory=True)))
    dt = DTYPES[dt_name]
    b = torch.tensor([], dtype=dt).element_size()
    check_fits({m: configs[m] for m in models}, max(batch_sizes), dev, b)
    with bench_threads(threads):
        ceil = ceilings_for(dev, dt, ceilings, remeasure_ceilings, say)
        skipping = [m for m in models if _has_skip_layer(configs[m])]
        if overlap and skipping and dev.type != "cuda":
            say("skip-layer overlap: not measured on CPU (it needs two CUDA streams); overlap_* columns are NaN")
        rows = []
        for name in models:
            rows += _bench_one(name, configs[name], batch_sizes, scopes=scopes, dev=dev, dt=dt, b=b,
                               ceil=ceil, warmup=warmup, repeats=repeats, context_len=context_len,
                               overlap=overlap and name in skipping and dev.type == "cuda", seed=seed, say=say)
    df = pd.DataFrame(rows, columns=COLUMNS)
    if out_dir is not None:
        write_outputs(df, out_dir)
    return df


@contextlib.contextmanager
def bench_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: as they are), restored afterwards."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ceilings_for(dev: torch.device, dt: torch.dtype, ceilings: Ceilings | None, remeasure: bool,
                 say: Callable[[str], None]) -> Ceilings:
    """``ceilings`` if given, else the machine's measured (cached) ceilings; says which it uses."""
    ceil = ceilings if ceilings is not None else get_ceilings(dev, dt, force=remeasure)
    say(f"ceilings on {dev} ({dtype_name(dt)}, {torch.get_num_threads()} threads): copy "
        f"{ceil.copy_bytes_per_s / 1e9:.2f} GB/s, matmul {ceil.matmul_flops_per_s / 1e9:.1f} GFLOP/s")
    return ceil


def _bench_one(name: str, cfg, batch_sizes: Sequence[int], *, scopes, dev, dt, b, ceil, warmup, repeats,
               context_len, overlap, seed, say) -> list[dict]:
    torch.manual_seed(seed)
    lm = LM(cfg).to(device=dev, dtype=dt).eval()
    set_detailed_aux(lm, False)                 # no O(N_slots) per-call diagnostics (module docstring)
    budget = model_budget(cfg, context_len=1, dtype_bytes=b)
    parts = _model_parts(cfg)
    layer = sparse_layer(lm, cfg)
    layer_cost = _layer_cost(sparse_layer_cfg(cfg))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    common = {"model": name, "total_params": budget.total_params, "active_params": budget.active_params,
              "copy_bytes_per_s": ceil.copy_bytes_per_s, "matmul_flops_per_s": ceil.matmul_flops_per_s,
              "device": str(dev), "dtype": dtype_name(dt), "threads": torch.get_num_threads(),
              "plan": describe_plan(cfg)}
    nan_cols = {c: math.nan for c in ("read_s", "read_frac", "read_bytes_per_s", "gather_s", "gather_bytes_per_s",
                                       "gather_frac_copy", "overlap_mem_s", "overlap_dense_s", "overlap_both_s",
                                       "overlap_frac")}
    rows = []
    with torch.inference_mode():
        for B in batch_sizes:
            if "layer" in scopes:
                x = torch.randn(B, cfg.d_model, generator=gen).to(device=dev, dtype=dt)   # (B, D)
                t = time_fn(lambda x=x: layer(x), warmup=warmup, repeats=repeats, device=dev)
                _, aux = layer(x)
                indices = getattr(aux, "indices", None) if layer_cost.sparse_part else None
                accessed = touched_bytes(layer_cost, indices, bytes_per_param=b, to_units=to_units(layer))
                pred = layer_step_cost(layer_cost, B, bytes_per_param=b, ceilings=ceil)
                extra = dict(nan_cols)
                if cfg.plan.kind == "memory":
                    extra.update(_time_read(layer, aux, B, b, t.median_s, warmup, repeats, dev,
                                            ceil.copy_bytes_per_s))
                rows.append(_row(common, "layer", B, t, pred, accessed, extra))
            if "model" in scopes:
                idx = torch.randint(cfg.vocab_size, (B, 1), generator=gen).to(dev)          # (B, T=1)
                ctx = torch.randn(B, 1, cfg.d_model, generator=gen).to(device=dev, dtype=dt)  # (B, 1, D)
                hook = lm.tok_emb.register_forward_hook(lambda mod, inp, out, ctx=ctx: out + ctx)
                try:
                    t = time_fn(lambda idx=idx: lm(idx), warmup=warmup, repeats=repeats, device=dev)
                    out = lm(idx)
                finally:
                    hook.remove()
                accessed = _model_touched_bytes(lm, parts, out.aux, b)
                pred = model_step_cost(parts, B, bytes_per_param=b, ceilings=ceil,
                                       n_attn_layers=cfg.n_layers if context_len else 0,
                                       d_kv=cfg.d_model if context_len else 0, context_len=context_len)
                extra = dict(nan_cols)
                if overlap:
                    extra.update(measure_overlap(lm, B, warmup=warmup, repeats=repeats, device=dev, dtype=dt))
                rows.append(_row(common, "model", B, t, pred, accessed, extra))
            for last in rows[-len(scopes):]:
                say(f"[{name:>8}] B={B:<5} {last['scope']:>5}: {last['latency_s'] * 1e3:9.3f} ms "
                    f"(pred {last['predicted_s'] * 1e3:8.3f} ms, {last['bound']}-bound), accessed {last['bytes_accessed'] / 1e6:9.2f} MB "
                    f"(pred {last['bytes_predicted'] / 1e6:9.2f} MB), {last['frac_copy']:.1%} of copy")
    return rows


def _time_read(layer, aux, B: int, b: float, layer_s: float, warmup: int, repeats: int, dev,
               copy_bytes_per_s: float) -> dict:
    """Time the memory layer's value read, and the gather inside it, with the indices/scores its
    forward produced (the spec's ``value_read`` hook replays them); {} without a hook."""
    value_read = memory_spec(layer.cfg).value_read
    if value_read is None:
        return {}
    read, gather = value_read(layer, aux)
    t = time_fn(read, warmup=warmup, repeats=repeats, device=dev)
    g = time_fn(gather, warmup=warmup, repeats=repeats, device=dev)
    d_v = layer.values.weight.shape[1]
    value_bytes = aux.indices.numel() * d_v * b                         # every selected row, repeats counted
    return {"read_s": t.median_s, "read_frac": t.median_s / layer_s, "read_bytes_per_s": value_bytes / t.median_s,
            "gather_s": g.median_s, "gather_bytes_per_s": value_bytes / g.median_s,
            "gather_frac_copy": value_bytes / g.median_s / copy_bytes_per_s}


def _row(common: dict, scope: str, B: int, t, pred, accessed: float, extra: dict) -> dict:
    lat = t.median_s
    copy = common["copy_bytes_per_s"]
    return {**common, "scope": scope, "batch": B, "latency_s": lat, "latency_iqr_s": t.iqr_s,
            "predicted_s": pred.time_s, "bound": pred.bound, "flops": pred.flops,
            "bytes_accessed": accessed, "bytes_predicted": pred.bytes_total, "bytes_streamed": pred.bytes_streamed,
            "achieved_bytes_per_s": accessed / lat, "frac_copy": accessed / lat / copy,
            "streamed_bytes_per_s": pred.bytes_streamed / lat, "frac_copy_streamed": pred.bytes_streamed / lat / copy,
            **extra}


# ----------------------------------------------------------------------------------------------
# The MoE / UltraMem ratio and the outputs (the figure is labcore.viz.bench's).
# ----------------------------------------------------------------------------------------------


def moe_ultramem_ratio(df: pd.DataFrame, scope: str = "model") -> pd.DataFrame:
    """Per batch size: MoE latency / UltraMem latency (the paper's "2-6x") and the memory-access ratio."""
    d = df[df["scope"] == scope]
    moe = d[d["model"] == "moe"].set_index("batch")
    um = d[d["model"] == "ultramem"].set_index("batch")
    common = moe.index.intersection(um.index)
    return pd.DataFrame({
        "batch": common,
        "latency_ratio": (moe.loc[common, "latency_s"] / um.loc[common, "latency_s"]).to_numpy(),
        "bytes_ratio": (moe.loc[common, "bytes_accessed"] / um.loc[common, "bytes_accessed"]).to_numpy(),
    })


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_outputs(df: pd.DataFrame, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``inference.parquet`` and ``inference.html`` in ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    pq, html = out / "inference.parquet", out / "inference.html"
    _atomic(pq, lambda p: df.to_parquet(p, index=False))
    scope = "model" if (df["scope"] == "model").any() else "layer"
    fig = inference_figure(df, moe_ultramem_ratio(df, scope), scope)
    _atomic(html, lambda p: fig.write_html(p, include_plotlyjs=True, full_html=True))
    return pq, html


def format_table(df: pd.DataFrame) -> str:
    """Plain-text summary: one line per (scope, batch) with each model's latency and access."""
    lines = []
    for scope in [s for s in ("layer", "model") if s in set(df["scope"])]:
        d = df[df["scope"] == scope]
        models = [m for m in model_names(every_memory=True) if m in set(d["model"])]
        head = f"{scope:<6}{'B':>6} " + " ".join(f"{get(m).label + ' ms':>12} {'MB':>9}" for m in models)
        if "moe" in models and "ultramem" in models:
            head += f" {'MoE/UM':>7}"
        lines += [head, "-" * len(head)]
        for B in sorted(set(d["batch"])):
            r = d[d["batch"] == B].set_index("model")
            line = f"{'':<6}{B:>6} " + " ".join(
                f"{r.loc[m, 'latency_s'] * 1e3:>12.3f} {r.loc[m, 'bytes_accessed'] / 1e6:>9.2f}" for m in models)
            if "moe" in models and "ultramem" in models:
                line += f" {r.loc['moe', 'latency_s'] / r.loc['ultramem', 'latency_s']:>6.2f}x"
            lines.append(line)
        lines.append("")
    mem = df[(df["scope"] == "layer") & df["read_s"].notna()]
    if len(mem):
        lines.append("memory layers, value read vs copy ceiling (layer scope):")
        for r in mem.itertuples():
            lines.append(f"  {get(r.model).label:<9} B={r.batch:<5} layer {r.latency_s * 1e3:9.3f} ms, read "
                         f"{r.read_s * 1e3:9.3f} ms ({r.read_frac:.0%} of layer), read streams "
                         f"{r.read_bytes_per_s / 1e9:6.2f} GB/s = {r.read_bytes_per_s / r.copy_bytes_per_s:.0%} of copy, "
                         f"its gather {r.gather_s * 1e3:.3f} ms = {r.gather_frac_copy:.0%} of copy; "
                         f"layer: accessed {r.frac_copy:.0%}, streamed {r.frac_copy_streamed:.0%} of copy")
    return "\n".join(lines)


__all__ = ["COLUMNS", "DEFAULT_BATCHES", "check_fits", "default_configs", "estimate_bytes", "format_table",
           "measure_overlap", "model_names", "moe_ultramem_ratio", "run_inference_bench", "sparse_layer",
           "sparse_layer_cfg", "to_units", "validate", "write_outputs"]

