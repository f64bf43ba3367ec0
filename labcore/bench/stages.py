"""Where a layer's forward time goes: the real layer timed stage by stage, against its roofline bound.

``labcore bench inference --stages`` (:func:`run_stage_bench`) answers, per layer and batch size,
"how far is this layer from what the machine allows, and which stage holds the rest?".

The bound
---------
A decode step of B tokens through one layer must do its FLOPs and move its compulsory bytes, so it
cannot run faster than (docs/mechanisms.md §7.2, eq. 7.2c)

    bound(B) = max( bytes(B) / copy bandwidth , FLOPs(B) / matmul peak )

with this machine's *measured* ceilings (:mod:`labcore.profiling.ceilings`, for the dtype and the
thread count of the run). FLOPs(B) = B * ``cost().flops_per_token`` (2 per multiply-add,
:func:`labcore.profiling.cost_model.layer_step_cost`). bytes(B) = the parameters the step touched,
counted from what it selected (:func:`labcore.profiling.cost_model.touched_bytes`: dense parameters
once + each distinct expert / physical value row once) + the input and output activations
(2*B*D values). ``time / bound`` is then how many times slower than its roofline the layer runs;
1 would be perfect.

The stages: the real layer, no second implementation
----------------------------------------------------
Nothing here re-implements a layer. While a stage run is on, :func:`instrument` wraps, on one
layer instance, the pieces its forward already calls, and takes the wrappers off afterwards:

* a *method* of the layer (``self.make_query``, ``self._aux``; the wrapper is set on the instance,
  so ``self.make_query(...)`` inside the forward finds it), or the ``forward`` of a *submodule*
  (``self.value_proj``);
* a *function*: the speed functions of ``labcore.layers.fast`` (``exact_topk``, ``side_search``,
  ``tucker_search``, ``bags.value_bags``, ...) and ``torch.nn.functional.embedding_bag``, replaced
  in their defining module and wherever a ``labcore`` module imported them by name.

Each wrapper records the wall time of its call (after a device sync on GPU) and how many times it
ran. Calls nest (``exact_topk`` runs inside ``tucker_search``), so a stage's time is its *exclusive*
time: the time inside its calls minus the time of wrapped calls nested in them, and the stages
never count a microsecond twice. What is left of the whole call (the glue between stages: reshapes,
token chunking, softmaxes that no wrapper covers) is the ``unattributed`` row:

    unattributed = time (the un-instrumented layer) - sum of the stage times

so the shares (stage ms / time) sum to 1 exactly. The wrappers cost about a microsecond per call;
``staged_ms`` (the instrumented call's own median) shows that overhead, and ``overhead_ok`` says
whether staged_ms is within :data:`TOLERANCE` of the plain time (:func:`within_tolerance`).
Un-instrumented and instrumented calls alternate, so a change of machine load hits both.

Each layer's stages are listed in :data:`STAGE_PLANS` (registry name -> probes in data-flow order).
A probe whose method or submodule is missing raises; so does a ``required`` probe that never ran
(the layer no longer calls what the plan names): the stage table cannot silently go stale when a
layer is refactored, and ``tests/bench/test_stages.py`` runs every plan.

Bad input (batch sizes, model names, dtype, device, warmup/repeats, threads) raises
:class:`~labcore.layers.base.ConfigError` before any work, as in :mod:`labcore.bench.inference`.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from labcore.bench.inference import (
    bench_threads,
    ceilings_for,
    check_fits,
    default_configs,
    model_names,
    sparse_layer,
    sparse_layer_cfg,
    to_units,
    validate,
)
from labcore.config import ConfigError, check_choice, check_int
from labcore.layers.base import set_detailed_aux
from labcore.layers.registry import get, spec_for
from labcore.lm.model import LM
from labcore.profiling.ceilings import DTYPES, Ceilings, dtype_name
from labcore.profiling.cost_model import touched_bytes
from labcore.profiling.timer import resolve_device, synchronize
from labcore.results import write_atomic

DEFAULT_BATCHES = (1, 64, 512, 4096)
DEFAULT_THREADS = 2
UNATTRIBUTED = "unattributed"
TOLERANCE = 0.15          # staged_ms within 15% of the plain time ...
TOLERANCE_ABS_S = 20e-6   # ... or within 20 us (a few wrapper calls at B = 1)
COLUMNS = ["model", "label", "batch", "stage", "stage_ms", "share", "calls", "time_ms", "staged_ms",
           "overhead_ok", "bound_ms", "bound", "time_over_bound", "flops", "bytes", "copy_bytes_per_s",
           "matmul_flops_per_s", "device", "dtype", "threads", "load_1m"]


# ----------------------------------------------------------------------------------------------
# The plans: which pieces of each layer are timed, under which stage name.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One timed piece of a layer's forward.

    stage: the row it is counted in (several probes may share one).
    target: ``"self.a.b"``, an attribute path from the layer: a method (timed on the instance) or a
        submodule (its ``forward`` is timed); or ``"pkg.module.function"``, a function replaced in
        that module and in every ``labcore`` module that imported it by name.
    required: the forward must call it (else :func:`instrument`'s caller raises); False for
        pieces that only some configurations use (a balance loss, pre-values).
    optional_attr: a missing or None attribute means "this configuration has none" (an optional
        projection) instead of an error.
    """

    stage: str
    target: str
    required: bool = True
    optional_attr: bool = False


_TOPK = Probe("top-k", "labcore.layers.fast.topk.exact_topk", required=False)
_GATHER = Probe("gather", "torch.nn.functional.embedding_bag")
_PKM = (
    Probe("query", "self.make_query"),                                  # projection + query norm
    # inference with the compiled extension: the whole search is one pass (fast.search.fused_pkm_search)
    Probe("fused search", "labcore.layers.fast.search.fused_pkm_search", required=False),
    # otherwise the readable steps
    Probe("side search", "labcore.layers.fast.search.side_search", required=False),  # sub-key scores (+ top-k)
    Probe("softmax + slot ids", "self.retrieve"),                       # what retrieve does around the search
    Probe("candidate grid", "labcore.layers.fast.search.pruned_pair_topk", required=False),
    _TOPK,
    _GATHER,
    Probe("projection", "self.value_proj", optional_attr=True),
    Probe("aux", "self._aux"),
)
_ULTRAMEM = (
    Probe("query", "self._queries"),
    # inference with the compiled extension: the whole search is one pass (fast.search.fused_tucker_search)
    Probe("fused search", "self._search_fused", required=False),
    # otherwise the readable steps
    Probe("side scores", "self._side_scores_q", required=False),
    Probe("MCS scores", "self._search", required=False),                # per-core rescoring + slot ids
    Probe("candidate grid", "labcore.layers.fast.search.tucker_search", required=False),  # proxies, top-m, m x m grid
    Probe("candidate grid", "labcore.layers.fast.search.two_sided_tucker_search", required=False),
    _TOPK,
    Probe("value bags", "labcore.layers.fast.bags.value_bags"),        # IVE: sort / searchsorted into bags
    _GATHER,
    Probe("projection", "self.read"),                                   # the read around its gather: E*D_v -> D
    Probe("aux", "self._aux"),
)
_ULTRAMEM_V2 = (
    Probe("query", "self._queries"),
    Probe("side scores", "self._side_scores_q"),
    Probe("MCS scores", "self._search"),
    Probe("candidate grid", "labcore.layers.fast.search.tucker_search"),
    Probe("candidate grid", "labcore.layers.fast.search.two_sided_tucker_search", required=False),
    _TOPK,
    Probe("balance loss", "self._balance_sums", required=False),
    Probe("pre-values", "self.pre_proj", optional_attr=True),
    Probe("pre-values", "torch.nn.functional.embedding", required=False),
    Probe("value bags", "labcore.layers.fast.bags.value_bags"),
    _GATHER,
    Probe("projection", "self.read"),
    Probe("projection", "self.value_proj", optional_attr=True, required=False),
    Probe("aux", "self._aux"),
)
_PEER = (
    Probe("query", "self.make_query"),
    Probe("fused search", "labcore.layers.fast.search.fused_pkm_search", required=False),  # inference, compiled
    Probe("side scores", "self.retrieve"),                               # the sub-key einsum and glue
    Probe("candidate grid", "labcore.layers.fast.search.pruned_pair_topk", required=False),
    _TOPK,
    Probe("expert down", "labcore.layers.peer.expert_down"),            # gather u_i, u_i^T x
    Probe("expert up", "labcore.layers.peer.expert_up"),                # gather v_i, sum w_i v_i
    Probe("aux", "self._aux"),
)
_MEMORY_PLUS = tuple(
    Probe(p.stage, p.target.replace("self.", "self.memory.", 1), p.required, p.optional_attr) for p in _PKM
) + (
    Probe("gate", "self.gate", optional_attr=True),
    Probe("gate", "self.w_out", optional_attr=True),
    Probe("gate", "self.output_gate", optional_attr=True),
)
_MOE = (
    Probe("router", "self.router"),
    Probe("top-k routing", "labcore.layers.moe.route"),
    Probe("experts", "self.routed_experts"),
    Probe("shared expert", "self.shared", optional_attr=True),
)
_DENSE = (
    Probe("gate proj", "self.w_gate"),
    Probe("up proj", "self.w_up"),
    Probe("SwiGLU", "self.mlp"),                                         # silu(gate) * up
    Probe("down proj", "self.w_out"),
)

STAGE_PLANS: dict[str, tuple[Probe, ...]] = {
    "dense": _DENSE, "moe": _MOE, "pkm": _PKM, "ultramem": _ULTRAMEM, "ultramem_v2": _ULTRAMEM_V2,
    "memory_plus": _MEMORY_PLUS, "peer": _PEER,
}


def stage_names(name: str) -> tuple[str, ...]:
    """The stages of layer ``name`` in data-flow order (without ``unattributed``)."""
    check_choice("stage_names", "name", name, tuple(STAGE_PLANS))
    return tuple(dict.fromkeys(p.stage for p in STAGE_PLANS[name]))


# ----------------------------------------------------------------------------------------------
# Instrumentation: wrap, record exclusive times, unwrap.
# ----------------------------------------------------------------------------------------------


class StageRecorder:
    """Exclusive wall time and call count per probe, for the calls made while it is installed.

    The wrapper is kept small (about a microsecond per call on CPU): per-probe slots in flat lists,
    no allocation besides the nesting stack."""

    def __init__(self, probes: Sequence[Probe], device: torch.device):
        self.probes = tuple(probes)
        self.sync = (lambda: synchronize(device)) if device.type == "cuda" else None
        self.clock = time.perf_counter
        self.exclusive = [0.0] * len(self.probes)
        self.calls = [0] * len(self.probes)
        self._children: list[float] = []          # time of wrapped calls nested in each open call

    def reset(self) -> None:
        for i in range(len(self.probes)):
            self.exclusive[i], self.calls[i] = 0.0, 0
        self._children.clear()

    def stage_times(self) -> dict[str, tuple[float, int]]:
        """Stage -> (exclusive seconds, calls), stages in plan order, summed over their probes."""
        out: dict[str, tuple[float, int]] = {}
        for p, t, n in zip(self.probes, self.exclusive, self.calls):
            t0, n0 = out.get(p.stage, (0.0, 0))
            out[p.stage] = (t0 + t, n0 + n)
        return out

    def wrap(self, slot: int, fn: Callable) -> Callable:
        """``fn`` timed into probe ``slot``."""
        exclusive, calls, children, clock, sync = self.exclusive, self.calls, self._children, self.clock, self.sync

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if sync is not None:
                sync()
            children.append(0.0)
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                if sync is not None:
                    sync()
                dt = clock() - t0
                exclusive[slot] += dt - children.pop()
                calls[slot] += 1
                if children:
                    children[-1] += dt
        return timed


def _resolve_attr(layer: nn.Module, probe: Probe) -> tuple[Any, str] | None:
    """(owner, attribute name) of a ``self.`` probe; None when an optional attribute is absent."""
    *path, attr = probe.target.split(".")[1:]
    owner: Any = layer
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            break
    value = getattr(owner, attr, None) if owner is not None else None
    if value is None:
        if probe.optional_attr:
            return None
        raise ConfigError(f"stage plan of {type(layer).__name__}: probe {probe.target!r} (stage {probe.stage!r}) "
                          "names an attribute the layer does not have; update STAGE_PLANS in "
                          "labcore/bench/stages.py to the layer's code")
    if isinstance(value, nn.Module):
        return value, "forward"
    if not callable(value):
        raise ConfigError(f"stage plan of {type(layer).__name__}: probe {probe.target!r} is neither a method "
                          "nor a submodule")
    return owner, attr


def _function_sites(target: str) -> list[tuple[Any, str]]:
    """Every (module, global name) bound to the function ``target``: its defining module and the
    ``labcore`` modules that imported it by name."""
    mod_name, _, fn_name = target.rpartition(".")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    sites = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == mod_name or name == "labcore" or name.startswith("labcore.")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is fn:
                sites.append((mod, attr))
    return sites


@contextmanager
def instrument(layer: nn.Module, recorder: StageRecorder) -> Iterator[None]:
    """Install ``recorder``'s wrappers for its probes on ``layer`` (and on the named functions);
    everything is restored on exit, also after an error."""
    undo: list[Callable[[], None]] = []
    try:
        for slot, probe in enumerate(recorder.probes):
            if probe.target.startswith("self."):
                site = _resolve_attr(layer, probe)
                if site is None:
                    continue
                owner, attr = site
                had = attr in vars(owner)
                old = vars(owner).get(attr)
                object.__setattr__(owner, attr, recorder.wrap(slot, getattr(owner, attr)))
                undo.append((lambda o=owner, a=attr, h=had, v=old:
                             object.__setattr__(o, a, v) if h else object.__delattr__(o, a)))
            else:
                for mod, attr in _function_sites(probe.target):
                    old = getattr(mod, attr)
                    setattr(mod, attr, recorder.wrap(slot, old))
                    undo.append(lambda m=mod, a=attr, v=old: setattr(m, a, v))
        yield
    finally:
        for restore in reversed(undo):
            restore()


def check_probes_ran(name: str, layer: nn.Module, recorder: StageRecorder) -> None:
    """Raise if a required probe that was installed never ran (the plan is stale)."""
    for p, n in zip(recorder.probes, recorder.calls):
        if not p.required or n > 0:
            continue
        if p.target.startswith("self.") and _resolve_attr(layer, p) is None:
            continue
        raise ConfigError(f"stage plan of {name!r}: probe {p.target!r} (stage {p.stage!r}) never ran in the "
                          "forward; the layer no longer calls it: update STAGE_PLANS in labcore/bench/stages.py")


# ----------------------------------------------------------------------------------------------
# Timing one layer at one batch size.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageTiming:
    """One layer at one batch: plain and instrumented medians (s), per-stage exclusive medians (s,
    data-flow order, stages that ran) and call counts per forward."""

    time_s: float
    staged_s: float
    stages: dict[str, float]
    calls: dict[str, float]

    @property
    def unattributed_s(self) -> float:
        return self.time_s - sum(self.stages.values())


def time_stages(name: str, layer: nn.Module, x: torch.Tensor, *, warmup: int = 2, repeats: int = 5,
                probes: Sequence[Probe] | None = None) -> StageTiming:
    """Time ``layer(x)`` plain and instrumented, alternating, ``repeats`` times each (after
    ``warmup`` of each); return the medians. ``probes`` default: ``STAGE_PLANS[name]``."""
    check_int("time_stages", "warmup", warmup, min_value=0)
    check_int("time_stages", "repeats", repeats, min_value=1)
    probes = STAGE_PLANS[name] if probes is None else tuple(probes)
    dev = x.device
    recorder = StageRecorder(probes, dev)
    clock = time.perf_counter
    plain, staged = [], []
    per_stage: dict[str, list[float]] = defaultdict(list)
    per_calls: dict[str, list[int]] = defaultdict(list)
    for i in range(warmup + repeats):
        synchronize(dev)
        t0 = clock()
        layer(x)
        synchronize(dev)
        t_plain = clock() - t0
        with instrument(layer, recorder):
            recorder.reset()
            synchronize(dev)
            t0 = clock()
            layer(x)
            synchronize(dev)
            t_staged = clock() - t0
        if i == 0:
            check_probes_ran(name, layer, recorder)
        if i < warmup:
            continue
        plain.append(t_plain)
        staged.append(t_staged)
        for stage, (t, n) in recorder.stage_times().items():
            per_stage[stage].append(t)
            per_calls[stage].append(n)
    ran = [s for s in per_stage if max(per_calls[s]) > 0]
    return StageTiming(time_s=_median(plain), staged_s=_median(staged), stages={s: _median(per_stage[s]) for s in ran},
                       calls={s: _median(per_calls[s]) for s in ran})


def _median(values: Sequence[float]) -> float:
    """The median (the mean of the two middle values for an even count)."""
    v = sorted(values)
    n = len(v)
    return float(v[n // 2]) if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def within_tolerance(time_s: float, staged_s: float, rel: float = TOLERANCE, abs_s: float = TOLERANCE_ABS_S) -> bool:
    """The instrumented call's time agrees with the plain one: |staged - time| <= max(rel * time, abs_s)."""
    return abs(staged_s - time_s) <= max(rel * time_s, abs_s)


def layer_bound(layer: nn.Module, aux, batch: int, d_model: int, bytes_per_param: float,
                ceil: Ceilings) -> dict[str, float | str]:
    """The roofline bound of one step (module docstring): FLOPs, compulsory bytes, bound time and
    which ceiling sets it."""
    cost = layer.cfg.cost()
    flops = float(batch * cost.flops_per_token)
    indices = getattr(aux, "indices", None) if cost.sparse_part else None
    params = touched_bytes(cost, indices, bytes_per_param=bytes_per_param, to_units=to_units(layer))
    n_bytes = params + 2.0 * batch * d_model * bytes_per_param          # + input and output activations
    t_mem, t_flop = n_bytes / ceil.copy_bytes_per_s, flops / ceil.matmul_flops_per_s
    return {"flops": flops, "bytes": n_bytes, "bound_s": max(t_mem, t_flop),
            "bound": "memory" if t_mem >= t_flop else "compute"}


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def stage_model_names() -> tuple[str, ...]:
    """The default layers: "dense", "moe" and every registered memory."""
    return model_names(every_memory=True)


def run_stage_bench(batch_sizes: Sequence[int] = DEFAULT_BATCHES, models: Sequence[str] | None = None, *,
                    base=None, ratio: float = 12.0, configs: Mapping[str, Any] | None = None,
                    family_kwargs: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "float32", warmup: int = 2, repeats: int = 5,
                    threads: int | None = DEFAULT_THREADS, ceilings: Ceilings | None = None,
                    remeasure_ceilings: bool = False, out_dir: str | os.PathLike | None = None, seed: int = 0,
                    log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Per layer and batch size: time, bound, time/bound and the stage breakdown; the tidy table
    (one row per layer x batch x stage, ``unattributed`` last; :data:`COLUMNS`).

    The layers are those of :func:`labcore.bench.inference.run_inference_bench` at scope "layer"
    (the equal-budget family from ``base`` and ``ratio``, or ``configs``: name -> ModelConfig),
    default every registered memory plus "moe" and "dense". ``threads``: torch threads during the
    run (default 2; None leaves them). ``out_dir``: write ``stages.parquet`` and ``stages.csv``.
    """
    say = log or (lambda s: None)
    dev = resolve_device(device)
    dt_name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    batch_sizes = tuple(batch_sizes)
    if models is None:
        models = tuple(configs) if configs is not None else stage_model_names()
    models = tuple(models)
    validate(batch_sizes, models, dev, dt_name, repeats, warmup, owner="run_stage_bench")
    if threads is not None:
        check_int("run_stage_bench", "threads", threads, min_value=1)
    if configs is None:
        configs = default_configs(base, ratio, models, **dict(family_kwargs or {}))
    missing = [m for m in models if m not in configs]
    if missing:
        raise ConfigError(f"run_stage_bench: configs lacks {missing}; it has {sorted(configs)}")
    for m in models:
        kind = spec_for(sparse_layer_cfg(configs[m])).name
        if kind not in STAGE_PLANS:
            raise ConfigError(f"run_stage_bench: model {m!r} is a {kind!r} layer, which has no stage plan; "
                              f"plans exist for {', '.join(STAGE_PLANS)}")
    dt = DTYPES[dt_name]
    b = torch.tensor([], dtype=dt).element_size()
    check_fits({m: configs[m] for m in models}, max(batch_sizes), dev, b)
    with bench_threads(threads):
        ceil = ceilings_for(dev, dt, ceilings, remeasure_ceilings, say)
        rows = []
        for name in models:
            rows += _stages_one(name, configs[name], batch_sizes, dev=dev, dt=dt, b=b, ceil=ceil, warmup=warmup,
                                repeats=repeats, seed=seed, say=say)
    df = pd.DataFrame(rows, columns=COLUMNS)
    if out_dir is not None:
        write_stage_outputs(df, out_dir)
    return df


def _stages_one(name: str, cfg, batch_sizes: Sequence[int], *, dev, dt, b, ceil, warmup, repeats, seed,
                say) -> list[dict]:
    torch.manual_seed(seed)
    lm = LM(cfg).to(device=dev, dtype=dt).eval()
    set_detailed_aux(lm, False)             # as the inference bench: no O(N_slots) diagnostics per call
    layer = sparse_layer(lm, cfg)
    kind = spec_for(layer.cfg).name
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    with torch.inference_mode():
        for B in batch_sizes:
            x = torch.randn(B, cfg.d_model, generator=gen).to(device=dev, dtype=dt)   # (B, D)
            st = time_stages(kind, layer, x, warmup=warmup, repeats=repeats)
            _, aux = layer(x)
            bound = layer_bound(layer, aux, B, cfg.d_model, b, ceil)
            common = {"model": name, "label": get(name).label, "batch": B,
                      "time_ms": st.time_s * 1e3, "staged_ms": st.staged_s * 1e3,
                      "overhead_ok": within_tolerance(st.time_s, st.staged_s), "bound_ms": bound["bound_s"] * 1e3,
                      "bound": bound["bound"], "time_over_bound": st.time_s / bound["bound_s"],
                      "flops": bound["flops"], "bytes": bound["bytes"], "copy_bytes_per_s": ceil.copy_bytes_per_s,
                      "matmul_flops_per_s": ceil.matmul_flops_per_s, "device": str(dev), "dtype": dtype_name(dt),
                      "threads": torch.get_num_threads(), "load_1m": os.getloadavg()[0]}
            for stage, s in [*st.stages.items(), (UNATTRIBUTED, st.unattributed_s)]:
                rows.append({**common, "stage": stage, "stage_ms": s * 1e3, "share": s / st.time_s,
                             "calls": st.calls.get(stage, math.nan)})
            say(f"[{name:>11}] B={B:<5} {st.time_s * 1e3:9.3f} ms = {st.time_s / bound['bound_s']:7.1f} x bound "
                f"({bound['bound_s'] * 1e3:.3f} ms, {bound['bound']}); staged {st.staged_s * 1e3:.3f} ms, "
                f"unattributed {st.unattributed_s / st.time_s:.0%}")
    return rows


# ----------------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------------


def write_stage_outputs(df: pd.DataFrame, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``stages.parquet`` and ``stages.csv`` in ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    pq, csv = out / "stages.parquet", out / "stages.csv"
    write_atomic(pq, df.to_parquet(index=False))
    write_atomic(csv, df.to_csv(index=False))
    return pq, csv


def format_stage_table(df: pd.DataFrame) -> str:
    """One block per layer: per batch size, time, bound, time/bound, then each stage's ms and share."""
    lines = []
    for model in dict.fromkeys(df["model"]):
        d = df[df["model"] == model]
        stages = list(dict.fromkeys(d["stage"]))
        stages = [s for s in stages if s != UNATTRIBUTED] + [UNATTRIBUTED]
        first = d.iloc[0]
        lines.append(f"{first['label']} ({model}), {first['device']} {first['dtype']}, {first['threads']} threads")
        head = f"{'B':>6} {'time ms':>9} {'bound ms':>9} {'t/bound':>8}  " + "  ".join(f"{s:>18}" for s in stages)
        lines += [head, "-" * len(head)]
        for B in dict.fromkeys(d["batch"]):
            r = d[d["batch"] == B].set_index("stage")
            top = r.iloc[0]
            cells = []
            for s in stages:
                cells.append(f"{r.loc[s, 'stage_ms']:>9.3f} ({r.loc[s, 'share']:>4.0%})" if s in r.index
                             else f"{'-':>18}")
            flag = "" if top["overhead_ok"] else f"   [staged {top['staged_ms']:.3f} ms: outside tolerance]"
            lines.append(f"{B:>6} {top['time_ms']:>9.3f} {top['bound_ms']:>9.3f} {top['time_over_bound']:>7.1f}x  "
                         + "  ".join(f"{c:>18}" for c in cells) + flag)
        lines.append(f"  bound: {', '.join(f'B={B} {k}' for B, k in dict.fromkeys(zip(d['batch'], d['bound'])))}; "
                     f"load average (1 min) {d['load_1m'].min():.1f}-{d['load_1m'].max():.1f}")
        lines.append("")
    return "\n".join(lines)


__all__ = ["COLUMNS", "DEFAULT_BATCHES", "DEFAULT_THREADS", "Probe", "STAGE_PLANS", "StageRecorder", "StageTiming",
           "TOLERANCE", "UNATTRIBUTED", "check_probes_ran", "format_stage_table", "instrument", "layer_bound",
           "run_stage_bench", "stage_model_names", "stage_names", "time_stages", "within_tolerance",
           "write_stage_outputs"]
