// UltraMem's TDQKR search in one pass per (head, 8 tokens), for inference (docs/mechanisms.md §1.3,
// UltraMemV2 eqs. 6-7; the readable version is labcore/layers/fast/search.py:tucker_search).
//
// The readable search computes the full side scores S_row = K_row q_row and S_col = K_col q_col
// ((R, n_s) per token, head and side), the rank-1 proxies u^T S_row and t^T S_col, their top-m, the
// m x m grid S_row[:, I]^T C S_col[:, J] and its top-K. The proxy is linear in the query,
//
//     u^T (K_row q_row) = (u^T K_row) q_row,
//
// so here each side's proxy is one dot product with a "proxy key" per sub-key (u^T K_row, computed
// once per call from the keys), and S is computed only at the m selected sub-keys (R m dot products
// per side instead of R n_s). Steps per (head h, token t):
//   1. proxy scores p = P_row q_row, p' = P_col q_col for a tile of 8 tokens (the score tile of the
//      fused side search, topk_core.h), kept in a per-thread buffer;
//   2. I = TopM(p), J = TopM(p') (two-sided: also the m most negative, I-, J-);
//   3. the selected side scores S_row[r, I], S_col[r, J] (R x m each; R x 2m two-sided);
//   4. the grid S_row[:, I]^T C S_col[:, J] (m x m; two-sided: the I- x J- quadrant too, its cells
//      that are also in I+ x J+ set to -inf, as the readable search does) and its top-K, descending;
//   5. per selected cell, the per-core scores S_row[:, i]^T C^(c) S_col[:, j] (MCS) when cores given.
// The dot products are summed in another order than torch's matmuls, so scores agree with the
// readable search to float32 rounding and only a near-tie (within rounding) at the m-th proxy or the
// K-th cell can be resolved differently. No autograd: the caller uses it only without gradients.
#include "topk_core.h"

#include <cmath>

namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

#ifdef LABCORE_X86
LABCORE_AVX512 inline float dot512(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  if (d < D) {
    const __mmask16 m = __mmask16((1u << (D - d)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// Sizes, inputs and outputs of one call.
struct Tucker {
  int64_t H, T, D, R, n, np, h, m, k, M, cells_n;
  bool two_sided;
  const float *q, *keys, *pkT, *core, *cores;                 // q (H, 2, T, D), keys (H, 2, R, n, D), ...
  int64_t* cells;                                              // (2, T, H, k)
  float *scores, *vecs, *core_scores;                          // (T, H, k), (2, T, H, R, k), (T, H, k, h)
};

// Per-thread buffers.
struct TuckerBuffers {
  std::vector<float> qbuf, pbuf, neg, grid, left, sel, topv, best_v;
  std::vector<int64_t> top, best_i;
  Scratch s;
  explicit TuckerBuffers(const Tucker& a)
      : qbuf(kTile * a.D), pbuf(2 * kTile * a.np), neg(a.np), grid(a.cells_n), left(a.M * a.R),
        sel(2 * a.R * a.M), topv(std::max(a.M, a.k)), best_v(a.k), top(2 * a.M), best_i(a.k),
        s(std::max(a.np, a.cells_n)) {}
};

// Steps 1-5 of the header comment for head hh and tokens t0 .. t0 + rows - 1. Inlined into one
// wrapper per instruction set, so that the plain loops are vectorised for that set.
template <bool V512>
__attribute__((always_inline)) inline void tucker_tile(const Tucker& a, int64_t hh, int64_t t0, int64_t rows,
                                                       TuckerBuffers& b) {
  const int64_t D = a.D, R = a.R, n = a.n, np = a.np, m = a.m, M = a.M, k = a.k, T = a.T, H = a.H;
  for (int side = 0; side < 2; ++side) {                                  // 1. proxy scores of the tile
    std::fill(b.qbuf.begin(), b.qbuf.end(), 0.0f);
    const float* qs = a.q + ((hh * 2 + side) * T + t0) * D;
    std::copy(qs, qs + rows * D, b.qbuf.begin());
    const float* pk = a.pkT + (hh * 2 + side) * D * np;
    float* out = b.pbuf.data() + side * kTile * np;
#ifdef LABCORE_X86
    if constexpr (V512) scores_tile_avx512(b.qbuf.data(), pk, D, np, out);
    else
#endif
      scores_tile_portable(b.qbuf.data(), pk, D, np, out);
  }
  const float* C = a.core + hh * R * R;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t tok = t0 + t;
    for (int side = 0; side < 2; ++side) {
      const float* prow = b.pbuf.data() + (side * kTile + t) * np;
      int64_t* ts = b.top.data() + side * M;
      row_topk(prow, n, m, false, b.topv.data(), ts, b.s, V512);          // 2. I+ (J+)
      if (a.two_sided) {                                                  //    I- (J-): top-m of -p
        for (int64_t j = 0; j < n; ++j) b.neg[j] = -prow[j];
        row_topk(b.neg.data(), n, m, false, b.topv.data(), ts + m, b.s, V512);
      }
      const float* qv = a.q + ((hh * 2 + side) * T + tok) * D;            // 3. S[:, I] at the M selected
      const float* kb = a.keys + (hh * 2 + side) * R * n * D;
      float* ss = b.sel.data() + side * R * M;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < M; ++i) {
          const float* key = kb + (r * n + ts[i]) * D;
#ifdef LABCORE_X86
          if constexpr (V512) {
            ss[r * M + i] = dot512(key, qv, D);
            continue;
          }
#endif
          ss[r * M + i] = dot(key, qv, D);
        }
    }
    const float* srow = b.sel.data();                                     // (R, M)
    const float* scol = b.sel.data() + R * M;                             // (R, M)
    float* left = b.left.data();                                          // (M, R)
    float* grid = b.grid.data();                                          // (quads, m, m)
    for (int64_t i = 0; i < M; ++i)                                       // 4. left = S_row[:, I]^T C
      for (int64_t c2 = 0; c2 < R; ++c2) {
        float acc = 0.0f;
        for (int64_t r = 0; r < R; ++r) acc += srow[r * M + i] * C[r * R + c2];
        left[i * R + c2] = acc;
      }
    const int64_t quads = a.two_sided ? 2 : 1;
    for (int64_t qd = 0; qd < quads; ++qd)                                //    grid[i][j] = sum_c left[i][c] S_col[c][j]
      for (int64_t i = 0; i < m; ++i) {
        float* g = grid + (qd * m + i) * m;
        const float* li = left + (qd * m + i) * R;
        const float* sc0 = scol + qd * m;
        for (int64_t j = 0; j < m; ++j) g[j] = li[0] * sc0[j];
        for (int64_t c2 = 1; c2 < R; ++c2)
          for (int64_t j = 0; j < m; ++j) g[j] += li[c2] * sc0[c2 * M + j];
      }
    if (a.two_sided) {                                                    //    cells of I- x J- also in I+ x J+
      const int64_t* tr = b.top.data();
      const int64_t* tc = b.top.data() + M;
      for (int64_t i = 0; i < m; ++i) {
        if (std::find(tr, tr + m, tr[m + i]) == tr + m) continue;
        for (int64_t j = 0; j < m; ++j)
          if (std::find(tc, tc + m, tc[m + j]) != tc + m) grid[(m + i) * m + j] = -INFINITY;
      }
    }
    row_topk(grid, a.cells_n, k, true, b.best_v.data(), b.best_i.data(), b.s, V512);  // top-K, descending
    for (int64_t kk = 0; kk < k; ++kk) {                                  // 5. outputs (+ MCS)
      const int64_t f = b.best_i[kk], qd = f / (m * m), cell = f % (m * m);
      const int64_t pi = qd * m + cell / m, pj = qd * m + cell % m;
      const int64_t o = (tok * H + hh) * k + kk;
      a.cells[o] = b.top[pi];
      a.cells[T * H * k + o] = b.top[M + pj];
      a.scores[o] = b.best_v[kk];
      for (int64_t r = 0; r < R; ++r) {
        a.vecs[((tok * H + hh) * R + r) * k + kk] = srow[r * M + pi];
        a.vecs[((T + tok) * H + hh) * R * k + r * k + kk] = scol[r * M + pj];
      }
      for (int64_t c = 0; c < a.h; ++c) {                                 //    s^(c) = S_row[:, i]^T C^(c) S_col[:, j]
        const float* Cc = a.cores + (c * H + hh) * R * R;
        float acc = 0.0f;
        for (int64_t c2 = 0; c2 < R; ++c2) {
          float lb = 0.0f;
          for (int64_t r = 0; r < R; ++r) lb += srow[r * M + pi] * Cc[r * R + c2];
          acc += lb * scol[c2 * M + pj];
        }
        a.core_scores[o * a.h + c] = acc;
      }
    }
  }
}

void tucker_tile_portable(const Tucker& a, int64_t hh, int64_t t0, int64_t rows, TuckerBuffers& b) {
  tucker_tile<false>(a, hh, t0, rows, b);
}

#ifdef LABCORE_X86
LABCORE_AVX512 void tucker_tile_avx512(const Tucker& a, int64_t hh, int64_t t0, int64_t rows, TuckerBuffers& b) {
  tucker_tile<true>(a, hh, t0, rows, b);
}
#endif

}  // namespace

namespace labcore {

// q (H, 2, T, D); keys (H, 2, R, n, D); pkeys (H, 2, n, D); core (H, R, R); cores (h, H, R, R) or an
// empty tensor. Returns cells (2, T, H, k) int64, scores (T, H, k), vecs (2, T, H, R, k) (the selected
// cells' side-score columns) and core_scores (T, H, k, h) (empty without cores).
std::vector<at::Tensor> tucker_topk(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& pkeys,
                                    const at::Tensor& core, const at::Tensor& cores, int64_t m, int64_t k,
                                    bool two_sided, int64_t isa) {
  for (const at::Tensor* t : {&q, &keys, &pkeys, &core, &cores}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "tucker_topk: contiguous float32 CPU tensors expected");
  }
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 5 && pkeys.dim() == 4 && core.dim() == 3,
              "tucker_topk: q (H, 2, T, D), keys (H, 2, R, n, D), pkeys (H, 2, n, D), core (H, R, R)");
  const int64_t H = q.size(0), T = q.size(2), D = q.size(3), R = keys.size(2), n = keys.size(3);
  TORCH_CHECK(q.size(1) == 2 && keys.size(0) == H && keys.size(1) == 2 && keys.size(4) == D,
              "tucker_topk: keys ", keys.sizes(), " do not match q ", q.sizes());
  TORCH_CHECK(pkeys.size(0) == H && pkeys.size(1) == 2 && pkeys.size(2) == n && pkeys.size(3) == D,
              "tucker_topk: pkeys ", pkeys.sizes(), " do not match keys ", keys.sizes());
  TORCH_CHECK(core.size(0) == H && core.size(1) == R && core.size(2) == R, "tucker_topk: core ", core.sizes(),
              " must be (H, R, R)");
  const int64_t h = cores.numel() == 0 ? 0 : cores.size(0);
  TORCH_CHECK(h == 0 || (cores.dim() == 4 && cores.size(1) == H && cores.size(2) == R && cores.size(3) == R),
              "tucker_topk: cores ", cores.sizes(), " must be (h, H, R, R)");
  TORCH_CHECK(1 <= m && m <= n, "tucker_topk: m=", m, " must be in [1, n=", n, "]");
  TORCH_CHECK(0 <= k && k <= m * m, "tucker_topk: k=", k, " must be in [0, m*m=", m * m, "]");
  const bool use512 = use_avx512("tucker_topk", isa);

  auto opts = q.options();
  at::Tensor cells = at::empty({2, T, H, k}, opts.dtype(at::kLong));
  at::Tensor scores = at::empty({T, H, k}, opts);
  at::Tensor vecs = at::empty({2, T, H, R, k}, opts);
  at::Tensor core_scores = at::empty({T, H, k, h}, opts);
  if (T == 0 || H == 0 || k == 0) return {cells, scores, vecs, core_scores};

  const int64_t np = (n + 31) / 32 * 32;
  at::Tensor pkT = at::zeros({H, 2, D, np}, opts);                            // proxy keys, (D, n_pad) per (h, side)
  pkT.narrow(3, 0, n).copy_(pkeys.transpose(2, 3));
  Tucker a{H, T, D, R, n, np, h, m, k, two_sided ? 2 * m : m, (two_sided ? 2 : 1) * m * m, two_sided,
           q.data_ptr<float>(), keys.data_ptr<float>(), pkT.data_ptr<float>(), core.data_ptr<float>(),
           h ? cores.data_ptr<float>() : nullptr, cells.data_ptr<int64_t>(), scores.data_ptr<float>(),
           vecs.data_ptr<float>(), core_scores.data_ptr<float>()};
  const int64_t tiles = (T + kTile - 1) / kTile;
  at::parallel_for(0, H * tiles, 1, [&](int64_t begin, int64_t end) {
    TuckerBuffers b(a);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t hh = w / tiles, t0 = (w % tiles) * kTile, rows = std::min<int64_t>(kTile, T - t0);
#ifdef LABCORE_X86
      if (use512) {
        tucker_tile_avx512(a, hh, t0, rows, b);
        continue;
      }
#endif
      tucker_tile_portable(a, hh, t0, rows, b);
    }
  });
  (void)use512;
  return {cells, scores, vecs, core_scores};
}

}  // namespace labcore
