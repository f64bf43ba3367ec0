// Exact per-row top-k of a float32 matrix (topk_rows) and PKM's fused side search (side_topk); the
// per-row algorithm and its proof of exactness are described in topk_core.h. The Python module's
// functions are registered at the end of this file (bag_backward: value_bags.cpp; tucker_topk:
// tucker_search.cpp; pkm_topk: pkm_search.cpp).
#include "topk_core.h"

namespace {

// isa: -1 = best available, 0 = portable, 1 = AVX-512 (error when unsupported).
std::vector<at::Tensor> topk_rows(const at::Tensor& x, int64_t k, bool sorted, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu(), "topk_rows: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "topk_rows: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "topk_rows: x must be 2-D (R, n), got ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous(), "topk_rows: x must be contiguous");
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK(0 <= k && k <= n, "topk_rows: k=", k, " must be in [0, n=", n, "]");
  TORCH_CHECK(n < INT32_MAX, "topk_rows: rows longer than 2^31 - 1 are not supported, n=", n);
  const bool use512 = use_avx512("topk_rows", isa);
  at::Tensor values = at::empty({R, k}, x.options());
  at::Tensor indices = at::empty({R, k}, x.options().dtype(at::kLong));
  if (R == 0 || k == 0) return {values, indices};
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    Scratch s(n);
    for (int64_t r = begin; r < end; ++r) {
#ifdef LABCORE_X86
      if (use512) {
        row_avx512(xp + r * n, n, k, sorted, vp + r * k, ip + r * k, s);
        continue;
      }
#endif
      row_portable(xp + r * n, n, k, sorted, vp + r * k, ip + r * k, s);
    }
  });
  (void)use512;
  return {values, indices};
}


// Product-key side search: q (G, T, D), keys (G, n, D) -> the top-k of q[g, t] . keys[g, j] over j.
std::vector<at::Tensor> side_topk(const at::Tensor& q, const at::Tensor& keys, int64_t k, bool sorted,
                                  int64_t isa) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu(), "side_topk: tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat, "side_topk: float32 only");
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3, "side_topk: q (G, T, D) and keys (G, n, D) expected");
  const int64_t G = q.size(0), T = q.size(1), D = q.size(2), n = keys.size(1);
  TORCH_CHECK(keys.size(0) == G && keys.size(2) == D, "side_topk: keys ", keys.sizes(), " do not match q ",
              q.sizes());
  TORCH_CHECK(0 <= k && k <= n, "side_topk: k=", k, " must be in [0, n=", n, "]");
  const bool use512 = use_avx512("side_topk", isa);
  at::Tensor values = at::empty({G, T, k}, q.options());
  at::Tensor indices = at::empty({G, T, k}, q.options().dtype(at::kLong));
  if (G == 0 || T == 0 || k == 0) return {values, indices};
  const int64_t np = (n + 31) / 32 * 32;
  at::Tensor kT = at::zeros({G, D, np}, keys.options());                     // (G, D, n_pad), zero pad
  kT.narrow(2, 0, n).copy_(keys.transpose(1, 2));
  const at::Tensor qc = q.contiguous();
  const float* qp = qc.data_ptr<float>();
  const float* kp = kT.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const int64_t tiles = (T + kTile - 1) / kTile;
  at::parallel_for(0, G * tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch s(np);
    std::vector<float> qbuf(kTile * D), sbuf(kTile * np);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t g = w / tiles, t0 = (w % tiles) * kTile, rows = std::min<int64_t>(kTile, T - t0);
      std::fill(qbuf.begin(), qbuf.end(), 0.0f);
      std::copy(qp + (g * T + t0) * D, qp + (g * T + t0 + rows) * D, qbuf.begin());
      const float* kg = kp + g * D * np;
#ifdef LABCORE_X86
      if (use512) scores_tile_avx512(qbuf.data(), kg, D, np, sbuf.data());
      else
#endif
        scores_tile_portable(qbuf.data(), kg, D, np, sbuf.data());
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t r = g * T + t0 + t;
#ifdef LABCORE_X86
        if (use512) {
          row_avx512(sbuf.data() + t * np, n, k, sorted, vp + r * k, ip + r * k, s);
          continue;
        }
#endif
        row_portable(sbuf.data() + t * np, n, k, sorted, vp + r * k, ip + r * k, s);
      }
    }
  });
  (void)use512;
  return {values, indices};
}

}  // namespace

namespace labcore {
std::vector<at::Tensor> bag_backward(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& w,
                                     const at::Tensor& table, bool need_table, bool need_w);  // value_bags.cpp
std::vector<at::Tensor> tucker_topk(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& pkeys,
                                    const at::Tensor& core, const at::Tensor& cores, int64_t m, int64_t k,
                                    bool two_sided, int64_t isa);  // tucker_search.cpp
std::vector<at::Tensor> bag_backward_offsets(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& offsets,
                                             const at::Tensor& w, const at::Tensor& table, bool need_table,
                                             bool need_w);  // value_bags.cpp
std::vector<at::Tensor> bag_backward_sparse(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& offsets,
                                            const at::Tensor& w, const at::Tensor& table, int64_t n_chunks,
                                            bool need_w);  // value_bags.cpp
std::vector<at::Tensor> pkm_topk(const at::Tensor& q, const at::Tensor& keys, int64_t k, int64_t isa);  // pkm_search.cpp
}  // namespace labcore

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bag_backward_offsets", &labcore::bag_backward_offsets,
        "backward of a weighted embedding bag with 1-D indices and bag offsets", py::arg("gy"), py::arg("idx"),
        py::arg("offsets"), py::arg("w"), py::arg("table"), py::arg("need_table"), py::arg("need_w"),
        py::call_guard<py::gil_scoped_release>());
  m.def("bag_backward_sparse", &labcore::bag_backward_sparse,
        "backward of a weighted embedding bag with a sparse table gradient (touched rows, their rows)",
        py::arg("gy"), py::arg("idx"), py::arg("offsets"), py::arg("w"), py::arg("table"), py::arg("n_chunks"),
        py::arg("need_w"), py::call_guard<py::gil_scoped_release>());
  m.def("pkm_topk", &labcore::pkm_topk, "PKM's product-key search fused (both halves, pruned grid, top-k)",
        py::arg("q"), py::arg("keys"), py::arg("k"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());
  m.def("tucker_topk", &labcore::tucker_topk, "UltraMem's TDQKR search fused (proxy keys, selected side scores, grid top-k, MCS)",
        py::arg("q"), py::arg("keys"), py::arg("pkeys"), py::arg("core"), py::arg("cores"), py::arg("m"),
        py::arg("k"), py::arg("two_sided"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());
  m.def("topk_rows", &topk_rows, "per-row exact top-k of a float32 (R, n) matrix",
        py::arg("x"), py::arg("k"), py::arg("sorted"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>());
  m.def("side_topk", &side_topk, "product-key side search: top-k of q @ keys^T without the score matrix",
        py::arg("q"), py::arg("keys"), py::arg("k"), py::arg("sorted"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>());
  m.def("bag_backward", &labcore::bag_backward,
        "backward of a weighted embedding bag with 2-D indices: (grad_table, grad_w)",
        py::arg("gy"), py::arg("idx"), py::arg("w"), py::arg("table"), py::arg("need_table"), py::arg("need_w"),
        py::call_guard<py::gil_scoped_release>());
  m.def("has_avx512", &cpu_has_avx512, "whether the CPU (and OS) support the AVX-512 path");
}
