"""The ablation notebooks' parameter schemas: frozen dataclasses, validated in ``__post_init__``.

Each notebook's ``parameters`` cell mirrors one of these classes and its second cell calls
``validate_notebook_params(XParams, globals())`` (:mod:`labcore.params`). ``labcore sweep`` builds
the same class for every run of a sweep file before it starts any kernel, so a bad value
(``steps: -5``) stops the sweep with a :class:`~labcore.config.ConfigError` naming the run, the
parameter, the value and what is allowed.

This module imports no torch (the sweep driver validates without loading it). The methods that
turn parameters into model, data and training configs import those modules when called: they
import torch. The experiment modules (:mod:`labcore.experiments.tdqkr`, ...) re-export their class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labcore.config import (
    ConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_list,
    check_str,
    is_perfect_square,
)

if TYPE_CHECKING:
    from labcore.data.facts import FactsConfig
    from labcore.lm.model import ModelConfig, SparsePlan
    from labcore.lm.train import TrainConfig

__all__ = ["LabParams", "TDQKRParams", "SplittingParams", "VirtualMemoryParams", "ArchitecturesParams",
           "PaperTableParams", "PAPER_VAL_DELTAS", "ROWS", "MemoryFamilyParams", "MEMORY_FAMILY",
           "FactsTaskParams"]


@dataclass(frozen=True)
class LabParams:
    """Parameters shared by the ablation notebooks (mirrored by their ``parameters`` cells).

    Every ablation trains on the **facts task** (:mod:`labcore.data.facts`): ``n_facts`` facts
    (subject, relation) -> object over 4 relations, ``n_objects`` possible answers (``log2
    n_objects`` bits per fact), loss and metrics on the answer token only. The trunk is ``d_model``
    x ``n_layers`` (D/16 heads, d_ff 4D), too small to store every fact at equal activated FLOPs in
    ``steps`` steps; a memory layer with ~10x its parameters can. ``batch_size`` counts fact rows.

    Confound-free defaults, the same in every arm unless the arm is about them: the memory init is
    calibrated to the trunk's FFN output std at step 0 (``calibrate_init``; the step-0 stds are
    reported), the memory values train at ``value_lr_multiplier`` x the LR decaying linearly to 1x
    (UltraMem's schedule, docs/mechanisms.md §1.6), no weight decay on any parameter (so no group is
    restrained more than another), MoE balance loss averaged over layers.

    ``smoke=True`` shrinks everything (:meth:`effective`). The defaults are the quick sweep's scale.
    """

    smoke: bool = False          # tiny sizes and few steps (tests, CI)
    out_dir: str = "runs/manual"  # run directory (the sweep runner sets it)
    seed: int = 0                # first seed; seeds are seed, seed+1, ...
    n_seeds: int = 3             # seeds per variant (paired: same init seed and batch order)
    steps: int = 400             # optimiser steps per training run
    batch_size: int = 256        # fact rows per step
    lr: float = 3e-3             # peak learning rate (warmup + cosine)
    d_model: int = 32            # trunk width D
    n_layers: int = 2            # trunk blocks L
    n_facts: int = 2000          # facts (subject, relation) -> object; a multiple of 4 (4 relations)
    n_objects: int = 128         # answer space (log2 of it = bits per fact)
    value_lr_multiplier: float = 10.0  # memory values' LR factor at step 0 (decays linearly to 1x)
    calibrate_init: bool = True  # rescale memory values so their step-0 output std matches the FFNs
    device: str = "auto"         # "auto" | "cpu" | "cuda"
    keep_checkpoints: bool = False  # keep training checkpoints once the run has finished

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_bool(o, "smoke", self.smoke)
        check_str(o, "out_dir", self.out_dir)
        check_int(o, "seed", self.seed, min_value=0)
        check_int(o, "n_seeds", self.n_seeds, min_value=1, max_value=100)
        check_int(o, "steps", self.steps, min_value=1)
        check_int(o, "batch_size", self.batch_size, min_value=1)
        check_float(o, "lr", self.lr, min_value=0.0, max_value=1.0, min_inclusive=False)
        check_int(o, "d_model", self.d_model, min_value=16)
        if self.d_model % 16:
            raise ConfigError(f"{o}.d_model={self.d_model!r} is not allowed: must be a multiple of 16")
        check_int(o, "n_layers", self.n_layers, min_value=2)
        check_int(o, "n_facts", self.n_facts, min_value=8, max_value=400_000)
        if self.n_facts % 4:
            raise ConfigError(f"{o}.n_facts={self.n_facts!r} is not allowed: must be a multiple of 4 "
                              "(4 relations per subject)")
        check_int(o, "n_objects", self.n_objects, min_value=2, max_value=200)
        check_float(o, "value_lr_multiplier", self.value_lr_multiplier, min_value=0.0, max_value=100.0,
                    min_inclusive=False)
        check_bool(o, "calibrate_init", self.calibrate_init)
        check_choice(o, "device", self.device, ("auto", "cpu", "cuda"))
        check_bool(o, "keep_checkpoints", self.keep_checkpoints)

    # -- derived sizes -----------------------------------------------------------------------
    def effective(self) -> LabParams:
        """The sizes actually run: ``smoke`` shrinks steps, seeds, rows per step and facts."""
        if not self.smoke:
            return self
        return dataclasses.replace(self, steps=min(self.steps, 12), n_seeds=min(self.n_seeds, 2),
                                   batch_size=min(self.batch_size, 64), n_facts=min(self.n_facts, 200),
                                   d_model=32, n_layers=2)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n_seeds)]

    @property
    def context_len(self) -> int:
        """Tokens one fact row feeds the model (row_len - 1): the context FLOPs are counted at."""
        return self.data_config().row_len - 1

    # -- configs (these import the torch-based modules when called) --------------------------
    def data_config(self) -> FactsConfig:
        """The facts: the same for every seed (seeds vary the model init and the batch order)."""
        from labcore.data.facts import FactsConfig

        return FactsConfig(n_subjects=self.n_facts // 4, n_relations=4, n_objects=self.n_objects, seed=0)

    def train_config(self, **overrides: Any) -> TrainConfig:
        """AdamW without weight decay, warmup (min(20, steps/10)) then cosine to 0.1x, memory values
        at ``value_lr_multiplier`` decaying linearly to 1x."""
        from labcore.lm.train import TrainConfig

        fields = dict(steps=self.steps, batch_size=self.batch_size, seq_len=self.context_len, lr=self.lr,
                      warmup_steps=max(1, min(20, self.steps // 10)), weight_decay=0.0, eval_every=0,
                      checkpoint_every=0, value_lr_multiplier=self.value_lr_multiplier, device=self.device,
                      progress=False)
        fields.update(overrides)
        return TrainConfig(**fields)

    def model(self, plan: SparsePlan | None = None, **overrides: Any) -> ModelConfig:
        """The dense trunk (``plan`` None) or the trunk with ``plan``'s sparse layers."""
        from labcore.data.tokenizer import ByteTokenizer
        from labcore.lm.model import ModelConfig, SparsePlan

        fields = dict(vocab_size=ByteTokenizer().vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                      n_heads=max(1, self.d_model // 16), d_ff=4 * self.d_model,
                      max_seq_len=max(16, self.context_len), plan=plan or SparsePlan())
        fields.update(overrides)
        return ModelConfig(**fields)


# ----------------------------------------------------------------------------------------------
# 01_tdqkr
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TDQKRParams(LabParams):
    """01_tdqkr: additive vs rank-R Tucker scoring inside one UltraMem, on the facts task.

    Every arm: ``heads`` x ``top_k`` reads, ``k_dim`` key features per side (the additive arm
    ``2 x k_dim`` with ``additive_equal_keys``: equal key parameters and key-score FLOPs), full-width
    values, E = 1, raw scores, beside the middle block's FFN, at (1 + ``ratio``) x the dense trunk's
    parameters and its forward FLOPs (values and d_ff solved per arm). Arms: "additive", "R=<r>" for
    ``ranks``, "R=2 two-sided" (``two_sided``), "R=2 h=2" (``multi_core``), "R=2 +aux" (``aux_loss``).
    Defaults (LabParams': 2,000 facts, 400 steps of 256 rows): past the steep take-off of the
    learning curves, where the seed-to-seed spread of the answer loss is largest.
    """

    out_dir: str = "runs/manual/01_tdqkr"  # run directory (the sweep runner sets it)
    ratio: float = 10.0          # memory model params = (1 + ratio) x the dense trunk's
    heads: int = 2               # memory heads H
    top_k: int = 16              # values per head K (= candidates per side m)
    k_dim: int = 8               # key features per side D_k of the Tucker arms
    additive_equal_keys: bool = True  # additive keys get R=2 x k_dim features (equal key params and FLOPs)
    ranks: list[int] = field(default_factory=lambda: [2])  # Tucker ranks R, one arm each (2 = the release)
    two_sided: bool = True       # add the arm R=2 two-sided (two-sided proxy search)
    multi_core: bool = False     # add the arm R=2 h=2 (multi-core scoring, 2 cores)
    aux_loss: bool = False       # add the arm R=2 +aux (Tucker aux loss, alpha 0.001, tau 0.15)
    recall_rows: int = 512       # stored facts whose answer position is searched by brute force

    def __post_init__(self) -> None:
        super().__post_init__()
        o = type(self).__name__
        check_float(o, "ratio", self.ratio, min_value=0.5, max_value=64.0)
        check_int(o, "heads", self.heads, min_value=1, max_value=16)
        check_int(o, "top_k", self.top_k, min_value=1, max_value=64)
        check_int(o, "k_dim", self.k_dim, min_value=1, max_value=256)
        check_bool(o, "additive_equal_keys", self.additive_equal_keys)
        check_int_list(o, "ranks", self.ranks, min_value=2, max_value=8)
        if len(set(self.ranks)) != len(self.ranks):
            raise ConfigError(f"{o}.ranks={self.ranks!r} is not allowed: must list distinct ranks")
        for name in ("two_sided", "multi_core", "aux_loss"):
            check_bool(o, name, getattr(self, name))
        needs_r2 = [n for n in ("two_sided", "multi_core", "aux_loss") if getattr(self, n)]
        if needs_r2 and 2 not in self.ranks:
            raise ConfigError(f"{o}.ranks={self.ranks!r} is not allowed with {'/'.join(needs_r2)}=True: must "
                              "include 2 (those arms are compared with R=2)")
        check_int(o, "recall_rows", self.recall_rows, min_value=1, max_value=400_000)

    def effective(self) -> TDQKRParams:
        """Smoke: LabParams' shrink, and 64 recall rows."""
        e = super().effective()
        return e if not self.smoke else dataclasses.replace(e, recall_rows=min(self.recall_rows, 64))


# ----------------------------------------------------------------------------------------------
# 02_layer_splitting
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplittingParams(LabParams):
    """02_layer_splitting: one memory of ``total_values`` values vs S smaller ones (docs/mechanisms.md §1.2).

    The split keeps the TOTAL values and the ACTIVATED values per token equal
    (:func:`labcore.lm.model.split_memory_plan`): each of the S memories holds ``total_values / S``
    values (a perfect square: product keys) and reads ``top_k / S`` values per head, so S * H * K / S
    = H * K value rows per token before and after. Arms: "S=1" (one memory, the baseline), for each
    S > 1 in ``splits`` "S=<S> same block" (the S memories side by side at the baseline's block:
    the split alone, when ``same_block``) and, for each span in ``spans``, "S=<S> depth span <s>"
    (spread over the depth with skip span s, :func:`labcore.lm.model.spread_placements`). Splitting
    over depth needs more than 2 blocks: the trunk has ``n_layers`` = 4 by default.
    """

    out_dir: str = "runs/manual/02_layer_splitting"  # run directory (the sweep runner sets it)
    steps: int = 250                  # optimiser steps per training run
    batch_size: int = 128             # fact rows per step
    n_layers: int = 4                 # trunk blocks L (> 2: the memories spread over the depth)
    n_facts: int = 1000               # facts (subject, relation) -> object; 4 relations
    total_values: int = 9216          # physical values N summed over all memories (96^2)
    top_k: int = 32                   # values per head K of the single memory; S memories read K/S each
    splits: list[int] = field(default_factory=lambda: [1, 4])        # numbers of memories S (1: baseline)
    spans: list[int] = field(default_factory=lambda: [0])            # skip spans (v - k) of the depth arms
    same_block: bool = True           # also an arm with the S memories side by side at the baseline's block
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 256])  # decode batch sizes timed

    def __post_init__(self) -> None:
        super().__post_init__()
        o = type(self).__name__
        check_int(o, "n_layers", self.n_layers, min_value=3)
        check_int(o, "total_values", self.total_values, min_value=16, max_value=1 << 24)
        check_int(o, "top_k", self.top_k, min_value=1)
        check_int_list(o, "splits", self.splits, min_value=1, max_value=64)
        if 1 not in self.splits:
            raise ConfigError(f"{o}.splits={self.splits!r} is not allowed: must include 1 (the single memory, "
                              "the baseline)")
        check_int_list(o, "spans", self.spans, min_value=0, max_value=self.n_layers - 1)
        check_bool(o, "same_block", self.same_block)
        check_int_list(o, "batch_sizes", self.batch_sizes, min_value=1)
        for s in self.splits:
            per, rem = divmod(self.total_values, s)
            if rem or not is_perfect_square(per):
                raise ConfigError(f"{o}.splits={self.splits!r} is not allowed with total_values="
                                  f"{self.total_values}: {self.total_values}/{s} is not a perfect square "
                                  "(each memory's values form an n x n product-key grid)")
            if self.top_k % s:
                raise ConfigError(f"{o}.splits={self.splits!r} is not allowed with top_k={self.top_k}: "
                                  f"top_k must be divisible by every S (each of S memories reads top_k/S "
                                  "values per head, so activated values stay equal)")
            if math.isqrt(per) < self.top_k // s:
                raise ConfigError(f"{o}.splits={self.splits!r} is not allowed with top_k={self.top_k}: "
                                  f"{s} memories of {per} values have {math.isqrt(per)} keys per side "
                                  f"< top_k/S = {self.top_k // s}")

    def effective(self) -> SplittingParams:
        """Smoke: a dozen steps, 2 seeds, 200 facts, 64 rows per step; the depth (n_layers) is kept."""
        if not self.smoke:
            return self
        return dataclasses.replace(self, steps=min(self.steps, 12), n_seeds=min(self.n_seeds, 2),
                                   batch_size=min(self.batch_size, 64), n_facts=min(self.n_facts, 200),
                                   d_model=32)


# ----------------------------------------------------------------------------------------------
# 03_virtual_memory
# ----------------------------------------------------------------------------------------------

VALUE_WIDTH_REFERENCES = ("full_width", "full_width_proj")


@dataclass(frozen=True)
class VirtualMemoryParams(LabParams):
    """03_virtual_memory: implicit value expansion (IVE, docs/mechanisms.md §1.4) at equal physical values.

    Every arm has the same N = ``n_keys``^2 physical values and reads the same H * K of them per
    token. "E=<E>" arms (``expansions``, perfect squares, 1 = IVE off, the baseline) store values of
    width ``d_value`` (the paper's D/2) behind the E*D_v -> D projection; E grows the virtual rows
    (E * N), the keys per side (sqrt(E) * n) and the projection. ``references`` adds E = 1 arms
    with full-width values: "full_width" (D_v = D, no projection: the lab's facts default) and
    "full_width_proj" (D_v = D with a D -> D projection), which separate the cost of the
    projection from that of the half width.
    """

    out_dir: str = "runs/manual/03_virtual_memory"  # run directory (the sweep runner sets it)
    steps: int = 500                  # optimiser steps per training run
    batch_size: int = 128             # fact rows per step
    n_facts: int = 1000               # facts (subject, relation) -> object; 4 relations
    n_keys: int = 64                  # physical keys per side n (N = n^2 physical values in every arm)
    top_k: int = 16                   # values per head K
    d_value: int = 16                 # value width D_v of the E arms (the paper's D/2; projection to D)
    expansions: list[int] = field(default_factory=lambda: [1, 4])    # E (perfect squares, 1 = baseline)
    references: list[str] = field(default_factory=lambda: ["full_width"])  # E=1 full-width reference arms

    def __post_init__(self) -> None:
        super().__post_init__()
        o = type(self).__name__
        check_int(o, "n_keys", self.n_keys, min_value=4, max_value=4096)
        check_int(o, "top_k", self.top_k, min_value=1, max_value=self.n_keys)
        check_int(o, "d_value", self.d_value, min_value=2, max_value=4096)
        if self.d_value % 2:
            raise ConfigError(f"{o}.d_value={self.d_value!r} is not allowed: must be even (2 scoring cores "
                              "each weight half of the value vector)")
        check_int_list(o, "expansions", self.expansions, min_value=1, max_value=64)
        if any(not is_perfect_square(e) for e in self.expansions) or 1 not in self.expansions:
            raise ConfigError(f"{o}.expansions={self.expansions!r} is not allowed: must list perfect squares "
                              ">= 1 including 1 (the baseline)")
        if (not isinstance(self.references, list | tuple) or len(set(self.references)) != len(self.references)
                or any(r not in VALUE_WIDTH_REFERENCES for r in self.references)):
            raise ConfigError(f"{o}.references={self.references!r} is not allowed: must list distinct names of "
                              f"{list(VALUE_WIDTH_REFERENCES)} (may be empty)")


# ----------------------------------------------------------------------------------------------
# 04_architectures
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchitecturesParams(LabParams):
    """04_architectures: dense, MoE, PKM (beside and replacing the FFN) and UltraMem at equal
    activated FLOPs, the sparse arms at ``(1 + ratio)`` x the dense parameters, on the facts task.
    Five arms x ``n_seeds``: the defaults train fewer facts for fewer steps than :class:`LabParams`'
    (same exposures per fact scale) to fit the quick sweep."""

    out_dir: str = "runs/manual/04_architectures"  # run directory (the sweep runner sets it)
    steps: int = 300                   # optimiser steps per training run
    batch_size: int = 128              # fact rows per step
    n_facts: int = 1000                # facts (subject, relation) -> object; a multiple of 4 (4 relations)
    ratio: float = 10.0                # sparse / dense parameters (total = (1 + ratio) x dense)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 256, 4096])  # decode batches timed

    def __post_init__(self) -> None:
        super().__post_init__()
        o = type(self).__name__
        check_float(o, "ratio", self.ratio, min_value=0.5, max_value=64.0)
        check_int_list(o, "batch_sizes", self.batch_sizes, min_value=1, max_value=65536)


# ----------------------------------------------------------------------------------------------
# 05_paper_table
# ----------------------------------------------------------------------------------------------

# arXiv 2411.12364 Table 2 (docs/mechanisms.md §1.8): validation-loss delta of each row against
# the previous one.
PAPER_VAL_DELTAS = {
    "+rm softmax": -0.006, "+half vdim + proj": -0.022, "+share query": +0.003,
    "+split big mem & skip": -0.015, "+query/key LN": +0.001, "+IVE": -0.017, "+TDQKR": -0.008,
    "+MCS": -0.003, "+improved init": -0.003, "+value lr decay": -0.022,
}
ROWS = ("PKM", *PAPER_VAL_DELTAS)


@dataclass(frozen=True)
class PaperTableParams(LabParams):
    """05_paper_table: Table 2 walked on the facts task, one cumulative switch per row.

    The walk is the lab's most expensive notebook (eleven rows x seeds), so its defaults train fewer
    facts for fewer steps than :class:`LabParams`' and pick the PKM row's memory (``n_keys`` per
    side, ``heads`` x ``top_k``, ``k_dim`` key features per side) so that the first row sits off its
    ceiling. ``top_k`` is even: the split row gives each of its two memories top_k / 2.
    """

    out_dir: str = "runs/manual/05_paper_table"  # run directory (the sweep runner sets it)
    n_seeds: int = 3          # seeds per row (paired: same init seed and batch order)
    steps: int = 150          # optimiser steps per training run
    batch_size: int = 128     # fact rows per step
    n_facts: int = 800        # facts (subject, relation) -> object; a multiple of 4 (4 relations)
    n_keys: int = 29          # PKM row: physical keys per side n (N = n^2 values)
    heads: int = 2            # memory query heads H
    top_k: int = 16           # values selected per head K (even: the split row halves it)
    k_dim: int = 16           # key features per side D_k
    rows: list[str] = field(default_factory=lambda: list(ROWS))  # which rows to walk (in table order)

    def __post_init__(self) -> None:
        super().__post_init__()
        o = type(self).__name__
        check_int(o, "n_keys", self.n_keys, min_value=4, max_value=4096)
        check_int(o, "heads", self.heads, min_value=1, max_value=16)
        check_int(o, "top_k", self.top_k, min_value=2, max_value=self.n_keys)
        if self.top_k % 2:
            raise ConfigError(f"{o}.top_k={self.top_k!r} is not allowed: must be even (the split row gives each "
                              "of its 2 memories top_k / 2 slots per head)")
        check_int(o, "k_dim", self.k_dim, min_value=2, max_value=1024)
        if (not isinstance(self.rows, list | tuple) or not self.rows or self.rows[0] != "PKM"
                or any(r not in ROWS for r in self.rows) or len(set(self.rows)) != len(self.rows)
                or list(self.rows) != sorted(self.rows, key=ROWS.index)):
            raise ConfigError(f"{o}.rows={self.rows!r} is not allowed: must start with 'PKM' and list distinct "
                              f"rows of {list(ROWS)} in table order")


# ----------------------------------------------------------------------------------------------
# 00_tour (its logic and drawings: labcore.viz.tour, labcore.viz.tour_plots)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TourParams:
    """Parameters of ``notebooks/00_tour.ipynb`` (and the sizes of :class:`labcore.viz.widgets.TourControls`).

    smoke: tiny sizes for a fast headless run (caps n_queries and batch_size, see :meth:`resolved`).
    out_dir: run directory for the saved figures and summary. seed: one seed for every random draw.
    d_model: D. n_experts / moe_top_k: E and K of the MoE router. n_keys: n sub-keys per side
    (N = n^2 physical slots). k_dim: D_k per half-query. top_k: K slots per token (also m, the
    candidates per side of the TDQKR search). rank: R. expansion: E of IVE (a perfect square).
    batch_size: B tokens for the load histograms. n_queries: random queries for the bias measure.
    token: which of the B tokens is "the" token followed through the tour (0-based).
    ive_shuffle: apply IVE's fixed random permutation (False shows the aligned, unshuffled layout).
    heads: H retrieval heads of PEER and Memory+. memory_layers: L memory layers sharing one value
    pool (Memory+, UltraMemV2). ring_share: g, pool segments each UltraMemV2 layer's ring window
    spans (share_ratio = g / L; 1 <= g <= L).
    """

    smoke: bool = False
    out_dir: str = "runs/tour"
    seed: int = 0
    d_model: int = 16
    n_experts: int = 8
    moe_top_k: int = 2
    n_keys: int = 8
    k_dim: int = 8
    top_k: int = 4
    rank: int = 2
    expansion: int = 4
    batch_size: int = 64
    n_queries: int = 2000
    token: int = 0
    ive_shuffle: bool = True
    heads: int = 2
    memory_layers: int = 3
    ring_share: int = 2

    def __post_init__(self) -> None:
        o = type(self).__name__
        for name in ("smoke", "ive_shuffle"):
            check_bool(o, name, getattr(self, name))
        check_str(o, "out_dir", self.out_dir)
        check_int(o, "seed", self.seed, min_value=0)
        check_int(o, "d_model", self.d_model, min_value=1, max_value=4096)
        check_int(o, "n_experts", self.n_experts, min_value=1, max_value=1024)
        check_int(o, "moe_top_k", self.moe_top_k, min_value=1, max_value=self.n_experts)
        check_int(o, "n_keys", self.n_keys, min_value=2, max_value=64)
        check_int(o, "k_dim", self.k_dim, min_value=1, max_value=1024)
        check_int(o, "top_k", self.top_k, min_value=1, max_value=self.n_keys)
        check_int(o, "rank", self.rank, min_value=1, max_value=8)
        check_int(o, "expansion", self.expansion, min_value=1, max_value=16)
        if not is_perfect_square(self.expansion):
            raise ConfigError(f"{o}.expansion={self.expansion!r} is not allowed: must be a perfect square "
                              "(1, 4, 9, 16): keys per side grow by sqrt(E)")
        check_int(o, "batch_size", self.batch_size, min_value=1, max_value=65536)
        check_int(o, "n_queries", self.n_queries, min_value=10, max_value=1_000_000)
        check_int(o, "token", self.token, min_value=0, max_value=self.batch_size - 1)
        check_int(o, "heads", self.heads, min_value=1, max_value=16)
        check_int(o, "memory_layers", self.memory_layers, min_value=1, max_value=8)
        check_int(o, "ring_share", self.ring_share, min_value=1, max_value=self.memory_layers)

    def resolved(self) -> TourParams:
        """The sizes actually used: in smoke mode n_queries <= 300 and batch_size <= 32."""
        if not self.smoke:
            return self
        b = min(self.batch_size, 32)
        return dataclasses.replace(self, n_queries=min(self.n_queries, 300), batch_size=b, token=min(self.token, b - 1))


# ----------------------------------------------------------------------------------------------
# 06_results_explorer (its widgets: labcore.viz.widgets)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplorerParams:
    """Parameters of ``notebooks/06_results_explorer.ipynb``.

    results_root: a results directory (a sweep's root, or any folder of run directories); relative
    paths resolve against the repository root (``labcore.results.repo_path``); "" means the sweep
    this notebook runs in (``LABCORE_SWEEP_DIR``, set by ``labcore sweep``). notebook / metric:
    initial selections ("" = the first available). out_dir: where the explorer saves its figure
    and a per-notebook summary. smoke, seed: as in every notebook (nothing random here).
    """

    smoke: bool = False
    out_dir: str = "runs/explorer"
    seed: int = 0
    results_root: str = "runs/quick"
    notebook: str = ""
    metric: str = ""

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_bool(o, "smoke", self.smoke)
        check_str(o, "out_dir", self.out_dir)
        check_int(o, "seed", self.seed, min_value=0)
        if not isinstance(self.results_root, str):
            raise ConfigError(f"{o}.results_root={self.results_root!r} is not allowed: must be a path string "
                              "(\"\" for the sweep this notebook runs in)")
        for name in ("notebook", "metric"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{o}.{name}={getattr(self, name)!r} is not allowed: must be a string "
                                  "(\"\" for the first available)")


# ----------------------------------------------------------------------------------------------
# 07_memory_family
# ----------------------------------------------------------------------------------------------

# The names of labcore.lm.budget.memory_family_names(), in its order (kept here torch-free so that the
# sweep driver can check them; tests/experiments/test_memory_family.py checks they agree).
MEMORY_FAMILY = ("dense", "moe", "pkm", "ultramem", "ultramem_v2", "memory_plus", "peer")
CAPACITY_ARCHS = ("pkm", "ultramem", "ultramem_v2", "memory_plus", "peer")


@dataclass(frozen=True)
class MemoryFamilyParams(LabParams):
    """07_memory_family: the whole family at equal activated FLOPs on the facts task.

    The task, trunk, training and confound-free defaults are :class:`LabParams`' (facts task, D=32
    L=2 trunk, value-LR multiplier in every memory, init calibrated to the FFN output std, no weight
    decay); this notebook runs fewer steps on fewer facts by default, because it trains seven models
    plus the capacity points per seed. ``ratio``: the family's sparse / dense parameters;
    ``capacity_archs`` x ``capacity_ratios``: the memories and sizes of the capacity curve (all at
    the dense model's activated FLOPs); ``batch_sizes``: the decode batches timed.
    """

    out_dir: str = "runs/manual/07_memory_family"  # run directory (the sweep runner sets it)
    steps: int = 150                  # optimiser steps per training run
    batch_size: int = 128             # fact rows per step
    n_facts: int = 800                # facts (subject, relation) -> object; 4 relations
    ratio: float = 10.0               # sparse / dense parameters of the family (total = (1 + ratio) x dense)
    architectures: list[str] = field(default_factory=lambda: list(MEMORY_FAMILY))  # "dense" first
    capacity_archs: list[str] = field(default_factory=lambda: ["pkm", "ultramem"])  # memories for the curve
    capacity_ratios: list[float] = field(default_factory=lambda: [2.5, 10.0, 40.0])  # memory sizes (ratio) on the curve
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64, 512])  # decode batches timed

    def __post_init__(self) -> None:
        super().__post_init__()
        o = type(self).__name__
        check_float(o, "ratio", self.ratio, min_value=0.5, max_value=64.0)
        check_int_list(o, "batch_sizes", self.batch_sizes, min_value=1, max_value=65536)
        if (not isinstance(self.architectures, list | tuple) or not self.architectures
                or self.architectures[0] != "dense" or len(set(self.architectures)) != len(self.architectures)
                or any(a not in MEMORY_FAMILY for a in self.architectures)):
            raise ConfigError(f"{o}.architectures={self.architectures!r} is not allowed: must start with "
                              f"'dense' and list distinct names of {list(MEMORY_FAMILY)}")
        if (not isinstance(self.capacity_archs, list | tuple) or len(set(self.capacity_archs)) != len(
                self.capacity_archs) or any(a not in CAPACITY_ARCHS for a in self.capacity_archs)):
            raise ConfigError(f"{o}.capacity_archs={self.capacity_archs!r} is not allowed: must list distinct "
                              f"names of {list(CAPACITY_ARCHS)} (may be empty: no capacity curve)")
        if not isinstance(self.capacity_ratios, list | tuple) or not self.capacity_ratios:
            raise ConfigError(f"{o}.capacity_ratios={self.capacity_ratios!r} is not allowed: must be a "
                              "non-empty list of numbers in [0.5, 64.0]")
        for r in self.capacity_ratios:
            if isinstance(r, bool) or not isinstance(r, int | float) or not 0.5 <= r <= 64.0:
                raise ConfigError(f"{o}.capacity_ratios={self.capacity_ratios!r} is not allowed: must be a "
                                  "non-empty list of numbers in [0.5, 64.0]")

    def effective(self) -> MemoryFamilyParams:
        """Smoke: a dozen steps, 2 seeds, 200 facts, 64 rows per step, batches up to 8, two curve sizes."""
        if not self.smoke:
            return self
        return dataclasses.replace(self, steps=min(self.steps, 12), n_seeds=min(self.n_seeds, 2),
                                   batch_size=min(self.batch_size, 64), n_facts=min(self.n_facts, 200),
                                   d_model=32, n_layers=2, capacity_ratios=sorted(self.capacity_ratios)[:2],
                                   batch_sizes=sorted({min(b, 8) for b in self.batch_sizes}))


# ----------------------------------------------------------------------------------------------
# 08_facts_task
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactsTaskParams(LabParams):
    """08_facts_task: the facts task's own property, a dense trunk's stored knowledge vs the load.

    Every trunk of ``d_models`` (D x ``n_layers``, D/16 heads, d_ff 4D; no memory) is trained on
    each fact count of ``fact_counts`` with the same number of **exposures per fact**: steps =
    round(``exposures`` x n_facts / ``batch_size``), so a larger load gets proportionally more steps
    and every fact is seen about ``exposures`` times at every size. ``capacity_bits``: the bits per
    parameter of the capacity line drawn beside the measurements (Allen-Zhu & Li, arXiv 2404.05405:
    about 2 after ~1000 exposures, about 1 after ~100). ``eval_points``: evaluations during each
    run (the learning curves; 0: only the final one).

    Not used here: ``steps`` (derived per load, above), ``n_facts`` (``fact_counts``), ``d_model``
    (``d_models``), ``value_lr_multiplier`` and ``calibrate_init`` (a dense trunk has no memory).
    The defaults are the quick setting: one D = 16 trunk (12,416 parameters) on 400-3,200 facts,
    measured at about two minutes of one CPU thread.
    """

    out_dir: str = "runs/manual/08_facts_task"  # run directory (the sweep runner sets it)
    n_seeds: int = 3                 # seeds per (trunk, load): paired by init seed and batch order
    lr: float = 1e-2                 # peak learning rate (a D = 16 trunk learns faster at 1e-2 than 3e-3)
    d_model: int = 16                # not used here: d_models lists the trunks
    fact_counts: list[int] = field(default_factory=lambda: [400, 800, 1600, 3200])  # loads, increasing
    d_models: list[int] = field(default_factory=lambda: [16])  # trunk widths D (multiples of 16)
    exposures: int = 160             # exposures per fact: steps = exposures * n_facts / batch_size
    capacity_bits: float = 2.0       # bits per parameter of the capacity line (Allen-Zhu & Li)
    eval_points: int = 4             # evaluations per run for the learning curves (0: final only)

    def __post_init__(self) -> None:
        super().__post_init__()
        o = type(self).__name__
        check_int_list(o, "fact_counts", self.fact_counts, min_value=8, max_value=400_000)
        fc = list(self.fact_counts)
        if len(fc) < 2 or any(b <= a for a, b in zip(fc, fc[1:])) or any(c % 4 for c in fc):
            raise ConfigError(f"{o}.fact_counts={self.fact_counts!r} is not allowed: must list at least 2 "
                              "strictly increasing multiples of 4 (4 relations per subject) in [8, 400000]")
        check_int_list(o, "d_models", self.d_models, min_value=16, max_value=512)
        if len(set(self.d_models)) != len(self.d_models) or any(d % 16 for d in self.d_models):
            raise ConfigError(f"{o}.d_models={self.d_models!r} is not allowed: must list distinct multiples "
                              "of 16 in [16, 512]")
        check_int(o, "exposures", self.exposures, min_value=1, max_value=100_000)
        check_float(o, "capacity_bits", self.capacity_bits, min_value=0.0, max_value=64.0, min_inclusive=False)
        check_int(o, "eval_points", self.eval_points, min_value=0, max_value=20)

    def effective(self) -> FactsTaskParams:
        """Smoke: 2 seeds, loads of 40 and 80 facts, 16 exposures, 32 rows per step (trunks as given)."""
        if not self.smoke:
            return self
        return dataclasses.replace(self, n_seeds=min(self.n_seeds, 2), fact_counts=[40, 80],
                                   exposures=min(self.exposures, 16), batch_size=min(self.batch_size, 32),
                                   eval_points=min(self.eval_points, 2))

    def steps_for(self, n_facts: int) -> int:
        """Optimiser steps that show each of ``n_facts`` facts ``exposures`` times (at least 1)."""
        return max(1, round(self.exposures * n_facts / self.batch_size))
