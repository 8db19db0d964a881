// CPU fast path for paged attention over a flattened batch: optionally writes the step's keys and
// values into the paged cache, then one fused loop per (query row, kv head, up to 256 of the row's keys; a longer
// row's parts are merged after) reads keys and values straight from the cache (no gathered copy), scores in
// float32, softmax, weighted sum. The plain-torch reference is loraplex/engine/layers/attention.py:paged_attention;
// tests/engine/test_cpu_kernels.py checks this against it. Built once per machine by
// loraplex/engine/kernels/cpu_kernels.py (torch.utils.cpp_extension), registered as torch.ops.loraplex_cpu.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_layer_parts.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;  // exact widening
}

inline void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);  // round to nearest even, as .to(bfloat16)
}

#if defined(LORAPLEX_AVX512)
// scores[0..n) <- exp(scores - max), in place; *max <- the max; returns the sum
inline float softmax_unnormalised(float* sg, int64_t n, float* max) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, lpx::tail_mask(n - j), sg + j));
  *max = _mm512_reduce_max_ps(m);
  const __m512 mv = _mm512_set1_ps(*max);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 tail = lpx::tail_mask(n - j);
    const __m512 e = lpx::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), mv));
    _mm512_mask_storeu_ps(sg + j, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  return _mm512_reduce_add_ps(sum);
}

template <int D, typename T>
inline void store_scaled(const __m512* acc, float inv, T* out) {
  const __m512 iv = _mm512_set1_ps(inv);
  for (int c = 0; c < D / 16; ++c) lpx::store(out + 16 * c, _mm512_mul_ps(acc[c], iv));
}

constexpr int64_t PREFETCH_AHEAD = 6;  // tokens: hides the jump to the next paged block

// One (query row, kv head) item, head_dim D and the G query heads sharing the kv head known at compile
// time: each key/value row is loaded once for all G heads, every accumulator lives in registers, and
// rows a few tokens ahead are prefetched (consecutive tokens sit in different blocks every block_size).
template <int D, int G, typename T>
void attend_item_grouped(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n,
                         int64_t kv_stride, float scale, float* scores, T* out, float* parts, int64_t part_stride) {
  constexpr int C = D / 16;
  __m512 qv[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = lpx::load(q + g * D + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    if (j + PREFETCH_AHEAD < n) {
      const char* kp = reinterpret_cast<const char*>(k_cache + slots[j + PREFETCH_AHEAD] * kv_stride);
      const char* vp = reinterpret_cast<const char*>(v_cache + slots[j + PREFETCH_AHEAD] * kv_stride);
      for (int64_t b = 0; b < static_cast<int64_t>(D * sizeof(T)); b += 64) {
        _mm_prefetch(kp + b, _MM_HINT_T0);
        _mm_prefetch(vp + b, _MM_HINT_T1);
      }
    }
    const T* k = k_cache + slots[j] * kv_stride;
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = lpx::load(k + 16 * c);
    for (int g = 0; g < G; ++g) {
      __m512 s = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int c = 1; c < C; ++c) s = _mm512_fmadd_ps(qv[g][c], kv[c], s);
      scores[g * n + j] = _mm512_reduce_add_ps(s) * scale;
    }
  }
  float sum[G], max[G];
  for (int g = 0; g < G; ++g) sum[g] = softmax_unnormalised(scores + g * n, n, max + g);
  __m512 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* v = v_cache + slots[j] * kv_stride;
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = lpx::load(v + 16 * c);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * n + j]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) {
    if (parts == nullptr) {
      store_scaled<D>(acc[g], 1.f / sum[g], out + g * D);
      continue;
    }
    float* p = parts + g * part_stride;  // one chunk of a split row: (max, sum, acc) for split_softmax
    p[0] = max[g];
    p[1] = sum[g];
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(p + 2 + 16 * c, acc[g][c]);
  }
}

// Any group size: the query heads one at a time. parts: null (out gets the output) or where this chunk's
// (max, sum, acc) go, part_stride floats per query head.
template <int D, typename T>
void attend_item_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n,
                        int64_t group, int64_t kv_stride, float scale, float* scores, T* out, float* parts,
                        int64_t part_stride) {
  const auto grouped = [&](auto g) {  // g: the group size as a type (std::integral_constant)
    attend_item_grouped<D, decltype(g)::value>(q, k_cache, v_cache, slots, n, kv_stride, scale, scores, out, parts,
                                                part_stride);
  };
  switch (group) {
    case 1: return grouped(std::integral_constant<int, 1>{});
    case 2: return grouped(std::integral_constant<int, 2>{});
    case 3: return grouped(std::integral_constant<int, 3>{});
    case 4: return grouped(std::integral_constant<int, 4>{});
    default: break;
  }
  for (int64_t g = 0; g < group; ++g)
    attend_item_grouped<D, 1>(q + g * D, k_cache, v_cache, slots, n, kv_stride, scale, scores, out + g * D,
                              parts == nullptr ? nullptr : parts + g * part_stride, part_stride);
}

#elif defined(LORAPLEX_AVX2)
// The same item on AVX2's 16 ymm registers: scores with the key row held (D / 8 vectors) and the query heads read
// from L1; then the weighted sum of values two 8-float columns at a time for up to 4 query heads (8 accumulators),
// each value row read again per column pair from L1/L2 (an item has at most SPLIT_KEYS keys). parts as
// attend_item_avx512's.
template <int D, typename T>
void attend_item_avx2(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n,
                      int64_t group, int64_t kv_stride, float scale, float* scores, T* out, float* parts,
                      int64_t part_stride) {
  constexpr int C = D / 8;
  static_assert(C % 2 == 0, "attend_item_avx2: head_dim a multiple of 16");
  thread_local std::vector<float> head_buffer;  // the query heads in float32, then each head's max and sum
  std::vector<float>& qf = head_buffer;
  qf.resize(group * (D + 2));
  to_float(q, qf.data(), group * D);
  float* max = qf.data() + group * D;
  float* sum = max + group;
  for (int64_t j = 0; j < n; ++j) {
    const T* k = k_cache + slots[j] * kv_stride;
    __m256 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = lpx::load8(k + 8 * c);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf.data() + g * D;
      __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(qg), kv[0]), s1 = _mm256_mul_ps(_mm256_loadu_ps(qg + 8), kv[1]);
      for (int c = 2; c < C; c += 2) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), kv[c], s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c + 8), kv[c + 1], s1);
      }
      scores[g * n + j] = lpx::hsum8(_mm256_add_ps(s0, s1)) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // scores <- exp(score - max) in place
    float* sg = scores + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, sg[j]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = lpx::exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), mv));
      _mm256_storeu_ps(sg + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    float total = lpx::hsum8(acc);
    if (j < n) {  // the tail through the same exp
      float tail[8] = {};
      for (int64_t l = 0; j + l < n; ++l) tail[l] = sg[j + l] - m;
      _mm256_storeu_ps(tail, lpx::exp8(_mm256_loadu_ps(tail)));
      for (int64_t l = 0; j + l < n; ++l) {
        sg[j + l] = tail[l];
        total += tail[l];
      }
    }
    max[g] = m;
    sum[g] = total;
  }
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const int64_t gs = std::min<int64_t>(4, group - g0);
    for (int c = 0; c < C; c += 2) {  // columns 8c .. 8c + 15 of heads g0 .. g0 + gs - 1
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const T* v = v_cache + slots[j] * kv_stride + 8 * c;
        const __m256 v0 = lpx::load8(v), v1 = lpx::load8(v + 8);
        for (int64_t g = 0; g < gs; ++g) {
          const __m256 p = _mm256_set1_ps(scores[(g0 + g) * n + j]);
          acc[2 * g] = _mm256_fmadd_ps(p, v0, acc[2 * g]);
          acc[2 * g + 1] = _mm256_fmadd_ps(p, v1, acc[2 * g + 1]);
        }
      }
      for (int64_t g = 0; g < gs; ++g) {
        float cols[16];
        _mm256_storeu_ps(cols, acc[2 * g]);
        _mm256_storeu_ps(cols + 8, acc[2 * g + 1]);
        if (parts == nullptr) {
          const float inv = 1.f / sum[g0 + g];
          for (int l = 0; l < 16; ++l) cols[l] *= inv;
          from_float(cols, out + (g0 + g) * D + 8 * c, 16);
        } else {  // one chunk of a split row: (max, sum, acc) for split_softmax
          float* pp = parts + (g0 + g) * part_stride;
          pp[0] = max[g0 + g];
          pp[1] = sum[g0 + g];
          std::memcpy(pp + 2 + 8 * c, cols, sizeof(cols));
        }
      }
    }
  }
}
#endif

#if defined(LORAPLEX_AVX512) || defined(LORAPLEX_AVX2)
// A row split into chunks: one query head's output from each chunk's (max, sum, acc), in chunk order:
// out = sum_c exp(m_c - m) acc_c / sum_c exp(m_c - m) s_c, m the largest m_c.
template <int D, typename T>
void split_softmax(const float* parts, int64_t chunks, int64_t part_stride, T* out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < chunks; ++c) m = std::max(m, parts[c * part_stride]);
  float acc[D] = {};
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* p = parts + c * part_stride;
    const float w = std::exp(p[0] - m);
    s += w * p[1];
    for (int64_t d = 0; d < D; ++d) acc[d] += w * p[2 + d];
  }
  const float inv = 1.f / s;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inv);
}

constexpr int64_t SPLIT_KEYS = 256;  // keys per work item: a longer row is split, its parts merged (split_softmax)
constexpr int64_t SPLIT_MIN = 64;    // a row of SPLIT_MIN to SPLIT_KEYS keys: two halves

// Keys per chunk of a row of n keys (n > 0): SPLIT_KEYS, or half the row (rounded up) for a row of SPLIT_MIN to
// SPLIT_KEYS keys, so that a short row's work still spreads over two threads.
inline int64_t chunk_keys(int64_t n) { return n >= SPLIT_MIN && n <= SPLIT_KEYS ? (n + 1) / 2 : SPLIT_KEYS; }
inline int64_t row_chunks(int64_t n) { return n > 0 ? (n + chunk_keys(n) - 1) / chunk_keys(n) : 0; }

// The vectorised path (head_dim 64 or 128): one work item per (query row, kv head, chunk of the row's keys), so a
// row's keys spread over the threads instead of its few kv heads leaving one idle (at one row and three kv heads,
// one thread took two of the three items: on a short chat context, a third of the step's attention on one thread
// alone). A row of one chunk (under SPLIT_MIN keys) gets its output from its item; longer rows keep each chunk's
// (max, sum, acc) and merge them in chunk order. How a row is split depends on its own length only: its output is
// the same whatever else is in the batch and however many threads run it.
template <int D, typename T>
void paged_attention_split(const T* q, const T* k_cache, const T* v_cache, const int64_t* slot_table,
                           const int64_t* row_index, const int64_t* row_len, T* out, int64_t num_rows,
                           int64_t num_heads, int64_t num_kv_heads, int64_t table_width, int64_t window,
                           float scale) {
  const int64_t group = num_heads / num_kv_heads, part = D + 2;
  struct Item {
    int64_t t, h, c;
  };
  // the calling thread's buffers, grown and kept: a long prefill chunk's rows make thousands of items and parts
  // (2048 rows: ~11 MB of parts), and fresh memory each call would be paid in page faults
  // (bound to references here: inside the parallel region the names would mean each worker thread's own)
  thread_local std::vector<Item> items_buffer;
  thread_local std::vector<int64_t> first_part_buffer;
  thread_local std::vector<float> parts_buffer;
  std::vector<Item>& items = items_buffer;
  std::vector<int64_t>& first_part = first_part_buffer;  // a split row's first chunk in parts (-1: one chunk or none)
  std::vector<float>& parts = parts_buffer;              // [split chunk, query head, (max, sum, acc[D])]
  items.clear();
  first_part.assign(num_rows, -1);
  int64_t num_parts = 0;
  for (int64_t t = 0; t < num_rows; ++t) {
    const int64_t len = row_len[t], first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    const int64_t chunks = row_chunks(len - first);
    if (chunks <= 0) {  // a row the caller computes another way
      std::fill(out + t * num_heads * D, out + (t + 1) * num_heads * D, T(0.f));
      continue;
    }
    if (chunks > 1) {
      first_part[t] = num_parts;
      num_parts += chunks;
    }
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t c = 0; c < chunks; ++c) items.push_back({t, h, c});
  }
  if (static_cast<int64_t>(parts.size()) < num_parts * num_heads * part) parts.resize(num_parts * num_heads * part);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * SPLIT_KEYS);
    for (int64_t i = begin; i < end; ++i) {
      const Item it = items[i];
      const int64_t len = row_len[it.t], first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t ck = chunk_keys(len - first), start = first + it.c * ck, n = std::min(ck, len - start);
      const int64_t head0 = it.t * num_heads + it.h * group;  // the item's first query head
      float* p = first_part[it.t] < 0 ? nullptr
                                      : parts.data() + ((first_part[it.t] + it.c) * num_heads + it.h * group) * part;
#if defined(LORAPLEX_AVX512)
      attend_item_avx512<D>(q + head0 * D, k_cache + it.h * D, v_cache + it.h * D,
                            slot_table + row_index[it.t] * table_width + start, n, group, num_kv_heads * D, scale,
                            scores.data(), out + head0 * D, p, part);
#else
      attend_item_avx2<D>(q + head0 * D, k_cache + it.h * D, v_cache + it.h * D,
                          slot_table + row_index[it.t] * table_width + start, n, group, num_kv_heads * D, scale,
                          scores.data(), out + head0 * D, p, part);
#endif
    }
  });
  if (num_parts == 0) return;
  at::parallel_for(0, num_rows * num_heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / num_heads;
      if (first_part[t] < 0) continue;
      const int64_t len = row_len[t], first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      split_softmax<D, T>(parts.data() + (first_part[t] * num_heads + i % num_heads) * part, row_chunks(len - first),
                          num_heads * part, out + i * D);
    }
  });
}
#endif

// q [T, H, D]; caches [S, KVH, D]; slot_table [R, W]: row r's kv slots in token order; row_index [T]:
// each query row's table row; row_len [T]: how many of that row's tokens it sees (causal), of which
// the last `window` (window > 0) only; a row with row_len 0 gets zeros. out [T, H, D].
template <typename T>
void paged_attention_impl(const T* q, const T* k_cache, const T* v_cache, const int64_t* slot_table,
                          const int64_t* row_index, const int64_t* row_len, T* out, int64_t num_rows,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t table_width,
                          int64_t window, float scale) {
#if defined(LORAPLEX_AVX512) || defined(LORAPLEX_AVX2)
  if (head_dim == 64)
    return paged_attention_split<64, T>(q, k_cache, v_cache, slot_table, row_index, row_len, out, num_rows,
                                        num_heads, num_kv_heads, table_width, window, scale);
  if (head_dim == 128)
    return paged_attention_split<128, T>(q, k_cache, v_cache, slot_table, row_index, row_len, out, num_rows,
                                         num_heads, num_kv_heads, table_width, window, scale);
#endif
  // any head_dim, any CPU: one item per (query row, kv head), loops the compiler vectorises
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, num_rows * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), row(head_dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t len = row_len[t];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t* slots = slot_table + row_index[t] * table_width;
      const int64_t n = len - first;
      if (n <= 0) {  // a row the caller computes another way
        std::fill(out + t * num_heads * head_dim + h * group * head_dim,
                  out + t * num_heads * head_dim + (h + 1) * group * head_dim, T(0.f));
        continue;
      }
      scores.resize(group * n);
      to_float(q + (t * num_heads + h * group) * head_dim, qf.data(), group * head_dim);
      // scores[g, j] = scale * q_g . k_j
      for (int64_t j = 0; j < n; ++j) {
        to_float(k_cache + (slots[first + j] * num_kv_heads + h) * head_dim, row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < head_dim; ++d) s += qg[d] * row[d];
          scores[g * n + j] = s * scale;
        }
      }
      // softmax per query head, in float32
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) m = std::max(m, sg[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          sg[j] = std::exp(sg[j] - m);
          sum += sg[j];
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
      }
      // out_g = sum_j p[g, j] v_j
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        to_float(v_cache + (slots[first + j] * num_kv_heads + h) * head_dim, row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + j];
          float* ag = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * row[d];
        }
      }
      from_float(acc.data(), out + (t * num_heads + h * group) * head_dim, group * head_dim);
    }
  });
}

// cache rows [slot] <- new [t] (the step's keys or values), rows of num_kv_heads * head_dim elements
template <typename T>
void write_rows(T* cache, const T* rows, int64_t row_stride, const int64_t* slots, int64_t n, int64_t width) {
  for (int64_t t = 0; t < n; ++t) std::memcpy(cache + slots[t] * width, rows + t * row_stride, width * sizeof(T));
}

void check_slots(const at::Tensor& slots, int64_t num_slots, const char* what) {
  const int64_t* p = slots.data_ptr<int64_t>();
  for (int64_t i = 0, n = slots.numel(); i < n; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < num_slots, "paged_attention: ", what, " slot ", p[i], " out of range");
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slot_table, const at::Tensor& row_index, const at::Tensor& row_len,
                           int64_t window, double scale, const c10::optional<at::Tensor>& k_new,
                           const c10::optional<at::Tensor>& v_new, const c10::optional<at::Tensor>& slot_mapping) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "paged_attention: q [T, H, D] and caches [S, KVH, D] expected");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_attention: q and the caches must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(1) == 0, "paged_attention: head shapes");
  TORCH_CHECK(slot_table.scalar_type() == at::kLong && row_index.scalar_type() == at::kLong &&
                  row_len.scalar_type() == at::kLong && slot_table.dim() == 2,
              "paged_attention: int64 slot_table [R, W], row_index [T], row_len [T] expected");
  TORCH_CHECK(row_index.numel() == q.size(0) && row_len.numel() == q.size(0), "paged_attention: one row per query");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: contiguous caches expected");
  auto qc = q.contiguous();
  auto table = slot_table.contiguous();
  auto idx = row_index.contiguous();
  auto lens = row_len.contiguous();
  auto out = at::empty_like(qc);
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2), S = k_cache.size(0), KVH = k_cache.size(1),
                W = table.size(1), R = table.size(0);
  const bool write = k_new.has_value();
  if (write) {  // this step's keys and values go into the cache first (write_kv)
    TORCH_CHECK(v_new.has_value() && slot_mapping.has_value(), "paged_attention: k_new, v_new and slot_mapping together");
    for (const at::Tensor* t : {&*k_new, &*v_new}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == T && t->size(1) == KVH && t->size(2) == D &&
                      t->scalar_type() == k_cache.scalar_type() && t->stride(2) == 1 && t->stride(1) == D,
                  "paged_attention: k_new / v_new [T, KVH, D] in the cache dtype, rows contiguous");
    }
    TORCH_CHECK(slot_mapping->scalar_type() == at::kLong && slot_mapping->numel() == T && slot_mapping->is_contiguous(),
                "paged_attention: slot_mapping [T] int64");
    check_slots(*slot_mapping, S, "write");
  }
  check_slots(table, S, "read");
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(lp[t] >= 0 && lp[t] <= W, "paged_attention: row_len ", lp[t], " exceeds the slot table width ", W);
    TORCH_CHECK(ip[t] >= 0 && ip[t] < R, "paged_attention: row_index out of range");
  }
  const float s = static_cast<float>(scale);
  const int64_t* slots = write ? slot_mapping->data_ptr<int64_t>() : nullptr;
  auto run = [&](auto* type) {
    using E = std::remove_pointer_t<decltype(type)>;
    lpx_parts::paged_attention<E>(qc.data_ptr<E>(), k_cache.data_ptr<E>(), v_cache.data_ptr<E>(),
                                  table.data_ptr<int64_t>(), ip, lp, out.data_ptr<E>(), T, H, KVH, D, W, window, s,
                                  write ? k_new->data_ptr<E>() : nullptr, write ? k_new->stride(0) : 0,
                                  write ? v_new->data_ptr<E>() : nullptr, write ? v_new->stride(0) : 0, slots);
  };
  if (qc.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else if (qc.scalar_type() == at::kBFloat16) {
    run(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16 expected, got ", qc.scalar_type());
  }
  return out;
}

}  // namespace

namespace lpx_parts {

template <typename T>
void paged_attention(const T* q, T* k_cache, T* v_cache, const int64_t* slot_table, const int64_t* row_index,
                     const int64_t* row_len, T* out, int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim, int64_t table_width, int64_t window, float scale, const T* k_new,
                     int64_t k_stride, const T* v_new, int64_t v_stride, const int64_t* slot_mapping) {
  if (k_new != nullptr) {
    write_rows(k_cache, k_new, k_stride, slot_mapping, num_rows, num_kv_heads * head_dim);
    write_rows(v_cache, v_new, v_stride, slot_mapping, num_rows, num_kv_heads * head_dim);
  }
  paged_attention_impl<T>(q, k_cache, v_cache, slot_table, row_index, row_len, out, num_rows, num_heads, num_kv_heads,
                          head_dim, table_width, window, scale);
}
#define LPX_ATTENTION(T)                                                                                            \
  template void paged_attention<T>(const T*, T*, T*, const int64_t*, const int64_t*, const int64_t*, T*, int64_t,   \
                                   int64_t, int64_t, int64_t, int64_t, int64_t, float, const T*, int64_t, const T*, \
                                   int64_t, const int64_t*);
LPX_ATTENTION(float)
LPX_ATTENTION(c10::BFloat16)
#undef LPX_ATTENTION

}  // namespace lpx_parts

TORCH_LIBRARY(loraplex_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_table, Tensor row_index, "
        "Tensor row_len, int window, float scale, Tensor? k_new=None, Tensor? v_new=None, "
        "Tensor? slot_mapping=None) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, &paged_attention);
}
