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
  const int64_t M = two_sided ? 2 * m : m, cells_n = (two_sided ? 2 : 1) * m * m;
  TORCH_CHECK(1 <= m && m <= n, "tucker_topk: m=", m, " must be in [1, n=", n, "]");
  TORCH_CHECK(0 <= k && k <= m * m, "tucker_topk: k=", k, " must be in [0, m*m=", m * m, "]");
  TORCH_CHECK(isa >= -1 && isa <= 1, "tucker_topk: isa=", isa, " must be -1 (auto), 0 or 1");
  const bool has512 = cpu_has_avx512();
  TORCH_CHECK(isa != 1 || has512, "tucker_topk: isa=1 (AVX-512) requested but the CPU lacks it");
  const bool use512 = isa == 1 || (isa == -1 && has512);

  auto opts = q.options();
  at::Tensor cells = at::empty({2, T, H, k}, opts.dtype(at::kLong));
  at::Tensor scores = at::empty({T, H, k}, opts);
  at::Tensor vecs = at::empty({2, T, H, R, k}, opts);
  at::Tensor core_scores = at::empty({T, H, k, h}, opts);
  if (T == 0 || H == 0 || k == 0) return {cells, scores, vecs, core_scores};

  const int64_t np = (n + 31) / 32 * 32;
  at::Tensor pkT = at::zeros({H, 2, D, np}, opts);                            // proxy keys, (D, n_pad) per (h, side)
  pkT.narrow(3, 0, n).copy_(pkeys.transpose(2, 3));
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* pp = pkT.data_ptr<float>();
  const float* cp = core.data_ptr<float>();
  const float* csp = h ? cores.data_ptr<float>() : nullptr;
  int64_t* cellp = cells.data_ptr<int64_t>();
  float* scp = scores.data_ptr<float>();
  float* vp = vecs.data_ptr<float>();
  float* csout = core_scores.data_ptr<float>();
  const int64_t tiles = (T + kTile - 1) / kTile;

  at::parallel_for(0, H * tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch s(std::max(np, cells_n));
    std::vector<float> qbuf(kTile * D), pbuf(2 * kTile * np), neg(np), grid(cells_n), left(M * R);
    std::vector<float> sel(2 * R * M), topv(std::max(M, k)), best_v(k);
    std::vector<int64_t> top(2 * M), best_i(k);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t hh = w / tiles, t0 = (w % tiles) * kTile, rows = std::min<int64_t>(kTile, T - t0);
      for (int side = 0; side < 2; ++side) {                                // 1. proxy scores of the tile
        std::fill(qbuf.begin(), qbuf.end(), 0.0f);
        const float* qs = qp + ((hh * 2 + side) * T + t0) * D;
        std::copy(qs, qs + rows * D, qbuf.begin());
        const float* pk = pp + (hh * 2 + side) * D * np;
#ifdef LABCORE_X86
        if (use512) scores_tile_avx512(qbuf.data(), pk, D, np, pbuf.data() + side * kTile * np);
        else
#endif
          scores_tile_portable(qbuf.data(), pk, D, np, pbuf.data() + side * kTile * np);
      }
      const float* C = cp + hh * R * R;
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t tok = t0 + t;
        for (int side = 0; side < 2; ++side) {
          const float* prow = pbuf.data() + (side * kTile + t) * np;
          int64_t* ts = top.data() + side * M;
          row_topk(prow, n, m, false, topv.data(), ts, s, use512);          // 2. I+ (J+)
          if (two_sided) {                                                  //    I- (J-): top-m of -p
            for (int64_t j = 0; j < n; ++j) neg[j] = -prow[j];
            row_topk(neg.data(), n, m, false, topv.data(), ts + m, s, use512);
          }
          const float* qv = qp + ((hh * 2 + side) * T + tok) * D;           // 3. S[:, I] at the M selected
          const float* kb = kp + (hh * 2 + side) * R * n * D;
          float* ss = sel.data() + side * R * M;
          for (int64_t r = 0; r < R; ++r)
            for (int64_t i = 0; i < M; ++i) ss[r * M + i] = dot(kb + (r * n + ts[i]) * D, qv, D);
        }
        const float* srow = sel.data();                                     // (R, M)
        const float* scol = sel.data() + R * M;                             // (R, M)
        for (int64_t i = 0; i < M; ++i)                                     // 4. left = S_row[:, I]^T C
          for (int64_t b = 0; b < R; ++b) {
            float acc = 0.0f;
            for (int64_t a = 0; a < R; ++a) acc += srow[a * M + i] * C[a * R + b];
            left[i * R + b] = acc;
          }
        const int64_t quads = two_sided ? 2 : 1;
        for (int64_t qd = 0; qd < quads; ++qd)                              //    grid (quad, m, m)
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < m; ++j) {
              const int64_t pi = qd * m + i, pj = qd * m + j;
              float acc = 0.0f;
              for (int64_t b = 0; b < R; ++b) acc += left[pi * R + b] * scol[b * M + pj];
              grid[(qd * m + i) * m + j] = acc;
            }
        if (two_sided) {                                                    //    cells of I- x J- also in I+ x J+
          const int64_t* tr = top.data();
          const int64_t* tc = top.data() + M;
          for (int64_t i = 0; i < m; ++i) {
            const bool row_dup = std::find(tr, tr + m, tr[m + i]) != tr + m;
            if (!row_dup) continue;
            for (int64_t j = 0; j < m; ++j)
              if (std::find(tc, tc + m, tc[m + j]) != tc + m) grid[(m + i) * m + j] = -INFINITY;
          }
        }
        row_topk(grid.data(), cells_n, k, true, best_v.data(), best_i.data(), s, use512);  // top-K, descending
        for (int64_t kk = 0; kk < k; ++kk) {                                // 5. outputs (+ MCS)
          const int64_t f = best_i[kk], qd = f / (m * m), cell = f % (m * m);
          const int64_t pi = qd * m + cell / m, pj = qd * m + cell % m;
          const int64_t o = (tok * H + hh) * k + kk;
          cellp[o] = top[pi];
          cellp[T * H * k + o] = top[M + pj];
          scp[o] = best_v[kk];
          for (int64_t r = 0; r < R; ++r) {
            vp[((tok * H + hh) * R + r) * k + kk] = srow[r * M + pi];
            vp[((T + tok) * H + hh) * R * k + r * k + kk] = scol[r * M + pj];
          }
          for (int64_t c = 0; c < h; ++c) {
            const float* Cc = csp + (c * H + hh) * R * R;
            float acc = 0.0f;
            for (int64_t b = 0; b < R; ++b) {
              float lb = 0.0f;
              for (int64_t a = 0; a < R; ++a) lb += srow[a * M + pi] * Cc[a * R + b];
              acc += lb * scol[b * M + pj];
            }
            csout[o * h + c] = acc;
          }
        }
      }
    }
  });
  (void)use512;
  return {cells, scores, vecs, core_scores};
}

}  // namespace labcore
