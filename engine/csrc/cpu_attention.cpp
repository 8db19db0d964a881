// CPU fast path for paged attention over a flattened batch: one fused loop per (query row, kv head)
// reads the keys and values straight from the paged cache (no gathered copy), scores in float32,
// softmax, weighted sum. The plain-torch reference is loraplex/engine/attention.py:paged_attention;
// tests/engine/test_cpu_kernels.py checks this against it. Built once per machine by
// loraplex/engine/cpu_kernels.py (torch.utils.cpp_extension), registered as torch.ops.loraplex_cpu.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
// One (query row, kv head) item with head_dim D known at compile time: the query heads of the group
// one at a time, so every accumulator lives in registers.
template <int D, typename T>
void attend_item_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n,
                        int64_t group, int64_t kv_stride, float scale, float* scores, T* out) {
  constexpr int C = D / 16;
  for (int64_t g = 0; g < group; ++g) {
    __m512 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = lpx::load(q + g * D + 16 * c);
    float* sg = scores + g * n;
    for (int64_t j = 0; j < n; ++j) {
      const T* k = k_cache + slots[j] * kv_stride;
      __m512 s = _mm512_mul_ps(qv[0], lpx::load(k));
      for (int c = 1; c < C; ++c) s = _mm512_fmadd_ps(qv[c], lpx::load(k + 16 * c), s);
      sg[j] = _mm512_reduce_add_ps(s) * scale;
    }
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sg + j));
    float mx = _mm512_reduce_max_ps(m);
    for (; j < n; ++j) mx = std::max(mx, sg[j]);
    const __m512 mv = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
      const __m512 e = lpx::exp(_mm512_sub_ps(_mm512_loadu_ps(sg + j), mv));
      _mm512_storeu_ps(sg + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (j < n) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 e = lpx::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), mv));
      _mm512_mask_storeu_ps(sg + j, tail, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum);
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (j = 0; j < n; ++j) {
      const T* v = v_cache + slots[j] * kv_stride;
      const __m512 p = _mm512_set1_ps(sg[j]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(p, lpx::load(v + 16 * c), acc[c]);
    }
    alignas(64) float res[D];
    for (int c = 0; c < C; ++c) _mm512_store_ps(res + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
    from_float(res, out + g * D, D);
  }
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
#if defined(LORAPLEX_AVX512)
      if (head_dim == 64 || head_dim == 128) {
        const T* qh = q + (t * num_heads + h * group) * head_dim;
        T* oh = out + (t * num_heads + h * group) * head_dim;
        const T* kh = k_cache + h * head_dim;
        const T* vh = v_cache + h * head_dim;
        if (head_dim == 64) {
          attend_item_avx512<64>(qh, kh, vh, slots + first, n, group, num_kv_heads * head_dim, scale, scores.data(), oh);
        } else {
          attend_item_avx512<128>(qh, kh, vh, slots + first, n, group, num_kv_heads * head_dim, scale, scores.data(), oh);
        }
        continue;
      }
#endif
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

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slot_table, const at::Tensor& row_index, const at::Tensor& row_len,
                           int64_t window, double scale) {
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
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2), KVH = k_cache.size(1), W = table.size(1);
  if (T == 0) return out;
  TORCH_CHECK(lens.max().item<int64_t>() <= W, "paged_attention: row_len exceeds the slot table width");
  const float s = static_cast<float>(scale);
  if (qc.scalar_type() == at::kFloat) {
    paged_attention_impl<float>(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                table.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                                out.data_ptr<float>(), T, H, KVH, D, W, window, s);
  } else if (qc.scalar_type() == at::kBFloat16) {
    paged_attention_impl<c10::BFloat16>(
        qc.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(),
        table.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
        out.data_ptr<c10::BFloat16>(), T, H, KVH, D, W, window, s);
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16 expected, got ", qc.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(loraplex_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slot_table, Tensor row_index, "
        "Tensor row_len, int window, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, &paged_attention);
}
