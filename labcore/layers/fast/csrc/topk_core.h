#pragma once
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
//
// This header holds the per-row primitives (threshold, survivors, ranking, the score tile of the
// fused side search) shared by topk_rows.cpp (topk_rows, side_topk) and tucker_search.cpp.
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
// 8 (0 is below every packed value since indices are < 2^31; a pad's rank is c >= k). The loop over
// the c comparands is innermost, with the ranks of up to 4 x 8 survivors held in registers (4
// independent add chains); the other order kept every rank vector in memory, one store-to-load
// round trip per compare.
template <int U>
LABCORE_AVX512 inline void rank_group512(const uint64_t* cand, int64_t c, int64_t v0, int64_t* r) {
  const __m512i one = _mm512_set1_epi64(1);
  __m512i cv[U], rank[U];
  for (int u = 0; u < U; ++u) {
    cv[u] = _mm512_loadu_si512(cand + 8 * (v0 + u));
    rank[u] = _mm512_setzero_si512();
  }
  for (int64_t j = 0; j < c; ++j) {
    const __m512i b = _mm512_set1_epi64(int64_t(cand[j]));
    for (int u = 0; u < U; ++u)
      rank[u] = _mm512_mask_add_epi64(rank[u], _mm512_cmpgt_epu64_mask(b, cv[u]), rank[u], one);
  }
  for (int u = 0; u < U; ++u) _mm512_storeu_si512(r + 8 * (v0 + u), rank[u]);
}

LABCORE_AVX512 void finish_rank512(uint64_t* cand, int64_t c, int64_t k, const float* row, float* out_v,
                                   int64_t* out_i) {
  const int64_t vecs = (c + 7) / 8;
  for (int64_t j = c; j < vecs * 8; ++j) cand[j] = 0;
  alignas(64) int64_t r[kRankMax];
  int64_t v = 0;
  for (; v + 4 <= vecs; v += 4) rank_group512<4>(cand, c, v, r);
  switch (vecs - v) {
    case 3: rank_group512<3>(cand, c, v, r); break;
    case 2: rank_group512<2>(cand, c, v, r); break;
    case 1: rank_group512<1>(cand, c, v, r); break;
    default: break;
  }
  // ranks are a permutation of 0..c-1: invert it (no data-dependent branch), then read the first k
  alignas(64) int32_t by_rank[kRankMax];
  for (int64_t j = 0; j < c; ++j) by_rank[r[j]] = int32_t(j);
  for (int64_t t = 0; t < k; ++t) {
    const int64_t i = unpack_index(cand[by_rank[t]]);
    out_i[t] = i;
    out_v[t] = row[i];
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
    // compress in a register, then a plain store (buffers have 16 slack); no branch on m, whose
    // outcome is close to random (about 1.3k survivors spread over n/16 vectors)
    _mm512_storeu_si512(kb + c, _mm512_maskz_compress_epi32(m, key));
    _mm512_storeu_si512(ib + c, _mm512_maskz_compress_epi32(m, iv));
    c += __builtin_popcount(unsigned(m));
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

// isa: -1 = best available, 0 = portable, 1 = AVX-512 (an error when the CPU lacks it). Whether a
// kernel ``fn`` runs its AVX-512 code.
inline bool use_avx512(const char* fn, int64_t isa) {
  TORCH_CHECK(isa >= -1 && isa <= 1, fn, ": isa=", isa, " must be -1 (auto), 0 or 1");
  const bool has512 = cpu_has_avx512();
  TORCH_CHECK(isa != 1 || has512, fn, ": isa=1 (AVX-512) requested but the CPU lacks it");
  return isa == 1 || (isa == -1 && has512);
}

// One row's top-k with the chosen implementation (use512 only when cpu_has_avx512()).
inline void row_topk(const float* row, int64_t n, int64_t k, bool sorted, float* out_v, int64_t* out_i,
                     Scratch& s, bool use512) {
#ifdef LABCORE_X86
  if (use512) {
    row_avx512(row, n, k, sorted, out_v, out_i, s);
    return;
  }
#endif
  (void)use512;
  row_portable(row, n, k, sorted, out_v, out_i, s);
}

}  // namespace
