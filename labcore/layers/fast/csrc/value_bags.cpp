// Backward of the memory layers' value read, y[b] = sum over the indices j of bag b of w[j] * V[idx[j]]
// (F.embedding_bag, mode "sum", per-sample weights w):
//
//     grad_V[r] = sum over j with idx[j] = r of  w[j] * gy[bag(j)]      (a weighted scatter)
//     grad_w[j] = V[idx[j]] . gy[bag(j)]                                (a gather-dot)
//
// Two layouts of the bags: 2-D indices (n, S), one bag of S rows per b (PKM's read, UltraMem's at
// E = 1: bag_backward), and 1-D indices with bag offsets (UltraMem's IVE read, one bag per (token,
// core, block): bag_backward_offsets). bag_backward_sparse gives the table gradient as the touched
// rows and their gradient rows (for a sparse COO gradient: lazy value updates, XLM's --mem_sparse). PyTorch's CPU embedding_bag backward sorts the indices and
// materialises the (L, D) products; both sums here are one pass over the indices with D-wide fused
// multiply-adds. The scatter is parallel over ranges of table rows (every thread scans the indices
// and updates only its own rows), so each row accumulates its contributions in index order whatever
// the thread count: the result is deterministic and equals a serial loop bitwise. The gather-dot is
// parallel over the indices.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

// One backward's inputs, contiguous, with raw pointers: L indices into a (rows, Dc) table, bag[j] =
// the row of gy that index j belongs to. Checks every index against the table's rows.
struct Bags {
  at::Tensor g_, ix_, w_, v_;   // owners of the pointers below
  int64_t L, Dc;
  const float* gy;              // (bags, Dc)
  const int64_t* idx;           // (L,)
  const int64_t* bag;           // (L,)
  const float* w;               // (L,)
  const float* table;           // (rows, Dc)
  Bags(const at::Tensor& gy_, const at::Tensor& idx_, const int64_t* bag_, const at::Tensor& w__,
       const at::Tensor& table_)
      : g_(gy_.contiguous()), ix_(idx_.contiguous()), w_(w__.contiguous()), v_(table_.contiguous()),
        L(ix_.numel()), Dc(v_.size(1)), gy(g_.data_ptr<float>()), idx(ix_.data_ptr<int64_t>()), bag(bag_),
        w(w_.data_ptr<float>()), table(v_.data_ptr<float>()) {
    const int64_t rows = v_.size(0);
    for (int64_t j = 0; j < L; ++j) {
      TORCH_CHECK(idx[j] >= 0 && idx[j] < rows, "bag_backward: index ", idx[j], " out of range [0, ", rows, ")");
    }
  }
};

// out block (idx[j] % h) of row u = slot[idx[j] / h] (u = idx[j] when slot is null and h = 1)
// += w[j] * gy[bag[j]], for every j. out has U rows of h * Dc; parallel over ranges of its rows, each
// row accumulating in index order (deterministic for any thread count).
void weighted_scatter(const Bags& a, const int64_t* slot, int64_t U, int64_t h, float* out) {
  at::parallel_for(0, U, 256, [&](int64_t lo, int64_t hi) {
    const bool all = lo == 0 && hi == U;
    for (int64_t j = 0; j < a.L; ++j) {
      const int64_t r = a.idx[j], u = slot ? slot[r / h] : r;
      if (!all && (u < lo || u >= hi)) continue;
      const float ws = a.w[j];
      const float* gb = a.gy + a.bag[j] * a.Dc;
      float* dst = out + (u * h + r % h) * a.Dc;
#pragma omp simd
      for (int64_t d = 0; d < a.Dc; ++d) dst[d] += ws * gb[d];
    }
  });
}

// grad_w[j] = table[idx[j]] . gy[bag[j]] (a gather-dot), parallel over j.
void gather_dot(const Bags& a, float* out) {
  at::parallel_for(0, a.L, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const float* gb = a.gy + a.bag[j] * a.Dc;
      const float* row = a.table + a.idx[j] * a.Dc;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < a.Dc; ++d) acc += row[d] * gb[d];
      out[j] = acc;
    }
  });
}

// The two sums with a dense table gradient (the table's shape).
std::vector<at::Tensor> backward_core(const at::Tensor& gy, const at::Tensor& idx, const int64_t* bag,
                                      const at::Tensor& w, const at::Tensor& table, bool need_table, bool need_w) {
  const Bags a(gy, idx, bag, w, table);
  at::Tensor grad_table = need_table ? at::zeros(table.sizes(), table.options()) : at::Tensor();
  at::Tensor grad_w = need_w ? at::empty(w.sizes(), w.options()) : at::Tensor();
  if (need_table && a.L > 0) weighted_scatter(a, nullptr, table.size(0), 1, grad_table.data_ptr<float>());
  if (need_w && a.L > 0) gather_dot(a, grad_w.data_ptr<float>());
  return {grad_table, grad_w};
}

// The same sums with a sparse table gradient: the rows of the full (N, F) table the indices touch
// (sorted, unique), and their gradient rows. The indices address an (N * h, F / h) chunk view of
// the table (h = n_chunks; h = 1: the table itself): chunk row r*h + c is row r, columns
// [c F/h, (c+1) F/h). The rows read are numbered in order (slot), then scattered as the dense sums.
std::vector<at::Tensor> sparse_core(const at::Tensor& gy, const at::Tensor& idx, const int64_t* bag,
                                    const at::Tensor& w, const at::Tensor& table, int64_t h, bool need_w) {
  const Bags a(gy, idx, bag, w, table);
  const int64_t N = table.size(0) / h;
  std::vector<int64_t> slot(N, -1);
  for (int64_t j = 0; j < a.L; ++j) slot[a.idx[j] / h] = 0;
  int64_t U = 0;
  for (int64_t r = 0; r < N; ++r)
    if (slot[r] == 0) slot[r] = U++;
  at::Tensor rows = at::empty({U}, idx.options());
  int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)
    if (slot[r] >= 0) rp[slot[r]] = r;
  at::Tensor vals = at::zeros({U, h * a.Dc}, table.options());
  at::Tensor grad_w = need_w ? at::empty(w.sizes(), w.options()) : at::Tensor();
  if (a.L > 0) weighted_scatter(a, slot.data(), U, h, vals.data_ptr<float>());
  if (need_w && a.L > 0) gather_dot(a, grad_w.data_ptr<float>());
  return {rows, vals, grad_w};
}

void check_common(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& w, const at::Tensor& table) {
  TORCH_CHECK(gy.device().is_cpu() && idx.device().is_cpu() && w.device().is_cpu() && table.device().is_cpu(),
              "bag_backward: CPU tensors only");
  TORCH_CHECK(gy.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && table.scalar_type() == at::kFloat,
              "bag_backward: gy, w and table must be float32");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "bag_backward: idx must be int64");
  TORCH_CHECK(gy.dim() == 2 && table.dim() == 2 && gy.size(1) == table.size(1),
              "bag_backward: gy (bags, D) and table (N, D) expected");
}

}  // namespace

namespace labcore {

namespace {

std::vector<int64_t> bags_2d(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& w) {
  TORCH_CHECK(idx.dim() == 2 && w.dim() == 2, "bag_backward: gy (n, D), idx (n, S), w (n, S), table (N, D)");
  const int64_t n = idx.size(0), S = idx.size(1);
  TORCH_CHECK(gy.size(0) == n && w.size(0) == n && w.size(1) == S,
              "bag_backward: shapes disagree: gy (n, D), idx (n, S), w (n, S), table (N, D)");
  std::vector<int64_t> bag(n * S);
  for (int64_t j = 0; j < n * S; ++j) bag[j] = j / S;
  return bag;
}

std::vector<int64_t> bags_offsets(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& offsets,
                                  const at::Tensor& w) {
  TORCH_CHECK(idx.dim() == 1 && w.dim() == 1 && offsets.dim() == 1 && w.size(0) == idx.size(0),
              "bag_backward_offsets: idx (L,), offsets (B,), w (L,) expected");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong, "bag_backward_offsets: offsets int64");
  const int64_t L = idx.size(0), B = offsets.size(0);
  TORCH_CHECK(gy.size(0) == B, "bag_backward_offsets: gy has ", gy.size(0), " rows for ", B, " bags");
  const at::Tensor oc = offsets.contiguous();
  const int64_t* op = oc.data_ptr<int64_t>();
  TORCH_CHECK(B == 0 || op[0] == 0, "bag_backward_offsets: offsets[0] must be 0");
  std::vector<int64_t> bag(L);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = op[b], hi = b + 1 < B ? op[b + 1] : L;
    TORCH_CHECK(lo <= hi && hi <= L, "bag_backward_offsets: offsets must be non-decreasing and <= L");
    for (int64_t j = lo; j < hi; ++j) bag[j] = b;
  }
  return bag;
}

}  // namespace

// gy (n, D), idx (n, S), w (n, S), table (N, D): one bag of S rows per b.
std::vector<at::Tensor> bag_backward(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& w,
                                     const at::Tensor& table, bool need_table, bool need_w) {
  check_common(gy, idx, w, table);
  const std::vector<int64_t> bag = bags_2d(gy, idx, w);
  return backward_core(gy, idx, bag.data(), w, table, need_table, need_w);
}

// gy (B, D), idx (L,), offsets (B,) non-decreasing, offsets[0] = 0 (bag b = idx[offsets[b] ..
// offsets[b+1]), the last bag ends at L), w (L,), table (N, D).
std::vector<at::Tensor> bag_backward_offsets(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& offsets,
                                             const at::Tensor& w, const at::Tensor& table, bool need_table,
                                             bool need_w) {
  check_common(gy, idx, w, table);
  const std::vector<int64_t> bag = bags_offsets(gy, idx, offsets, w);
  return backward_core(gy, idx, bag.data(), w, table, need_table, need_w);
}

// Sparse table gradient: the indices address the (N * h, F / h) chunk view ``table`` of an (N, F)
// table; offsets empty for 2-D idx. Returns the touched rows of the (N, F) table (sorted, unique),
// their gradient rows (U, F) and grad_w (or an undefined tensor).
std::vector<at::Tensor> bag_backward_sparse(const at::Tensor& gy, const at::Tensor& idx, const at::Tensor& offsets,
                                            const at::Tensor& w, const at::Tensor& table, int64_t n_chunks,
                                            bool need_w) {
  check_common(gy, idx, w, table);
  TORCH_CHECK(n_chunks >= 1 && table.size(0) % n_chunks == 0, "bag_backward_sparse: n_chunks=", n_chunks,
              " must divide the rows of the chunk view (", table.size(0), ")");
  const std::vector<int64_t> bag = idx.dim() == 2 ? bags_2d(gy, idx, w) : bags_offsets(gy, idx, offsets, w);
  return sparse_core(gy, idx, bag.data(), w, table, n_chunks, need_w);
}

}  // namespace labcore
