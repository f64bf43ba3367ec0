"""labcore.viz.tour: each station of the tour against brute force and against labcore's real layers."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
import torch

import labcore.layers.moe as moe_mod
import labcore.layers.pkm as pkm_mod
import labcore.layers.ultramem as um
from labcore.config import ConfigError
from labcore.layers.memory_plus import memory_plus_reference
from labcore.layers.peer import peer_reference
from labcore.layers.pkm import pkm_reference
from labcore.layers.ultramem_v2 import ring_window, ultramem_v2_reference
from labcore.params import schema_mismatches
from labcore.results import RunDir
from labcore.viz.tour import (
    FP32_BYTES,
    IVEMapping,
    TourParams,
    build_tour,
    expert_load,
    follow_token,
    ive_mapping,
    ive_output,
    ive_output_materialized,
    memory_plus_layers,
    memory_plus_station,
    peer_layer,
    peer_station,
    pkm_as_tucker,
    pkm_retrieve,
    pkm_slots_batch,
    random_baseline,
    random_grids,
    rank1_proxy,
    route_token,
    run_tour,
    second_best_shares_line,
    tdqkr_grid,
    tdqkr_retrieve,
    tdqkr_search,
    tdqkr_slots_batch,
    topology_bias,
    topology_bias_table,
    ultramem_v2_layers,
    ultramem_v2_station,
)
from labcore.viz.tour_plots import TOUR_SAVED_FIGURES, save_tour
from labcore.viz.widgets import ExplorerParams


def _assert_same_selection(ids, weights, layer_ids, layer_weights, rtol=1e-5, atol=0.0):
    """Same selected ids with the same weights, in any order (layers may return them unsorted)."""
    ids, layer_ids = np.asarray(ids), np.asarray(layer_ids)
    a, b = np.argsort(ids, kind="stable"), np.argsort(layer_ids, kind="stable")
    assert ids[a].tolist() == layer_ids[b].tolist()
    np.testing.assert_allclose(np.asarray(weights)[a], np.asarray(layer_weights)[b], rtol=rtol, atol=atol)


def _brute_topk(values: np.ndarray, k: int) -> list[int]:
    """Top-k ids by a plain python sort (descending value, then ascending id)."""
    return [i for _, i in sorted(((-float(v), i) for i, v in enumerate(values)))][:k]


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("n_keys", 1), ("expansion", 2), ("expansion", 8), ("top_k", 9), ("moe_top_k", 9), ("smoke", 1),
    ("ive_shuffle", "yes"), ("out_dir", ""), ("seed", -1), ("token", 64), ("rank", 0), ("n_queries", 5),
    ("heads", 0), ("memory_layers", 0), ("ring_share", 4),
])
def test_tour_params_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"TourParams\.{field}={value!r}"):
        TourParams(**{field: value})


def test_smoke_caps_sizes_and_keeps_others():
    p = TourParams(smoke=True, batch_size=500, n_queries=5000, token=100, n_keys=12).resolved()
    assert (p.batch_size, p.n_queries, p.token, p.n_keys) == (32, 300, 31, 12)
    q = TourParams(batch_size=500, n_queries=5000, token=100)
    assert q.resolved() is q


# ----------------------------------------------------------------------------------------------
# (a) MoE
# ----------------------------------------------------------------------------------------------


def test_route_token_matches_brute_force_and_conventions():
    rng = np.random.default_rng(1)
    W, x = rng.standard_normal((7, 5)), rng.standard_normal(5)
    r = route_token(x, W, 3)
    logits = [float(np.dot(W[e], x)) for e in range(7)]
    z = [math.exp(v) for v in logits]
    probs = [v / sum(z) for v in z]
    assert r.chosen.tolist() == _brute_topk(np.array(logits), 3)
    np.testing.assert_allclose(r.probs, probs, rtol=1e-12)
    kept = [probs[e] for e in r.chosen]
    np.testing.assert_allclose(r.weights, [p / sum(kept) for p in kept], rtol=1e-12)
    np.testing.assert_allclose(route_token(x, W, 3, "topk_softmax").weights, r.weights, rtol=1e-12)
    np.testing.assert_allclose(route_token(x, W, 3, "softmax_topk").weights, kept, rtol=1e-12)
    t = r.table()
    assert t["chosen"].sum() == 3 and t.loc[t["chosen"], "weight"].sum() == pytest.approx(1.0)
    assert (t.loc[~t["chosen"], "weight"] == 0).all()
    with pytest.raises(ConfigError, match="router="):
        route_token(x, W, 3, "sigmoid")
    with pytest.raises(ConfigError, match="top_k=8"):
        route_token(x, W, 8)


def test_expert_load_counts_each_tokens_choice():
    rng = np.random.default_rng(2)
    W, X = rng.standard_normal((6, 4)), rng.standard_normal((40, 4))
    counts = expert_load(X, W, 2)
    manual = np.zeros(6, dtype=int)
    for x in X:
        for e in route_token(x, W, 2).chosen:
            manual[e] += 1
    assert counts.tolist() == manual.tolist() and counts.sum() == 80


def test_route_token_agrees_with_labcore_moe_layer():
    torch.manual_seed(0)
    layer = moe_mod.MoE(moe_mod.MoEConfig(d_model=8, d_expert=4, n_experts=6, top_k=2, init_std=0.5))
    x = torch.randn(5, 8)
    _, aux = layer(x)
    W = layer.router.weight.detach().double().numpy()
    for t in range(5):
        r = route_token(x[t].double().numpy(), W, 2)
        _assert_same_selection(r.chosen, r.weights, aux.indices[t].numpy(), aux.scores[t].double().numpy())


# ----------------------------------------------------------------------------------------------
# (b) PKM
# ----------------------------------------------------------------------------------------------


def test_pkm_product_key_search_is_exact():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n, Dk, K = 7, 4, 4
        kr, kc = rng.standard_normal((n, Dk)), rng.standard_normal((n, Dk))
        qr, qc = rng.standard_normal(Dk), rng.standard_normal(Dk)
        r = pkm_retrieve(qr, qc, kr, kc, K)
        full = np.array([float(kr[i] @ qr + kc[j] @ qc) for i in range(n) for j in range(n)])  # slot i*n+j
        assert r.slots.tolist() == _brute_topk(full, K)
        np.testing.assert_allclose(r.scores, full[r.slots], rtol=1e-12)
        np.testing.assert_allclose(r.grid.ravel(), full, rtol=1e-12)
        e = np.exp(r.scores - r.scores.max())
        np.testing.assert_allclose(r.weights, e / e.sum(), rtol=1e-12)
        assert r.cells == [(s // n, s % n) for s in r.slots.tolist()]


def test_pkm_retrieve_agrees_with_labcore_pkm_layer():
    torch.manual_seed(0)
    cfg = pkm_mod.PKMConfig(d_model=8, n_keys=6, heads=1, k_dim=8, top_k=3, query_norm="none")
    layer = pkm_mod.PKM(cfg).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        _, aux = layer(x)
        q = layer.make_query(x).double().numpy()                     # (N_tok, 1, 2, D_k/2)
    keys = layer.keys.detach().double().numpy()                      # (1, 2, n, D_k/2)
    for t in range(4):
        r = pkm_retrieve(q[t, 0, 0], q[t, 0, 1], keys[0, 0], keys[0, 1], 3)
        _assert_same_selection(r.slots, r.weights, aux.indices[t].numpy(), aux.scores[t].double().numpy())


# ----------------------------------------------------------------------------------------------
# (c) TDQKR
# ----------------------------------------------------------------------------------------------


def test_tdqkr_grid_is_the_bilinear_form():
    rng = np.random.default_rng(4)
    R, n = 3, 5
    S_row, S_col, C = rng.standard_normal((R, n)), rng.standard_normal((R, n)), rng.standard_normal((R, R))
    g = tdqkr_grid(S_row, C, S_col)
    for i, j in itertools.product(range(n), range(n)):
        expected = sum(S_row[a, i] * C[a, b] * S_col[b, j] for a in range(R) for b in range(R))
        assert g[i, j] == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pkm_is_tucker_rank_two_special_case():
    rng = np.random.default_rng(5)
    s_row, s_col = rng.standard_normal(6), rng.standard_normal(6)
    S_row, C, S_col = pkm_as_tucker(s_row, s_col)
    np.testing.assert_allclose(tdqkr_grid(S_row, C, S_col), s_row[:, None] + s_col[None, :], rtol=1e-12)
    # docs/mechanisms.md §1.3: pairing this core with S_col = [1; s_col] gives a product, not a sum
    S_col_note = np.stack([np.ones(6), s_col])
    np.testing.assert_allclose(tdqkr_grid(S_row, C, S_col_note), np.outer(s_row, s_col) + 1, rtol=1e-12)
    np.testing.assert_allclose(tdqkr_grid(S_row, np.eye(2), S_col_note), s_row[:, None] + s_col[None, :],
                               rtol=1e-12)                  # ... with the identity core it is PKM
    # the swap core has two equal singular values: no dominant rank-1 direction
    np.testing.assert_allclose(rank1_proxy(C)[2], [1.0, 1.0], rtol=1e-12)
    # with every row/column a candidate the search is exact and equals PKM's selection
    td = tdqkr_search(S_row, S_col, C, top_k=4, m=6)
    full = (s_row[:, None] + s_col[None, :]).ravel()
    assert td.slots.tolist() == td.exact_slots.tolist() == _brute_topk(full, 4)


def test_rank1_proxy_is_leading_singular_pair():
    rng = np.random.default_rng(6)
    C = rng.standard_normal((3, 3))
    u, t, lam = rank1_proxy(C)
    np.testing.assert_allclose(C @ t, lam[0] * u, atol=1e-12)
    np.testing.assert_allclose(C.T @ u, lam[0] * t, atol=1e-12)
    assert lam[0] >= lam[1] >= lam[2] and u[np.argmax(np.abs(u))] > 0
    u2, t2, _ = rank1_proxy(-C)                              # sign convention: u's largest entry > 0
    np.testing.assert_allclose(u2, u, atol=1e-12)
    np.testing.assert_allclose(t2, -t, atol=1e-12)


def test_tdqkr_proxy_search_properties():
    rng = np.random.default_rng(7)
    R, n, Dk, K = 2, 8, 6, 3
    recalls = []
    for _ in range(60):
        kr, kc = rng.standard_normal((R, n, Dk)), rng.standard_normal((R, n, Dk))
        qr, qc = rng.standard_normal(Dk), rng.standard_normal(Dk)
        core = rng.random((R, R))
        td = tdqkr_retrieve(qr, qc, kr, kc, core, K)
        full = td.grid.ravel()
        assert td.candidate_mask.sum() == K * K
        # the proxy's choice is the exact top-K of the candidate cells
        cand = np.flatnonzero(td.candidate_mask.ravel())
        assert sorted(td.slots.tolist()) == sorted(cand[_brute_topk(full[cand], K)].tolist())
        np.testing.assert_allclose(td.scores, full[td.slots], rtol=1e-10)
        assert td.exact_slots.tolist() == _brute_topk(full, K)
        # an exact top-K cell inside the candidates is always found (nothing outside beats it)
        assert td.recall == pytest.approx(td.exact_in_candidates.mean())
        recalls.append(td.recall)
        # m = n: every cell is a candidate, the search is exact
        full_search = tdqkr_retrieve(qr, qc, kr, kc, core, K, m=n)
        assert full_search.slots.tolist() == full_search.exact_slots.tolist() and full_search.recall == 1.0
    # on random untrained layers the rank-1 proxy misses part of the exact top-K
    assert 0.0 < np.mean(recalls) < 1.0


def test_tdqkr_multi_core_ranks_by_the_sum():
    rng = np.random.default_rng(8)
    S_row, S_col = rng.standard_normal((2, 6)), rng.standard_normal((2, 6))
    cores = rng.random((3, 2, 2))
    a = tdqkr_search(S_row, S_col, cores, 3)
    b = tdqkr_search(S_row, S_col, cores.sum(0), 3)
    assert a.slots.tolist() == b.slots.tolist()
    with pytest.raises(ConfigError, match="top_k=10"):
        tdqkr_search(S_row, S_col, cores, 10, m=3)


def test_tdqkr_agrees_with_labcore_ultramem_layer():
    cfg = um.UltraMemConfig(d_model=8, n_keys=4, heads=1, k_dim=6, top_k=3, d_value=4, rank=2, n_cores=1,
                            expansion=4, qk_norm=False, seed=3)
    torch.manual_seed(0)
    layer = um.UltraMem(cfg)
    x = torch.randn(5, 8)
    with torch.no_grad():
        y, aux = layer(x)
        s_row, s_col = layer.side_scores(x)                          # (N_tok, 1, R, n_s) or (.., n_s, R)
    if s_row.shape[-1] != cfg.n_side:                                # rank-last layout: make it (R, n_s)
        s_row, s_col = s_row.transpose(-1, -2), s_col.transpose(-1, -2)
    assert s_row.shape[-2:] == (2, 8)
    core = layer.cores.detach().sum(0)[0].double().numpy()
    proxy = (layer.u[0].double().numpy(), layer.t[0].double().numpy())
    mapping = IVEMapping(n_keys=4, expansion=4, perm=layer.perm.numpy(), shuffled=True)
    values = layer.values.weight.detach().double().numpy()           # (N, D_v)
    W = layer.value_proj.weight.detach().double().numpy()            # (D, E*D_v), input laid out (p, d)
    projectors = W.T.reshape(4, 4, 8)                                # (E, D_v, D)
    for t in range(5):
        td = tdqkr_search(s_row[t, 0].double().numpy(), s_col[t, 0].double().numpy(), core, 3, proxy=proxy)
        _assert_same_selection(td.slots, td.scores, aux.indices[t].numpy(), aux.scores[t].double().numpy(),
                               rtol=1e-4, atol=1e-6)
        o = ive_output(mapping, values, projectors, td.slots, td.scores)
        np.testing.assert_allclose(o, y[t].double().numpy(), rtol=1e-4, atol=1e-6)


def test_batch_searches_equal_the_per_token_searches():
    rng = np.random.default_rng(11)
    B, n, Dk, R, K = 9, 7, 5, 2, 3
    qr, qc = rng.standard_normal((B, Dk)), rng.standard_normal((B, Dk))
    kr, kc = rng.standard_normal((n, Dk)), rng.standard_normal((n, Dk))
    assert pkm_slots_batch(qr, qc, kr, kc, K).tolist() == [
        pkm_retrieve(qr[b], qc[b], kr, kc, K).slots.tolist() for b in range(B)]
    tr, tc, core = rng.standard_normal((R, n, Dk)), rng.standard_normal((R, n, Dk)), rng.random((R, R))
    slots, exact = tdqkr_slots_batch(qr, qc, tr, tc, core, K, exact=True)
    for b in range(B):
        one = tdqkr_retrieve(qr[b], qc[b], tr, tc, core, K)
        assert slots[b].tolist() == one.slots.tolist() and exact[b].tolist() == one.exact_slots.tolist()


# ----------------------------------------------------------------------------------------------
# (d) Topology bias
# ----------------------------------------------------------------------------------------------


def test_additive_runner_up_always_shares_a_line_constructive_proof():
    """Lemma: with grid[i, j] = a[i] + b[j] the best cell is (argmax a, argmax b) and the runner-up
    is (best row, 2nd column) or (2nd row, best column); any (i, j) off both lines is beaten by
    (i*, j), itself not the best. Checked cell by cell on random grids, not just on a fraction."""
    rng = np.random.default_rng(9)
    for n in (2, 3, 5, 9):
        for _ in range(200):
            a, b = rng.standard_normal(n), rng.standard_normal(n)
            g = a[:, None] + b[None, :]
            i1, j1 = int(np.argmax(a)), int(np.argmax(b))
            a2, b2 = np.sort(a)[-2], np.sort(b)[-2]
            assert g.max() == g[i1, j1]
            second = np.sort(g.ravel())[-2]
            assert second == pytest.approx(max(a[i1] + b2, a2 + b[j1]), rel=1e-12)
            for i, j in itertools.product(range(n), range(n)):
                if i != i1 and j != j1:
                    assert g[i1, j] > g[i, j] and (i1, j) != (i1, j1)   # the dominating witness
            assert second_best_shares_line(g[None])[0]


def test_second_best_shares_line_detects_both_cases():
    g = np.zeros((2, 3, 3))
    g[0, 1, 1], g[0, 2, 2] = 5, 4          # runner-up diagonal: shares nothing
    g[1, 0, 0], g[1, 0, 2] = 5, 4          # same row
    assert second_best_shares_line(g).tolist() == [False, True]


def test_random_baseline_counts_cells():
    for n in (2, 3, 4, 7):
        best = (0, 0)
        others = [(i, j) for i in range(n) for j in range(n) if (i, j) != best]
        share = sum(i == best[0] or j == best[1] for i, j in others)
        assert random_baseline(n) == pytest.approx(share / len(others))
        assert random_baseline(n) == pytest.approx(2 / (n + 1))


def test_topology_bias_measurements():
    n, Q = 6, 3000
    add = topology_bias("additive", n, Q, seed=1)
    assert add.shares == Q and add.fraction == 1.0                      # by construction
    rnd = topology_bias("random", n, Q, seed=2)
    # i.i.d. cells: the runner-up is a uniformly random other cell (within 4 standard errors)
    assert abs(rnd.fraction - random_baseline(n)) < 4 * math.sqrt(random_baseline(n) * (1 - random_baseline(n)) / Q)
    tuck = topology_bias("tucker", n, Q, rank=2, seed=3)
    assert tuck.fraction < 0.95                                         # the bilinear grid breaks the bias
    assert tuck.fraction > rnd.fraction                                 # ... but not down to random order
    table = topology_bias_table(n, 400, rank=2)
    assert table["scoring"].tolist() == ["additive", "tucker", "random"]
    assert table.loc[0, "fraction"] == 1.0 and (table["random_baseline"] == random_baseline(n)).all()


def test_random_grids_shapes_and_validation():
    assert random_grids("tucker", 5, 7, rank=3).shape == (7, 5, 5)
    with pytest.raises(ConfigError, match="scoring='multiplicative'"):
        random_grids("multiplicative", 5, 7)


# ----------------------------------------------------------------------------------------------
# (e) IVE
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, E", [(4, 4), (3, 9), (5, 1)])
def test_ive_every_physical_row_serves_E_virtual_slots_one_per_block(n, E):
    m = ive_mapping(n, E, seed=4)
    assert sorted(m.perm.tolist()) == list(range(E * n * n))
    s = m.serves()
    assert (s["n_virtual"] == E).all() and (s["n_blocks"] == E).all()
    t = m.table()
    assert len(t) == E * n * n and t["block"].between(0, E - 1).all()
    assert (t["virtual_row"] * m.side + t["virtual_col"] == t["virtual_slot"]).all()


def test_ive_without_shuffle_copies_are_aligned_in_one_column():
    n, E = 8, 4
    m = ive_mapping(n, E, shuffle=False)
    t = m.table()
    for p in (0, 13, 63):
        copies = t[t["physical_row"] == p]
        assert copies["virtual_col"].nunique() == 1                       # same column ...
        assert np.diff(copies["virtual_row"]).tolist() == [n * n // m.side] * (E - 1)   # ... N/n_s rows apart
    shuffled = ive_mapping(n, E, seed=0).table()
    spread = shuffled.groupby("physical_row")["virtual_col"].nunique()
    assert (spread > 1).mean() > 0.9                                        # the shuffle breaks that


def test_ive_pool_then_project_equals_materialised_virtual_table():
    rng = np.random.default_rng(10)
    m = ive_mapping(3, 4, seed=2)
    values, proj = rng.standard_normal((9, 5)), rng.standard_normal((4, 5, 7))
    slots = np.array([0, 5, 5, 17, 35, 20])                  # a repeated slot (two heads): summed
    scores = rng.standard_normal(6)
    a = ive_output(m, values, proj, slots, scores)
    b = ive_output_materialized(m, values, proj, slots, scores)
    manual = sum(scores[k] * values[m.physical_row[s]] @ proj[m.block[s]] for k, s in enumerate(slots))
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(a, manual, rtol=1e-12)
    pooled = m.pooled_scores(slots, scores)
    assert pooled.shape == (4, 9) and pooled.sum() == pytest.approx(scores.sum())
    assert pooled[m.block[5], m.physical_row[5]] == pytest.approx(scores[1] + scores[2])


def test_ive_mapping_validation():
    with pytest.raises(ConfigError, match="expansion=3"):
        ive_mapping(4, 3)


# ----------------------------------------------------------------------------------------------
# (f)-(h) The memory family: the stations' records against direct calls of the real layers
# ----------------------------------------------------------------------------------------------

FAMILY = TourParams(smoke=True, n_keys=5, top_k=3, batch_size=8, heads=2, memory_layers=3, ring_share=2,
                    token=3, seed=4)


@pytest.fixture
def family():
    """The tour's weights and tokens (float64); the layers' references run without autograd."""
    w = build_tour(FAMILY)
    with torch.no_grad():
        yield w, torch.as_tensor(w.X, dtype=torch.float64)


def test_peer_station_equals_the_layer_and_its_brute_force_reference(family):
    w, X = family
    p = w.params
    st = peer_station(w)
    layer = peer_layer(p)                                             # same params -> same weights
    x = X[p.token:p.token + 1]
    y_ref, experts_ref, g_ref = peer_reference(layer, x)              # scores all N experts
    H, K, D = p.heads, p.top_k, p.d_model
    assert st.experts.shape == st.weights.shape == st.activations.shape == (H, K)
    for h in range(H):                                                # per head: same K experts, same g
        _assert_same_selection(st.experts[h], st.weights[h], experts_ref[0, h * K:(h + 1) * K].numpy(),
                               g_ref[0, h * K:(h + 1) * K].numpy(), rtol=1e-10)
        assert np.all(np.diff(st.weights[h]) <= 0)                      # sorted by router weight
    np.testing.assert_allclose(st.weights.sum(1), 1.0, rtol=1e-12)    # softmax over each head's K
    u = layer.down.weight.detach().numpy()
    v = layer.up.weight.detach().numpy()
    x_np = w.X[p.token]
    pre = u[st.experts] @ x_np                                        # u_i^T x, (H, K)
    gelu = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))
    np.testing.assert_allclose(st.activations, gelu, rtol=1e-10, atol=1e-14)
    y_hand = np.einsum("hk,hkd->d", st.weights * gelu, v[st.experts])  # sum g_i σ(u_i^T x) v_i
    np.testing.assert_allclose(st.y, y_hand, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(st.y, y_ref[0].detach().numpy(), rtol=1e-10, atol=1e-14)
    # what is touched, by hand: 2D numbers per neuron (u_i, v_i) and the shared sub-keys (2 n D_k/2)
    t = st.touched().set_index("what")
    distinct = len(set(st.experts.ravel().tolist()))
    keys = 2 * p.n_keys * p.k_dim * FP32_BYTES
    assert t.loc["PEER (this token)", "bytes_read"] == distinct * 2 * D * 4 + keys
    assert t.loc["PEER (this token)", "neuron_uses"] == H * K
    assert t.loc["dense FFN, equal activated FLOPs (width H*K)", "bytes_read"] == H * K * 2 * D * 4
    assert t.loc["dense FFN, equal parameters (width N)", "distinct_neurons"] == p.n_keys ** 2
    _, batch_experts, _ = peer_reference(layer, X)
    assert st.batch_experts == len(set(batch_experts.ravel().tolist()))
    assert H * K <= st.batch_experts <= min(p.n_keys ** 2, p.batch_size * H * K)


def test_memory_plus_station_read_gate_output_and_shared_pool(family):
    w, X = family
    p = w.params
    st = memory_plus_station(w)
    layers = memory_plus_layers(p)
    first = layers[0]
    x = X[p.token:p.token + 1]
    y_ref, slots_ref, wts_ref = memory_plus_reference(first, x)       # brute force: all n^2 slots scored
    m_ref, _, _ = pkm_reference(first.memory, x)
    D = p.d_model
    assert st.read.shape == st.gate.shape == st.gated.shape == st.y.shape == (D,)
    # PKM's layer takes its softmax over the K scores in float32 (also for float64 input): 1e-6 agreement
    np.testing.assert_allclose(st.read, m_ref[0].detach().numpy(), rtol=1e-5, atol=1e-9)
    s = w.X[p.token] @ first.gate.weight.detach().numpy().T           # W_s x
    np.testing.assert_allclose(st.gate, s / (1 + np.exp(-s)), rtol=1e-10)     # SiLU(s) = s sigmoid(s)
    np.testing.assert_allclose(st.gated, st.read * st.gate, rtol=1e-12)
    np.testing.assert_allclose(st.y, first.w_out.weight.detach().numpy() @ st.gated, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(st.y, y_ref[0].detach().numpy(), rtol=1e-5, atol=1e-9)
    for h in range(p.heads):
        sl = slice(h * p.top_k, (h + 1) * p.top_k)
        _assert_same_selection(st.slots[sl], st.weights[sl], slots_ref[0, sl].numpy(), wts_ref[0, sl].numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(st.read, st.weights @ first.values.weight.detach().numpy()[st.slots],
                               rtol=1e-10, atol=1e-14)                # m = sum of weighted value rows
    nrm = st.norms().iloc[0]
    assert nrm["read |m|"] == pytest.approx(np.linalg.norm(st.read))
    assert nrm["gated |m * gate|"] == pytest.approx(np.linalg.norm(st.read * st.gate))
    assert nrm["gate flips sign (gate < 0)"] == pytest.approx((s < 0).mean())
    # the shared pool: L layers, one table; each layer's rows for the token and its batch hits
    assert st.shared and all(layer.values.weight is first.values.weight for layer in layers)
    L, N = p.memory_layers, p.n_keys ** 2
    assert st.layer_slots.shape == (L, p.heads * p.top_k) and st.pool_counts.shape == (L, N)
    for i, layer in enumerate(layers):
        _, slots_l, _ = memory_plus_reference(layer, x)
        assert sorted(st.layer_slots[i].tolist()) == sorted(slots_l[0].tolist())
        _, slots_b, _ = memory_plus_reference(layer, X)
        np.testing.assert_array_equal(st.pool_counts[i], np.bincount(slots_b.ravel().numpy(), minlength=N))
    assert (st.pool_counts.sum(1) == p.batch_size * p.heads * p.top_k).all()
    assert not np.array_equal(st.layer_slots[0], st.layer_slots[1])   # different keys: other rows


def test_ultramem_v2_station_pre_values_projection_and_ring(family):
    w, X = family
    p = w.params
    st = ultramem_v2_station(w)
    layers, twin = ultramem_v2_layers(p)
    first = layers[0]
    c = first.cfg
    x = X[p.token:p.token + 1]
    y_ref, slots_ref, w_ref, _ = ultramem_v2_reference(first, x)      # per-token loops
    E, N, Dv = p.expansion, c.n_slots, c.d_v
    assert st.slots.tolist() == slots_ref[0].tolist()                 # descending, like the reference
    np.testing.assert_allclose(st.weights, w_ref[0].sum(-1).detach().numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(st.y, y_ref[0].detach().numpy(), rtol=1e-10, atol=1e-14)
    # virtual slot -> (block, physical row) -> pool row, by hand from the fixed permutation
    perm = first.perm.numpy()
    np.testing.assert_array_equal(st.blocks, perm[st.slots] // N)
    np.testing.assert_array_equal(st.rows, (perm[st.slots] % N + first.window_start) % first.pool_size)
    # pre-values: g = <P_pre[row], W_pre x>, and the weight that multiplies each value is s * g
    z = first.pre_proj.weight.detach().numpy() @ w.X[p.token]
    g = first.pre_values.weight.detach().numpy()[st.rows] @ z
    np.testing.assert_allclose(st.pre, g, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(st.weights, st.scores * st.pre, rtol=1e-10, atol=1e-15)
    assert np.all(np.diff(st.scores) <= 1e-12)                        # retrieval scores, best first
    # one projection of the sum over blocks (v2) vs one projection per block (v1, the twin)
    assert st.pooled.shape == (E, Dv)
    W = first.value_proj.weight.detach().numpy()                      # (D, D_v)
    np.testing.assert_allclose(st.y, W @ st.pooled.sum(0), rtol=1e-10, atol=1e-14)
    W1 = twin.value_proj.weight.detach().numpy()                      # (D, E*D_v), columns (p, d)
    per_block = sum(W1[:, b * Dv:(b + 1) * Dv] @ st.pooled[b] for b in range(E))
    np.testing.assert_allclose(st.y_per_block, per_block, rtol=1e-10, atol=1e-14)
    y_twin, _, _, _ = ultramem_v2_reference(twin, x)
    np.testing.assert_allclose(st.y_per_block, y_twin[0].detach().numpy(), rtol=1e-10, atol=1e-14)
    proj = st.projections().set_index("projection")["params"]
    assert proj.tolist() == [p.d_model * Dv, E * p.d_model * Dv]
    # ring windows: L layers, pool L * n^2 rows, window n_w = floor(sqrt(g * n^2)) from start l * n^2
    L = p.memory_layers
    assert st.pool_size == L * p.n_keys ** 2
    for i in range(L):
        rw = ring_window(i, L, st.pool_size, p.ring_share / L)
        assert tuple(st.windows[i]) == (rw.start, rw.n_keys) == (i * p.n_keys ** 2, math.isqrt(2 * 25))
        assert layers[i].window_start == rw.start
        mask = st.window_mask()[i]
        np.testing.assert_array_equal(np.nonzero(mask)[0], np.sort(rw.rows().numpy()))
        assert mask[st.layer_rows[i]].all()                           # a layer reads only its window
        assert st.layer_rows[i].tolist() == layers[i](x)[1].rows[0].tolist()
    assert st.window_mask().sum() == L * 49 and st.window_mask().any(0).all()   # 7^2 rows each; all covered


# ----------------------------------------------------------------------------------------------
# The whole tour
# ----------------------------------------------------------------------------------------------


def test_run_tour_is_deterministic_and_consistent():
    p = TourParams(smoke=True, n_keys=6, top_k=3, batch_size=16)
    rec = run_tour(p)
    again = follow_token(build_tour(p))
    assert rec.pkm.slots.tolist() == again.pkm.slots.tolist()
    assert rec.moe.chosen.tolist() == again.moe.chosen.tolist()
    P = rec.params
    assert rec.expert_counts.sum() == P.batch_size * P.moe_top_k
    assert rec.slot_counts.sum() == rec.physical_counts.sum() == P.batch_size * P.top_k
    assert rec.ive.grid.shape == (12, 12) and rec.ive_map.side == 12      # sqrt(E) n keys per side
    route = rec.ive_route()
    assert (route["physical_row"] == rec.ive_map.physical_row[rec.ive.slots]).all()
    s = rec.summary()
    assert len(s) == 1 and s.loc[0, "bias_additive"] == 1.0
    assert s.loc[0, "bias_random_baseline"] == pytest.approx(2 / 7)
    assert 0.0 <= s.loc[0, "tdqkr_mean_recall"] <= 1.0
    other = run_tour(TourParams(smoke=True, n_keys=6, top_k=3, batch_size=16, seed=5))
    assert not np.array_equal(other.pkm.grid, rec.pkm.grid)


def test_save_tour_writes_a_finished_run_and_never_overwrites(tmp_path):
    rec = run_tour(TourParams(smoke=True, n_keys=4, top_k=2, batch_size=8))
    path = save_tour(rec, tmp_path / "tour", png=False)
    run = RunDir(path)
    assert run.is_done() and run.read()["params"]["smoke"] is True
    assert run.summary().loc[0, "bias_additive"] == 1.0
    assert sorted(p.name for p in run.figures_dir.glob("*.json")) == sorted(f"{n}.json" for n in TOUR_SAVED_FIGURES)
    assert save_tour(rec, tmp_path / "tour", png=False).name == "tour-2"


# ----------------------------------------------------------------------------------------------
# The notebook
# ----------------------------------------------------------------------------------------------

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.parametrize("name", ["00_tour.ipynb", "06_results_explorer.ipynb"])
def test_committed_notebook_is_clean_and_mirrors_its_schema(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "validate_notebook_params" in code[1].source
    schema = TourParams if name.startswith("00") else ExplorerParams
    assert schema_mismatches(schema, NOTEBOOKS / name) == []
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in c.source.splitlines())


def test_tour_notebook_runs_headless_in_smoke_mode(tmp_path):
    """papermill, smoke mode: every cell runs, the run directory is finished, the widgets exist."""
    out = tmp_path / "00_tour.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / "00_tour.ipynb"), str(out), kernel_name="python3",
                               parameters={"smoke": True, "out_dir": str(tmp_path / "run")},
                               cwd=str(NOTEBOOKS), progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 8                                         # one panel per station
    run = RunDir(tmp_path / "run")
    assert run.is_done() and run.read()["params"]["smoke"] is True
    s = run.summary()
    assert s.loc[0, "bias_additive"] == 1.0 and s.loc[0, "batch_size"] == 32    # smoke cap applied
