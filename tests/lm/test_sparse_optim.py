"""LazyAdamW: row-wise AdamW for memory value tables, checked against torch AdamW and a scalar reference."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labcore.config import ConfigError
from labcore.layers.base import tag_param
from labcore.layers.pkm import PKMConfig
from labcore.layers.ultramem import UltraMemConfig
from labcore.lm.model import LM, ModelConfig, SparsePlan
from labcore.lm.optim import ValueLRSchedule, apply_value_lr, build_param_groups
from labcore.lm.sparse_optim import LazyAdamW, build_lazy_adamw, clip_grad_norm_, row_chunks, touched_rows

BETAS = (0.9, 0.95)
EPS = 1e-6
WD = 0.1


class TinyMemoryModel(nn.Module):
    """A value table (role memory_values) read by embedding_bag, plus dense parts around it."""

    def __init__(self, n_rows: int = 10, d: int = 4, sparse: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.values = nn.Embedding(n_rows, d)
        tag_param(self.values.weight, "memory_values")
        self.sparse = sparse

    def forward(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        read = F.embedding_bag(slots, self.values.weight, mode="sum", per_sample_weights=weights,
                               sparse=self.sparse)
        return self.norm(self.proj(x) + read).pow(2).sum()


def _twins(**kw) -> tuple[TinyMemoryModel, TinyMemoryModel]:
    """Two identical models (built from one seed: copy.deepcopy would drop the role tags)."""
    torch.manual_seed(0)
    a = TinyMemoryModel(**kw)
    torch.manual_seed(0)
    return a, TinyMemoryModel(**kw)


def _batch(gen: torch.Generator, n_rows: int, n_tok: int = 3, k: int = 2, d: int = 4):
    x = torch.randn(n_tok, d, generator=gen)
    slots = torch.randint(0, n_rows, (n_tok, k), generator=gen)
    weights = torch.rand(n_tok, k, generator=gen) + 0.1          # never exactly zero
    return x, slots, weights


# (a) every row touched every step -> exactly torch AdamW ------------------------------------------


@pytest.mark.parametrize("bias_correction", ["row", "global"])
def test_all_rows_touched_equals_torch_adamw(bias_correction):
    torch.manual_seed(0)
    w0 = torch.randn(6, 5)
    ref = nn.Parameter(w0.clone())
    lazy = nn.Parameter(w0.clone())
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)
    opt_lazy = LazyAdamW([lazy], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD, bias_correction=bias_correction)
    for step in range(6):
        g = torch.randn(6, 5)
        for opt, p in ((opt_ref, ref), (opt_lazy, lazy)):
            opt.param_groups[0]["lr"] = 1e-2 * (1 + step)               # a schedule changes the lr
            p.grad = g.clone()
            opt.step()
        assert torch.equal(lazy, ref), f"step {step}: max diff {(lazy - ref).abs().max().item()}"
    assert torch.equal(opt_lazy.state[lazy]["exp_avg"], opt_ref.state[ref]["exp_avg"])
    assert torch.equal(opt_lazy.state[lazy]["exp_avg_sq"], opt_ref.state[ref]["exp_avg_sq"])
    assert opt_lazy.state[lazy]["row_step"].tolist() == [6] * 6


def test_dense_groups_are_torch_adamw_and_value_lr_schedule_applies():
    model, twin = _twins()
    opt = build_lazy_adamw(model, lr=1e-2, weight_decay=WD, betas=BETAS, eps=EPS)
    ref = torch.optim.AdamW(build_param_groups(twin, 1e-2, WD), lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)
    assert [g["lazy"] for g in opt.param_groups] == [g.get("lr_role") == "memory_values" for g in opt.param_groups]
    sched = ValueLRSchedule(4.0, end_step=10)
    gen = torch.Generator().manual_seed(1)
    for s in range(4):
        x, slots, w = _batch(gen, 10, n_tok=20, k=4)                   # 80 reads of 10 rows: all touched
        for m, o in ((model, opt), (twin, ref)):
            apply_value_lr(o, sched, s)
            o.zero_grad()
            m(x, slots, w).backward()
            o.step()
    assert torch.count_nonzero(model.values.weight.grad.ne(0).any(1)) == 10
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    value_group = next(g for g in opt.param_groups if g["lazy"])
    assert value_group["lr"] == pytest.approx(1e-2 * sched.factor(3))


# (b) untouched rows keep value and state -----------------------------------------------------------


def test_untouched_rows_keep_value_and_state():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3))
    opt = LazyAdamW([p], lr=0.1, betas=BETAS, eps=EPS, weight_decay=WD)
    p.grad = torch.randn(5, 3)
    opt.step()                                                          # every row once
    before = p.detach().clone()
    st = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "row_step")}
    g = torch.randn(5, 3)
    g[[1, 3]] = 0.0
    p.grad = g
    opt.step()
    untouched, touched = [1, 3], [0, 2, 4]
    assert torch.equal(p[untouched], before[untouched])                 # not even weight-decayed
    for k in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(opt.state[p][k][untouched], st[k][untouched]), k
    assert opt.state[p]["row_step"].tolist() == [2, 1, 2, 1, 2]
    assert not torch.equal(p[touched], before[touched])
    assert float(opt.state[p]["step"]) == 2.0


# (c) a touched row follows Adam with its own step count -------------------------------------------


def _reference(w0, grads, touch, lr, betas, eps, wd, bias_correction):
    """Scalar float64 AdamW, row by row: lazy moments, lazy decay, per-row or per-parameter t."""
    b1, b2 = betas
    rows, cols = len(w0), len(w0[0])
    w = [list(r) for r in w0]
    m = [[0.0] * cols for _ in range(rows)]
    v = [[0.0] * cols for _ in range(rows)]
    t_row = [0] * rows
    for step, (g, mask) in enumerate(zip(grads, touch), start=1):
        for r in range(rows):
            if not mask[r]:
                continue
            t_row[r] += 1
            t = t_row[r] if bias_correction == "row" else step
            for c in range(cols):
                m[r][c] = b1 * m[r][c] + (1 - b1) * g[r][c]
                v[r][c] = b2 * v[r][c] + (1 - b2) * g[r][c] ** 2
                w[r][c] *= 1 - lr * wd
                m_hat = m[r][c] / (1 - b1 ** t)
                v_hat = v[r][c] / (1 - b2 ** t)
                w[r][c] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return w, t_row


@pytest.mark.parametrize("bias_correction", ["row", "global"])
def test_intermittent_rows_follow_hand_computed_adam(bias_correction):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    touch = [[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]]
    grads = []
    for mask in touch:
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        grads.append(g * torch.tensor(mask, dtype=torch.float64)[:, None])
    p = nn.Parameter(w0.clone())
    opt = LazyAdamW([p], lr=0.05, betas=BETAS, eps=EPS, weight_decay=WD, bias_correction=bias_correction)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want, t_row = _reference(w0.tolist(), [g.tolist() for g in grads], touch, 0.05, BETAS, EPS, WD,
                             bias_correction)
    torch.testing.assert_close(p.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert opt.state[p]["row_step"].tolist() == t_row == [4, 3, 4, 2]


def test_row_and_global_bias_correction_differ_for_a_late_row():
    p_row = nn.Parameter(torch.zeros(2, 1))
    p_glob = nn.Parameter(torch.zeros(2, 1))
    o_row = LazyAdamW([p_row], lr=1.0, betas=BETAS, eps=0.0, weight_decay=0.0, bias_correction="row")
    o_glob = LazyAdamW([p_glob], lr=1.0, betas=BETAS, eps=0.0, weight_decay=0.0, bias_correction="global")
    for step in range(5):
        g = torch.tensor([[1.0], [1.0 if step == 4 else 0.0]])         # row 1 first touched at step 5
        for p, o in ((p_row, o_row), (p_glob, o_glob)):
            p.grad = g.clone()
            o.step()
    assert p_row[1].item() == pytest.approx(-1.0, rel=1e-6)             # Adam's first step: lr * sign
    b1, b2 = BETAS
    want = -(1 - b1) / (1 - b1 ** 5) / math.sqrt((1 - b2) / (1 - b2 ** 5))
    assert p_glob[1].item() == pytest.approx(want, rel=1e-6)


# (d) sparse COO and dense-with-zero-rows gradients agree ------------------------------------------


def test_sparse_and_dense_gradients_give_the_same_update():
    dense, sparse = _twins(n_rows=50)
    sparse.sparse = True
    o_dense = build_lazy_adamw(dense, lr=1e-2, weight_decay=WD, value_weight_decay=0.05, betas=BETAS, eps=EPS)
    o_sparse = build_lazy_adamw(sparse, lr=1e-2, weight_decay=WD, value_weight_decay=0.05, betas=BETAS, eps=EPS)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        x, slots, w = _batch(gen, 50, n_tok=4, k=3)                    # <= 12 of 50 rows per step
        for m, o in ((dense, o_dense), (sparse, o_sparse)):
            o.zero_grad()
            m(x, slots, w).backward()
            o.step()
    assert sparse.values.weight.grad.is_sparse and not dense.values.weight.grad.is_sparse
    for (n, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    steps = o_dense.state[dense.values.weight]["row_step"]
    assert torch.equal(steps, o_sparse.state[sparse.values.weight]["row_step"])
    assert 0 < int((steps == 0).sum()) < 50                             # some rows never touched


def test_touched_rows_and_duplicate_sparse_indices():
    p = torch.zeros(5, 2)
    g = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                                (5, 2), check_invariants=True)
    with pytest.raises(ConfigError, match="coalesced"):
        touched_rows(g, p, "values.weight")
    assert touched_rows(g.coalesce(), p).tolist() == [1, 3]
    dense = torch.zeros(5, 2)
    dense[[0, 4], 1] = torch.tensor([1.0, -2.0])
    assert touched_rows(dense, p).tolist() == [0, 4]
    q = nn.Parameter(torch.zeros(5, 2))
    opt = LazyAdamW([q], lr=1.0, betas=BETAS, eps=0.0, weight_decay=0.0)
    q.grad = g                                                          # duplicates: rows 3 and 3 summed
    opt.step()
    assert opt.state[q]["row_step"].tolist() == [0, 1, 0, 1, 0]
    torch.testing.assert_close(opt.state[q]["exp_avg"][3], 0.1 * torch.tensor([6.0, 8.0]))


# (e) state_dict round trip ----------------------------------------------------------------------


def _run(model, opt, gen, steps):
    for _ in range(steps):
        x, slots, w = _batch(gen, 30, n_tok=4, k=2)
        opt.zero_grad()
        model(x, slots, w).backward()
        opt.step()


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    model = TinyMemoryModel(n_rows=30)
    opt = build_lazy_adamw(model, lr=1e-2, weight_decay=WD, betas=BETAS, eps=EPS)
    _run(model, opt, torch.Generator().manual_seed(5), 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = TinyMemoryModel(n_rows=30)
    resumed.load_state_dict(ck["model"])
    opt2 = build_lazy_adamw(resumed, lr=1e-2, weight_decay=WD, betas=BETAS, eps=EPS)
    opt2.load_state_dict(ck["opt"])
    assert opt2.state[resumed.values.weight]["row_step"].dtype == torch.int64
    _run(model, opt, torch.Generator().manual_seed(6), 3)
    _run(resumed, opt2, torch.Generator().manual_seed(6), 3)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_loads_a_torch_adamw_checkpoint():
    """A torch AdamW state has no row_step: every row's count starts at the parameter's step."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    ref, lazy = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(3):
        ref.grad = torch.randn(4, 3)
        opt_ref.step()
    lazy.data.copy_(ref.data)
    opt_lazy = LazyAdamW([lazy], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)
    opt_lazy.load_state_dict(copy.deepcopy(opt_ref.state_dict()))     # a checkpoint holds copies
    g = torch.randn(4, 3)
    for p, o in ((ref, opt_ref), (lazy, opt_lazy)):
        p.grad = g.clone()
        o.step()
    assert torch.equal(lazy, ref)
    assert opt_lazy.state[lazy]["row_step"].tolist() == [4] * 4


# (f) bad input errors name the parameter ---------------------------------------------------------


def test_lazy_group_rejects_non_table_parameters_by_name():
    model = TinyMemoryModel()
    tag_param(model.norm.bias, "memory_values")                        # a 1-D tensor tagged as a table
    with pytest.raises(ConfigError, match=r"norm\.bias.*\(4,\).*lazy=False"):
        build_lazy_adamw(model, lr=1e-2, weight_decay=0.0)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\['params'\]\[0\].*\(2, 2, 2\)"):
        LazyAdamW([nn.Parameter(torch.zeros(2, 2, 2))])


def test_sparse_gradient_in_a_dense_group_is_named():
    model = TinyMemoryModel(sparse=True)
    opt = LazyAdamW([{"params": [model.values.weight], "param_names": ["values.weight"], "lazy": False}])
    x, slots, w = _batch(torch.Generator().manual_seed(0), 10)
    model(x, slots, w).backward()
    with pytest.raises(ConfigError, match=r"values\.weight.*sparse gradient.*lazy=True"):
        opt.step()


def test_bad_settings_are_named():
    p = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="bias_correction"):
        LazyAdamW([p], bias_correction="rows")
    with pytest.raises(ConfigError, match=r"betas\[1\]"):
        LazyAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="lazy"):
        LazyAdamW([{"params": [p], "lazy": "yes"}])
    with pytest.raises(ConfigError, match=r"gradient of values\.weight.*\(2, 3\)"):
        touched_rows(torch.zeros(2, 3), p, "values.weight")


def test_clip_grad_norm_matches_torch_and_takes_sparse_gradients():
    dense, sparse = _twins(n_rows=40)
    sparse.sparse = True
    x, slots, w = _batch(torch.Generator().manual_seed(4), 40, n_tok=5, k=3)
    for m in (dense, sparse):
        (100 * m(x, slots, w)).backward()                               # large: the clip is active
    ref = [p.grad.clone() for p in dense.parameters()]
    want = torch.nn.utils.clip_grad_norm_([*dense.parameters()], 0.5)
    for p, g in zip(dense.parameters(), ref):                           # restore and clip with ours
        p.grad = g
    got = clip_grad_norm_([*dense.parameters()], 0.5)
    assert torch.equal(got, want)
    got_sparse = clip_grad_norm_([*sparse.parameters()], 0.5)
    torch.testing.assert_close(got_sparse, want)
    assert sparse.values.weight.grad.is_sparse and sparse.values.weight.grad.is_coalesced()
    for (n, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad.to_dense(), p.grad, msg=n)
    assert float(want) > 0.5
    with pytest.raises(ConfigError, match="max_norm"):
        clip_grad_norm_([*dense.parameters()], 0.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_row_chunks_passes_sparse_gradients_back_to_the_table(sparse):
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(6, 4, generator=gen)
    idx = torch.tensor([[1, 3, 11], [3, 5, 0]])                          # chunk rows of a (12, 2) view
    psw = torch.rand(2, 3, generator=gen)
    ref = nn.Parameter(w0.clone())
    F.embedding_bag(idx, ref.view(12, 2), mode="sum", per_sample_weights=psw).pow(2).sum().backward()
    got = nn.Parameter(w0.clone())
    y = F.embedding_bag(idx, row_chunks(got, 2), mode="sum", per_sample_weights=psw, sparse=sparse)
    torch.testing.assert_close(y, F.embedding_bag(idx, w0.view(12, 2), mode="sum", per_sample_weights=psw))
    y.pow(2).sum().backward()
    assert got.grad.is_sparse == sparse
    torch.testing.assert_close(got.grad.to_dense(), ref.grad)
    if sparse:
        assert got.grad.coalesce().indices()[0].tolist() == [0, 1, 2, 5]
    with pytest.raises(ConfigError, match="n_chunks=3"):
        row_chunks(got, 3)


@pytest.mark.parametrize("arch", ["pkm", "ultramem"])
def test_lm_memory_tables_step_lazily(arch):
    """A small LM: the value table is the only lazy group; the first step equals torch AdamW on every
    parameter (an untouched row has zero moments, so AdamW leaves it too); later untouched rows stay."""
    d = 32
    mem = (PKMConfig(d_model=d, n_keys=16, heads=2, k_dim=16, top_k=4) if arch == "pkm" else
           UltraMemConfig(d_model=d, n_keys=16, heads=2, k_dim=16, top_k=4, d_value=d // 2))
    cfg = ModelConfig(vocab_size=259, d_model=d, n_layers=2, n_heads=2, d_ff=2 * d, max_seq_len=16,
                      plan=SparsePlan(kind="memory", memory=mem, placements=("0:1",)))
    torch.manual_seed(0)
    model = LM(cfg)
    torch.manual_seed(0)
    twin = LM(cfg)
    opt = build_lazy_adamw(model, lr=1e-2, weight_decay=WD, betas=BETAS)
    ref = torch.optim.AdamW(build_param_groups(twin, 1e-2, WD), lr=1e-2, betas=BETAS, weight_decay=WD)
    lazy_names = [n for g in opt.param_groups if g["lazy"] for n in g["param_names"]]
    assert len(lazy_names) == 1 and lazy_names[0].endswith("values.weight")
    table = dict(model.named_parameters())[lazy_names[0]]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randint(0, 259, (1, 4), generator=gen)
        before = table.detach().clone()
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            out = m(x, x)
            (out.loss + out.aux_loss).backward()
            o.step()
        untouched = ~table.grad.ne(0).any(1)
        assert 0 < int(untouched.sum()) < table.shape[0]
        assert torch.equal(table[untouched], before[untouched])
        if step == 0:
            for (n, p), q in zip(model.named_parameters(), twin.parameters()):
                assert torch.equal(p, q), n
