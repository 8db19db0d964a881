// Weight-streaming linear for CPU decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W stored dense (float32,
// bfloat16) or weight-only quantized (8-bit or 4-bit codes with a scale and an integer zero point per group of
// `group` input channels: w = (q - z) * s, exactly as the GPTQ reference dequantizes in float32).
//
// Each output element is one float32 dot product with a fixed order: 8 lanes accumulated chunk after chunk over K
// with explicit fused multiply-adds, then a fixed pairwise sum of the lanes. The order never depends on M, on the
// tile a row falls in or on the thread: a row's result is the same alone and in any batch (batch invariance, as the
// engine requires). Tile shapes (register blocking) differ between AVX2 and AVX-512 builds; the arithmetic does not.
//
// Work split: threads take blocks of NB output channels; a block's weights are decoded once into float32 (a few
// KiB, L1/L2) and reused by every row of x, so the weights stream from memory once per call whatever M is.
//
// 4-bit layout: each 16-channel chunk of a row is 8 bytes; byte i holds channel i (low nibble) and channel i + 8
// (high nibble). engine/quant/stream.py packs it and holds the plain-torch reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

// 16 float32 lanes as two 8-lane halves (a decoded 16-channel chunk)
struct F16 {
  v8f lo, hi;
};
enum Kind : int64_t { kDense = 0, kU8 = 1, kU4 = 2 };
constexpr int64_t NB = 12;  // output channels per block (decoded together, reused across every row of x)

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, 32);
  return v;
}
inline void store16(float* p, F16 v) {
  std::memcpy(p, &v.lo, 32);
  std::memcpy(p + 8, &v.hi, 32);
}

inline float hsum(v8f a) {  // fixed pairwise order: lane i + lane i + 4, then i + 2, then the last pair
  v4f b0, b1;
  std::memcpy(&b0, &a, 16);
  std::memcpy(&b1, reinterpret_cast<const char*>(&a) + 16, 16);
  const v4f b = b0 + b1;
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline v8f bf16x8(const c10::BFloat16* p) {  // 8 bfloat16 -> float32: the 16 bits move to the top half
#if defined(__AVX2__)
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  v8f f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#else
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  const v8u32 u = __builtin_convertvector(h, v8u32) << 16;
  v8f f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// 8 bytes widened to int32 lanes (GCC scalarizes __builtin_convertvector from 8-byte vectors)
inline v8i widen8(const uint8_t* p) {
#if defined(__AVX2__)
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v8i r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
#else
  v8u8 b;
  std::memcpy(&b, p, 8);
  return __builtin_convertvector(b, v8i);
#endif
}

// row n's weights as float32 into dst[K] (dense float32 rows are read in place: see block_rows)
void decode_row(int64_t kind, const void* w, const float* scales, const int32_t* zeros, int64_t n, int64_t K,
                int64_t group, at::ScalarType wtype, float* dst) {
  const int64_t groups = K / group;
  if (kind == kDense) {  // bfloat16
    const c10::BFloat16* row = static_cast<const c10::BFloat16*>(w) + n * K;
    for (int64_t k = 0; k < K; k += 16) store16(dst + k, F16{bf16x8(row + k), bf16x8(row + k + 8)});
    return;
  }
  (void)wtype;
  for (int64_t g = 0; g < groups; ++g) {
    const float s = scales[n * groups + g];
    const int32_t z = zeros[n * groups + g];
    const v8f sv = {s, s, s, s, s, s, s, s};
    const v8i zv = {z, z, z, z, z, z, z, z};
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      v8i lo, hi;
      if (kind == kU8) {
        lo = widen8(static_cast<const uint8_t*>(w) + n * K + k);
        hi = widen8(static_cast<const uint8_t*>(w) + n * K + k + 8);
      } else {
        const v8i b = widen8(static_cast<const uint8_t*>(w) + n * (K / 2) + k / 2);
        lo = b & 15;
        hi = b >> 4;
      }
      // (q - z) is exact, one rounding in the product: the float32 weight the reference dequantizes
      store16(dst + k, F16{__builtin_convertvector(lo - zv, v8f) * sv, __builtin_convertvector(hi - zv, v8f) * sv});
    }
  }
}

// acc + x * w: one explicit fused multiply-add where the CPU has it (left to the compiler, contraction would differ
// between tile shapes and break batch invariance), a rounded multiply then add where it has not
inline v8f fma8(v8f x, v8f w, v8f acc) {
#if defined(__FMA__)
  return _mm256_fmadd_ps(x, w, acc);
#else
  const v8f p = x * w;
  return acc + p;
#endif
}

// out[i][j] = dot(x[i], w[j]) over K, for MT rows of x and NT weight rows: one 8-lane accumulator per pair, chunk
// after chunk, then hsum. Every tile shape does exactly this per pair: shapes only change register reuse.
template <int MT, int NT>
inline void tile(const float* const* x, const float* const* w, int64_t K, float out[MT][NT]) {
  v8f acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = v8f{};
  for (int64_t k = 0; k < K; k += 8) {
    v8f wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = load8(w[j] + k);
    for (int i = 0; i < MT; ++i) {
      const v8f xv = load8(x[i] + k);
      for (int j = 0; j < NT; ++j) acc[i][j] = fma8(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) out[i][j] = hsum(acc[i][j]);
}

// tile shapes: accumulators + held weight vectors + one x vector within the vector registers
// M == 1 on encoded weights (bfloat16, 8-bit, 4-bit): the same weights and the same multiply-adds as decode_row +
// tile, decoded in registers instead of through the buffer (bit for bit the same results, fewer instructions)
template <int64_t KIND, int NT>
inline void row1(const float* x, const void* w, const float* scales, const int32_t* zeros, int64_t n0, int64_t K,
                 int64_t group, float out[NT]) {
  v8f acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = v8f{};
  if constexpr (KIND == kDense) {  // bfloat16
    const c10::BFloat16* rows[NT];
    for (int j = 0; j < NT; ++j) rows[j] = static_cast<const c10::BFloat16*>(w) + (n0 + j) * K;
    for (int64_t k = 0; k < K; k += 8) {
      const v8f xv = load8(x + k);
      for (int j = 0; j < NT; ++j) acc[j] = fma8(xv, bf16x8(rows[j] + k), acc[j]);
    }
  } else {
    const int64_t groups = K / group;
    const int64_t row_bytes = KIND == kU8 ? K : K / 2;
    for (int64_t g = 0; g < groups; ++g) {
      v8f sv[NT];
      v8i zv[NT];
      for (int j = 0; j < NT; ++j) {
        const float s = scales[(n0 + j) * groups + g];
        const int32_t z = zeros[(n0 + j) * groups + g];
        sv[j] = v8f{s, s, s, s, s, s, s, s};
        zv[j] = v8i{z, z, z, z, z, z, z, z};
      }
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        const v8f xlo = load8(x + k), xhi = load8(x + k + 8);
        for (int j = 0; j < NT; ++j) {
          const uint8_t* row = static_cast<const uint8_t*>(w) + (n0 + j) * row_bytes;
          v8i lo, hi;
          if constexpr (KIND == kU8) {
            lo = widen8(row + k);
            hi = widen8(row + k + 8);
          } else {
            const v8i b = widen8(row + k / 2);
            lo = b & 15;
            hi = b >> 4;
          }
          acc[j] = fma8(xlo, __builtin_convertvector(lo - zv[j], v8f) * sv[j], acc[j]);
          acc[j] = fma8(xhi, __builtin_convertvector(hi - zv[j], v8f) * sv[j], acc[j]);
        }
      }
    }
  }
  for (int j = 0; j < NT; ++j) out[j] = hsum(acc[j]);
}

template <int64_t KIND, typename Emit>
inline void block_row1(const float* x, const void* w, const float* scales, const int32_t* zeros, int64_t n0,
                       int64_t nb, int64_t K, int64_t group, Emit&& emit) {
  int64_t j = 0;
  for (; j + 4 <= nb; j += 4) {
    float out[4];
    row1<KIND, 4>(x, w, scales, zeros, n0 + j, K, group, out);
    for (int q = 0; q < 4; ++q) emit(0, n0 + j + q, out[q]);
  }
  for (; j < nb; ++j) {
    float out[1];
    row1<KIND, 1>(x, w, scales, zeros, n0 + j, K, group, out);
    emit(0, n0 + j, out[0]);
  }
}

#if defined(__AVX512F__)
constexpr int MT = 4, NT = 6;  // 32 registers
#else
constexpr int MT = 4, NT = 3;  // 16 ymm
#endif
constexpr int NT1 = 6;  // M == 1: six accumulation chains in flight

template <typename T>
void run(const float* xf, int64_t M, int64_t K, int64_t N, int64_t kind, const void* w, at::ScalarType wtype,
         const float* scales, const int32_t* zeros, int64_t group, const T* bias, T* y) {
  const int64_t blocks = (N + NB - 1) / NB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const bool direct = kind == kDense && wtype == at::kFloat;
    std::vector<float> buf(direct || M == 1 ? 0 : NB * K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, N - n0);
      auto emit = [&](int64_t m, int64_t n, float v) {
        if (bias != nullptr) v += static_cast<float>(bias[n]);
        y[m * N + n] = static_cast<T>(v);
      };
      if (M == 1 && !direct) {
        if (kind == kDense) {
          block_row1<kDense>(xf, w, scales, zeros, n0, nb, K, group, emit);
        } else if (kind == kU8) {
          block_row1<kU8>(xf, w, scales, zeros, n0, nb, K, group, emit);
        } else {
          block_row1<kU4>(xf, w, scales, zeros, n0, nb, K, group, emit);
        }
        continue;
      }
      const float* wrow[NB];
      for (int64_t j = 0; j < nb; ++j) {
        if (kind == kDense && wtype == at::kFloat) {
          wrow[j] = static_cast<const float*>(w) + (n0 + j) * K;
        } else {
          decode_row(kind, w, scales, zeros, n0 + j, K, group, wtype, buf.data() + j * K);
          wrow[j] = buf.data() + j * K;
        }
      }
      int64_t m = 0;
      if (M == 1) {
        const float* xr[1] = {xf};
        int64_t j = 0;
        for (; j + NT1 <= nb; j += NT1) {
          float out[1][NT1];
          tile<1, NT1>(xr, wrow + j, K, out);
          for (int q = 0; q < NT1; ++q) emit(0, n0 + j + q, out[0][q]);
        }
        for (; j < nb; ++j) {
          float out[1][1];
          tile<1, 1>(xr, wrow + j, K, out);
          emit(0, n0 + j, out[0][0]);
        }
        continue;
      }
      for (; m + MT <= M; m += MT) {
        const float* xr[MT];
        for (int i = 0; i < MT; ++i) xr[i] = xf + (m + i) * K;
        int64_t j = 0;
        for (; j + NT <= nb; j += NT) {
          float out[MT][NT];
          tile<MT, NT>(xr, wrow + j, K, out);
          for (int i = 0; i < MT; ++i)
            for (int q = 0; q < NT; ++q) emit(m + i, n0 + j + q, out[i][q]);
        }
        for (; j < nb; ++j) {
          float out[MT][1];
          tile<MT, 1>(xr, wrow + j, K, out);
          for (int i = 0; i < MT; ++i) emit(m + i, n0 + j, out[i][0]);
        }
      }
      for (; m < M; ++m) {  // the last rows: one at a time (same per-pair arithmetic)
        const float* xr[1] = {xf + m * K};
        for (int64_t j = 0; j < nb; ++j) {
          float out[1][1];
          tile<1, 1>(xr, wrow + j, K, out);
          emit(m, n0 + j, out[0][0]);
        }
      }
    }
  });
}

at::Tensor stream_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                         const c10::optional<at::Tensor>& zeros, int64_t kind, int64_t group,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "stream_linear: CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "stream_linear: x [M, K] with contiguous rows expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "stream_linear: float32 or bfloat16 x");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "stream_linear: contiguous 2-D weight expected");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "stream_linear: in_features must be a multiple of 16");
  if (kind == kDense) {
    TORCH_CHECK(w.size(1) == K && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
                "stream_linear: dense weight [N, K] float32 or bfloat16 expected");
  } else {
    TORCH_CHECK(kind == kU8 || kind == kU4, "stream_linear: unknown weight kind ", kind);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) == (kind == kU8 ? K : K / 2),
                "stream_linear: uint8 codes [N, K] (8-bit) or [N, K / 2] (4-bit) expected");
    TORCH_CHECK(group > 0 && group % 16 == 0 && K % group == 0, "stream_linear: group must divide K, multiple of 16");
    TORCH_CHECK(scales.has_value() && zeros.has_value(), "stream_linear: quantized weights need scales and zeros");
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == N * (K / group),
                "stream_linear: scales [N, K / group] float32 expected");
    TORCH_CHECK(zeros->scalar_type() == at::kInt && zeros->is_contiguous() && zeros->numel() == N * (K / group),
                "stream_linear: zeros [N, K / group] int32 expected");
  }
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  auto xf = x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == x.scalar_type(), "stream_linear: bias [N] of x's dtype");
    b = bias->contiguous();
  }
  const float* s = kind == kDense ? nullptr : scales->data_ptr<float>();
  const int32_t* z = kind == kDense ? nullptr : zeros->data_ptr<int32_t>();
  if (x.scalar_type() == at::kFloat) {
    run<float>(xf.data_ptr<float>(), M, K, N, kind, w.data_ptr(), w.scalar_type(), s, z, group,
               b ? b->data_ptr<float>() : nullptr, out.data_ptr<float>());
  } else {
    run<c10::BFloat16>(xf.data_ptr<float>(), M, K, N, kind, w.data_ptr(), w.scalar_type(), s, z, group,
                       b ? b->data_ptr<c10::BFloat16>() : nullptr, out.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def("stream_linear(Tensor x, Tensor w, Tensor? scales, Tensor? zeros, int kind, int group, Tensor? bias) -> Tensor");
  m.impl("stream_linear", c10::DispatchKey::CPU, &stream_linear);
}
