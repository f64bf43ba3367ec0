// PKM's product-key search in one pass per (head, 8 tokens), for inference (docs/mechanisms.md §1.1,
// Lample et al. 2019, arXiv 1907.05242, §3.2; the readable version is PKM.retrieve with
// labcore/layers/fast/search.py:side_search and pruned_pair_topk).
//
// Per (head h, token t):
//   1. sub-key scores of both halves, q_row . K_row[j] and q_col . K_col[j] for all n sub-keys, for a
//      tile of 8 tokens (the score tile of the fused side search, topk_core.h, the same sums);
//   2. each half's top-K, descending (s_row, i_row; s_col, i_col);
//   3. the pruned candidate grid: the sums s_row[a] + s_col[b] over the rank pairs with
//      (a+1)(b+1) <= K (the only pairs that can be in the top K; search.py:pruned_candidates lists
//      them in the same row-major order);
//   4. their top-K, descending: scores and slot ids i_row[a] * n + i_col[b].
// The scores are bitwise those of the readable compiled path (side_topk + pruned_pair_topk); only the
// order of the K results differs (here descending, there "no particular order"). No autograd.
#include "topk_core.h"

namespace {

struct PkmBuffers {
  std::vector<float> qbuf, pbuf, side_v, cand, best_v;
  std::vector<int64_t> side_i, best_i;
  Scratch s;
  PkmBuffers(int64_t D, int64_t np, int64_t k, int64_t C)
      : qbuf(kTile * D), pbuf(2 * kTile * np), side_v(2 * k), cand(C), best_v(k), side_i(2 * k), best_i(k),
        s(std::max(np, C)) {}
};

}  // namespace

namespace labcore {

// q (H, 2, T, D); keys (H, 2, n, D). Returns scores (T, H, k) descending and int64 slots (T, H, k).
std::vector<at::Tensor> pkm_topk(const at::Tensor& q, const at::Tensor& keys, int64_t k, int64_t isa) {
  for (const at::Tensor* t : {&q, &keys}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "pkm_topk: contiguous float32 CPU tensors expected");
  }
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && q.size(1) == 2 && keys.size(1) == 2,
              "pkm_topk: q (H, 2, T, D) and keys (H, 2, n, D) expected");
  const int64_t H = q.size(0), T = q.size(2), D = q.size(3), n = keys.size(2);
  TORCH_CHECK(keys.size(0) == H && keys.size(3) == D, "pkm_topk: keys ", keys.sizes(), " do not match q ",
              q.sizes());
  TORCH_CHECK(1 <= k && k <= n, "pkm_topk: k=", k, " must be in [1, n=", n, "]");
  const bool use512 = use_avx512("pkm_topk", isa);

  at::Tensor scores = at::empty({T, H, k}, q.options());
  at::Tensor slots = at::empty({T, H, k}, q.options().dtype(at::kLong));
  if (T == 0 || H == 0) return {scores, slots};
  std::vector<int32_t> cr, cc;                                                // rank pairs, row-major
  for (int64_t a = 0; a < k; ++a)
    for (int64_t b = 0; b < k; ++b)
      if ((a + 1) * (b + 1) <= k) {
        cr.push_back(int32_t(a));
        cc.push_back(int32_t(b));
      }
  const int64_t C = int64_t(cr.size());
  const int64_t np = (n + 31) / 32 * 32;
  at::Tensor kT = at::zeros({H, 2, D, np}, keys.options());                 // (D, n_pad) per (head, half)
  kT.narrow(3, 0, n).copy_(keys.transpose(2, 3));
  const float* qp = q.data_ptr<float>();
  const float* kp = kT.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  int64_t* op = slots.data_ptr<int64_t>();
  const int64_t tiles = (T + kTile - 1) / kTile;
  at::parallel_for(0, H * tiles, 1, [&](int64_t begin, int64_t end) {
    PkmBuffers b(D, np, k, C);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t hh = w / tiles, t0 = (w % tiles) * kTile, rows = std::min<int64_t>(kTile, T - t0);
      for (int side = 0; side < 2; ++side) {                                  // 1. sub-key scores of the tile
        std::fill(b.qbuf.begin(), b.qbuf.end(), 0.0f);
        const float* qs = qp + ((hh * 2 + side) * T + t0) * D;
        std::copy(qs, qs + rows * D, b.qbuf.begin());
        const float* kg = kp + (hh * 2 + side) * D * np;
        float* out = b.pbuf.data() + side * kTile * np;
#ifdef LABCORE_X86
        if (use512) scores_tile_avx512(b.qbuf.data(), kg, D, np, out);
        else
#endif
          scores_tile_portable(b.qbuf.data(), kg, D, np, out);
      }
      for (int64_t t = 0; t < rows; ++t) {
        for (int side = 0; side < 2; ++side)                                  // 2. each half's top-K
          row_topk(b.pbuf.data() + (side * kTile + t) * np, n, k, true, b.side_v.data() + side * k,
                   b.side_i.data() + side * k, b.s, use512);
        const float* vr = b.side_v.data();
        const float* vc = b.side_v.data() + k;
        for (int64_t c = 0; c < C; ++c) b.cand[c] = vr[cr[c]] + vc[cc[c]];   // 3. pruned grid
        row_topk(b.cand.data(), C, k, true, b.best_v.data(), b.best_i.data(), b.s, use512);  // 4. top-K
        const int64_t o = ((t0 + t) * H + hh) * k;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t c = b.best_i[j];
          sp[o + j] = b.best_v[j];
          op[o + j] = b.side_i[cr[c]] * n + b.side_i[k + cc[c]];
        }
      }
    }
  });
  (void)use512;
  return {scores, slots};
}

}  // namespace labcore
