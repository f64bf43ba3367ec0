// Per-row exact top-k of a float32 matrix (R, n) -> values (R, k) and int64 indices (R, k).
//
// Order: every float32 is ranked by its order-preserving int32 key (sign-magnitude bits turned into
// two's complement), i.e. IEEE 754 totalOrder:
//     -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN
// (the same contract as labcore.layers.pkm.exact_topk: a NaN ranks above +inf only when its sign bit
// is clear). Ties are broken towards the lower index, so the result is deterministic.
//
// Algorithm for one row (exact):
//   1. Threshold. Split the row into L interleaved lanes (element i goes to lane i mod L, L >= 2k,
//      a multiple of 16) and take each lane's maximum key. The k-th largest of those L maxima, t, is
//      the key of k distinct elements, so the k-th largest element of the row is >= t.
//   2. Survivors. Every element with key >= t is copied out (key, index): about 1.2k..1.4k of them
//      for continuous data, every element in the worst case (e.g. all equal).
//   3. Rank the survivors (descending key, then ascending index) and keep the k best. Values are
//      read back from the row, so they are bitwise the input's.
// Short rows (n < 2L) and k > 128 skip step 1 (t = smallest key: every element survives).
//
// Two implementations, chosen at run time. AVX-512 (when the CPU and OS support it): 16 lanes per
// register; the k-th largest lane maximum and the survivors' ranks are found by counting, for every
// element at once, how many others are larger (compare + masked add, no branches; survivors compacted
// with vpcompressd into a register, then stored); more than 256 survivors (ties) use nth_element +
// sort. Portable (any CPU): the same steps with scalar loops (the lane maxima auto-vectorised),
// nth_element for the threshold and nth_element + sort for the survivors. Compiling with
// -DLABCORE_NO_AVX512 leaves the AVX-512 code out. Rows are spread over threads with
// at::parallel_for.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <functional>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LABCORE_NO_AVX512)
#include <immintrin.h>
#define LABCORE_X86 1
#endif

namespace {

constexpr int kMaxLanes = 128;
constexpr int kTile = 8;  // queries per score tile (side_topk)

inline int32_t order_key(int32_t bits) { return bits ^ ((bits >> 31) & 0x7fffffff); }

// (key descending, index ascending) as one unsigned 64-bit number: larger = better.
inline uint64_t pack(int32_t key, int64_t idx) {
  return (uint64_t(uint32_t(key) ^ 0x80000000u) << 32) | uint64_t(0xffffffffu - uint32_t(idx));
}
inline int64_t unpack_index(uint64_t p) { return int64_t(0xffffffffu - uint32_t(p)); }

// Lanes for the threshold pass (0: no threshold, every element survives).
int lanes_for(int64_t n, int64_t k) {
  if (k > kMaxLanes) return 0;
  int64_t L = std::min<int64_t>(kMaxLanes, std::max<int64_t>(16, (2 * k + 15) / 16 * 16));
  const int64_t least = std::max<int64_t>(16, (k + 15) / 16 * 16);  // fewer lanes for short rows
  while (L > least && n < 2 * L) L -= 16;
  if (L < k || n < 2 * L) return 0;
  return int(L);
}

struct Scratch {
  std::vector<int32_t> lanes, keys, index;
  std::vector<uint64_t> cand;
  explicit Scratch(int64_t n) : lanes(kMaxLanes), keys(n + 16), index(n + 16), cand(n + 16) {}
};

constexpr int64_t kRankMax = 256;  // up to this many survivors: rank by counting (AVX-512 path)

// Steps 3 + output: the k best of c survivors.
void finish(uint64_t* cand, int64_t c, int64_t k, bool sorted, const float* row, float* out_v,
            int64_t* out_i) {
  if (c > k) std::nth_element(cand, cand + (k - 1), cand + c, std::greater<uint64_t>());
  if (sorted) std::sort(cand, cand + k, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = unpack_index(cand[j]);
    out_i[j] = i;
    out_v[j] = row[i];
  }
}

int32_t kth_largest(int32_t* v, int L, int64_t k) {
  std::nth_element(v, v + (k - 1), v + L, std::greater<int32_t>());
  return v[k - 1];
}

// ---------------------------------------------------------------------------------------------
// Portable path
// ---------------------------------------------------------------------------------------------
void lane_max_portable(const int32_t* bits, int64_t n, int L, int32_t* lm) {
  std::fill(lm, lm + L, INT32_MIN);
  const int64_t full = n / L * L;
  for (int64_t i = 0; i < full; i += L)
    for (int j = 0; j < L; ++j) lm[j] = std::max(lm[j], order_key(bits[i + j]));
  for (int64_t i = full; i < n; ++i) lm[i - full] = std::max(lm[i - full], order_key(bits[i]));
}

void row_portable(const float* row, int64_t n, int64_t k, bool sorted, float* out_v, int64_t* out_i,
                  Scratch& s) {
  const int32_t* bits = reinterpret_cast<const int32_t*>(row);
  int32_t t = INT32_MIN;
  if (const int L = lanes_for(n, k)) {
    lane_max_portable(bits, n, L, s.lanes.data());
    t = kth_largest(s.lanes.data(), L, k);
  }
  uint64_t* cand = s.cand.data();
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free compaction
    const int32_t key = order_key(bits[i]);
    cand[c] = pack(key, i);
    c += key >= t;
  }
  finish(cand, c, k, sorted, row, out_v, out_i);
}


void scores_tile_portable(const float* q, const float* kT, int64_t D, int64_t np, float* s) {
  for (int t = 0; t < kTile; ++t) {
    float* st = s + t * np;
    std::fill(st, st + np, 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[t * D + d];
      const float* kd = kT + d * np;
      for (int64_t j = 0; j < np; ++j) st[j] += qd * kd[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 path
// ---------------------------------------------------------------------------------------------
#ifdef LABCORE_X86
#define LABCORE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

LABCORE_AVX512 inline __m512i key512(__m512i bits) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  return _mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), magnitude));
}

template <int V>
LABCORE_AVX512 int32_t threshold_avx512(const int32_t* bits, int64_t n, int64_t k, int32_t* lm) {
  constexpr int L = 16 * V;
  __m512i acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_set1_epi32(INT32_MIN);
  const int64_t full = n / L * L;
  for (int64_t i = 0; i < full; i += L)
    for (int v = 0; v < V; ++v)
      acc[v] = _mm512_max_epi32(acc[v], key512(_mm512_loadu_si512(bits + i + 16 * v)));
  for (int v = 0; v < V; ++v) {  // the tail (< L elements) joins the first lanes
    const int64_t left = n - full - 16 * v;
    if (left <= 0) break;
    const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512i x = key512(_mm512_maskz_loadu_epi32(m, bits + full + 16 * v));
    acc[v] = _mm512_mask_max_epi32(acc[v], m, acc[v], x);
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_si512(lm + 16 * v, acc[v]);
  // k-th largest of the L maxima = the largest lane value v with #{j : lm[j] >= v} >= k; the counts
  // are accumulated per lane (L x V independent compare + masked add, no scalar loop)
  const __m512i one = _mm512_set1_epi32(1);
  __m512i cnt[V];
  for (int v = 0; v < V; ++v) cnt[v] = _mm512_setzero_si512();
  for (int j = 0; j < L; ++j) {
    const __m512i b = _mm512_set1_epi32(lm[j]);
    for (int v = 0; v < V; ++v) cnt[v] = _mm512_mask_add_epi32(cnt[v], _mm512_cmple_epi32_mask(acc[v], b), cnt[v], one);
  }
  const __m512i kv = _mm512_set1_epi32(int32_t(k));
  __m512i best = _mm512_set1_epi32(INT32_MIN);
  for (int v = 0; v < V; ++v) best = _mm512_mask_max_epi32(best, _mm512_cmpge_epi32_mask(cnt[v], kv), best, acc[v]);
  return _mm512_reduce_max_epi32(best);
}

// The k best of c <= kRankMax survivors, in order: a survivor's rank is the number of larger ones
// (packed values are distinct), counted for 8 survivors at a time. cand is zero-padded to a multiple of
// 8 (0 is below every packed value since indices are < 2^31; a pad's rank is c >= k).
LABCORE_AVX512 void finish_rank512(uint64_t* cand, int64_t c, int64_t k, const float* row, float* out_v,
                                   int64_t* out_i) {
  const int64_t vecs = (c + 7) / 8;
  for (int64_t j = c; j < vecs * 8; ++j) cand[j] = 0;
  __m512i rank[kRankMax / 8];
  __m512i cv[kRankMax / 8];
  const __m512i one = _mm512_set1_epi64(1);
  for (int64_t v = 0; v < vecs; ++v) {
    rank[v] = _mm512_setzero_si512();
    cv[v] = _mm512_loadu_si512(cand + 8 * v);
  }
  for (int64_t j = 0; j < c; ++j) {
    const __m512i b = _mm512_set1_epi64(int64_t(cand[j]));
    for (int64_t v = 0; v < vecs; ++v)
      rank[v] = _mm512_mask_add_epi64(rank[v], _mm512_cmpgt_epu64_mask(b, cv[v]), rank[v], one);
  }
  alignas(64) int64_t r[kRankMax];
  for (int64_t v = 0; v < vecs; ++v) _mm512_store_si512(r + 8 * v, rank[v]);
  for (int64_t j = 0; j < c; ++j) {
    if (r[j] < k) {
      const int64_t i = unpack_index(cand[j]);
      out_i[r[j]] = i;
      out_v[r[j]] = row[i];
    }
  }
}

LABCORE_AVX512 int32_t threshold_dispatch(const int32_t* bits, int64_t n, int64_t k, int L, int32_t* lm) {
  switch (L / 16) {
    case 1: return threshold_avx512<1>(bits, n, k, lm);
    case 2: return threshold_avx512<2>(bits, n, k, lm);
    case 3: return threshold_avx512<3>(bits, n, k, lm);
    case 4: return threshold_avx512<4>(bits, n, k, lm);
    case 5: return threshold_avx512<5>(bits, n, k, lm);
    case 6: return threshold_avx512<6>(bits, n, k, lm);
    case 7: return threshold_avx512<7>(bits, n, k, lm);
    default: return threshold_avx512<8>(bits, n, k, lm);
  }
}

LABCORE_AVX512 void row_avx512(const float* row, int64_t n, int64_t k, bool sorted, float* out_v,
                               int64_t* out_i, Scratch& s) {
  const int32_t* bits = reinterpret_cast<const int32_t*>(row);
  int32_t t = INT32_MIN;
  if (const int L = lanes_for(n, k)) t = threshold_dispatch(bits, n, k, L, s.lanes.data());
  const __m512i tv = _mm512_set1_epi32(t);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int32_t* kb = s.keys.data();
  int32_t* ib = s.index.data();
  int64_t c = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i key = key512(_mm512_loadu_si512(bits + i));
    const __mmask16 m = _mm512_cmpge_epi32_mask(key, tv);
    if (m) {  // compress in a register, then a plain store (buffers have 16 slack)
      _mm512_storeu_si512(kb + c, _mm512_maskz_compress_epi32(m, key));
      _mm512_storeu_si512(ib + c, _mm512_maskz_compress_epi32(m, iv));
      c += __builtin_popcount(unsigned(m));
    }
    iv = _mm512_add_epi32(iv, step);
  }
  if (i < n) {
    const __mmask16 tail = __mmask16((1u << (n - i)) - 1);
    const __m512i key = key512(_mm512_maskz_loadu_epi32(tail, bits + i));
    const __mmask16 m = _mm512_mask_cmpge_epi32_mask(tail, key, tv);
    _mm512_storeu_si512(kb + c, _mm512_maskz_compress_epi32(m, key));
    _mm512_storeu_si512(ib + c, _mm512_maskz_compress_epi32(m, iv));
    c += __builtin_popcount(unsigned(m));
  }
  uint64_t* cand = s.cand.data();
  for (int64_t j = 0; j < c; ++j) cand[j] = pack(kb[j], ib[j]);
  if (c <= kRankMax)
    finish_rank512(cand, c, k, row, out_v, out_i);  // always sorted
  else
    finish(cand, c, k, sorted, row, out_v, out_i);
}

// ---------------------------------------------------------------------------------------------
// Fused product-key side search: scores of a tile of 8 queries against all n sub-keys, kept in a
// per-thread buffer (8 x n_pad floats, cache-resident), then each row's top-k. The score matrix
// (G, T, n) is never materialised.
// ---------------------------------------------------------------------------------------------

// s[t][j] = sum_d q[t][d] * kT[d][j] for t < 8, j < np (np a multiple of 32); FMAs in order d = 0..D-1.
LABCORE_AVX512 void scores_tile_avx512(const float* q, const float* kT, int64_t D, int64_t np, float* s) {
  for (int64_t j0 = 0; j0 < np; j0 += 32) {
    __m512 acc[kTile][2];
    for (int t = 0; t < kTile; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m512 k0 = _mm512_loadu_ps(kT + d * np + j0);
      const __m512 k1 = _mm512_loadu_ps(kT + d * np + j0 + 16);
      for (int t = 0; t < kTile; ++t) {
        const __m512 qb = _mm512_set1_ps(q[t * D + d]);
        acc[t][0] = _mm512_fmadd_ps(qb, k0, acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(qb, k1, acc[t][1]);
      }
    }
    for (int t = 0; t < kTile; ++t) {
      _mm512_storeu_ps(s + t * np + j0, acc[t][0]);
      _mm512_storeu_ps(s + t * np + j0 + 16, acc[t][1]);
    }
  }
}
#endif

bool cpu_has_avx512() {
#ifdef LABCORE_X86
  __builtin_cpu_init();  // libgcc also checks that the OS saves the AVX-512 state (XCR0)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// isa: -1 = best available, 0 = portable, 1 = AVX-512 (error when unsupported).
std::vector<at::Tensor> topk_rows(const at::Tensor& x, int64_t k, bool sorted, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu(), "topk_rows: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "topk_rows: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "topk_rows: x must be 2-D (R, n), got ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous(), "topk_rows: x must be contiguous");
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK(0 <= k && k <= n, "topk_rows: k=", k, " must be in [0, n=", n, "]");
  TORCH_CHECK(n < INT32_MAX, "topk_rows: rows longer than 2^31 - 1 are not supported, n=", n);
  TORCH_CHECK(isa >= -1 && isa <= 1, "topk_rows: isa=", isa, " must be -1 (auto), 0 or 1");
  const bool has512 = cpu_has_avx512();
  TORCH_CHECK(isa != 1 || has512, "topk_rows: isa=1 (AVX-512) requested but the CPU lacks it");
  const bool use512 = isa == 1 || (isa == -1 && has512);
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
  TORCH_CHECK(isa >= -1 && isa <= 1, "side_topk: isa=", isa, " must be -1 (auto), 0 or 1");
  const bool has512 = cpu_has_avx512();
  TORCH_CHECK(isa != 1 || has512, "side_topk: isa=1 (AVX-512) requested but the CPU lacks it");
  const bool use512 = isa == 1 || (isa == -1 && has512);
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
}  // namespace labcore

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
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
