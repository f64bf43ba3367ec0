"""Exercises of notebooks/03_virtual_memory.ipynb: what IVE grows and what it keeps.

Every checker computes its answer from :class:`labcore.layers.ultramem.UltraMemConfig` (its
derived sizes and ``cost()``), not from a stored number.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from labcore.config import ConfigError
from labcore.exercises import as_number, as_whole, exercise
from labcore.layers.ultramem import UltraMemConfig

# The notebook's default memory: n = 64 physical keys per side, 2 heads x top-16, D = 32, D_v = 16.
N_KEYS, D_MODEL, D_VALUE = 64, 32, 16


def _memory(expansion: int) -> UltraMemConfig:
    return UltraMemConfig(d_model=D_MODEL, n_keys=N_KEYS, heads=2, k_dim=D_MODEL // 4, top_k=16, d_value=D_VALUE,
                          value_proj=True, expansion=expansion, rank=2, n_cores=2)


@exercise("03.1", "Set E so that the virtual table has 4x the physical rows.",
          solution="E is the expansion factor: the search grid has n_s^2 = (sqrt(E) n)^2 = E * N cells, each a "
          "virtual row, over N physical rows. 4x the physical rows: E = 4 (keys per side double).")
def _four_x(answer: Any) -> tuple[bool, str]:
    e = as_whole("03.1", answer)
    try:
        cfg = _memory(e)
    except ConfigError as err:
        return False, f"E = {e} is not a valid expansion: {err}"
    ratio = cfg.n_virtual / cfg.n_slots
    if ratio == 4:
        return True, f"E = {e}: {cfg.n_virtual} virtual rows over {cfg.n_slots} physical rows"
    return False, f"E = {e} gives {cfg.n_virtual} virtual rows over {cfg.n_slots} physical: {ratio:g}x, not 4x"


@exercise("03.2", f"With n = {N_KEYS} physical keys per side and E = 4, how many sub-keys per side does the "
          "search score for each head?",
          solution="The grid must have E * N = E * n^2 cells, so each side has sqrt(E) * n sub-keys: "
          f"2 * {N_KEYS} = {2 * N_KEYS}. That is where IVE's extra FLOPs go (key scores grow sqrt(E)-fold), "
          "with the projection.")
def _keys_per_side(answer: Any) -> tuple[bool, str]:
    k = as_whole("03.2", answer)
    cfg = _memory(4)
    if k == cfg.n_side:
        return True, f"sqrt(4) * {N_KEYS} = {cfg.n_side}: a {cfg.n_side} x {cfg.n_side} grid = {cfg.n_virtual} slots"
    return False, (f"{k} keys per side make a {k} x {k} = {k * k} grid; the virtual table has E * n^2 = "
                   f"{cfg.n_virtual} slots")


PARTS = ("query", "norms", "keys", "cores", "values", "value_proj")


@exercise("03.3", "Going from E = 1 to E = 4 (same n, same D_v), which parts of the layer's parameters grow? "
          f"Answer a set of names from {PARTS}.",
          solution="The physical values (N x D_v) do not change: that is the point of IVE. The keys grow "
          "(sqrt(E) n per side instead of n) and the projection grows (E * D_v -> D instead of D_v -> D). "
          "Query, norms and cores do not depend on E. So {'keys', 'value_proj'} (`UltraMemConfig.cost().params`).")
def _what_grows(answer: Any) -> tuple[bool, str]:
    if isinstance(answer, str) or not isinstance(answer, set | list | tuple | frozenset):
        raise ConfigError(f"exercise 03.3: answer={answer!r} is not allowed: must be a set of names from {PARTS}")
    got = set(answer)
    bad = got - set(PARTS)
    if bad:
        raise ConfigError(f"exercise 03.3: answer={answer!r} is not allowed: {sorted(bad)} are not parts; "
                          f"must be names from {PARTS}")
    p1, p4 = _memory(1).cost().params, _memory(4).cost().params
    want = {k for k in PARTS if p4.get(k, 0) > p1.get(k, 0)}
    growth = ", ".join(f"{k} {p1.get(k, 0)} -> {p4.get(k, 0)}" for k in PARTS)
    if got == want:
        return True, f"{sorted(want)} grow; the values stay {p1['values']} ({growth})"
    return False, f"per part at E=1 -> E=4: {growth}"


@exercise("03.4", "Take E = 4 and halve n (physical keys per side). How many virtual rows does the search "
          "address now, relative to E = 1 at the original n? Give the ratio.",
          solution="Halving n divides the physical rows by 4 (N = n^2), and E = 4 multiplies the virtual rows "
          "by 4: E * (n/2)^2 = n^2. The virtual table is then exactly as large as the original physical one "
          "(ratio 1), with a quarter of the values stored. This is the other way to use IVE: the same "
          "addressable table with fewer physical bytes.")
def _same_virtual(answer: Any) -> tuple[bool, str]:
    x = as_number("03.4", answer, "answer (a ratio)")
    half = dataclasses.replace(_memory(4), n_keys=N_KEYS // 2)
    want = half.n_virtual / _memory(1).n_virtual
    if abs(x - want) < 1e-9:
        return True, f"{half.n_virtual} virtual rows vs {_memory(1).n_virtual}: ratio {want:g}"
    return False, f"E * (n/2)^2 = 4 * {N_KEYS // 2}^2 = {half.n_virtual}, against {_memory(1).n_virtual}"
