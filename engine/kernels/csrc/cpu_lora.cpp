// Batched LoRA on CPU for short segments (decodes, short prefill pieces): y[row] += B[a] (A[a] x[row])
// for every row of every segment, reading the adapter's pages in place from the paged pool. One call per
// linear instead of six ATen ops; h and the delta stay in float32 and y is rounded once. The plain-torch
// formulation in loraplex/adapters/ops/cpu.py (and ops/reference.py) is what the tests compare it with.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_layer_parts.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t ROWS_PER_ITEM = 8;  // rows of one segment handled together (its A/B pages stay in L1/L2)

template <typename T, typename U = T>
float dot(const T* a, const U* b, int64_t n) {
#if defined(LORAPLEX_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = lpx::tail_mask(n - d);
    acc = _mm512_fmadd_ps(lpx::load(a + d, m), lpx::load(b + d, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  int64_t d = 0;
  float s = 0.f;
#if defined(LORAPLEX_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains: an fma's latency is 4 cycles
  for (; d + 16 <= n; d += 16) {
    acc0 = _mm256_fmadd_ps(lpx::load8(a + d), lpx::load8(b + d), acc0);
    acc1 = _mm256_fmadd_ps(lpx::load8(a + d + 8), lpx::load8(b + d + 8), acc1);
  }
  for (; d + 8 <= n; d += 8) acc0 = _mm256_fmadd_ps(lpx::load8(a + d), lpx::load8(b + d), acc0);
  s = lpx::hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; d < n; ++d) s += lpx::f32(a[d]) * lpx::f32(b[d]);
  return s;
#endif
}

// y_row[0..n) += sum_r h[r] * b_rows[r][0..n)
template <typename T>
void expand_row(T* y, const T* const* b_rows, const float* h, int64_t rank, int64_t n) {
#if defined(LORAPLEX_AVX512)
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = lpx::tail_mask(n - d);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < rank; ++r) acc = _mm512_fmadd_ps(_mm512_set1_ps(h[r]), lpx::load(b_rows[r] + d, m), acc);
    lpx::store(y + d, _mm512_add_ps(lpx::load(y + d, m), acc), m);
  }
#else
  int64_t d = 0;
#if defined(LORAPLEX_AVX2)
  float sum[8];
  for (; d + 8 <= n; d += 8) {  // 8 lanes at a time, each adding in rank order
    __m256 acc = _mm256_setzero_ps();
    for (int64_t r = 0; r < rank; ++r) acc = _mm256_fmadd_ps(_mm256_set1_ps(h[r]), lpx::load8(b_rows[r] + d), acc);
    _mm256_storeu_ps(sum, acc);
    for (int l = 0; l < 8; ++l) y[d + l] = lpx::cast<T>(lpx::f32(y[d + l]) + sum[l]);
  }
#endif
  for (; d < n; ++d) {
    float acc = 0.f;
    for (int64_t r = 0; r < rank; ++r) acc += h[r] * lpx::f32(b_rows[r][d]);
    y[d] = lpx::cast<T>(lpx::f32(y[d]) + acc);
  }
#endif
}

template <typename T>
void lora_apply_impl(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* a_pool, const T* b_pool,
                     int64_t in, int64_t out, const lpx_parts::LoraRows& lr) {
  const int64_t *rows = lr.rows, *starts = lr.starts, *pages = lr.pages, *ranks = lr.ranks, max_rank = lr.max_rank;
  const float *page_scales = lr.page_scales, *row_scales = lr.row_scales;
  std::vector<std::pair<int64_t, int64_t>> items;  // (segment, first index into rows)
  for (int64_t s = 0; s < lr.num_segments; ++s)
    for (int64_t i = starts[s]; i < starts[s + 1]; i += ROWS_PER_ITEM) items.emplace_back(s, i);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(max_rank);
    std::vector<const T*> a_rows(max_rank), b_rows(max_rank);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = items[it].first, rank = ranks[s];
      for (int64_t r = 0; r < rank; ++r) {
        a_rows[r] = a_pool + pages[s * max_rank + r] * in;
        b_rows[r] = b_pool + pages[s * max_rank + r] * out;
      }
      const int64_t last = std::min(items[it].second + ROWS_PER_ITEM, starts[s + 1]);
      for (int64_t i = items[it].second; i < last; ++i) {
        const T* xr = x + rows[i] * x_stride;
        const float row_scale = row_scales ? row_scales[i] : 1.f;
        for (int64_t r = 0; r < rank; ++r) {
          h[r] = dot(xr, a_rows[r], in);
          if (page_scales) h[r] *= page_scales[s * max_rank + r];
          if (row_scales) h[r] *= row_scale;
        }
        expand_row(y + rows[i] * y_stride, b_rows.data(), h.data(), rank, out);
      }
    }
  });
}

}  // namespace

namespace lpx_parts {

LoraRows check_lora_rows(const at::Tensor& token_rows, const at::Tensor& seg_starts, const at::Tensor& seg_pages,
                         const at::Tensor& seg_ranks, const at::Tensor& page_scales, const at::Tensor& row_scales,
                         int64_t num_y_rows) {
  for (const at::Tensor* t : {&token_rows, &seg_starts, &seg_pages, &seg_ranks})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous(),
                "lora_apply_: contiguous int64 metadata");
  const int64_t S = seg_pages.size(0), R = seg_pages.dim() == 2 ? seg_pages.size(1) : 0;
  TORCH_CHECK(seg_pages.dim() == 2 && seg_ranks.numel() == S && seg_starts.numel() == S + 1, "lora_apply_: segments");
  LoraRows lr{token_rows.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(), seg_pages.data_ptr<int64_t>(),
              seg_ranks.data_ptr<int64_t>(), S, R, -1, nullptr, nullptr};
  const int64_t n_rows = token_rows.numel();
  TORCH_CHECK(lr.starts[0] == 0 && lr.starts[S] == n_rows, "lora_apply_: seg_starts must cover token_rows");
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lr.starts[s] <= lr.starts[s + 1] && lr.ranks[s] >= 0 && lr.ranks[s] <= R, "lora_apply_: bad segment ",
                s);
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(lr.pages[s * R + r] >= 0, "lora_apply_: page out of range");
      lr.max_page = std::max(lr.max_page, lr.pages[s * R + r]);
    }
  }
  for (int64_t i = 0; i < n_rows; ++i)
    TORCH_CHECK(lr.rows[i] >= 0 && lr.rows[i] < num_y_rows, "lora_apply_: row out of range");
  // optional multipliers of h (float32; empty: all 1): one per (segment, page) and one per row
  for (const at::Tensor* t : {&page_scales, &row_scales})
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu()),
                "lora_apply_: scales must be contiguous float32");
  TORCH_CHECK(page_scales.numel() == 0 || page_scales.numel() == S * R, "lora_apply_: page_scales [S, R] expected");
  TORCH_CHECK(row_scales.numel() == 0 || row_scales.numel() == n_rows, "lora_apply_: row_scales [rows] expected");
  lr.page_scales = page_scales.numel() ? page_scales.data_ptr<float>() : nullptr;
  lr.row_scales = row_scales.numel() ? row_scales.data_ptr<float>() : nullptr;
  return lr;
}

void check_lora_pools(const at::Tensor& a_pool, const at::Tensor& b_pool, int64_t in, int64_t out,
                      at::ScalarType dtype) {
  TORCH_CHECK(a_pool.device().is_cpu() && b_pool.device().is_cpu() && a_pool.dim() == 2 && b_pool.dim() == 2 &&
                  a_pool.size(0) == b_pool.size(0) && a_pool.is_contiguous() && b_pool.is_contiguous() &&
                  a_pool.size(1) == in && b_pool.size(1) == out,
              "lora_apply_: pools a [P, in], b [P, out] contiguous expected");
  TORCH_CHECK(a_pool.scalar_type() == dtype && b_pool.scalar_type() == dtype, "lora_apply_: pools of y's dtype");
}

template <typename T>
void lora_apply(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* a_pool, const T* b_pool, int64_t in,
                int64_t out, const LoraRows& rows) {
  lora_apply_impl<T>(y, y_stride, x, x_stride, a_pool, b_pool, in, out, rows);
}
template void lora_apply<float>(float*, int64_t, const float*, int64_t, const float*, const float*, int64_t, int64_t,
                                const LoraRows&);
template void lora_apply<c10::BFloat16>(c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*,
                                        const c10::BFloat16*, int64_t, int64_t, const LoraRows&);

}  // namespace lpx_parts

namespace {

void lora_apply_(at::Tensor y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                 const at::Tensor& token_rows, const at::Tensor& seg_starts, const at::Tensor& seg_pages,
                 const at::Tensor& seg_ranks, const at::Tensor& page_scales, const at::Tensor& row_scales) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu(), "lora_apply_: CPU tensors");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0) && y.stride(1) == 1 && x.stride(1) == 1,
              "lora_apply_: y [N, out] and x [N, in] with contiguous rows expected");
  const auto dt = y.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && x.scalar_type() == dt,
              "lora_apply_: one float32 or bfloat16 dtype expected");
  lpx_parts::check_lora_pools(a_pool, b_pool, x.size(1), y.size(1), dt);
  const lpx_parts::LoraRows lr = lpx_parts::check_lora_rows(token_rows, seg_starts, seg_pages, seg_ranks, page_scales,
                                                            row_scales, y.size(0));
  TORCH_CHECK(lr.max_page < a_pool.size(0), "lora_apply_: page out of range");
  if (dt == at::kFloat) {
    lpx_parts::lora_apply<float>(y.data_ptr<float>(), y.stride(0), x.data_ptr<float>(), x.stride(0),
                                 a_pool.data_ptr<float>(), b_pool.data_ptr<float>(), x.size(1), y.size(1), lr);
  } else {
    using B = c10::BFloat16;
    lpx_parts::lora_apply<B>(y.data_ptr<B>(), y.stride(0), x.data_ptr<B>(), x.stride(0), a_pool.data_ptr<B>(),
                             b_pool.data_ptr<B>(), x.size(1), y.size(1), lr);
  }
}

// MixLoRA router logits, batch-invariant: out[i, e] = <x[rows[i]], w[slots[i] * E + e]> in float32, one row at a
// time with a fixed summation order (a float32 GEMM's blocking, hence its last bits, depends on how many rows it
// is given, and a 1-ulp change can flip a top-k choice). x in the engine's dtype, w and out in float32.
template <typename T>
void mixlora_router_impl(float* out, const T* x, int64_t x_stride, const float* w, int64_t hidden,
                         const int64_t* rows, const int64_t* slots, int64_t n, int64_t experts) {
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + rows[i] * x_stride;
      const float* wr = w + slots[i] * experts * hidden;
      for (int64_t e = 0; e < experts; ++e) out[i * experts + e] = dot(xr, wr + e * hidden, hidden);
    }
  });
}

at::Tensor mixlora_router(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows, const at::Tensor& slots,
                          int64_t experts) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "mixlora_router: x [N, hidden] with contiguous rows expected");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(1) == x.size(1) &&
                  experts > 0 && w.size(0) % experts == 0, "mixlora_router: w [slots * experts, hidden] float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.is_contiguous() &&
                  slots.is_contiguous() && rows.numel() == slots.numel(), "mixlora_router: int64 rows and slots");
  const int64_t n = rows.numel(), N = x.size(0), S = w.size(0) / experts;
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < N && s[i] >= 0 && s[i] < S, "mixlora_router: row or slot out of range");
  at::Tensor out = at::empty({n, experts}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    mixlora_router_impl<float>(out.data_ptr<float>(), x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(),
                               x.size(1), r, s, n, experts);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "mixlora_router: x float32 or bfloat16");
    using B = c10::BFloat16;
    mixlora_router_impl<B>(out.data_ptr<float>(), x.data_ptr<B>(), x.stride(0), w.data_ptr<float>(), x.size(1), r,
                           s, n, experts);
  }
  return out;
}

// MixLoRA top-k routing in one call, row by row: each row's logits against its own slot's router (float32), a
// softmax over the row's adapter's experts (the others masked), the k largest (ties: the lower expert first),
// weights renormalised over the k, and each (row, choice) pair's virtual-expert pages. What adapters/ops/
// mixlora.py's route_pairs computes with a dozen torch ops per layer (its reference, and the fallback).
std::vector<at::Tensor> mixlora_route_topk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows,
                                           const at::Tensor& slots, const at::Tensor& counts, int64_t experts,
                                           int64_t k, const at::Tensor& vid_pages, const at::Tensor& vid_ranks) {
  at::Tensor logits = mixlora_router(x, w, rows, slots, experts);
  const int64_t n = rows.numel(), R = vid_pages.size(1);
  TORCH_CHECK(k >= 1 && k <= experts && counts.scalar_type() == at::kLong && counts.numel() == n &&
                  counts.is_contiguous() && vid_pages.scalar_type() == at::kLong && vid_pages.is_contiguous() &&
                  vid_ranks.scalar_type() == at::kLong && vid_ranks.is_contiguous() &&
                  vid_pages.size(0) == vid_ranks.numel() && vid_pages.size(0) % experts == 0,
              "mixlora_route_topk: bad arguments");
  const int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(cnt[i] >= k && cnt[i] <= experts, "mixlora_route_topk: expert count");
  at::Tensor weights = at::empty({n * k}, logits.options());
  at::Tensor pages = at::empty({n * k, R}, vid_pages.options());
  at::Tensor ranks = at::empty({n * k}, vid_ranks.options());
  at::Tensor pair_rows = at::empty({n * k}, rows.options());
  float* lg = logits.data_ptr<float>();
  float* wt = weights.data_ptr<float>();
  int64_t* pg = pages.data_ptr<int64_t>();
  int64_t* rk = ranks.data_ptr<int64_t>();
  int64_t* pr = pair_rows.data_ptr<int64_t>();
  const int64_t* vp = vid_pages.data_ptr<int64_t>();
  const int64_t* vr = vid_ranks.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t V = vid_ranks.numel();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> p(experts);
    std::vector<char> taken(experts);
    for (int64_t i = begin; i < end; ++i) {
      float* l = lg + i * experts;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < experts; ++e) {
        if (e >= cnt[i]) l[e] = -std::numeric_limits<float>::infinity();
        m = std::max(m, l[e]);
      }
      float sum = 0.f;
      for (int64_t e = 0; e < experts; ++e) sum += (p[e] = e < cnt[i] ? std::exp(l[e] - m) : 0.f);
      for (int64_t e = 0; e < experts; ++e) p[e] /= sum;
      std::fill(taken.begin(), taken.end(), 0);
      float top = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < cnt[i]; ++e)
          if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        taken[best] = 1;
        top += p[best];
        const int64_t q = i * k + j, vid = sl[i] * experts + best;
        TORCH_CHECK(vid < V, "mixlora_route_topk: slot out of range");
        wt[q] = p[best];
        std::copy(vp + vid * R, vp + (vid + 1) * R, pg + q * R);
        rk[q] = vr[vid];
        pr[q] = rw[i];
      }
      for (int64_t j = 0; j < k; ++j) wt[i * k + j] /= top;
    }
  });
  return {logits, weights, pages, ranks, pair_rows};
}

// The MixLoRA FFN of top-k rows, one row at a time with nothing materialised per pair: for MixLoRA row i (batch row
// rows[i]) and each of its k pairs q = i*k + j (expert pages pages[q], routing weight w[q]):
//   g_q = g[row] + B_gate A_gate x,  u_q = u[row] + B_up A_up x,  h_q = w_q * silu(g_q) * u_q
//   h_mix[i] = sum_j h_q,  y_delta[i] = sum_j B_down A_down h_q
// in float32 (pages read in place; scales are in the B pools). The dense W2 h and the row's own h are the caller's.
// Undefined pools: that module has no experts in this step. adapters/mixlora_mlp.py's torch path is the reference.
template <typename T>
void mixlora_ffn_impl(const T* g, int64_t gs, const T* u, int64_t us, const T* x, int64_t xs, const int64_t* rows,
                      int64_t n, int64_t k, const float* w, const int64_t* pages, const int64_t* ranks, int64_t R,
                      const T* ag, const T* bg, const T* au, const T* bu, const T* ad, const T* bd, int64_t H,
                      int64_t I, T* h_out, T* y_out) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(I), hq(I), yd(H), hg(R), hu(R), hdn(R);
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + rows[i] * xs;
      const T* gr = g + rows[i] * gs;
      const T* ur = u + rows[i] * us;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(yd.begin(), yd.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t q = i * k + j, rank = ranks[q];
        const int64_t* pg = pages + q * R;
        const float wq = w[q];
        for (int64_t r = 0; r < rank; ++r) {
          hg[r] = ag ? dot(xr, ag + pg[r] * H, H) : 0.f;
          hu[r] = au ? dot(xr, au + pg[r] * H, H) : 0.f;
        }
#if defined(LORAPLEX_AVX512)
        const __m512 one = _mm512_set1_ps(1.f);
        for (int64_t d = 0; d < I; d += 16) {
          const __mmask16 m = lpx::tail_mask(I - d);
          __m512 gv = lpx::load(gr + d, m), uv = lpx::load(ur + d, m);
          for (int64_t r = 0; r < rank; ++r) {
            if (bg) gv = _mm512_fmadd_ps(_mm512_set1_ps(hg[r]), lpx::load(bg + pg[r] * I + d, m), gv);
            if (bu) uv = _mm512_fmadd_ps(_mm512_set1_ps(hu[r]), lpx::load(bu + pg[r] * I + d, m), uv);
          }
          const __m512 act = _mm512_div_ps(gv, _mm512_add_ps(one, lpx::exp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
          const __m512 hv = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(wq), act), uv);
          _mm512_mask_storeu_ps(hq.data() + d, m, hv);
          _mm512_mask_storeu_ps(acc.data() + d, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc.data() + d), hv));
        }
#else
        for (int64_t d = 0; d < I; ++d) {
          float gv = lpx::f32(gr[d]), uv = lpx::f32(ur[d]);
          for (int64_t r = 0; r < rank; ++r) {
            if (bg) gv += hg[r] * lpx::f32(bg[pg[r] * I + d]);
            if (bu) uv += hu[r] * lpx::f32(bu[pg[r] * I + d]);
          }
          hq[d] = wq * (gv / (1.f + std::exp(-gv))) * uv;
          acc[d] += hq[d];
        }
#endif
        if (ad) {
          for (int64_t r = 0; r < rank; ++r) hdn[r] = dot(hq.data(), ad + pg[r] * I, I);
          for (int64_t e = 0; e < H; ++e) {
            float s = 0.f;
            for (int64_t r = 0; r < rank; ++r) s += hdn[r] * lpx::f32(bd[pg[r] * H + e]);
            yd[e] += s;
          }
        }
      }
      for (int64_t d = 0; d < I; ++d) h_out[i * I + d] = lpx::cast<T>(acc[d]);
      for (int64_t e = 0; e < H; ++e) y_out[i * H + e] = lpx::cast<T>(yd[e]);
    }
  });
}

std::vector<at::Tensor> mixlora_ffn(const at::Tensor& g, const at::Tensor& u, const at::Tensor& x,
                                    const at::Tensor& rows, int64_t k, const at::Tensor& weights,
                                    const at::Tensor& pages, const at::Tensor& ranks,
                                    const c10::optional<at::Tensor>& a_gate, const c10::optional<at::Tensor>& b_gate,
                                    const c10::optional<at::Tensor>& a_up, const c10::optional<at::Tensor>& b_up,
                                    const c10::optional<at::Tensor>& a_down, const c10::optional<at::Tensor>& b_down) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "mixlora_ffn: float32 or bfloat16");
  TORCH_CHECK(g.scalar_type() == dt && u.scalar_type() == dt && g.dim() == 2 && u.dim() == 2 && x.dim() == 2 &&
                  g.stride(1) == 1 && u.stride(1) == 1 && x.stride(1) == 1 && g.size(0) == x.size(0) &&
                  u.sizes() == g.sizes(), "mixlora_ffn: g, u [N, I] and x [N, H] with contiguous rows");
  const int64_t N = x.size(0), H = x.size(1), I = g.size(1), n = rows.numel();
  TORCH_CHECK(k >= 1 && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                  weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.numel() == n * k &&
                  pages.scalar_type() == at::kLong && pages.is_contiguous() && pages.dim() == 2 &&
                  pages.size(0) == n * k && ranks.scalar_type() == at::kLong && ranks.is_contiguous() &&
                  ranks.numel() == n * k, "mixlora_ffn: pairs");
  const int64_t R = pages.size(1);
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* rk = ranks.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(rw[i] >= 0 && rw[i] < N, "mixlora_ffn: row out of range");
  auto pool = [&](const c10::optional<at::Tensor>& t, int64_t width, const char* what) -> const at::Tensor* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->scalar_type() == dt && t->is_contiguous() && t->dim() == 2 && t->size(1) == width, "mixlora_ffn: ",
                what, " pool");
    return &t.value();
  };
  const at::Tensor* pools[6] = {pool(a_gate, H, "a_gate"), pool(b_gate, I, "b_gate"), pool(a_up, H, "a_up"),
                                pool(b_up, I, "b_up"), pool(a_down, I, "a_down"), pool(b_down, H, "b_down")};
  for (int m = 0; m < 3; ++m)
    TORCH_CHECK((pools[2 * m] == nullptr) == (pools[2 * m + 1] == nullptr), "mixlora_ffn: A and B pools go together");
  int64_t P = -1;
  for (const at::Tensor* t : pools) {
    if (t == nullptr) continue;
    TORCH_CHECK(P < 0 || t->size(0) == P, "mixlora_ffn: pools of one size");
    P = t->size(0);
  }
  for (int64_t q = 0; q < n * k; ++q) {
    TORCH_CHECK(rk[q] >= 0 && rk[q] <= R, "mixlora_ffn: bad rank");
    for (int64_t r = 0; r < R; ++r) TORCH_CHECK(pg[q * R + r] >= 0 && (P < 0 || pg[q * R + r] < P), "mixlora_ffn: page");
  }
  at::Tensor h_out = at::empty({n, I}, x.options());
  at::Tensor y_out = at::empty({n, H}, x.options());
  auto run = [&](auto tag) {
    using S = decltype(tag);
    auto ptr = [&](int i) -> const S* { return pools[i] ? pools[i]->template data_ptr<S>() : nullptr; };
    mixlora_ffn_impl<S>(g.data_ptr<S>(), g.stride(0), u.data_ptr<S>(), u.stride(0), x.data_ptr<S>(), x.stride(0), rw,
                        n, k, weights.data_ptr<float>(), pg, rk, R, ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5), H,
                        I, h_out.data_ptr<S>(), y_out.data_ptr<S>());
  };
  if (dt == at::kFloat) run(float{});
  else run(c10::BFloat16{});
  return {h_out, y_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def("mixlora_ffn(Tensor g, Tensor u, Tensor x, Tensor rows, int k, Tensor weights, Tensor pages, Tensor ranks, "
        "Tensor? a_gate, Tensor? b_gate, Tensor? a_up, Tensor? b_up, Tensor? a_down, Tensor? b_down) -> Tensor[]");
  m.impl("mixlora_ffn", c10::DispatchKey::CPU, &mixlora_ffn);
  m.def("mixlora_route_topk(Tensor x, Tensor w, Tensor rows, Tensor slots, Tensor counts, int experts, int k, "
        "Tensor vid_pages, Tensor vid_ranks) -> Tensor[]");
  m.impl("mixlora_route_topk", c10::DispatchKey::CPU, &mixlora_route_topk);
  m.def("mixlora_router(Tensor x, Tensor w, Tensor rows, Tensor slots, int experts) -> Tensor");
  m.impl("mixlora_router", c10::DispatchKey::CPU, &mixlora_router);
  m.def("lora_apply_(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor token_rows, Tensor seg_starts, "
        "Tensor seg_pages, Tensor seg_ranks, Tensor page_scales, Tensor row_scales) -> ()");
  m.impl("lora_apply_", c10::DispatchKey::CPU, &lora_apply_);
}
