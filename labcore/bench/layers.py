"""Layer speed benchmark: labcore's layers against their PyPI peers, same sizes, same run.

``python -m labcore.bench layers`` (or ``labcore bench layers``) times the forward pass of each pair on
the same input, B x T = 4 x 256 tokens, D = 256, float32, eval mode, under ``torch.inference_mode``,
with ``torch.set_num_threads(2)``. Each side is warmed up, then the two are timed in alternating
rounds (``repeats`` calls of one side, then of the other). The reported times are the medians over
all samples, with their interquartile ranges. The ratio (> 1: labcore faster) is *paired*: the
median over rounds of ``peer round median / labcore round median``, with the quartiles of those
per-round ratios beside it. On a shared 2-core VM whose speed drifts by 1.5x within a minute, the
ratio of overall medians mixes slow and fast periods; pairing each round with its neighbour does not.

=====================  ==============================================  =========================  ======
pair                   labcore                                         peer                       target
=====================  ==============================================  =========================  ======
pkm                    PKM: n_keys 128 (N = 128^2), 4 heads, top-32,   ``product_key_memory.PKM``  >= 2x
                       k_dim 128 (64 per half), query LayerNorm        0.3.0, same sizes
ultramem               UltraMem: n_keys 128, E = 4, R = 2, h = 2       ``ultra_mem.UltraMem``      >= 2x
                       cores, 2 heads, top-32, k_dim 128, D_v 256      0.1.2, sizes aligned below
moe8                   MoE 8 experts, top-2, d_expert 512              HF ``MixtralSparseMoeBlock``  >= 1x
moe64                  MoE 64 experts, top-8, d_expert 128             (eager experts), same        >= 1.5x
                                                                       weights (labcore.interop)
peer                   PEER: n_keys 128 (N = 128^2 experts), 8 heads,  ``PEER_pytorch.PEER`` 0.2.2  --
                       top-16, k_dim 128, no query norm, GELU          copied weights, K-softmax
ultramem_v2            UltraMemV2: n_keys 128, E = 1, R = 2, h = 2,    none on PyPI                 --
                       2 heads, top-32, k_dim 128, D_v 256, D_p 64
memory_plus            Memory+: PKM's sizes, D_v = D, SiLU gate        none on PyPI                 --
=====================  ==============================================  =========================  ======

How the peers are aligned (they do more or different work than labcore; where they do *more*, that
work is switched off so the ratio is conservative):

* labcore's memory layers are timed with ``detailed_aux=False``
  (:func:`labcore.layers.base.set_detailed_aux`): no per-call bincount / coverage / KL over all value
  slots (``aux.counts`` is None), which the peers do not compute either; the O(N_tok) stats stay.

* ``product_key_memory.PKM(dim=256, heads=4, num_keys=128, topk=32, dim_head=64)``: its ``dim_head``
  is the size of ONE half (sub-query), labcore's ``k_dim`` is both halves: k_dim 128 = 2 x 64. Both
  use a per-sub-query LayerNorm, a softmax over each head's K scores and a summed ``EmbeddingBag``.
* ``ultra_mem.UltraMem``: its ``num_memories`` counts *virtual* slots; keys per side = sqrt of it, and
  each of its ``core_heads`` owns a physical table of num_memories / E rows of width ``dim_values``.
  labcore's n_keys = 128 with E = 4 has N = 16384 physical rows of D_v = 256 and 256 keys per side
  (sqrt(E) x 128). So: ``num_memories = E * 128^2 = 65536`` (256 keys per side),
  ``value_expansion=4``, ``core_heads=2``, ``dim_values=128`` (2 tables of 16384 x 128 = the same
  value bytes as labcore's 16384 x 256, whose two core chunks are 128 wide), ``topk=32``,
  ``dim_queries_keys=128``, ``core_rank=2``. The peer selects top-32 per core (2 x 32 = 64 slots per
  token); labcore selects top-32 per head with 2 heads (also 64 (slot, score) pairs per token).
  Switched off in the peer because labcore does not do them: its RMSNorm prenorm, the causal
  depthwise query convolution and the ReLU on scores (``score_activation=Identity``).
* Mixtral: ``MixtralConfig(hidden_size=256, intermediate_size=I, num_local_experts=E,
  num_experts_per_tok=K, experts_implementation="eager")``; labcore's weights are copied in with
  :func:`labcore.interop.moe_to_hf`, and the outputs are checked to agree before timing.
* ``PEER_pytorch.PEER(dim=256, heads=8, num_experts=128^2, num_experts_per_head=16, dim_key=64,
  non_competing_scores=False)`` against labcore's PEER with ``query_norm="none"``, ``query_bias=False``,
  ``activation="gelu"``: the settings under which both compute the same layer (its default
  ``non_competing_scores=True`` keeps the top-1 expert per head with a ReLU weight instead of a softmax
  over K; docs/mechanisms.md §6). labcore's weights are copied in (query rows and keys permuted to
  its layout; labcore's shared keys copied into each of its heads) and the outputs are checked to
  agree before timing. It scores the whole K x K candidate grid per head (more work than labcore's
  pruned pairs).
* UltraMemV2 and Memory+ have no PyPI implementation: their rows time labcore alone.

A missing peer is skipped with a message: the row keeps labcore's time (and value read), without a
ratio.

Value-gather bandwidth: the PKM layer's own ``F.embedding_bag`` (the same indices and weights a forward
produced) is timed alone; its bytes are the value rows it reads (N_tok * H*K * D_v * 4, repeats
counted: a gather without deduplication streams every selected row), plus indices, weights and the
output. Next to it, the copy bandwidth (``dst.copy_(src)``, 64 MiB, read + write) measured in the
same run. UltraMem gets two rows: its gather alone (the one ``embedding_bag`` over the (N*h, D_v/h)
chunk view with the (token, core, block) bags of :meth:`UltraMem.value_bags`; bytes counted the same
way, every selected row read in h chunks) and its whole ``read`` (IVE key lookup and bag sort, the
gather, the E*D_v -> D projection), whose bytes add the pooled buffer, the projection weight and the
output.

The rows ``peer``, ``ultramem_v2`` and ``memory_plus`` also time their layer's value read alone
(``read_ms``; replayed from one forward's selections) and give its bytes/s next to the copy
ceiling: PEER reads two rows per selected expert (u_i for σ(u_i^T x), v_i for the weighted sum;
:func:`labcore.layers.peer.expert_down` / ``expert_up``), bytes = the 2 x H*K rows of D floats, the
input and output, the indices (read twice) and the per-expert weights; UltraMemV2 reads a
pre-value row and a value row per selected slot (the pre-value dot product and
:meth:`UltraMemV2.read`: gather + one projection), bytes = those rows, the pooled buffer, the
projection weight and the output; Memory+ reads the inner PKM's value rows (the same
``F.embedding_bag`` and byte count as the PKM gather row).

Peers are benchmark-only dependencies (``pip install -e .[bench]``): they are imported lazily and a
missing one gives a clear message and skips its row.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from labcore.config import ConfigError, check_choice, check_int
from labcore.interop import moe_to_hf
from labcore.layers.base import set_detailed_aux
from labcore.layers.memory_plus import MemoryPlus, MemoryPlusConfig
from labcore.layers.moe import EXPERT_IMPLS, MoE, MoEConfig
from labcore.layers.peer import PEER, PEERConfig, expert_down, expert_up
from labcore.layers.pkm import PKM, PKMConfig
from labcore.layers.ultramem import UltraMem, UltraMemConfig
from labcore.layers.ultramem_v2 import UltraMemV2, UltraMemV2Config
from labcore.profiling.ceilings import measure_copy_bandwidth
from labcore.profiling.timer import Timer, Timing, quantile
from labcore.results import write_atomic

PAIRS = ("pkm", "ultramem", "moe8", "moe64", "peer")   # layers with a PyPI peer
SOLO = ("ultramem_v2", "memory_plus")                   # layers without one: labcore timed alone
ROWS = PAIRS + SOLO + ("gather",)
TARGETS = {"pkm": 2.0, "ultramem": 2.0, "moe8": 1.0, "moe64": 1.5}


class PeerMissing(RuntimeError):
    """A benchmark-only dependency is not installed."""


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerMissing(f"peer '{module}' is not installed ({e}); install the benchmark extras: "
                          f"pip install -e .[bench]  (provides {package})") from None


# ----------------------------------------------------------------------------------------------
# Timing two callables in alternating rounds.
# ----------------------------------------------------------------------------------------------


def time_pair(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, rounds: int):
    """Warm each callable up, then ``rounds`` times time each ``repeats`` times, alternating."""
    timers = {name: Timer("cpu") for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                with timers[name]:
                    fn()
    return {name: t.timing() for name, t in timers.items()}


def paired_ratio(num: Timing, den: Timing, repeats: int) -> tuple[float, float, float]:
    """Median and quartiles over rounds of ``median(num round) / median(den round)``, where round r
    is samples ``r*repeats .. (r+1)*repeats - 1`` of each (as :func:`time_pair` takes them)."""
    check_int("paired_ratio", "repeats", repeats, min_value=1)
    if len(num.samples) != len(den.samples) or len(num.samples) % repeats:
        raise ValueError(f"paired_ratio: {len(num.samples)} and {len(den.samples)} samples are not the same "
                         f"whole number of rounds of repeats={repeats}")
    ratios = []
    for r in range(0, len(num.samples), repeats):
        ratios.append(statistics.median(num.samples[r:r + repeats]) / statistics.median(den.samples[r:r + repeats]))
    q = sorted(ratios)
    return statistics.median(q), quantile(q, 0.25), quantile(q, 0.75)


@dataclass(frozen=True)
class Row:
    pair: str
    labcore: str
    peer: str
    labcore_ms: float
    labcore_iqr_ms: float
    peer_ms: float | None
    peer_iqr_ms: float | None
    speedup: float | None          # median over rounds of peer / labcore (paired_ratio)
    target: float | None
    meets_target: bool | None
    max_abs_diff: float | None = None  # output agreement (same weights), when comparable
    speedup_q1: float | None = None    # quartiles of the per-round ratios
    speedup_q3: float | None = None
    bytes: float | None = None         # bytes of the value read (gather rows; peer/ultramem_v2/memory_plus)
    gbytes_per_s: float | None = None  # bytes / read time (labcore_ms for gather rows, else read_ms)
    copy_gbytes_per_s: float | None = None
    frac_of_copy: float | None = None
    note: str = ""
    read_ms: float | None = None       # the layer's value read alone (rows other than gather)
    read_iqr_ms: float | None = None


# ----------------------------------------------------------------------------------------------
# The pairs.
# ----------------------------------------------------------------------------------------------


def _pkm_pair(D: int):
    cfg = PKMConfig(d_model=D, n_keys=128, heads=4, k_dim=128, top_k=32, query_norm="layernorm")
    ours = PKM(cfg).eval()

    def peer():
        pkm_mod = _need("product_key_memory", "product-key-memory==0.3.0")
        return (pkm_mod.PKM(dim=D, heads=4, num_keys=128, topk=32, dim_head=cfg.k_dim // 2,
                            use_layernorm=True).eval(), "product_key_memory.PKM 0.3.0 (dim_head=64)")

    return ours, "PKM(n_keys=128, H=4, K=32, k_dim=128)", peer


def _ultramem_pair(D: int):
    cfg = UltraMemConfig(d_model=D, n_keys=128, heads=2, k_dim=128, top_k=32, d_value=D, rank=2,
                         n_cores=2, expansion=4)
    ours = UltraMem(cfg).eval()

    def peer():
        um = _need("ultra_mem", "ultra-mem==0.1.2")
        return (um.UltraMem(dim=D, num_memories=cfg.expansion * cfg.n_slots, topk=32, dim_queries_keys=cfg.k_dim,
                            core_rank=2, core_heads=2, value_expansion=cfg.expansion, dim_values=D // 2,
                            score_activation=nn.Identity(), pre_query_causal_conv=False, prenorm=False).eval(),
                "ultra_mem.UltraMem 0.1.2 (num_memories=65536, dim_values=128, no prenorm/conv/ReLU)")

    return ours, "UltraMem(n_keys=128, E=4, R=2, h=2, H=2, K=32, D_v=256)", peer


def _moe_pair(D: int, n_experts: int, top_k: int, d_expert: int, impl: str = "auto"):
    ours = MoE(MoEConfig(d_model=D, d_expert=d_expert, n_experts=n_experts, top_k=top_k, expert_impl=impl)).eval()

    def peer():
        _need("transformers", "transformers>=5.0")
        # transformers is a benchmark-only dependency: imported here, once _need has checked it.
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        hf_cfg = MixtralConfig(hidden_size=D, intermediate_size=d_expert, num_local_experts=n_experts,
                               num_experts_per_tok=top_k, experts_implementation="eager")
        return (moe_to_hf(ours, MixtralSparseMoeBlock(hf_cfg)).eval(),
                f"HF MixtralSparseMoeBlock eager (E={n_experts}, K={top_k}, I={d_expert})")

    impl_note = "" if impl == "auto" else f", {impl}"
    return ours, f"MoE(E={n_experts}, K={top_k}, I={d_expert}{impl_note})", peer


def peer_pytorch_state(layer: PEER) -> dict[str, torch.Tensor]:
    """labcore PEER weights in ``PEER_pytorch.PEER``'s layout: query rows (half, head, d) instead of
    (head, half, d), keys (H, n, 2, D_k/2) instead of (1 or H, 2, n, D_k/2) (shared keys copied into
    every head), expert tables as they are."""
    c = layer.cfg
    H, n, half = c.heads, c.n_keys, c.half
    w = layer.query.weight.detach().view(H, 2, half, c.d_model).transpose(0, 1).reshape(2 * H * half, c.d_model)
    keys = layer.keys.detach().expand(H, 2, n, half).permute(0, 2, 1, 3).contiguous()   # (H, n, 2, D_k/2)
    return {"to_queries.0.weight": w, "keys": keys, "weight_down_embed.weight": layer.down.weight.detach(),
            "weight_up_embed.weight": layer.up.weight.detach()}


def _peer_cfg(D: int) -> PEERConfig:
    return PEERConfig(d_model=D, n_keys=128, heads=8, top_k=16, k_dim=128, query_norm="none", activation="gelu",
                      query_bias=False)


def _peer_pair(D: int):
    cfg = _peer_cfg(D)
    ours = PEER(cfg).eval()

    def peer():
        lucid = _need("PEER_pytorch", "PEER-pytorch==0.2.2")
        theirs = lucid.PEER(D, heads=cfg.heads, num_experts=cfg.n_experts, num_experts_per_head=cfg.top_k,
                            dim_key=cfg.half, non_competing_scores=False)
        theirs.load_state_dict(peer_pytorch_state(ours))
        return theirs.eval(), "PEER_pytorch.PEER 0.2.2 (non_competing_scores=False, copied weights)"

    return ours, "PEER(n_keys=128, H=8, K=16, k_dim=128, no query norm, GELU)", peer


def _ultramem_v2_cfg(D: int) -> UltraMemV2Config:
    return UltraMemV2Config(d_model=D, n_keys=128, heads=2, k_dim=128, top_k=32, d_value=D, d_pre=64, rank=2,
                            n_cores=2, expansion=1)


def _solo(layer: nn.Module, desc: str):
    """A layer without a PyPI implementation: timed alone (no peer, no ratio)."""
    return layer.eval(), desc, lambda: (None, "none on PyPI")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------
# Value reads of the memory-family layers, replayed from one forward's selections.
# ----------------------------------------------------------------------------------------------


def _value_read(name: str, layer: nn.Module, x2d: torch.Tensor) -> tuple[Callable[[], object], int, str]:
    """(the value read of ``layer`` on ``x2d`` as a callable, its bytes, a note) for the rows
    "peer", "ultramem_v2" and "memory_plus" (bytes: see the module docstring)."""
    n_tok, D = x2d.shape
    _, aux = layer(x2d)
    experts = aux.indices                                                    # (N_tok, S)
    S = experts.shape[1]
    idx_bytes = experts.numel() * experts.element_size()
    if name == "peer":
        g, down, up = aux.scores, layer.down.weight, layer.up.weight

        def read():                                                          # Σ_i g_i σ(u_i^T x) v_i
            return expert_up(g * F.gelu(expert_down(x2d, experts, down)), experts, up)

        n_bytes = 2 * n_tok * S * D * 4 + 2 * n_tok * D * 4 + 2 * idx_bytes + 3 * n_tok * S * 4
        return read, n_bytes, f"{n_tok} tokens x {S} experts x 2 rows of {D} floats"
    if name == "ultramem_v2":
        c = layer.cfg
        rows, weights = aux.rows, aux.core_scores                            # (N_tok, S), (N_tok, S, h)
        z = layer.pre_proj(x2d)                                              # W_pre x (N_tok, D_p)
        pre = layer.pre_values.weight

        def read():                                                          # g = <P_pre[row], W_pre x>, W^T Σ w V
            torch.einsum("tkd,td->tk", F.embedding(rows, pre), z)
            return layer.read(experts, weights)

        n_bytes = (n_tok * S * (c.d_v + c.d_p) * 4 + n_tok * c.d_p * 4 + n_tok * c.d_v * 4   # rows, W_pre x, pooled
                   + layer.value_proj.weight.numel() * 4 + n_tok * D * 4 + 2 * idx_bytes + n_tok * S * 4 * c.n_cores)
        return read, n_bytes, f"{n_tok} tokens x {S} slots x ({c.d_v} value + {c.d_p} pre-value) floats"
    table, weights = layer.values.weight, aux.scores                         # Memory+: the inner PKM's read
    Dv = table.shape[1]

    def read():
        return F.embedding_bag(experts, table, mode="sum", per_sample_weights=weights)

    n_bytes = n_tok * S * Dv * 4 + n_tok * Dv * 4 + experts.numel() * (8 + 4)
    return read, n_bytes, f"{n_tok} tokens x {S} rows x {Dv} floats"


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def run_layer_bench(pairs: Sequence[str] = ROWS, *, batch: int = 4, seq: int = 256, d_model: int = 256,
                    threads: int | None = 2, warmup: int = 3, repeats: int = 5, rounds: int = 9,
                    seed: int = 0, moe_impl: str = "auto",
                    log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Run the listed rows (``PAIRS``, ``SOLO`` and/or ``"gather"``); one table row per layer (the
    gather rows: three). ``moe_impl``: labcore's ``MoEConfig.expert_impl`` in the MoE pairs (compare
    the expert paths against the same peer)."""
    for p in pairs:
        check_choice("run_layer_bench", "pairs", p, ROWS)
    check_choice("run_layer_bench", "moe_impl", moe_impl, EXPERT_IMPLS)
    for name, v in (("batch", batch), ("seq", seq), ("d_model", d_model), ("repeats", repeats),
                    ("rounds", rounds)):
        check_int("run_layer_bench", name, v, min_value=1)
    check_int("run_layer_bench", "warmup", warmup, min_value=0)
    if threads is not None:
        check_int("run_layer_bench", "threads", threads, min_value=1)
    if d_model % 2:
        raise ConfigError(f"run_layer_bench.d_model={d_model} is not allowed: must be even (UltraMem's 2 cores)")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    say = log or (lambda s: None)
    rows: list[Row] = []
    copy_bps: list[float] = []   # measured once, when a row first needs it

    def copy_ceiling() -> float:
        if not copy_bps:
            copy_bps.append(measure_copy_bandwidth("cpu", torch.float32, n_bytes=64 << 20, repeats=max(repeats, 5)))
        return copy_bps[0]

    try:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, seq, d_model, generator=gen)               # (B, T, D)
        kw = dict(warmup=warmup, repeats=repeats, rounds=rounds)
        builders = {
            "pkm": lambda: _pkm_pair(d_model),
            "ultramem": lambda: _ultramem_pair(d_model),
            "moe8": lambda: _moe_pair(d_model, 8, 2, 512, moe_impl),
            "moe64": lambda: _moe_pair(d_model, 64, 8, 128, moe_impl),
            "peer": lambda: _peer_pair(d_model),
            "ultramem_v2": lambda: _solo(UltraMemV2(_ultramem_v2_cfg(d_model)),
                                         "UltraMemV2(n_keys=128, E=1, R=2, h=2, H=2, K=32, D_v=256, D_p=64)"),
            "memory_plus": lambda: _solo(MemoryPlus(MemoryPlusConfig(d_model=d_model, n_keys=128, heads=4, k_dim=128,
                                                                     top_k=32)),
                                         "Memory+(n_keys=128, H=4, K=32, k_dim=128, D_v=D, gate)"),
        }
        with torch.inference_mode():
            for name in [p for p in pairs if p in PAIRS + SOLO]:
                torch.manual_seed(seed)
                ours, ours_desc, make_peer = builders[name]()
                set_detailed_aux(ours, False)       # no O(N_slots) diagnostics: the peers have none
                try:
                    peer, peer_desc = make_peer()
                except PeerMissing as e:
                    peer, peer_desc = None, "-"
                    say(f"[{name}] peer skipped: {e}")
                diff = None
                if peer is not None and name in ("moe8", "moe64", "peer"):  # same weights: outputs must agree
                    diff = float((_first(ours(x)) - _first(peer(x))).abs().max())
                fns = {"ours": lambda o=ours: o(x)}
                if peer is not None:
                    fns["peer"] = lambda p=peer: p(x)
                t = time_pair(fns, **kw)
                sp = q1 = q3 = None
                if peer is not None:
                    sp, q1, q3 = paired_ratio(t["peer"], t["ours"], repeats)
                target = TARGETS.get(name)
                row = Row(pair=name, labcore=ours_desc, peer=peer_desc,
                          labcore_ms=t["ours"].median_s * 1e3, labcore_iqr_ms=t["ours"].iqr_s * 1e3,
                          peer_ms=t["peer"].median_s * 1e3 if peer is not None else None,
                          peer_iqr_ms=t["peer"].iqr_s * 1e3 if peer is not None else None,
                          speedup=sp, target=target,
                          meets_target=sp >= target if sp is not None and target is not None else None,
                          max_abs_diff=diff, speedup_q1=q1, speedup_q3=q3)
                if name in ("peer",) + SOLO:
                    read, n_bytes, note = _value_read(name, ours, x.reshape(-1, d_model))
                    tr = _time_alone(read, warmup, rounds * repeats)
                    bps, ceil = n_bytes / tr.median_s, copy_ceiling()
                    row = replace(row, bytes=float(n_bytes), gbytes_per_s=bps / 1e9, copy_gbytes_per_s=ceil / 1e9,
                                  frac_of_copy=bps / ceil, read_ms=tr.median_s * 1e3, read_iqr_ms=tr.iqr_s * 1e3,
                                  note=f"value read: {note}")
                rows.append(row)
                ratio = f"  ratio {sp:.2f}x (rounds IQR {q1:.2f}-{q3:.2f})" if sp is not None else ""
                read_s = f"  read {row.gbytes_per_s:.2f} GB/s" if row.gbytes_per_s is not None else ""
                say(f"[{name}] labcore {t['ours']}" + (f"  peer {t['peer']}" if peer is not None else "")
                    + ratio + read_s)
                del ours, peer
            if "gather" in pairs:
                rows.extend(_gather_rows(x, seed=seed, say=say, copy_bps=copy_ceiling(), **kw))
    finally:
        torch.set_num_threads(old_threads)
    return pd.DataFrame([asdict(r) for r in rows])


def _time_alone(fn: Callable[[], object], warmup: int, n: int):
    timer = Timer("cpu")
    for _ in range(warmup):
        fn()
    for _ in range(n):
        with timer:
            fn()
    return timer.timing()


def _gather_rows(x: torch.Tensor, *, seed: int, say, copy_bps: float, warmup: int, repeats: int,
                 rounds: int) -> list[Row]:
    """Achieved bytes/s of the PKM value gather and of the UltraMem read, next to the copy ceiling."""
    D = x.shape[-1]
    x2d = x.reshape(-1, D)                                                   # (N_tok, D)
    n_tok = x2d.shape[0]
    rows = []

    torch.manual_seed(seed)
    pkm = PKM(PKMConfig(d_model=D, n_keys=128, heads=4, k_dim=128, top_k=32)).eval()
    set_detailed_aux(pkm, False)
    _, aux = pkm(x2d)
    slots, weights = aux.indices, aux.scores                                 # (N_tok, H*K) each
    table = pkm.values.weight
    S, Dv = slots.shape[1], table.shape[1]
    n_bytes = n_tok * S * Dv * 4 + n_tok * Dv * 4 + slots.numel() * (8 + 4)  # rows + out + idx/weights
    t = _time_alone(lambda: F.embedding_bag(slots, table, mode="sum", per_sample_weights=weights),
                    warmup, rounds * repeats)
    bps = n_bytes / t.median_s
    rows.append(Row(pair="gather", labcore="PKM value gather: F.embedding_bag(sum, weights)", peer="copy_",
                    labcore_ms=t.median_s * 1e3, labcore_iqr_ms=t.iqr_s * 1e3, peer_ms=None, peer_iqr_ms=None,
                    speedup=None, target=None, meets_target=None, bytes=float(n_bytes),
                    gbytes_per_s=bps / 1e9, copy_gbytes_per_s=copy_bps / 1e9, frac_of_copy=bps / copy_bps,
                    note=f"{n_tok} tokens x {S} rows x {Dv} floats, table {table.numel() * 4 / 2**20:.0f} MiB"))
    say(f"[gather] PKM embedding_bag {t}  {bps / 1e9:.2f} GB/s  (copy {copy_bps / 1e9:.2f} GB/s)")

    torch.manual_seed(seed)
    cfg = UltraMemConfig(d_model=D, n_keys=128, heads=2, k_dim=128, top_k=32, d_value=D, rank=2, n_cores=2,
                         expansion=4)
    um = UltraMem(cfg).eval()
    set_detailed_aux(um, False)
    _, aux = um(x2d)
    slots, core_scores = aux.indices, aux.core_scores                        # (N_tok, S), (N_tok, S, h)
    S = slots.shape[1]
    idx, offsets, w = um.value_bags(slots, core_scores)
    chunks = um.value_chunks()                                               # (N*h, D_v/h)
    n_bytes = (n_tok * S * cfg.d_v * 4 + n_tok * cfg.expansion * cfg.d_v * 4       # rows read (h chunks) + pooled
               + idx.numel() * idx.element_size() + w.numel() * 4 + offsets.numel() * offsets.element_size())
    t = _time_alone(lambda: F.embedding_bag(idx, chunks, offsets, mode="sum", per_sample_weights=w),
                    warmup, rounds * repeats)
    bps = n_bytes / t.median_s
    rows.append(Row(pair="gather", labcore="UltraMem value gather: F.embedding_bag over (token, core, block) bags",
                    peer="copy_", labcore_ms=t.median_s * 1e3, labcore_iqr_ms=t.iqr_s * 1e3, peer_ms=None,
                    peer_iqr_ms=None, speedup=None, target=None, meets_target=None, bytes=float(n_bytes),
                    gbytes_per_s=bps / 1e9, copy_gbytes_per_s=copy_bps / 1e9, frac_of_copy=bps / copy_bps,
                    note=f"{n_tok} tokens x {S} rows x {cfg.d_v} floats in {cfg.n_cores} chunks, "
                         f"{idx.numel() // (n_tok * S)} bag entries per slot"))
    say(f"[gather] UltraMem embedding_bag {t}  {bps / 1e9:.2f} GB/s")

    n_bytes = (n_tok * S * cfg.d_v * 4 + n_tok * cfg.expansion * cfg.d_v * 4       # rows read + pooled
               + um.value_proj.weight.numel() * 4 + n_tok * D * 4)                 # projection + output
    t = _time_alone(lambda: um.read(slots, core_scores), warmup, rounds * repeats)
    bps = n_bytes / t.median_s
    rows.append(Row(pair="gather", labcore="UltraMem read: IVE key lookup + bag sort + embedding_bag + projection",
                    peer="copy_", labcore_ms=t.median_s * 1e3, labcore_iqr_ms=t.iqr_s * 1e3, peer_ms=None,
                    peer_iqr_ms=None, speedup=None, target=None, meets_target=None, bytes=float(n_bytes),
                    gbytes_per_s=bps / 1e9, copy_gbytes_per_s=copy_bps / 1e9, frac_of_copy=bps / copy_bps,
                    note=f"{n_tok} tokens x {S} rows x {cfg.d_v} floats"))
    say(f"[gather] UltraMem read {t}  {bps / 1e9:.2f} GB/s")
    return rows


# ----------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------


def format_table(df: pd.DataFrame) -> str:
    """A plain-text table of :func:`run_layer_bench`'s result. GB/s: bytes of the value read over its
    time (the gather rows' own time, the other rows' ``read ms``), next to the copy ceiling."""
    if df.empty:
        return "(no rows)"
    lines = [f"{'pair':<12} {'labcore ms':>11} {'(IQR)':>8} {'peer ms':>9} {'(IQR)':>8} {'ratio':>7} "
             f"{'(IQR)':>11} {'target':>7}  {'ok':<3} {'read ms':>8} {'GB/s':>6} {'copy GB/s':>9} {'of copy':>7}  what"]
    lines.append("-" * len(lines[0]))

    def f(v, fmt):
        return format(v, fmt) if v is not None and not pd.isna(v) else "-"

    def has(v):
        return v is not None and not pd.isna(v)

    for r in df.itertuples():
        ok = "-" if not has(r.meets_target) else ("yes" if r.meets_target else "NO")
        ratio = f(r.speedup, "6.2f") + "x" if has(r.speedup) else "-"
        iqr = f(r.speedup_q1, ".2f") + "-" + f(r.speedup_q3, ".2f") if has(r.speedup) else "-"
        target = f(r.target, "6.1f") + "x" if has(r.target) else "-"
        read = getattr(r, "read_ms", None)
        lines.append(f"{r.pair:<12} {r.labcore_ms:>11.3f} {r.labcore_iqr_ms:>8.3f} {f(r.peer_ms, '9.3f'):>9} "
                     f"{f(r.peer_iqr_ms, '8.3f'):>8} {ratio:>7} {iqr:>11} {target:>7}  {ok:<3} "
                     f"{f(read, '8.3f'):>8} {f(r.gbytes_per_s, '6.2f'):>6} {f(r.copy_gbytes_per_s, '9.2f'):>9} "
                     f"{f(r.frac_of_copy, '7.0%'):>7}  {r.labcore} vs {r.peer}")
    return "\n".join(lines)


def write_outputs(df: pd.DataFrame, *, json_path: str | None = None, csv_path: str | None = None) -> None:
    if json_path:
        write_atomic(Path(json_path), json.dumps(df.to_dict(orient="records"), indent=2, default=str))
    if csv_path:
        write_atomic(Path(csv_path), df.to_csv(index=False))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labcore bench layers",
                                 description="Forward latency of labcore layers vs PyPI peers.")
    ap.add_argument("--only", default=",".join(ROWS),
                    help=f"comma-separated subset of {','.join(ROWS)} (default: all)")
    ap.add_argument("--batch", type=int, default=4, help="B (default 4)")
    ap.add_argument("--seq", type=int, default=256, help="T (default 256)")
    ap.add_argument("--d-model", type=int, default=256, help="D (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds (labcore, peer, ...)")
    ap.add_argument("--moe-impl", default="auto",
                    help=f"labcore MoE expert path: one of {', '.join(EXPERT_IMPLS)} (default auto)")
    ap.add_argument("--json", default=None, help="write the table as JSON records here")
    ap.add_argument("--csv", default=None, help="write the table as CSV here")
    args = ap.parse_args(argv)
    pairs = [p.strip() for p in args.only.split(",") if p.strip()]
    try:
        df = run_layer_bench(pairs, batch=args.batch, seq=args.seq, d_model=args.d_model, threads=args.threads,
                             warmup=args.warmup, repeats=args.repeats, rounds=args.rounds, moe_impl=args.moe_impl)
    except ConfigError as e:
        ap.error(str(e))
    print()
    print(f"labcore bench layers: {args.batch}x{args.seq} tokens, D={args.d_model}, float32, eval, "
          f"{args.threads} threads; median of {args.rounds}x{args.repeats} runs after {args.warmup} warm-up; "
          "ratio = median over rounds of peer / labcore (IQR over rounds)")
    print(format_table(df))
    write_outputs(df, json_path=args.json, csv_path=args.csv)
    return 0


__all__ = ["PAIRS", "ROWS", "SOLO", "TARGETS", "format_table", "main", "paired_ratio", "peer_pytorch_state",
           "run_layer_bench", "time_pair"]
