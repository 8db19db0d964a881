// CPU fast paths for the decoder's elementwise work, each one pass over memory instead of several
// ATen ops: RMSNorm, SiLU(gate) * up, rotary embedding (in place); and the greedy argmax over logits. bfloat16 results round exactly where
// the plain-torch references in loraplex/engine/layers/elementwise.py round, so the two agree to the last bit in
// most elements and within one bfloat16 ulp elsewhere (float32 sums in another order).
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
#include <string>
#include <tuple>

namespace {

using lpx::cast;
using lpx::f32;
using lpx::round_trip_scalar;

// rows per task so that each task has at least ~16k elements
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

template <typename T>
void rms_norm_row(const T* x, const T* w, T* o, int64_t dim, float eps) {
#if defined(LORAPLEX_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 v = lpx::load(x + d, lpx::tail_mask(dim - d));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(dim) + eps);
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = lpx::tail_mask(dim - d);
    const __m512 y = lpx::round_trip<T>(_mm512_mul_ps(lpx::load(x + d, m), iv));
    lpx::store(o + d, _mm512_mul_ps(lpx::load(w + d, m), y), m);
  }
#else
  float ss = 0.f;
  int64_t d0 = 0;
#if defined(LORAPLEX_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; d0 + 16 <= dim; d0 += 16) {
    const __m256 v0 = lpx::load8(x + d0), v1 = lpx::load8(x + d0 + 8);
    acc0 = _mm256_fmadd_ps(v0, v0, acc0);
    acc1 = _mm256_fmadd_ps(v1, v1, acc1);
  }
  ss = lpx::hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (int64_t d = d0; d < dim; ++d) ss += f32(x[d]) * f32(x[d]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
  for (int64_t d = 0; d < dim; ++d) o[d] = cast<T>(f32(w[d]) * round_trip_scalar<T>(f32(x[d]) * inv));
#endif
}

// s = x + a (rounded as a bfloat16 add would be), then o = rms_norm(s)
template <typename T>
void add_rms_norm_row(const T* x, const T* a, const T* w, T* s, T* o, int64_t dim, float eps) {
#if defined(LORAPLEX_AVX512)
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = lpx::tail_mask(dim - d);
    lpx::store(s + d, _mm512_add_ps(lpx::load(x + d, m), lpx::load(a + d, m)), m);  // rounds as torch's add
  }
#else
  for (int64_t d = 0; d < dim; ++d) s[d] = cast<T>(f32(x[d]) + f32(a[d]));
#endif
  rms_norm_row(s, w, o, dim, eps);  // s is still in L1
}

template <typename T>
void silu_and_mul_row(const T* g, const T* u, T* o, int64_t dim) {
#if defined(LORAPLEX_AVX512)
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = lpx::tail_mask(dim - d);
    const __m512 x = lpx::load(g + d, m);
    const __m512 act = _mm512_div_ps(x, _mm512_add_ps(one, lpx::exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    lpx::store(o + d, _mm512_mul_ps(lpx::round_trip<T>(act), lpx::load(u + d, m)), m);
  }
#else
  int64_t d = 0;
#if defined(LORAPLEX_AVX2)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; d + 8 <= dim; d += 8) {  // silu 8 lanes at a time; the roundings as below
    const __m256 x = lpx::load8(g + d);
    float act[8];
    _mm256_storeu_ps(act, _mm256_div_ps(x, _mm256_add_ps(one, lpx::exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)))));
    for (int l = 0; l < 8; ++l) o[d + l] = cast<T>(round_trip_scalar<T>(act[l]) * f32(u[d + l]));
  }
#endif
  for (; d < dim; ++d) {
    const float x = f32(g[d]);
    o[d] = cast<T>(round_trip_scalar<T>(x / (1.f + std::exp(-x))) * f32(u[d]));
  }
#endif
}

// one head of one token, in place: out = x * cos + rotate_half(x) * sin, rounded as the torch reference
template <typename T>
void rotary_row(T* v, const T* c, const T* s, int64_t dim) {
  const int64_t half = dim / 2;
#if defined(LORAPLEX_AVX512)
  if (half % 16 == 0) {
    for (int64_t d = 0; d < half; d += 16) {
      const __m512 x1 = lpx::load(v + d), x2 = lpx::load(v + half + d);
      const __m512 c1 = lpx::load(c + d), c2 = lpx::load(c + half + d);
      const __m512 s1 = lpx::load(s + d), s2 = lpx::load(s + half + d);
      const __m512 lo = _mm512_add_ps(lpx::round_trip<T>(_mm512_mul_ps(x1, c1)),
                                      lpx::round_trip<T>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1)));
      const __m512 hi = _mm512_add_ps(lpx::round_trip<T>(_mm512_mul_ps(x2, c2)),
                                      lpx::round_trip<T>(_mm512_mul_ps(x1, s2)));
      lpx::store(v + d, lo);
      lpx::store(v + half + d, hi);
    }
    return;
  }
#endif
  for (int64_t d = 0; d < half; ++d) {
    const float x1 = f32(v[d]), x2 = f32(v[d + half]);
    const float lo = round_trip_scalar<T>(x1 * f32(c[d])) + round_trip_scalar<T>(-x2 * f32(s[d]));
    const float hi = round_trip_scalar<T>(x2 * f32(c[d + half])) + round_trip_scalar<T>(x1 * f32(s[d + half]));
    v[d] = cast<T>(lo);
    v[d + half] = cast<T>(hi);
  }
}


// index of the first maximum of a row (a NaN counts as the maximum, as in torch.max)
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t best = 0;
  float best_v = f32(x[0]);
  int64_t d = 0;
#if defined(LORAPLEX_AVX512)
  if (n >= 16 && n <= std::numeric_limits<int32_t>::max()) {
    __m512 vmax = lpx::load(x);
    __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i cur = vidx;
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
    for (d = 16; d + 16 <= n; d += 16) {
      cur = _mm512_add_epi32(cur, step);
      const __m512 v = lpx::load(x + d);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strict: earlier index wins ties
      vmax = _mm512_mask_mov_ps(vmax, gt, v);
      vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
    }
    if (nan) {  // rare: find the first NaN with the scalar loop below
      d = 0;
    } else {
      alignas(64) float vals[16];
      alignas(64) int32_t idxs[16];
      _mm512_store_ps(vals, vmax);
      _mm512_store_si512(idxs, vidx);
      best_v = vals[0];
      best = idxs[0];
      for (int l = 1; l < 16; ++l) {
        if (vals[l] > best_v || (vals[l] == best_v && idxs[l] < best)) {
          best_v = vals[l];
          best = idxs[l];
        }
      }
    }
  }
#endif
  for (; d < n; ++d) {
    const float v = f32(x[d]);
    if (std::isnan(v)) return d;
    if (v > best_v) {
      best_v = v;
      best = d;
    }
  }
  return best;
}

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* out, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(x + r * dim, w, out + r * dim, dim, eps);
  });
}

template <typename T>
void silu_and_mul_impl(const T* gate, const T* up, T* out, int64_t rows, int64_t dim, int64_t gate_stride,
                       int64_t up_stride) {
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_and_mul_row(gate + r * gate_stride, up + r * up_stride, out + r * dim, dim);
  });
}

// x [N, H, D] (token rows of H*D with stride row_stride), cos/sin [N, D]
template <typename T>
void rotary_impl(T* x, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t dim, int64_t row_stride) {
  at::parallel_for(0, tokens, grain(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) rotary_row(x + t * row_stride + h * dim, cos + t * dim, sin + t * dim, dim);
    }
  });
}

template <typename T>
void add_rms_norm_impl(const T* x, const T* a, const T* w, T* s, T* out, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      add_rms_norm_row(x + r * dim, a + r * dim, w, s + r * dim, out + r * dim, dim, eps);
  });
}

void check_cpu_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": CPU tensor expected");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16 expected, got ", t.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cpu_float(x, "rms_norm");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight [dim] of the input's dtype expected");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const int64_t dim = xc.size(-1), rows = dim ? xc.numel() / dim : 0;
  if (xc.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(xc.data_ptr<float>(), wc.data_ptr<float>(), out.data_ptr<float>(), rows, dim, eps);
  } else {
    rms_norm_impl<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), wc.data_ptr<c10::BFloat16>(),
                                 out.data_ptr<c10::BFloat16>(), rows, dim, eps);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& a, const at::Tensor& weight,
                                                double eps) {
  check_cpu_float(x, "add_rms_norm");
  TORCH_CHECK(a.sizes() == x.sizes() && a.scalar_type() == x.scalar_type(), "add_rms_norm: x and a must match");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "add_rms_norm: weight [dim] of the input's dtype expected");
  auto xc = x.contiguous();
  auto ac = a.contiguous();
  auto wc = weight.contiguous();
  auto sum = at::empty_like(xc);
  auto out = at::empty_like(xc);
  const int64_t dim = xc.size(-1), rows = dim ? xc.numel() / dim : 0;
  if (xc.scalar_type() == at::kFloat) {
    add_rms_norm_impl<float>(xc.data_ptr<float>(), ac.data_ptr<float>(), wc.data_ptr<float>(), sum.data_ptr<float>(),
                             out.data_ptr<float>(), rows, dim, eps);
  } else {
    using B = c10::BFloat16;
    add_rms_norm_impl<B>(xc.data_ptr<B>(), ac.data_ptr<B>(), wc.data_ptr<B>(), sum.data_ptr<B>(), out.data_ptr<B>(),
                         rows, dim, eps);
  }
  return {sum, out};
}

at::Tensor silu_and_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_cpu_float(gate, "silu_and_mul");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type(),
              "silu_and_mul: gate and up [rows, dim] of one dtype expected");
  TORCH_CHECK(gate.stride(1) == 1 && up.stride(1) == 1, "silu_and_mul: rows must be contiguous");
  const int64_t rows = gate.size(0), dim = gate.size(1);
  auto out = at::empty({rows, dim}, gate.options());
  if (gate.scalar_type() == at::kFloat) {
    silu_and_mul_impl<float>(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), rows, dim,
                             gate.stride(0), up.stride(0));
  } else {
    silu_and_mul_impl<c10::BFloat16>(gate.data_ptr<c10::BFloat16>(), up.data_ptr<c10::BFloat16>(),
                                     out.data_ptr<c10::BFloat16>(), rows, dim, gate.stride(0), up.stride(0));
  }
  return out;
}

at::Tensor rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  check_cpu_float(x, "rotary_");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotary_: x [N, H, D] with contiguous rows");
  const int64_t n = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0, "rotary_: even head_dim expected");
  auto c = cos.reshape({n, dim}).contiguous();
  auto s = sin.reshape({n, dim}).contiguous();
  TORCH_CHECK(c.scalar_type() == x.scalar_type() && s.scalar_type() == x.scalar_type(), "rotary_: cos/sin dtype");
  if (x.scalar_type() == at::kFloat) {
    rotary_impl<float>(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), n, heads, dim, x.stride(0));
  } else {
    rotary_impl<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), c.data_ptr<c10::BFloat16>(), s.data_ptr<c10::BFloat16>(),
                               n, heads, dim, x.stride(0));
  }
  return x;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_cpu_float(x, "argmax_rows");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_rows: [rows, n > 0] expected");
  auto xc = x.contiguous();
  const int64_t rows = xc.size(0), n = xc.size(1);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      o[r] = xc.scalar_type() == at::kFloat ? argmax_row(xc.data_ptr<float>() + r * n, n)
                                            : argmax_row(xc.data_ptr<c10::BFloat16>() + r * n, n);
    }
  });
  return out;
}

// A multi-step decode batch moved on one position in place (engine/layers/attention.py:advance_decode_batch is the
// reference, four tensor operations): input_ids <- token_ids, positions += 1, kernel_lens += 1, and each row's slot
// for its new position from kernel_slots [rows, width]. Everything is checked before anything is written: a
// position past the slot table raises and leaves the batch as it was.
void advance_decode_(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                     const at::Tensor& kernel_lens, const at::Tensor& kernel_slots, const at::Tensor& token_ids) {
  const int64_t n = input_ids.numel();
  for (const at::Tensor* t : {&input_ids, &positions, &slot_mapping, &kernel_lens, &token_ids})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->numel() == n &&
                    t->is_contiguous(),
                "advance_decode_: int64 CPU vectors of one length expected");
  TORCH_CHECK(kernel_slots.device().is_cpu() && kernel_slots.scalar_type() == at::kLong && kernel_slots.dim() == 2 &&
                  kernel_slots.size(0) == n && kernel_slots.is_contiguous(),
              "advance_decode_: kernel_slots [rows, width] int64, contiguous");
  const int64_t width = kernel_slots.size(1);
  int64_t *ids = input_ids.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>(),
          *slot = slot_mapping.data_ptr<int64_t>(), *lens = kernel_lens.data_ptr<int64_t>();
  const int64_t *table = kernel_slots.data_ptr<int64_t>(), *tokens = token_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(pos[i] + 1 >= 0 && pos[i] + 1 < width, "advance_decode_: position ", pos[i] + 1,
                " is past the slot table (", width, " positions)");
  for (int64_t i = 0; i < n; ++i) {
    ids[i] = tokens[i];
    pos[i] += 1;
    lens[i] += 1;
    slot[i] = table[i * width + pos[i]];
  }
}

// A decode step's inputs in one call: the token rows of the embedding table and each position's row of the rotary
// cos / sin tables (engine/models/llama.py:LlamaModel.step_inputs; the modules' gathers are the reference, the same
// values): x [n, hidden], cos / sin [n, 1, head_dim]. A token or position past its table raises IndexError with
// nothing returned (the caller falls back to the modules, which grow the rotary tables).
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_inputs(const at::Tensor& weight, const at::Tensor& ids,
                                                           const at::Tensor& cos_table, const at::Tensor& sin_table,
                                                           const at::Tensor& positions) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "step_inputs: a contiguous float32 or bfloat16 embedding table [vocab, hidden] expected");
  TORCH_CHECK(cos_table.dim() == 2 && cos_table.sizes() == sin_table.sizes() && cos_table.is_contiguous() &&
                  sin_table.is_contiguous() && cos_table.scalar_type() == weight.scalar_type() &&
                  sin_table.scalar_type() == weight.scalar_type() && cos_table.device().is_cpu(),
              "step_inputs: contiguous cos / sin tables [positions, head_dim] in the table's dtype expected");
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous() &&
                  positions.device().is_cpu() && positions.scalar_type() == at::kLong &&
                  positions.sizes() == ids.sizes() && positions.is_contiguous(),
              "step_inputs: int64 ids and positions [tokens] expected");
  const int64_t n = ids.numel(), vocab = weight.size(0), hidden = weight.size(1), rows = cos_table.size(0),
                dim = cos_table.size(1), esize = weight.element_size();
  const int64_t *ip = ids.data_ptr<int64_t>(), *pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK_INDEX(ip[t] >= 0 && ip[t] < vocab, "step_inputs: token ", ip[t], " is past the embedding table");
    TORCH_CHECK_INDEX(pp[t] >= 0 && pp[t] < rows, "step_inputs: position ", pp[t], " is past the rotary tables");
  }
  auto x = at::empty({n, hidden}, weight.options());
  auto cos = at::empty({n, 1, dim}, weight.options()), sin = at::empty({n, 1, dim}, weight.options());
  const char *w = static_cast<const char*>(weight.data_ptr()), *c = static_cast<const char*>(cos_table.data_ptr()),
             *sn = static_cast<const char*>(sin_table.data_ptr());
  char *xo = static_cast<char*>(x.data_ptr()), *co = static_cast<char*>(cos.data_ptr()),
       *so = static_cast<char*>(sin.data_ptr());
  for (int64_t t = 0; t < n; ++t) {
    std::memcpy(xo + t * hidden * esize, w + ip[t] * hidden * esize, hidden * esize);
    std::memcpy(co + t * dim * esize, c + pp[t] * dim * esize, dim * esize);
    std::memcpy(so + t * dim * esize, sn + pp[t] * dim * esize, dim * esize);
  }
  return {x, cos, sin};
}

std::string vector_isa() {
#if defined(LORAPLEX_AVX512)
  return "avx512";
#elif defined(LORAPLEX_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

namespace lpx_parts {

template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t rows, int64_t dim, float eps) {
  rms_norm_impl<T>(x, w, out, rows, dim, eps);
}
template <typename T>
void add_rms_norm(const T* x, const T* a, const T* w, T* sum, T* out, int64_t rows, int64_t dim, float eps) {
  add_rms_norm_impl<T>(x, a, w, sum, out, rows, dim, eps);
}
template <typename T>
void silu_and_mul(const T* gate, const T* up, T* out, int64_t rows, int64_t dim, int64_t gate_stride,
                  int64_t up_stride) {
  silu_and_mul_impl<T>(gate, up, out, rows, dim, gate_stride, up_stride);
}
template <typename T>
void rotary(T* x, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t dim, int64_t row_stride) {
  rotary_impl<T>(x, cos, sin, tokens, heads, dim, row_stride);
}
#define LPX_PARTS(T)                                                                                       \
  template void rms_norm<T>(const T*, const T*, T*, int64_t, int64_t, float);                             \
  template void add_rms_norm<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, float);           \
  template void silu_and_mul<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t);              \
  template void rotary<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t);
LPX_PARTS(float)
LPX_PARTS(c10::BFloat16)
#undef LPX_PARTS

}  // namespace lpx_parts

TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def("vector_isa() -> str");
  m.impl("vector_isa", c10::DispatchKey::CatchAll, &vector_isa);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor a, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, &add_rms_norm);
  m.def("silu_and_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, &argmax_rows);
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("silu_and_mul", c10::DispatchKey::CPU, &silu_and_mul);
  m.impl("rotary_", c10::DispatchKey::CPU, &rotary_);
  m.def("advance_decode_(Tensor(a!) input_ids, Tensor(b!) positions, Tensor(c!) slot_mapping, Tensor(d!) kernel_lens, "
        "Tensor kernel_slots, Tensor token_ids) -> ()");
  m.impl("advance_decode_", c10::DispatchKey::CPU, &advance_decode_);
  m.def("step_inputs(Tensor weight, Tensor ids, Tensor cos_table, Tensor sin_table, Tensor positions) -> "
        "(Tensor, Tensor, Tensor)");
  m.impl("step_inputs", c10::DispatchKey::CPU, &step_inputs);
}
