// CPU backward of causal self-attention over packed sequences (training): sequence b owns rows
// [cu_seqlens[b], cu_seqlens[b+1]) of q [N, H, D], k and v [N, KVH, D], starts at position 0 and attends
// only to its own earlier rows (the last `window` of them with a sliding window). The forward is the paged
// kernel (cpu_attention.cpp) reading k/v as its cache; this recomputes each row's softmax instead of
// storing it. One task per (sequence, query head) owns that head's dq rows and float32 partial dk/dv for
// the sequence, so nothing races; the query heads sharing a kv head are summed at the end (GQA).
// Per query row i:  p = softmax(scale q_i K^T),  dp_j = do_i . v_j,  delta = sum_j p_j dp_j (= do_i . o_i),
//   ds_j = scale p_j (dp_j - delta),  dq_i = sum_j ds_j k_j,  dk_j += ds_j q_i,  dv_j += p_j do_i.
// The plain-torch reference is autograd through scaled_dot_product_attention per sequence
// (loraplex/engine/layers/attention.py:packed_attention_reference); tests/engine/test_cpu_kernels.py compares them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lpx::f32(src[i]);
}

// p[0..n) <- exp(p - max(p)) / sum, in place
inline void softmax_(float* p, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j]);
  float sum = 0.f;
#if defined(LORAPLEX_AVX512)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 tail = lpx::tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(tail, lpx::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + j), mv)));
    _mm512_mask_storeu_ps(p + j, tail, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#else
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
#endif
  const float inv = 1.f / sum;  // sum >= 1: the max term is exp(0)
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
}

template <int64_t DF>
inline float dot(const float* a, const float* b, int64_t d_runtime) {
  const int64_t D = DF > 0 ? DF : d_runtime;
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <int64_t DF>
inline void axpy(float alpha, const float* x, float* y, int64_t d_runtime) {
  const int64_t D = DF > 0 ? DF : d_runtime;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += alpha * x[d];
}

// One (sequence, query head) task, the plain loops (DF: head_dim known at compile time, or 0). kf, vf: the
// sequence's keys/values of this head's kv head, float32 [len, D]; dk, dv: float32 [len, D] accumulators
// (zeroed by the caller); p, dp: scratch [len].
template <int64_t DF, typename T>
void backward_task(const T* q, const T* dout, T* dq, int64_t row_stride, const float* kf, const float* vf,
                   float* dk, float* dv, float* qi, float* doi, float* dqi, float* p, float* dp, int64_t len,
                   int64_t d_runtime, int64_t window, float scale) {
  const int64_t D = DF > 0 ? DF : d_runtime;
  for (int64_t i = 0; i < len; ++i) {
    widen(q + i * row_stride, qi, D);
    widen(dout + i * row_stride, doi, D);
    const int64_t lo = window > 0 ? std::max<int64_t>(0, i + 1 - window) : 0, n = i + 1 - lo;
    const float* kj = kf + lo * D;
    const float* vj = vf + lo * D;
    for (int64_t j = 0; j < n; ++j) p[j] = dot<DF>(qi, kj + j * D, D) * scale;
    softmax_(p, n);
    float delta = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      dp[j] = dot<DF>(doi, vj + j * D, D);
      delta += p[j] * dp[j];
    }
    std::fill(dqi, dqi + D, 0.f);
    float* dkj = dk + lo * D;
    float* dvj = dv + lo * D;
    for (int64_t j = 0; j < n; ++j) {
      const float ds = scale * p[j] * (dp[j] - delta);
      axpy<DF>(ds, kj + j * D, dqi, D);
      axpy<DF>(ds, qi, dkj + j * D, D);
      axpy<DF>(p[j], doi, dvj + j * D, D);
    }
    T* out = dq + i * row_stride;
    for (int64_t d = 0; d < D; ++d) out[d] = lpx::cast<T>(dqi[d]);
  }
}

#if defined(LORAPLEX_AVX512)
// The same task blocked for AVX-512 (D = 16 * C): BR query rows at a time, so every key/value row loaded
// serves BR rows. Scores and dp for a 16-key tile come from transposed float32 keys/values (kt, vt [D][ld]:
// a broadcast query element times 16 keys, no horizontal sums); dq, dk and dv then run over the block's
// key range in row layout (kf [len][D]) with their accumulators in registers.
constexpr int64_t BR = 16;

// out[r][0..16) = sum_d a[r][d] * bt[d][0..16) for the BR rows of a [BR][D]; bt rows `ld` apart
template <int64_t D>
inline void tile_scores(const float* a, const float* bt, int64_t ld, float* out, int64_t ld_out) {
  __m512 acc[BR];
  for (int64_t r = 0; r < BR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 b = _mm512_loadu_ps(bt + d * ld);
    for (int64_t r = 0; r < BR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * D + d]), b, acc[r]);
  }
  for (int64_t r = 0; r < BR; ++r) _mm512_storeu_ps(out + r * ld_out, acc[r]);
}

template <int C, typename T>
void backward_task_blocked(const T* q, const T* dout, T* dq, int64_t row_stride, const float* kt, const float* vt,
                           int64_t ld, const float* kf, float* dk, float* dv, float* qb, float* dob, float* s,
                           float* dp, int64_t len, int64_t window, float scale) {
  constexpr int64_t D = 16 * C;
  for (int64_t i0 = 0; i0 < len; i0 += BR) {
    const int64_t nr = std::min(BR, len - i0), hi = i0 + nr;  // keys [lo, hi) cover every row of the block
    const int64_t lo = window > 0 ? std::max<int64_t>(0, i0 + 1 - window) : 0;
    const int64_t t0 = lo / 16 * 16;  // first 16-key tile; s and dp rows are indexed from t0
    for (int64_t r = 0; r < BR; ++r) {
      if (r < nr) {
        widen(q + (i0 + r) * row_stride, qb + r * D, D);
        widen(dout + (i0 + r) * row_stride, dob + r * D, D);
      } else {  // rows past the end: zeros, so they add nothing
        std::fill(qb + r * D, qb + (r + 1) * D, 0.f);
        std::fill(dob + r * D, dob + (r + 1) * D, 0.f);
      }
    }
    for (int64_t jt = t0; jt < hi; jt += 16) {  // s = q K^T and dp = do V^T, 16 keys x BR rows per tile
      tile_scores<D>(qb, kt + jt, ld, s + (jt - t0), ld);
      tile_scores<D>(dob, vt + jt, ld, dp + (jt - t0), ld);
    }
    const int64_t width = hi - t0;
    for (int64_t r = 0; r < nr; ++r) {  // p and ds = scale p (dp - delta) over the row's own keys, zero elsewhere
      const int64_t i = i0 + r, first = (window > 0 ? std::max<int64_t>(0, i + 1 - window) : 0) - t0;
      float* sr = s + r * ld;
      float* dr = dp + r * ld;
      const int64_t n = i + 1 - t0 - first;
      for (int64_t j = first; j < first + n; ++j) sr[j] *= scale;
      softmax_(sr + first, n);
      float delta = 0.f;
      for (int64_t j = first; j < first + n; ++j) delta += sr[j] * dr[j];
      for (int64_t j = 0; j < width; ++j) {
        const bool in = j >= first && j < first + n;
        if (!in) sr[j] = 0.f;
        dr[j] = in ? scale * sr[j] * (dr[j] - delta) : 0.f;
      }
    }
    for (int64_t r = nr; r < BR; ++r) {
      std::fill(s + r * ld, s + r * ld + width, 0.f);
      std::fill(dp + r * ld, dp + r * ld + width, 0.f);
    }
    // dq rows = ds K: RQ rows at a time keep RQ * C accumulators (16 registers)
    constexpr int64_t RQ = 16 / C > 0 ? 16 / C : 1;
    for (int64_t r0 = 0; r0 < nr; r0 += RQ) {
      __m512 acc[RQ][C];
      for (int64_t r = 0; r < RQ; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t j = lo; j < hi; ++j) {
        __m512 kv[C];
        for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_ps(kf + j * D + 16 * c);
        for (int64_t r = 0; r < RQ && r0 + r < nr; ++r) {
          const __m512 w = _mm512_set1_ps(dp[(r0 + r) * ld + (j - t0)]);
          for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(w, kv[c], acc[r][c]);
        }
      }
      for (int64_t r = 0; r < RQ && r0 + r < nr; ++r)
        for (int c = 0; c < C; ++c) lpx::store(dq + (i0 + r0 + r) * row_stride + 16 * c, acc[r][c]);
    }
    // dk_j += sum_r ds[r, j] q_r and dv_j += sum_r p[r, j] do_r: each key row loaded and stored once per block
    for (int64_t j = lo; j < hi; ++j) {
      __m512 ak[C], av[C];
      for (int c = 0; c < C; ++c) {
        ak[c] = _mm512_loadu_ps(dk + j * D + 16 * c);
        av[c] = _mm512_loadu_ps(dv + j * D + 16 * c);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const __m512 w = _mm512_set1_ps(dp[r * ld + (j - t0)]), pw = _mm512_set1_ps(s[r * ld + (j - t0)]);
        for (int c = 0; c < C; ++c) {
          ak[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(qb + r * D + 16 * c), ak[c]);
          av[c] = _mm512_fmadd_ps(pw, _mm512_loadu_ps(dob + r * D + 16 * c), av[c]);
        }
      }
      for (int c = 0; c < C; ++c) {
        _mm512_storeu_ps(dk + j * D + 16 * c, ak[c]);
        _mm512_storeu_ps(dv + j * D + 16 * c, av[c]);
      }
    }
  }
}
#endif

template <typename T>
void packed_backward_impl(const T* q, const T* k, const T* v, const T* dout, const int64_t* cu, int64_t num_seqs,
                          T* dq, float* dk_heads, float* dv_heads, int64_t H, int64_t KVH, int64_t D,
                          int64_t window, float scale) {
  const int64_t group = H / KVH;
  at::parallel_for(0, num_seqs * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf, vf, dk, dv, p, dp, qi(D), doi(D), dqi(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, kvh = h / group;
      const int64_t s0 = cu[b], len = cu[b + 1] - s0;
      if (len <= 0) continue;
      kf.resize(len * D);
      dk.assign(len * D, 0.f);
      dv.assign(len * D, 0.f);
      for (int64_t j = 0; j < len; ++j) widen(k + ((s0 + j) * KVH + kvh) * D, kf.data() + j * D, D);
      const int64_t off = (s0 * H + h) * D;
#if defined(LORAPLEX_AVX512)
      if (D == 64 || D == 128) {
        int64_t ld = (len + 15) / 16 * 16;  // transposed rows padded to whole 16-key tiles (zeros)
        if (ld % 1024 == 0) ld += 16;  // rows 4 KiB apart would share cache sets
        vf.assign(2 * D * ld, 0.f);  // kt then vt, [D][ld] each
        float* kt = vf.data();
        float* vt = kt + D * ld;
        for (int64_t j = 0; j < len; ++j) {
          const T* vr = v + ((s0 + j) * KVH + kvh) * D;
          for (int64_t d = 0; d < D; ++d) {
            kt[d * ld + j] = kf[j * D + d];
            vt[d * ld + j] = lpx::f32(vr[d]);
          }
        }
        p.resize(2 * BR * ld + 2 * BR * D);  // s, dp [BR][ld], then the block's q and do rows [BR][D]
        float* sb = p.data();
        float* dpb = sb + BR * ld;
        float* qb = dpb + BR * ld;
        float* dob = qb + BR * D;
        if (D == 64) {
          backward_task_blocked<4>(q + off, dout + off, dq + off, H * D, kt, vt, ld, kf.data(), dk.data(), dv.data(),
                                   qb, dob, sb, dpb, len, window, scale);
        } else {
          backward_task_blocked<8>(q + off, dout + off, dq + off, H * D, kt, vt, ld, kf.data(), dk.data(), dv.data(),
                                   qb, dob, sb, dpb, len, window, scale);
        }
      } else
#endif
      {
        vf.resize(len * D);
        for (int64_t j = 0; j < len; ++j) widen(v + ((s0 + j) * KVH + kvh) * D, vf.data() + j * D, D);
        p.resize(len);
        dp.resize(len);
        auto task_fn = D == 64 ? &backward_task<64, T> : D == 128 ? &backward_task<128, T> : &backward_task<0, T>;
        task_fn(q + off, dout + off, dq + off, H * D, kf.data(), vf.data(), dk.data(), dv.data(), qi.data(),
                doi.data(), dqi.data(), p.data(), dp.data(), len, D, window, scale);
      }
      for (int64_t j = 0; j < len; ++j) {  // this head's partial dk/dv rows: [N, H, D]
        std::copy(dk.data() + j * D, dk.data() + (j + 1) * D, dk_heads + ((s0 + j) * H + h) * D);
        std::copy(dv.data() + j * D, dv.data() + (j + 1) * D, dv_heads + ((s0 + j) * H + h) * D);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out,
    const at::Tensor& cu_seqlens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && grad_out.sizes() == q.sizes(),
              "packed_attention_backward: q, grad_out [N, H, D] and k, v [N, KVH, D] expected");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(1) % k.size(1) == 0,
              "packed_attention_backward: head shapes");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && grad_out.device().is_cpu(),
              "packed_attention_backward: CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type() &&
                  grad_out.scalar_type() == q.scalar_type(),
              "packed_attention_backward: q, k, v and grad_out must share a dtype");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "packed_attention_backward: cu_seqlens [B + 1] int64 expected");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1);
  auto cu = cu_seqlens.contiguous();
  const int64_t* cp = cu.data_ptr<int64_t>();
  const int64_t B = cu.numel() - 1;
  TORCH_CHECK(cp[0] == 0 && cp[B] == N, "packed_attention_backward: cu_seqlens must run from 0 to N");
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(cp[b + 1] >= cp[b], "packed_attention_backward: cu_seqlens must not decrease");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), gc = grad_out.contiguous();
  auto dq = at::empty_like(qc);
  auto opts = qc.options().dtype(at::kFloat);
  auto dk_heads = at::empty({N, H, D}, opts), dv_heads = at::empty({N, H, D}, opts);
  const float s = static_cast<float>(scale);
  if (qc.scalar_type() == at::kFloat) {
    packed_backward_impl<float>(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), gc.data_ptr<float>(), cp,
                                B, dq.data_ptr<float>(), dk_heads.data_ptr<float>(), dv_heads.data_ptr<float>(), H, KVH,
                                D, window, s);
  } else if (qc.scalar_type() == at::kBFloat16) {
    using Bf = c10::BFloat16;
    packed_backward_impl<Bf>(qc.data_ptr<Bf>(), kc.data_ptr<Bf>(), vc.data_ptr<Bf>(), gc.data_ptr<Bf>(), cp, B,
                             dq.data_ptr<Bf>(), dk_heads.data_ptr<float>(), dv_heads.data_ptr<float>(), H, KVH, D,
                             window, s);
  } else {
    TORCH_CHECK(false, "packed_attention_backward: float32 or bfloat16 expected, got ", qc.scalar_type());
  }
  const int64_t group = H / KVH;  // the query heads of one kv head are adjacent: sum them
  auto dk = dk_heads.view({N, KVH, group, D}).sum(2).to(qc.scalar_type());
  auto dv = dv_heads.view({N, KVH, group, D}).sum(2).to(qc.scalar_type());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def("packed_attention_backward(Tensor q, Tensor k, Tensor v, Tensor grad_out, Tensor cu_seqlens, int window, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.impl("packed_attention_backward", c10::DispatchKey::CPU, &packed_attention_backward);
}
