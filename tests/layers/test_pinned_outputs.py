"""Pinned outputs: every layer, on fixed seeds and inputs, still computes the numbers saved in
``tests/layers/data/pinned.pt`` (outputs, aux fields and, for training cases, gradients).

The cases and the recording code live in ``tests/layers/data/make_pinned.py``; a refactor that is
meant to change nothing must pass this test unchanged. Indices and counts must match exactly,
floating-point tensors to 1e-6 relative (to the element or the tensor's largest entry).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location("make_pinned", Path(__file__).parent / "data" / "make_pinned.py")
make_pinned = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(make_pinned)

PINNED = torch.load(make_pinned.PINNED)


def test_every_case_is_pinned():
    assert set(PINNED) == set(make_pinned.CASES)


UNORDERED = ("pkm_",)
"""Cases whose final top-K is unsorted (PKM: "no particular order"): their aux.indices / aux.scores
rows are compared as sets, (slot, score) pairs sorted by slot (then score)."""


def canonical(rec: dict) -> dict:
    """rec with each row of aux.indices / aux.scores reordered by (slot, score)."""
    order = rec["aux.scores"].argsort(dim=-1, stable=True)
    idx, sc = rec["aux.indices"].gather(-1, order), rec["aux.scores"].gather(-1, order)
    order = idx.argsort(dim=-1, stable=True)
    return {**rec, "aux.indices": idx.gather(-1, order), "aux.scores": sc.gather(-1, order)}


@pytest.mark.parametrize("name", list(make_pinned.CASES))
def test_outputs_equal_pinned(name):
    want = PINNED[name]
    got = make_pinned.run_case(name)
    if name.startswith(UNORDERED):
        want, got = canonical(want), canonical(got)
    assert set(got) == set(want)
    assert "y" in got and got["y"].abs().max() > 1e-4                      # not trivially zero
    for key, expected in want.items():
        actual = got[key]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
        if expected.is_floating_point():
            # 1e-6 relative to each element and to the tensor's scale: BLAS kernels may round the
            # last bit differently with the memory alignment of a run, even for identical code (and
            # BatchNorm makes the query-bias gradient pure rounding noise around 0: the 1e-7 floor)
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=max(1e-6 * scale, 1e-7),
                                       msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(actual, expected), key
