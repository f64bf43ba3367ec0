// Backward of the memory layers' value read, y[b] = sum_s w[b, s] * V[idx[b, s]]
// (F.embedding_bag, mode "sum", 2-D indices: one bag of S rows per b, per-sample weights w):
//
//     grad_V[r]    = sum over (b, s) with idx[b, s] = r of  w[b, s] * gy[b]      (a weighted scatter)
//     grad_w[b, s] = V[idx[b, s]] . gy[b]                                        (a gather-dot)
//
// PyTorch's CPU embedding_bag backward sorts the indices and materialises the (n, S, D) products;
// both sums here are a single pass over idx with D-wide fused multiply-adds. The scatter is
// parallel over ranges of table rows (every thread scans idx and updates only its own rows), so each
// row accumulates its contributions in the same (b, s) order whatever the thread count: the result
// is deterministic and equals a serial loop bitwise. The gather-dot is parallel over b.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace labcore {

std::vector<at::Tensor> bag_backward(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& w,
                                     const at::Tensor& table, bool need_table, bool need_w) {
  TORCH_CHECK(gy.device().is_cpu() && idx.device().is_cpu() && w.device().is_cpu() && table.device().is_cpu(),
              "bag_backward: CPU tensors only");
  TORCH_CHECK(gy.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && table.scalar_type() == at::kFloat,
              "bag_backward: gy, w and table must be float32");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "bag_backward: idx must be int64");
  TORCH_CHECK(gy.dim() == 2 && idx.dim() == 2 && w.dim() == 2 && table.dim() == 2,
              "bag_backward: gy (n, D), idx (n, S), w (n, S), table (N, D)");
  const int64_t n = idx.size(0), S = idx.size(1), N = table.size(0), D = table.size(1);
  TORCH_CHECK(gy.size(0) == n && gy.size(1) == D && w.size(0) == n && w.size(1) == S,
              "bag_backward: shapes disagree: gy (n, D), idx (n, S), w (n, S), table (N, D)");
  const at::Tensor g = gy.contiguous(), ix = idx.contiguous(), wc = w.contiguous(), V = table.contiguous();
  const float* gp = g.data_ptr<float>();
  const int64_t* ip = ix.data_ptr<int64_t>();
  const float* wp = wc.data_ptr<float>();
  const float* vp = V.data_ptr<float>();
  for (int64_t j = 0; j < n * S; ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < N, "bag_backward: index ", ip[j], " out of range [0, ", N, ")");
  }
  at::Tensor grad_table = need_table ? at::zeros({N, D}, table.options()) : at::Tensor();
  at::Tensor grad_w = need_w ? at::empty({n, S}, w.options()) : at::Tensor();
  if (need_table && n * S > 0) {
    float* tp = grad_table.data_ptr<float>();
    at::parallel_for(0, N, 1024, [&](int64_t lo, int64_t hi) {
      const bool all = lo == 0 && hi == N;
      for (int64_t b = 0; b < n; ++b) {
        const float* gb = gp + b * D;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t r = ip[b * S + s];
          if (!all && (r < lo || r >= hi)) continue;
          const float ws = wp[b * S + s];
          float* row = tp + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) row[d] += ws * gb[d];
        }
      }
    });
  }
  if (need_w && n * S > 0) {
    float* op = grad_w.data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const float* gb = gp + b * D;
        for (int64_t s = 0; s < S; ++s) {
          const float* row = vp + ip[b * S + s] * D;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < D; ++d) acc += row[d] * gb[d];
          op[b * S + s] = acc;
        }
      }
    });
  }
  return {grad_table, grad_w};
}

}  // namespace labcore
