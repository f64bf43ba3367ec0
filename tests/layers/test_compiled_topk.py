"""labcore.layers.fast.compiled.topk_rows: the compiled per-row top-k against torch.topk and the
readable PyTorch path, on both instruction-set paths, plus the fallback when the build is missing."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from labcore.config import ConfigError
from labcore.layers.fast import compiled
from labcore.layers.fast.topk import ordered_int32

REPO = Path(__file__).resolve().parents[2]


def _isas() -> list[str]:
    if compiled.disabled() or shutil.which(os.environ.get("CXX", "c++")) is None:
        return []                       # no compiler: only the fallback tests below run
    assert compiled.available(), compiled.unavailable_reason()  # a compiler but no build is a bug
    return ["portable", "avx512"] if compiled.isa() == "avx512" else ["portable"]


ISAS = _isas()
needs_ext = pytest.mark.skipif(not ISAS, reason="no C++ compiler (or LABCORE_COMPILED=0)")
isa_param = pytest.mark.parametrize("isa", ISAS or ["portable"])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row in IEEE totalOrder, descending (sorting is tie-free on values)."""
    keys = ordered_int32(x)
    order = keys.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return x.gather(-1, order)


def check_topk(x: torch.Tensor, k: int, v: torch.Tensor, i: torch.Tensor, sorted: bool = True) -> None:
    """Correct up to ties: the values are bitwise the k largest (descending when sorted), the indices
    are distinct, and they point at those values."""
    assert v.shape == i.shape == (*x.shape[:-1], k)
    assert v.dtype == torch.float32 and i.dtype == torch.int64
    bits = lambda t: t.contiguous().view(torch.int32)  # noqa: E731
    want = expected_values(x, k)
    got = v if sorted else v.gather(-1, ordered_int32(v).sort(dim=-1, descending=True, stable=True).indices)
    assert torch.equal(bits(got), bits(want))
    assert torch.equal(bits(x.gather(-1, i)), bits(v))
    if k > 1:
        s = i.sort(-1).values
        assert bool((s[..., 1:] != s[..., :-1]).all()), "an index was selected twice"


# --------------------------------------------------------------------------------------------------
# against torch.topk on random data: the layers' shapes and odd sizes
# --------------------------------------------------------------------------------------------------

LAYER_SHAPES = [   # (rows, n, k): PKM per-side / candidates, UltraMem per-side / m^2 grid, other K
    (96, 451, 32), (64, 119, 32), (48, 1276, 32), (40, 1024, 32),
    (64, 128, 32), (64, 256, 32), (33, 451, 8), (33, 451, 16), (33, 451, 64), (20, 4096, 64),
]
ODD_SHAPES = [(1, 1, 1), (1, 7, 7), (3, 17, 5), (5, 33, 32), (7, 127, 64), (9, 129, 1),
              (2, 257, 100), (4, 1001, 128), (3, 600, 200), (1, 451, 32), (2, 31, 31)]


@needs_ext
@isa_param
@pytest.mark.parametrize("rows,n,k", LAYER_SHAPES + ODD_SHAPES)
def test_matches_torch_topk_on_random_data(isa, rows, n, k):
    x = torch.randn(rows, n, generator=gen(rows * 1000 + n + k))
    v, i = compiled.topk_rows(x, k, isa=isa)
    ref = x.topk(k, dim=-1)
    assert torch.equal(v.view(torch.int32), ref.values.view(torch.int32))      # bitwise, same order
    assert torch.equal(i.sort(-1).values, ref.indices.sort(-1).values)         # the same set
    check_topk(x, k, v, i)


@needs_ext
@isa_param
@pytest.mark.parametrize("n,k", [(451, 32), (119, 32), (1024, 32), (50, 50)])
def test_unsorted_selects_the_same_set(isa, n, k):
    x = torch.randn(30, n, generator=gen(n))
    v, i = compiled.topk_rows(x, k, sorted=False, isa=isa)
    check_topk(x, k, v, i, sorted=False)
    assert torch.equal(i.sort(-1).values, x.topk(k, dim=-1).indices.sort(-1).values)


@needs_ext
@isa_param
def test_negative_rows_and_shifted_scores(isa):
    """Rows that are all negative (the int32-bit shortcut of exact_topk fails there) and mixed signs."""
    x = torch.randn(50, 451, generator=gen(1)) - 10.0
    x[::2] += 10.0
    for k in (1, 32):
        v, i = compiled.topk_rows(x, k, isa=isa)
        assert torch.equal(v, x.topk(k, dim=-1).values)
        check_topk(x, k, v, i)


@needs_ext
@isa_param
def test_leading_dims_and_non_contiguous_input(isa):
    x = torch.randn(2, 3, 5, 451, generator=gen(2)).transpose(1, 2)  # (2, 5, 3, 451), not contiguous
    v, i = compiled.topk_rows(x, 16, isa=isa)
    assert v.shape == (2, 5, 3, 16)
    assert torch.equal(v, x.topk(16, dim=-1).values)
    check_topk(x, 16, v, i)


@needs_ext
@isa_param
def test_many_threads_equal_one_thread(isa):
    x = torch.randn(3000, 451, generator=gen(3))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        v1, i1 = compiled.topk_rows(x, 32, isa=isa)
        torch.set_num_threads(max(2, old))
        v2, i2 = compiled.topk_rows(x, 32, isa=isa)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(v1, v2) and torch.equal(i1, i2)
    check_topk(x, 32, v1, i1)


# --------------------------------------------------------------------------------------------------
# ties, duplicates, infinities, NaN, signed zeros
# --------------------------------------------------------------------------------------------------

@needs_ext
@isa_param
@pytest.mark.parametrize("n,k", [(451, 32), (119, 32), (1024, 64), (20, 7)])
def test_heavy_duplicates(isa, n, k):
    x = torch.randint(0, 4, (40, n), generator=gen(n)).float()            # 4 distinct values
    v, i = compiled.topk_rows(x, k, isa=isa)
    check_topk(x, k, v, i)
    assert torch.equal(v, x.topk(k, dim=-1).values)


@needs_ext
@isa_param
def test_all_equal_rows_pick_the_lowest_indices(isa):
    """Ties are broken towards the lower index (deterministic), on both paths."""
    for n, k in [(451, 32), (119, 32), (9, 4)]:
        x = torch.full((3, n), 0.5)
        v, i = compiled.topk_rows(x, k, isa=isa)
        assert torch.equal(i, torch.arange(k).expand(3, k))
        assert bool((v == 0.5).all())


@needs_ext
@isa_param
def test_inf_rows(isa):
    x = torch.randn(6, 451, generator=gen(4))
    x[0] = float("-inf")                       # only -inf: any k entries, all -inf
    x[1, 10:] = float("-inf")                  # 10 finite entries, k = 32 reaches into the -inf
    x[2, ::7] = float("inf")                   # 65 +inf entries: the top 32 are +inf
    x[3, 5] = float("inf")
    x[4, :400] = float("-inf")
    for k in (1, 32, 451):
        v, i = compiled.topk_rows(x, k, isa=isa)
        check_topk(x, k, v, i)
        assert torch.equal(v, x.topk(k, dim=-1).values)
    v, i = compiled.topk_rows(x, 32, isa=isa)
    assert set(i[1, :10].tolist()) == set(range(10))


@needs_ext
@isa_param
def test_nan_order_is_ieee_total_order(isa):
    """+NaN ranks above +inf (as in torch.topk); -NaN ranks below -inf (torch.topk puts it on top)."""
    x = torch.randn(4, 200, generator=gen(5))
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[1, 8] = float("nan")
    neg_nan = torch.tensor([-0x400000], dtype=torch.int32).view(torch.float32)  # 0xffc00000
    x[2, 4] = neg_nan
    x[3, :] = float("-inf")
    x[3, 9] = neg_nan
    v, i = compiled.topk_rows(x, 5, isa=isa)
    check_topk(x, 5, v, i)
    assert i[0, 0] == 3 and i[1, 0] == 8 and i[1, 1] == 7
    assert 4 not in i[2].tolist()                                       # -NaN is the smallest
    assert 9 not in i[3].tolist()
    v_all, i_all = compiled.topk_rows(x, 200, isa=isa)
    assert i_all[2, -1] == 4 and i_all[3, -1] == 9


@needs_ext
@isa_param
def test_positive_zero_ranks_above_negative_zero(isa):
    x = torch.tensor([[-0.0, 0.0, -1.0, -0.0]] * 2)
    v, i = compiled.topk_rows(x, 2, isa=isa)
    assert i[:, 0].tolist() == [1, 1]
    assert torch.equal(v[:, 0].view(torch.int32), torch.zeros(2, dtype=torch.int32))  # +0.0 bits


# --------------------------------------------------------------------------------------------------
# edges, autograd, bad input
# --------------------------------------------------------------------------------------------------

@needs_ext
@isa_param
def test_k_zero_and_empty_batch(isa):
    x = torch.randn(3, 10, generator=gen(6))
    v, i = compiled.topk_rows(x, 0, isa=isa)
    assert v.shape == i.shape == (3, 0)
    v, i = compiled.topk_rows(torch.empty(0, 10), 4, isa=isa)
    assert v.shape == i.shape == (0, 4)


@needs_ext
def test_gradient_flows_to_the_selected_entries():
    x = torch.randn(5, 451, generator=gen(7), requires_grad=True)
    v, i = compiled.topk_rows(x, 8)
    v.sum().backward()
    want = torch.zeros(5, 451).scatter_(-1, i, 1.0)
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize("k", [-1, 11, 2.0, True])
def test_bad_k_is_a_config_error(k):
    with pytest.raises(ConfigError, match=r"k="):
        compiled.topk_rows(torch.randn(2, 10), k)


@pytest.mark.parametrize("x", [torch.randn(2, 10, dtype=torch.float64), torch.randint(0, 9, (2, 10)),
                               torch.tensor(1.0)])
def test_bad_tensor_is_a_config_error(x):
    with pytest.raises(ConfigError, match=r"x="):
        compiled.topk_rows(x, 1)


def test_bad_isa_is_a_config_error():
    with pytest.raises(ConfigError, match=r"isa='sse'"):
        compiled.topk_rows(torch.randn(2, 10), 1, isa="sse")


# --------------------------------------------------------------------------------------------------
# the PyTorch fallback
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_state(monkeypatch):
    """Forget the loaded extension for one test (restored afterwards)."""
    saved = dict(compiled._state)
    compiled._state.update(module=None, tried=False, reason=None)
    yield
    compiled._state.clear()
    compiled._state.update(saved)


@pytest.mark.parametrize("rows,n,k", [(64, 451, 32), (5, 33, 32), (1, 1, 1), (3, 119, 32)])
def test_reference_path_matches_torch_topk(rows, n, k):
    x = torch.randn(rows, n, generator=gen(n))
    v, i = compiled.reference_topk_rows(x, k)
    assert torch.equal(v, x.topk(k, dim=-1).values)
    check_topk(x, k, v, i)


def test_failed_build_warns_once_and_falls_back(monkeypatch, fresh_state):
    def broken(verbose=False):
        raise RuntimeError("Error building extension 'labcore_topk_rows'\nc++: command not found")

    monkeypatch.delenv(compiled.ENV_DISABLE, raising=False)
    monkeypatch.setattr(compiled, "_compile", broken)
    x = torch.randn(20, 451, generator=gen(8))
    x[3, :] = float("-inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v, i = compiled.topk_rows(x, 32)
        v2, i2 = compiled.topk_rows(x, 32)
        assert not compiled.available()
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "unavailable" in msgs[0] and "command not found" in msgs[0]
    assert compiled.isa() == "pytorch" and "command not found" in compiled.unavailable_reason()
    check_topk(x, 32, v, i)
    assert torch.equal(v, x.topk(32, dim=-1).values) and torch.equal(v, v2) and torch.equal(i, i2)


def test_disabled_by_environment_is_silent(monkeypatch, fresh_state):
    monkeypatch.setenv(compiled.ENV_DISABLE, "0")
    monkeypatch.setattr(compiled, "_compile", lambda verbose=False: pytest.fail("must not build"))
    x = torch.randn(10, 119, generator=gen(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, i = compiled.topk_rows(x, 32)
    assert not compiled.available() and compiled.isa() == "pytorch"
    assert "LABCORE_COMPILED" in compiled.unavailable_reason()
    check_topk(x, 32, v, i)


@needs_ext
@pytest.mark.parametrize("n,k", [(451, 32), (17, 5)])
def test_compiled_and_fallback_select_the_same(monkeypatch, n, k):
    x = torch.randn(40, n, generator=gen(10))
    v, i = compiled.topk_rows(x, k)
    monkeypatch.setenv(compiled.ENV_DISABLE, "0")
    v0, i0 = compiled.topk_rows(x, k)
    assert torch.equal(v, v0)
    assert torch.equal(i.sort(-1).values, i0.sort(-1).values)


def test_real_build_without_a_compiler_prints_one_line(tmp_path):
    """A fresh build directory and a compiler that does not exist: one warning line, no crash."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), LABCORE_EXT_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(REPO), LABCORE_COMPILED="1", OMP_NUM_THREADS="1")
    code = ("import torch; from labcore.layers.fast import compiled as c; "
            "x = torch.randn(4, 451); v, i = c.topk_rows(x, 8); "
            "assert torch.equal(v, x.topk(8).values); print('isa', c.isa())\n"
            # the layers' fused inference searches and sparse value gradients fall back too
            "from labcore.layers.base import set_sparse_value_grads\n"
            "from labcore.layers.pkm import PKM, PKMConfig\n"
            "from labcore.layers.ultramem import UltraMem, UltraMemConfig\n"
            "for layer in (PKM(PKMConfig(d_model=16, n_keys=9, heads=2, k_dim=8, top_k=4)),\n"
            "              UltraMem(UltraMemConfig(d_model=16, n_keys=9, heads=2, k_dim=8, top_k=4, d_value=8))):\n"
            "    x = torch.randn(5, 16)\n"
            "    with torch.no_grad():\n"
            "        y0 = layer.eval()(x)[0]\n"
            "    set_sparse_value_grads(layer, True)\n"
            "    y1 = layer(x)[0]\n"
            "    y1.sum().backward()\n"
            "    assert torch.allclose(y0, y1) and layer.values.weight.grad.is_sparse\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "isa pytorch"
    lines = [ln for ln in r.stderr.splitlines() if "labcore compiled top-k unavailable" in ln]
    assert len(lines) == 1, r.stderr


# --------------------------------------------------------------------------------------------------
# side_topk: the fused product-key side search against the readable bmm + top-k
# --------------------------------------------------------------------------------------------------

def side_reference(q: torch.Tensor, keys: torch.Tensor, k: int):
    """float64 scores (the exact order) and their top-k; plus the gap at the k-th place per row."""
    s = torch.bmm(q.double(), keys.double().transpose(1, 2))                  # (G, T, n)
    top = s.topk(min(k + 1, s.shape[-1]), dim=-1)
    gap = (top.values[..., k - 1] - top.values[..., k]) if k < s.shape[-1] else torch.full(s.shape[:-1], 1.0)
    return s, top.values[..., :k], top.indices[..., :k], gap


SIDE_SHAPES = [  # (G, T, D, n, k): PKM (H*2 = 8 groups, D_k/2 = 64), UltraMem-like, odd sizes
    (8, 67, 64, 451, 32), (4, 40, 64, 1276, 32), (2, 9, 64, 128, 8), (3, 37, 5, 33, 7), (1, 1, 3, 1, 1),
    (2, 16, 17, 64, 64), (1, 8, 128, 500, 16), (5, 3, 7, 31, 31),
]


@needs_ext
@isa_param
@pytest.mark.parametrize("G,T,D,n,k", SIDE_SHAPES)
def test_side_topk_matches_the_readable_search(isa, G, T, D, n, k):
    g = gen(G * 100 + T + n)
    q = torch.randn(G, T, D, generator=g)
    keys = torch.randn(G, n, D, generator=g) / D ** 0.5
    v, i = compiled.side_topk(q, keys, k, isa=isa)
    assert v.shape == i.shape == (G, T, k) and i.dtype == torch.int64
    s64, rv, ri, gap = side_reference(q, keys, k)
    clear = gap > 1e-4                                # rows whose k-th place is not a float32 near-tie
    assert clear.float().mean() > 0.9
    assert torch.equal(i.sort(-1).values[clear], ri.sort(-1).values[clear])
    torch.testing.assert_close(v.double(), rv, atol=1e-5, rtol=1e-5)                # sorted, close
    torch.testing.assert_close(v.double(), s64.gather(-1, i), atol=1e-5, rtol=1e-5)  # right indices
    readable_v, _ = compiled.reference_side_topk(q, keys, k)
    torch.testing.assert_close(v, readable_v, atol=1e-5, rtol=1e-5)


@needs_ext
@isa_param
def test_side_topk_unsorted_and_ties(isa):
    q = torch.ones(2, 11, 4)
    keys = torch.zeros(2, 40, 4)                      # every score is 0: ties towards the lower index
    keys[1, 7] = 1.0
    v, i = compiled.side_topk(q, keys, 5, isa=isa)
    assert torch.equal(i[0], torch.arange(5).expand(11, 5))
    assert torch.equal(i[1], torch.tensor([7, 0, 1, 2, 3]).expand(11, 5))
    q = torch.randn(3, 20, 16, generator=gen(11))
    keys = torch.randn(3, 100, 16, generator=gen(12))
    vs, is_ = compiled.side_topk(q, keys, 10, isa=isa)
    vu, iu = compiled.side_topk(q, keys, 10, sorted=False, isa=isa)
    assert torch.equal(is_.sort(-1).values, iu.sort(-1).values)


@needs_ext
def test_side_topk_gradient_reaches_queries_and_keys():
    q = torch.randn(2, 9, 8, generator=gen(13), requires_grad=True)
    keys = torch.randn(2, 30, 8, generator=gen(14), requires_grad=True)
    v, i = compiled.side_topk(q, keys, 4)
    v.square().sum().backward()
    q2, k2 = q.detach().clone().requires_grad_(), keys.detach().clone().requires_grad_()
    s = torch.bmm(q2, k2.transpose(1, 2))
    s.gather(-1, i).square().sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(keys.grad, k2.grad)


def test_side_topk_bad_input_and_fallback(monkeypatch, fresh_state):
    with pytest.raises(ConfigError, match=r"keys="):
        compiled.side_topk(torch.randn(2, 3, 4), torch.randn(2, 5, 3), 2)
    with pytest.raises(ConfigError, match=r"k=6"):
        compiled.side_topk(torch.randn(2, 3, 4), torch.randn(2, 5, 4), 6)
    monkeypatch.setenv(compiled.ENV_DISABLE, "0")
    q, keys = torch.randn(2, 5, 4, generator=gen(15)), torch.randn(2, 20, 4, generator=gen(16))
    v, i = compiled.side_topk(q, keys, 3)
    ref = torch.bmm(q, keys.transpose(1, 2)).topk(3, dim=-1)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
