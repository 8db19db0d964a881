// Weight-streaming linear for CPU decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W stored dense (float32,
// bfloat16) or weight-only quantized (8-bit or 4-bit codes with a scale and an integer zero point per group of
// `group` input channels: w = (q - z) * s, exactly as the GPTQ reference dequantizes in float32).
//
// Each output element is one float32 dot product with a fixed order: 8 lanes accumulated chunk after chunk over K
// with explicit fused multiply-adds, then a fixed pairwise sum of the lanes. The order never depends on M, on the
// tile a row falls in or on the thread: a row's result is the same alone and in any batch (batch invariance, as the
// engine requires). Tile shapes (register blocking) differ between AVX2 and AVX-512 builds; the arithmetic does not.
//
// Work split: blocks of NB output channels, each thread streaming its contiguous share and then taking what is left
// of the others' (parallel_blocks); a block's weights are decoded once into float32 (a few KiB, L1/L2) and reused by
// every row of x, so the weights stream from memory once per call whatever M is.
//
// A bfloat16 x against bfloat16 weights takes its own path (vdpbf16ps where the CPU has AVX-512 BF16, the same
// arithmetic in fused multiply-adds elsewhere: see "bfloat16 activations" below).
//
// Kinds 3 and 4 take the same 8-bit and 4-bit codes with x quantized to int8 per block of 32 channels (as llama.cpp
// does for its Q8_0 / Q4_0 dot products): integer dot products, about a fifth of the instructions per weight (1.2-1.8x
// faster per batch-1 call than widening every code to float32, measured here; see "int8 activations" below).
//
// Kinds 5 and 6 are kinds 3 and 4 on codes interleaved 4 output channels at a time (one sequential stream per batch-1
// tile: 1.2-1.9x faster batch-1 calls than kinds 3 and 4 on the default model's shapes, 1.15-1.5x whole decode steps).
//
// Kinds 7 and 8 take the same codes and int8 activations in channel lanes (a vector lane per output channel, see
// "channel lanes" below): their own per-pair arithmetic, 2-2.4x fewer instructions per weight than kinds 5 and 6.
//
// 4-bit layout: each 16-channel chunk of a row is 8 bytes; byte i holds channel i (low nibble) and channel i + 8
// (high nibble). engine/quant/stream.py packs it and holds the plain-torch reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_layer_parts.h"

#if defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>
#include <cmath>
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

// The first row tile over a block's weights (every tile at batch 1) reads them as one stream per thread; later row
// tiles find them in cache. On the AVX2 VM measured here (AMD EPYC, Zen 3 cores under KVM) the hardware prefetchers
// alone left the quantized streams waiting on DRAM: their linears took nearly the sum of their arithmetic and their
// reads. Touching the line 2 KiB ahead as each one is consumed made whole batch-1 decode steps 1.05-1.14x faster at
// 8-bit and 4-bit and 1.08-1.15x in bf16 (1 and 4 KiB ahead: less), 2 and 4 rows 1.05-1.14x, 8 and 16 rows
// 1.01-1.02x; f32 moved within the noise (0.94-1.02x in the benchmark's alternating rounds). On the AVX-512
// machines (Zen 4) a prefetch ahead of the 4-bit stream measured 0.97-0.98x, so those builds start at 0. The
// distance is a setting (op stream_ahead; `profile_decode.py --stream-ahead` times a step at another one against the
// build's) and never changes a result. A prefetch does not fault, so one past a tensor's end is harmless; its address
// is an integer sum.
#if defined(__AVX512F__)
constexpr int64_t kStreamAheadDefault = 0;
#else
constexpr int64_t kStreamAheadDefault = 2048;
#endif
constexpr int64_t kStreamAheadMax = 1 << 16;
std::atomic<int64_t> g_stream_ahead{kStreamAheadDefault};
inline int64_t stream_ahead_bytes() { return g_stream_ahead.load(std::memory_order_relaxed); }
inline int64_t first_rows_ahead(int64_t m) { return m == 0 ? stream_ahead_bytes() : 0; }  // a tile from row m
inline void stream_ahead(const void* p, int64_t bytes) {
  if (bytes != 0) __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + bytes), 0, 3);
}

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
inline void tile(const float* const* x, const float* const* w, int64_t K, float out[MT][NT], int64_t ahead) {
  v8f acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = v8f{};
  if (NT != 1) ahead = 0;  // one weight stream: one line a 64-byte step
  for (int64_t k = 0; k < K; k += 8) {
    v8f wv[NT];
    if (k % 16 == 0) stream_ahead(w[0] + k, ahead);
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

// fn(b) for every b in [0, n): each thread streams its own contiguous share front to back (the hardware prefetchers
// follow one sequential stream per core), then takes the blocks still left at the back of the others' shares (work
// stealing, as ggml's matmul chunks): a thread the OS preempts (the HTTP process, a client on the same cores) does
// not leave half the work waiting for it. Which thread computes a block never changes its result.
class alignas(64) BlockRange {  // blocks [front, back) left, packed in one word so owner and thieves claim with one CAS
  // (a cache line each: the threads claim their own blocks without bouncing one line between cores)
 public:
  void reset(int64_t front, int64_t back) { fb_.store(pack(front, back), std::memory_order_relaxed); }
  bool take(bool from_front, int64_t& b) {
    uint64_t v = fb_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = static_cast<int64_t>(v >> 32), back = static_cast<int64_t>(v & 0xffffffffu);
      if (front >= back) return false;
      const uint64_t next = from_front ? pack(front + 1, back) : pack(front, back - 1);
      if (fb_.compare_exchange_weak(v, next, std::memory_order_relaxed)) {
        b = from_front ? front : back - 1;
        return true;
      }
    }
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) {
    return (static_cast<uint64_t>(front) << 32) | static_cast<uint64_t>(back);
  }
  std::atomic<uint64_t> fb_{0};
};

template <typename Fn>
void parallel_blocks(int64_t n, Fn&& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<BlockRange> shares(workers);
  for (int64_t t = 0; t < workers; ++t) shares[t].reset(t * n / workers, (t + 1) * n / workers);
  at::parallel_for(0, workers, 1, [&](int64_t t0, int64_t t1) {
    int64_t b;
    for (int64_t t = t0; t < t1; ++t)
      while (shares[t].take(true, b)) fn(b);
    for (int64_t i = 1; i < workers; ++i)
      while (shares[(t0 + i) % workers].take(false, b)) fn(b);
  });
}

// One block's tiles (M rows x nb channels from n0): MT x NT tiles, MT x 1 for the block's last channels, then the
// rows left one at a time in 1 x NT1 and 1 x 1 tiles. `tile(mt, nt, m, j, out)` (mt, nt as std::integral_constant)
// fills float out[mt][nt] for rows m.. and channels n0 + j..; every shape does the same per-pair arithmetic.
template <int MT, typename T>
inline std::array<const T*, MT> row_ptrs(const T* x, int64_t m, int64_t K) {  // rows m .. m + MT - 1 of x [M, K]
  std::array<const T*, MT> rows;
  for (int i = 0; i < MT; ++i) rows[i] = x + (m + i) * K;
  return rows;
}

template <int MT, int NT, int NT1, typename Tile, typename Emit>
void walk_tiles(int64_t M, int64_t n0, int64_t nb, Tile&& tile, Emit&& emit) {
  using one = std::integral_constant<int, 1>;
  int64_t m = 0;
  for (; m + MT <= M; m += MT) {
    int64_t j = 0;
    for (; j + NT <= nb; j += NT) {
      float out[MT][NT];
      tile(std::integral_constant<int, MT>{}, std::integral_constant<int, NT>{}, m, j, out);
      for (int i = 0; i < MT; ++i)
        for (int t = 0; t < NT; ++t) emit(m + i, n0 + j + t, out[i][t]);
    }
    for (; j < nb; ++j) {
      float out[MT][1];
      tile(std::integral_constant<int, MT>{}, one{}, m, j, out);
      for (int i = 0; i < MT; ++i) emit(m + i, n0 + j, out[i][0]);
    }
  }
  for (; m < M; ++m) {
    int64_t j = 0;
    for (; j + NT1 <= nb; j += NT1) {
      float out[1][NT1];
      tile(one{}, std::integral_constant<int, NT1>{}, m, j, out);
      for (int t = 0; t < NT1; ++t) emit(m, n0 + j + t, out[0][t]);
    }
    for (; j < nb; ++j) {
      float out[1][1];
      tile(one{}, one{}, m, j, out);
      emit(m, n0 + j, out[0][0]);
    }
  }
}

#if defined(__AVX512F__)
constexpr int MT = 4, NT = 6;  // 32 registers
#else
constexpr int MT = 4, NT = 3;  // 16 ymm
#endif
constexpr int NT1 = 1;  // M == 1: one row at a time reads memory fastest (~1.3x over 6 chains in flight, measured)

template <typename T>
void run(const float* xf, int64_t M, int64_t K, int64_t N, int64_t kind, const void* w, at::ScalarType wtype,
         const float* scales, const int32_t* zeros, int64_t group, const T* bias, T* y) {
  const int64_t blocks = (N + NB - 1) / NB;
  const bool direct = kind == kDense && wtype == at::kFloat;
  parallel_blocks(blocks, [&](int64_t b) {
    thread_local std::vector<float> buf;  // decoded weights of one block
    if (!direct && M > 1 && static_cast<int64_t>(buf.size()) < NB * K) buf.resize(NB * K);
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
      return;
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
    walk_tiles<MT, NT, NT1>(M, n0, nb, [&](auto mt, auto nt, int64_t m, int64_t j, auto& out) {
      const auto xr = row_ptrs<decltype(mt)::value>(xf, m, K);
      tile<decltype(mt)::value, decltype(nt)::value>(xr.data(), wrow + j, K, out, first_rows_ahead(m));
    }, emit);
  });
}

// ---- int8 activations x 8-bit / 4-bit codes: integer dot products (kinds kU8A8, kU4A8) ------------------------------
// Each row of x is quantized per block of 32 input channels: d = max|x| / 127, a = round-half-even(x * (1 / d)) in
// [-127, 127] (stream.py quantize_activations, the reference, computes the same a and d bit for bit). The product of a
// block with its codes is an exact int32 per lane (4 channels each: sum a * (q - z)); a 64-channel chunk is 16 lanes,
// and each pair (row of x, output channel) accumulates y += float(lane) * (d_lane * s) with one fused multiply-add per
// lane and chunk, then sums its 16 lanes in a fixed order. The order depends on neither M, the tile nor the thread
// (batch invariance), nor on the instruction set: AVX-512 VNNI (vpdpbusd on 64 bytes), AVX2 (two 32-byte halves with
// vpmaddubsw, 8-bit codes offset to signed so no pair saturates) and plain C++ give the same bits.
// Requires K and the group size to be multiples of 64. 8-bit codes are read in order; for 4-bit codes the activation
// bytes are laid out to match the nibbles (a chunk's 32 code bytes: low nibbles are lanes 0-7, high nibbles 8-15).
constexpr int64_t kU8A8 = 3, kU4A8 = 4;
// Kinds 5 and 6: the same, with the codes of every IL_ROWS consecutive output channels interleaved chunk by chunk
// ([N / IL_ROWS, K / 64, IL_ROWS, code bytes of a chunk], stream.py interleave_rows): a batch-1 tile of IL_ROWS
// channels then reads one sequential stream instead of IL_ROWS short ones (a row of a small model is 5-9 cache
// lines, too short for the hardware prefetchers to follow). The arithmetic is kinds 3 and 4's, bit for bit.
constexpr int64_t kU8A8I = 5, kU4A8I = 6, IL_ROWS = 4;
constexpr int64_t QB = 32, QC = 64;  // activation block, channels per chunk (16 int32 lanes)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// 4-bit: the high nibbles are multiplied in place (code * 16, one AND instead of a shift and an AND): their lanes'
// integers (zero term included) are 16x, their scale d / 16. Powers of two scale exactly, so every product and sum is
// bit for bit the unshifted one.
constexpr int32_t kHighNibble = 16;
#else
constexpr int32_t kHighNibble = 1;
#endif

struct QAct {
  std::vector<int8_t> a;      // [M, K] activation bytes in the codes' order
  std::vector<int32_t> asum;  // [M, K / 64, 16] per-lane sums of a (the zero-point term)
  std::vector<float> dv;      // [M, K / 64, 16] per-lane block scale d
  std::vector<int32_t> zt;    // [M, K / 64, 16] the zero term when every group has the same zero point (else empty)
};

inline int64_t q4_channel(int64_t p) {  // 4-bit: byte p of a chunk's activation layout -> channel within the chunk
  const int64_t j = p & 31, t = j >> 3, i = j & 7;  // code byte j: 16-channel piece t, position i
  return 16 * t + i + (p >= 32 ? 8 : 0);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// One 64-channel chunk of quantize_rows in vector registers: the same operations lane by lane (the max of |x| is
// exact in any order, x * (1 / d) is one rounded product, roundscale rounds half to even as nearbyint does), so the
// same bytes, sums and scales as the scalar loop below.
inline void quantize_chunk(const float* xc, bool u4, int8_t* dst, int32_t* asum, float* dv) {
  __m512 v[4];
  float d[2];
  for (int h = 0; h < 2; ++h) {
    v[2 * h] = _mm512_loadu_ps(xc + h * QB);
    v[2 * h + 1] = _mm512_loadu_ps(xc + h * QB + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[2 * h]), _mm512_abs_ps(v[2 * h + 1])));
    d[h] = amax / 127.f;
    const __m512 id = _mm512_set1_ps(d[h] != 0.f ? 1.f / d[h] : 0.f);
    for (int i = 2 * h; i < 2 * h + 2; ++i) {
      const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v[i] = _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-127.f), r));
    }
  }
  __m512i bytes = _mm512_castsi128_si512(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v[0])));
  bytes = _mm512_inserti32x4(bytes, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v[1])), 1);
  bytes = _mm512_inserti32x4(bytes, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v[2])), 2);
  bytes = _mm512_inserti32x4(bytes, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v[3])), 3);
  if (u4) bytes = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), bytes);  // q4_channel's order
  _mm512_storeu_si512(dst, bytes);
  __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), bytes);  // 4 bytes per lane
  if (u4) sums = _mm512_mask_slli_epi32(sums, 0xff00, sums, 4);  // lanes 8-15 hold high nibbles: x kHighNibble
  _mm512_storeu_si512(asum, sums);
  for (int64_t l = 0; l < 16; ++l)
    dv[l] = u4 ? d[(l & 7) >> 2] / static_cast<float>(l >= 8 ? kHighNibble : 1) : d[l / 8];
}
static_assert(QC == 64 && QB == 32, "quantize_chunk: 64-channel chunks of two 32-channel blocks");
static_assert(kHighNibble == 16, "quantize_chunk: high nibbles at x16");
#elif defined(__AVX2__)
// The same chunk in 256-bit registers, the same operations lane by lane as the scalar loop below: max and min take
// their vector operand first, so a NaN falls through to the other one as std::max and std::min let it, and
// _mm256_round_ps rounds half to even as nearbyint does. Each call of a batch-1 step quantizes its input here: the
// scalar loop (nearbyint a library call per channel) took a fifth of a small linear's time.
inline void quantize_chunk(const float* xc, bool u4, int8_t* dst, int32_t* asum, float* dv) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256i n[8];  // the 64 rounded values as int32, in channel order
  float d[2];
  for (int h = 0; h < 2; ++h) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xc + h * QB + 8 * i);
      amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), amax);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    d[h] = _mm_cvtss_f32(m4) / 127.f;
    const __m256 id = _mm256_set1_ps(d[h] != 0.f ? 1.f / d[h] : 0.f);
    for (int i = 0; i < 4; ++i) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      n[4 * h + i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f)));
    }
  }
  // int32 -> int8 (no saturation: |n| <= 127); the packs interleave 128-bit halves, the permute restores the order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i b[2];  // channels 0-31, 32-63 (qwords Q0-Q3, Q4-Q7)
  for (int h = 0; h < 2; ++h) {
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(n[4 * h], n[4 * h + 1]),
                                         _mm256_packs_epi32(n[4 * h + 2], n[4 * h + 3]));
    b[h] = _mm256_permutevar8x32_epi32(w, order);
  }
  if (u4) {  // q4_channel's order: qwords Q0 Q2 Q4 Q6 | Q1 Q3 Q5 Q7
    const __m256i e = _mm256_permute4x64_epi64(b[0], 0xD8), o = _mm256_permute4x64_epi64(b[1], 0xD8);  // Q0 Q2 Q1 Q3
    b[0] = _mm256_permute2x128_si256(e, o, 0x20);
    b[1] = _mm256_permute2x128_si256(e, o, 0x31);
  }
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * h), b[h]);
    const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, b[h]), ones16);  // 4 bytes per lane, exact
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(asum + 8 * h), sums);
  }
  for (int64_t l = 0; l < 16; ++l) dv[l] = u4 ? d[(l & 7) >> 2] : d[l / 8];
}
static_assert(QC == 64 && QB == 32, "quantize_chunk: 64-channel chunks of two 32-channel blocks");
static_assert(kHighNibble == 1, "quantize_chunk (AVX2): high nibbles as they are");
#endif

void quantize_rows(const float* x, int64_t M, int64_t K, bool u4, QAct& q) {
  q.a.resize(M * K);
  q.asum.resize(M * K / 4);
  q.dv.resize(M * K / 4);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t c = 0; c < K / QC; ++c) {
#if (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)) || defined(__AVX2__)
        const int64_t at = (m * (K / QC) + c) * 16;
        quantize_chunk(x + m * K + c * QC, u4, q.a.data() + m * K + c * QC, q.asum.data() + at, q.dv.data() + at);
#else
        const float* xc = x + m * K + c * QC;
        int8_t nat[QC];
        float d[2];
        for (int h = 0; h < 2; ++h) {
          float amax = 0.f;
          for (int64_t i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(xc[h * QB + i]));
          d[h] = amax / 127.f;
          const float id = d[h] != 0.f ? 1.f / d[h] : 0.f;
          for (int64_t i = 0; i < QB; ++i) {
            const float r = std::nearbyint(xc[h * QB + i] * id);  // round half to even, as torch.round
            nat[h * QB + i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
          }
        }
        int8_t* dst = q.a.data() + m * K + c * QC;
        for (int64_t p = 0; p < QC; ++p) dst[p] = u4 ? nat[q4_channel(p)] : nat[p];
        for (int64_t l = 0; l < 16; ++l) {
          const int64_t at = (m * (K / QC) + c) * 16 + l;
          const int32_t high = u4 && l >= 8 ? kHighNibble : 1;
          q.asum[at] = (dst[4 * l] + dst[4 * l + 1] + dst[4 * l + 2] + dst[4 * l + 3]) * high;
          q.dv[at] = d[u4 ? q4_channel(4 * l) / QB : l / 8] / static_cast<float>(high);
        }
#endif
      }
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
struct QI {
  __m512i v;
};
struct QF {
  __m512 v;
};
inline QF qf_zero() { return {_mm512_setzero_ps()}; }
inline QI qi_load(const int32_t* p) { return {_mm512_loadu_si512(p)}; }
inline QF qf_load(const float* p) { return {_mm512_loadu_ps(p)}; }
template <int64_t KIND>
inline int32_t zero_coef(int32_t z) { return -z; }
inline QI zero_term(int32_t zc, QI asum) { return {_mm512_mullo_epi32(_mm512_set1_epi32(zc), asum.v)}; }
struct QW {  // a chunk's 64 codes as bytes
  __m512i v;
};
template <int64_t KIND>
inline QW qload(const uint8_t* codes) {
  if constexpr (KIND == kU8A8) {
    return {_mm512_loadu_si512(codes)};
  } else {  // low nibbles in lanes 0-7, high nibbles (times 16) in lanes 8-15
    const __m512i nibbles = _mm512_inserti64x4(_mm512_set1_epi8(0x0f), _mm256_set1_epi8(static_cast<char>(0xf0)), 1);
    return {_mm512_and_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))),
                             nibbles)};
  }
}
struct QA {  // a chunk's 64 activation bytes, loaded once for every output channel of a tile
  __m512i v;
};
// the empty asm keeps the loaded value in its register: the compiler would otherwise fold the load into each
// channel's vpdpbusd (one more load per channel and chunk)
inline QA qa_plain(const int8_t* a) { return {_mm512_loadu_si512(a)}; }
inline QA qa_load(const int8_t* a) {
  QA r{_mm512_loadu_si512(a)};
  asm volatile("" : "+v"(r.v));
  return r;
}
inline QF qf_keep(QF x) {
  asm volatile("" : "+v"(x.v));
  return x;
}
template <int64_t KIND>
inline QI qdot(QW w, QA a, QI init) {  // init + sum over each lane's 4 bytes of codes * a
  return {_mm512_dpbusd_epi32(init.v, w.v, a.v)};
}
inline QF qscale(QF dv, float s) { return {_mm512_mul_ps(dv.v, _mm512_set1_ps(s))}; }
inline QF qacc(QI lanes, QF scale, QF y) { return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes.v), scale.v, y.v)}; }
inline float qsum(QF y) {
  v8f h[2];
  std::memcpy(h, &y.v, 64);
  return hsum(h[0] + h[1]);
}
#elif defined(__AVX2__) && defined(__FMA__)
struct QI {
  __m256i lo, hi;
};
struct QF {
  __m256 lo, hi;
};
inline QF qf_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline QI qi_load(const int32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
}
inline QF qf_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
// 8-bit codes go in as signed (q - 128) so that |code| * |a| pairs stay within vpmaddubsw's int16: the zero term
// gives the 128 back
template <int64_t KIND>
inline int32_t zero_coef(int32_t z) { return KIND == kU8A8 ? 128 - z : -z; }
inline QI zero_term(int32_t zc, QI asum) {
  const __m256i c = _mm256_set1_epi32(zc);
  return {_mm256_mullo_epi32(c, asum.lo), _mm256_mullo_epi32(c, asum.hi)};
}
inline __m256i dot32(__m256i w, __m256i a, __m256i init) {  // w unsigned (< 129 in magnitude terms), a signed
  return _mm256_add_epi32(init, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)));
}
struct QW {  // a chunk's 64 codes as bytes (8-bit: signed q - 128)
  __m256i lo, hi;
};
template <int64_t KIND>
inline QW qload(const uint8_t* codes) {
  if constexpr (KIND == kU8A8) {
    const __m256i off = _mm256_set1_epi8(static_cast<char>(0x80));
    return {_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)), off),
            _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32)), off)};
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)), m = _mm256_set1_epi8(15);
    return {_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16(v, 4), m)};
  }
}
struct QA {
  const int8_t* p;
};
inline QA qa_load(const int8_t* a) { return {a}; }
inline QA qa_plain(const int8_t* a) { return {a}; }
inline QF qf_keep(QF x) { return x; }
template <int64_t KIND>
inline QI qdot(QW w, QA qa, QI init) {
  const int8_t* a = qa.p;
  const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
  if constexpr (KIND == kU8A8) {
    return {dot32(_mm256_abs_epi8(w.lo), _mm256_sign_epi8(a0, w.lo), init.lo),
            dot32(_mm256_abs_epi8(w.hi), _mm256_sign_epi8(a1, w.hi), init.hi)};
  } else {
    return {dot32(w.lo, a0, init.lo), dot32(w.hi, a1, init.hi)};
  }
}
inline QF qscale(QF dv, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  return {_mm256_mul_ps(dv.lo, sv), _mm256_mul_ps(dv.hi, sv)};
}
inline QF qacc(QI lanes, QF scale, QF y) {
  return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes.lo), scale.lo, y.lo),
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes.hi), scale.hi, y.hi)};
}
inline float qsum(QF y) {
  v8f lo, hi;
  std::memcpy(&lo, &y.lo, 32);
  std::memcpy(&hi, &y.hi, 32);
  return hsum(lo + hi);
}
#else
struct QI {
  int32_t l[16];
};
struct QF {
  float l[16];
};
inline QF qf_zero() { return QF{}; }
inline QI qi_load(const int32_t* p) {
  QI r;
  std::memcpy(r.l, p, 64);
  return r;
}
inline QF qf_load(const float* p) {
  QF r;
  std::memcpy(r.l, p, 64);
  return r;
}
template <int64_t KIND>
inline int32_t zero_coef(int32_t z) { return -z; }
inline QI zero_term(int32_t zc, QI asum) {
  for (int l = 0; l < 16; ++l) asum.l[l] *= zc;
  return asum;
}
struct QW {
  uint8_t b[64];
};
template <int64_t KIND>
inline QW qload(const uint8_t* codes) {
  QW w;
  for (int p = 0; p < 64; ++p) w.b[p] = KIND == kU8A8 ? codes[p] : (p < 32 ? codes[p] & 15 : codes[p - 32] >> 4);
  return w;
}
struct QA {
  const int8_t* p;
};
inline QA qa_load(const int8_t* a) { return {a}; }
inline QA qa_plain(const int8_t* a) { return {a}; }
inline QF qf_keep(QF x) { return x; }
template <int64_t KIND>
inline QI qdot(const QW& w, QA a, QI init) {
  for (int p = 0; p < 64; ++p) init.l[p / 4] += w.b[p] * a.p[p];
  return init;
}
inline QF qscale(QF dv, float s) {
  for (int l = 0; l < 16; ++l) dv.l[l] *= s;
  return dv;
}
inline QF qacc(QI lanes, QF scale, QF y) {
  for (int l = 0; l < 16; ++l) y.l[l] = std::fma(static_cast<float>(lanes.l[l]), scale.l[l], y.l[l]);
  return y;
}
inline float qsum(QF y) {
  v8f lo, hi;
  std::memcpy(&lo, y.l, 32);
  std::memcpy(&hi, y.l + 8, 32);
  return hsum(lo + hi);
}
#endif

// out[i][j] = row m0 + i of x against output channel n0 + j; every tile shape does the same per pair
template <int64_t KIND, bool IL, bool UNIFORM, int MT, int NT>
inline void qtile(const QAct& q, int64_t m0, const uint8_t* w, const float* scales, const int32_t* zeros, int64_t n0,
                  int64_t K, int64_t group, float out[MT][NT]) {
  constexpr int64_t CB = KIND == kU8A8 ? QC : QC / 2;  // code bytes per chunk
  const int64_t chunks = K / QC, groups = K / group, per_group = group / QC, row_bytes = chunks * CB;
  const uint8_t* row[NT];  // channel n0 + j's first chunk; its chunk c is `step` bytes further on per chunk
  const int64_t step = IL ? IL_ROWS * CB : CB;
  for (int j = 0; j < NT; ++j)
    row[j] = IL ? w + ((n0 + j) / IL_ROWS) * (IL_ROWS * row_bytes) + ((n0 + j) % IL_ROWS) * CB : w + (n0 + j) * row_bytes;
  QF y[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) y[i][j] = qf_zero();
  // Groups of 64 (one group per chunk, the default export): one flat pass over the chunks, each channel's scale and
  // zero point read at its own forward-moving offset, the activations loaded once per chunk and kept in registers;
  // the arithmetic of the group loop below, pair by pair. The group loop around a one-chunk inner loop cost the
  // compiler registers it spilled in the hot loop: this pass is 1.4-1.8x faster at 64 rows (compute-bound), the same
  // at batch 1 (memory-bound).
  if (group == QC) {
    const float* sp[NT];
    const int32_t* zp[NT];
    for (int j = 0; j < NT; ++j) {
      sp[j] = scales + (n0 + j) * chunks;
      zp[j] = UNIFORM ? nullptr : zeros + (n0 + j) * chunks;
    }
    const int32_t* lane = (UNIFORM ? q.zt : q.asum).data();
    for (int64_t c = 0; c < chunks; ++c) {
      QI asum[MT];  // UNIFORM: the zero term itself
      QF dv[MT];
      QA a[MT];
      for (int i = 0; i < MT; ++i) {
        const int64_t at = ((m0 + i) * chunks + c) * 16;
        asum[i] = qi_load(lane + at);
        dv[i] = qf_keep(qf_load(q.dv.data() + at));
        a[i] = qa_load(q.a.data() + (m0 + i) * K + c * QC);
      }
      for (int j = 0; j < NT; ++j) {
        const QW codes = qload<KIND>(row[j] + c * step);
        const float s = sp[j][c];
        const int32_t zc = UNIFORM ? 0 : zero_coef<KIND>(zp[j][c]);
        for (int i = 0; i < MT; ++i)
          y[i][j] = qacc(qdot<KIND>(codes, a[i], UNIFORM ? asum[i] : zero_term(zc, asum[i])), qscale(dv[i], s),
                         y[i][j]);
      }
    }
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) out[i][j] = qsum(y[i][j]);
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    float s[NT];
    int32_t zc[NT];
    for (int j = 0; j < NT; ++j) {
      s[j] = scales[(n0 + j) * groups + g];
      zc[j] = UNIFORM ? 0 : zero_coef<KIND>(zeros[(n0 + j) * groups + g]);
    }
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      QI asum[MT];  // UNIFORM: the zero term itself
      QF dv[MT];
      QA a[MT];
      for (int i = 0; i < MT; ++i) {
        const int64_t at = ((m0 + i) * chunks + c) * 16;
        asum[i] = qi_load((UNIFORM ? q.zt : q.asum).data() + at);
        dv[i] = qf_load(q.dv.data() + at);
        a[i] = qa_plain(q.a.data() + (m0 + i) * K + c * QC);
      }
      for (int j = 0; j < NT; ++j) {
        const QW codes = qload<KIND>(row[j] + c * step);
        for (int i = 0; i < MT; ++i)
          y[i][j] = qacc(qdot<KIND>(codes, a[i], UNIFORM ? asum[i] : zero_term(zc[j], asum[i])), qscale(dv[i], s[j]),
                         y[i][j]);
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) out[i][j] = qsum(y[i][j]);
}

#if defined(__AVX512F__)
constexpr int QMT = 4, QNT = 4;
constexpr int QNT1 = 6;  // M == 1: output channels in flight (6 measured ~15% faster than 4 or 12 here)
#else
constexpr int QMT = 2, QNT = 2;
constexpr int QNT1 = 4;  // two ymm per accumulator
#endif

template <int64_t KIND, bool IL, bool UNIFORM, typename Emit>
void qblock(const QAct& q, int64_t M, const uint8_t* w, const float* scales, const int32_t* zeros, int64_t n0,
            int64_t nb, int64_t K, int64_t group, Emit&& emit) {
  constexpr int NT1 = IL ? static_cast<int>(IL_ROWS) : QNT1;  // batch 1, interleaved: one group per tile
  walk_tiles<QMT, QNT, NT1>(M, n0, nb, [&](auto mt, auto nt, int64_t m, int64_t j, auto& out) {
    qtile<KIND, IL, UNIFORM, decltype(mt)::value, decltype(nt)::value>(q, m, w, scales, zeros, n0 + j, K, group, out);
  }, emit);
}

template <typename T>
void run_q(const float* xf, int64_t M, int64_t K, int64_t N, int64_t kind, const uint8_t* w, const float* scales,
           const int32_t* zeros, bool uniform_zero, int64_t group, const T* bias, T* y) {
  thread_local QAct caller;  // reused: no allocation per call once it has grown
  QAct& q = caller;           // (a reference: the worker threads read the caller's, not their own thread_local)
  const bool il = kind == kU8A8I || kind == kU4A8I;
  if (il) kind -= kU8A8I - kU8A8;
  quantize_rows(xf, M, K, kind == kU4A8, q);
  if (uniform_zero) {  // sym GPTQ: one zero point, so the zero term is per row and chunk, not per output channel
    const int32_t zc = kind == kU8A8 ? zero_coef<kU8A8>(zeros[0]) : zero_coef<kU4A8>(zeros[0]);
    q.zt.resize(q.asum.size());
    for (size_t i = 0; i < q.asum.size(); ++i) q.zt[i] = zc * q.asum[i];
  }
  const int64_t blocks = (N + NB - 1) / NB;
  parallel_blocks(blocks, [&](int64_t b) {
    const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, N - n0);
    auto emit = [&](int64_t m, int64_t n, float v) {
      if (bias != nullptr) v += static_cast<float>(bias[n]);
      y[m * N + n] = static_cast<T>(v);
    };
    const auto go = [&](auto k, auto interleaved) {
      constexpr int64_t KIND = decltype(k)::value;
      constexpr bool IL = decltype(interleaved)::value;
      uniform_zero ? qblock<KIND, IL, true>(q, M, w, scales, zeros, n0, nb, K, group, emit)
                   : qblock<KIND, IL, false>(q, M, w, scales, zeros, n0, nb, K, group, emit);
    };
    using u8 = std::integral_constant<int64_t, kU8A8>;
    using u4 = std::integral_constant<int64_t, kU4A8>;
    if (kind == kU8A8) {
      il ? go(u8{}, std::true_type{}) : go(u8{}, std::false_type{});
    } else {
      il ? go(u4{}, std::true_type{}) : go(u4{}, std::false_type{});
    }
  });
}

// ---- kinds 7 and 8: channel lanes --------------------------------------------------------------------------------
// The codes and int8 activations of kinds 3 and 4, laid out so that each 32-bit lane of a vector is one output
// channel: a 64-byte code vector holds 4 consecutive input channels' codes (8-bit) or 8 (4-bit: the first 4 in the low
// nibbles, the next 4 in the high ones) of 16 output channels, and one vpdpbusd with 4 activation bytes broadcast to
// every lane advances all 16 channels. Kinds 3-6 spend a conversion, a scale product and a fused multiply-add per 64
// codes and channel on 16 partial lanes, then a horizontal sum; here those are per 32 input channels and 16 output
// channels, and there is no horizontal sum: far fewer vector instructions per weight, which is what kinds 5 and 6 were
// bound by in every batched call and at batch 1 with their weights in cache (Zen 4 runs each 512-bit instruction as
// two 256-bit halves); a batch-1 call streaming from memory waits on the bytes either way.
//
// Arithmetic, per pair (row of x, output channel): for each 32-channel activation block b in order, t_b = the exact
// int32 sum over the block of a * (q - z), then y = fma(float(t_b), s * d_b, y) from y = 0, with s the scale of the
// weight group holding block b and s * d_b one rounded product. Integer sums are exact in any order, so neither the
// tile, the thread nor the instruction set (AVX-512 VNNI, AVX2, plain C++) changes a bit, and a row's result is the
// same alone and in any batch.
// Layout (engine/quant/stream.py channel_lanes): codes [N / 16, K / S, 16, 4] with S = 4 (8-bit: byte t of lane c is
// channel c's code for input k + t) or S = 8 (4-bit: byte t of lane c holds input k + t in its low nibble and k + 4 + t
// in its high nibble), except that the vectors of lane groups 2p and 2p + 1 alternate (a batch-1 tile of 32 channels
// reads one sequential stream; an odd last group stands alone); scales [N / 16, K / group, 16] float32, zeros likewise
// int32 (or [1], one zero point).
constexpr int64_t kU8CL = 7, kU4CL = 8, CL_CH = 16, CL_NB = 32;  // channels per lane group, per block of work
// Kind 9: kind 7 with every code stored as q ^ 0x80 (q - 128 as a signed byte), for the builds that multiply 8-bit
// codes as signed bytes (AVX2's vpmaddubsw pairs would saturate on unsigned ones): they read them as they are, the
// others flip them back at load. Set by stream.py where the loaded build asks for it (channel_lane_u8_kind).
constexpr int64_t kU8CLS = 9;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr int CL_MT = 4;         // rows of x per batched tile
constexpr int CL_BATCH_NG = 2;   // lane groups per batched tile
constexpr int32_t kCLHigh = 16;  // 4-bit high nibbles are multiplied in place (code * 16: one AND, no shift)
constexpr int32_t kCLU8Off = 0;  // 8-bit codes go in as they are (vpdpbusd multiplies unsigned by signed bytes)
constexpr bool kCLU8Signed = false;
struct CLV {
  __m512i v;
};
template <bool U4, bool SIGNED>
inline void cl_load(const uint8_t* p, CLV& lo, CLV& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  if constexpr (U4) {
    lo.v = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
    hi.v = _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(0xf0)));
  } else if constexpr (SIGNED) {  // kind 9's codes back to unsigned
    lo.v = _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    lo.v = v;
  }
}
template <bool U4>
inline QI cl_dot(QI acc, CLV w, int32_t a4) { return {_mm512_dpbusd_epi32(acc.v, w.v, _mm512_set1_epi32(a4))}; }
inline QI qi_set1(int32_t v) { return {_mm512_set1_epi32(v)}; }
inline QI cl_zero_term(const int32_t* z, int32_t sum, int32_t off) {  // lane c: off * sum - z[c] * sum
  return {_mm512_add_epi32(_mm512_mullo_epi32(_mm512_loadu_si512(z), _mm512_set1_epi32(-sum)),
                           _mm512_set1_epi32(off * sum))};
}
template <bool U4>
inline QI cl_total(QI lo, QI hi) {  // hi: the high nibbles' sum times kCLHigh (exact: shifted back without loss)
  return {_mm512_add_epi32(lo.v, U4 ? _mm512_srai_epi32(hi.v, 4) : hi.v)};
}
inline void qf_store(float* p, QF y) { _mm512_storeu_ps(p, y.v); }
static_assert(kCLHigh == 16, "cl_total shifts by 4");
constexpr bool kCLSum16 = false;  // vpdpbusd adds each lane's 4 products into int32 in one instruction
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int CL_MT = 2;
constexpr int CL_BATCH_NG = 1;  // 16 ymm: one lane group at a time
constexpr int32_t kCLHigh = 1;
constexpr int32_t kCLU8Off = 128;  // 8-bit codes go in as signed q - 128 (vpmaddubsw pairs must not saturate)
constexpr bool kCLU8Signed = true;  // kind 9 stores them so: one instruction fewer per 32 codes
struct CLV {
  __m256i lo, hi;  // channels 0-7, 8-15
};
template <bool U4, bool SIGNED>
inline void cl_load(const uint8_t* p, CLV& lo, CLV& hi) {
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  if constexpr (U4) {
    const __m256i m = _mm256_set1_epi8(15);
    lo = {_mm256_and_si256(v0, m), _mm256_and_si256(v1, m)};
    hi = {_mm256_and_si256(_mm256_srli_epi16(v0, 4), m), _mm256_and_si256(_mm256_srli_epi16(v1, 4), m)};
  } else if constexpr (SIGNED) {
    lo = {v0, v1};
  } else {
    const __m256i off = _mm256_set1_epi8(static_cast<char>(0x80));
    lo = {_mm256_xor_si256(v0, off), _mm256_xor_si256(v1, off)};
  }
}
template <bool U4>
inline __m256i cl_dot8(__m256i acc, __m256i w, __m256i a) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (U4) return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w)), ones));
}
template <bool U4>
inline QI cl_dot(QI acc, CLV w, int32_t a4) {
  const __m256i a = _mm256_set1_epi32(a4);
  return {cl_dot8<U4>(acc.lo, w.lo, a), cl_dot8<U4>(acc.hi, w.hi, a)};
}
inline QI qi_set1(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
inline QI cl_zero_term(const int32_t* z, int32_t sum, int32_t off) {
  const __m256i s = _mm256_set1_epi32(-sum), o = _mm256_set1_epi32(off * sum);
  return {_mm256_add_epi32(_mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(z)), s), o),
          _mm256_add_epi32(_mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(z + 8)), s), o)};
}
template <bool U4>
inline QI cl_total(QI lo, QI hi) { return {_mm256_add_epi32(lo.lo, hi.lo), _mm256_add_epi32(lo.hi, hi.hi)}; }
// 4-bit: a block's products are summed in int16 lanes (vpmaddubsw's pairs added with vpaddw), widened once a block
// (one vpmaddwd), instead of widening and adding every pair: half the multiplies. Exact: a pair is at most
// 2 * 15 * 127 = 3810 in magnitude and a lane adds 2 * (QB / 8) of them a block (low and high nibbles), 30480 < 2^15.
constexpr bool kCLSum16 = true;
inline QI cl_dot16(QI acc, CLV w, int32_t a4) {
  const __m256i a = _mm256_set1_epi32(a4);
  QI r{_mm256_add_epi16(acc.lo, _mm256_maddubs_epi16(w.lo, a)),
       _mm256_add_epi16(acc.hi, _mm256_maddubs_epi16(w.hi, a))};
  // each sum in its register as it is made: left free, the compiler computes a block's 32 products first, then adds
  // them in a tree, spilling most of them to the stack (16 ymm)
  asm volatile("" : "+x"(r.lo), "+x"(r.hi));
  return r;
}
inline QI cl_widen16(QI init, QI acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  return {_mm256_add_epi32(init.lo, _mm256_madd_epi16(acc.lo, ones)),
          _mm256_add_epi32(init.hi, _mm256_madd_epi16(acc.hi, ones))};
}
static_assert(2 * (QB / 8) * 2 * 15 * 127 < 32768, "cl_dot16: a block's int16 sums must not overflow");
inline void qf_store(float* p, QF y) {
  _mm256_storeu_ps(p, y.lo);
  _mm256_storeu_ps(p + 8, y.hi);
}
#else
constexpr int CL_MT = 2;
constexpr int CL_BATCH_NG = 1;
constexpr int32_t kCLHigh = 1;
constexpr int32_t kCLU8Off = 0;
constexpr bool kCLU8Signed = false;
struct CLV {
  uint8_t b[64];
};
template <bool U4, bool SIGNED>
inline void cl_load(const uint8_t* p, CLV& lo, CLV& hi) {
  for (int i = 0; i < 64; ++i) {
    lo.b[i] = U4 ? p[i] & 15 : (SIGNED ? p[i] ^ 0x80 : p[i]);
    hi.b[i] = U4 ? p[i] >> 4 : 0;
  }
}
template <bool U4>
inline QI cl_dot(QI acc, const CLV& w, int32_t a4) {
  int8_t a[4];
  std::memcpy(a, &a4, 4);
  for (int l = 0; l < 16; ++l)
    for (int t = 0; t < 4; ++t) acc.l[l] += w.b[4 * l + t] * a[t];
  return acc;
}
inline QI qi_set1(int32_t v) {
  QI r;
  for (int l = 0; l < 16; ++l) r.l[l] = v;
  return r;
}
inline QI cl_zero_term(const int32_t* z, int32_t sum, int32_t off) {
  QI r;
  for (int l = 0; l < 16; ++l) r.l[l] = off * sum - z[l] * sum;
  return r;
}
template <bool U4>
inline QI cl_total(QI lo, QI hi) {
  for (int l = 0; l < 16; ++l) lo.l[l] += hi.l[l];
  return lo;
}
inline void qf_store(float* p, QF y) { std::memcpy(p, y.l, 64); }
constexpr bool kCLSum16 = false;
#endif
// kCLSum16's block sums (defined where it is true; the calls are discarded elsewhere)
QI cl_dot16(QI acc, CLV w, int32_t a4);
QI cl_widen16(QI init, QI acc);

struct CLBlocks {           // per row of x and 32-channel activation block
  std::vector<int32_t> sum;  // [M, K / 32] the block's sum of a
  std::vector<float> d;      // [M, K / 32] its scale
  std::vector<int32_t> zt;   // [M, K / 32] the whole zero term, when there is one zero point
};

// out [MT][NG * 16]: rows m0.. of x against the NG lane groups from g0; AHEAD: prefetch the codes `ahead` bytes on
// (a separate instantiation: the tiles that do not prefetch keep no test in their loop)
template <bool U4, bool SIGNED, bool UNIFORM, int MT, int NG, bool AHEAD>
inline void cl_tile(const QAct& q, const CLBlocks& cb, int64_t m0, int64_t K, int64_t group, const uint8_t* codes,
                    int64_t groups_n, const float* scales, const int32_t* zeros, int64_t g0, float* out,
                    int64_t ahead) {
  constexpr int64_t S = U4 ? 8 : 4;  // input channels per code vector
  constexpr int64_t VPB = QB / S;    // code vectors per activation block
  const int64_t blocks = K / QB, groups = K / group, bpg = group / QB, gbytes = (K / S) * 64;
  constexpr int32_t off = U4 ? 0 : kCLU8Off;
  QF y[MT][NG];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NG; ++j) y[i][j] = qf_zero();
  const uint8_t* gc[NG];  // lane group g0 + j's first vector; its vector v is v * gstep[j] further on
  int64_t gstep[NG];
  for (int j = 0; j < NG; ++j) {
    const int64_t g = g0 + j;
    const bool paired = (g | 1) < groups_n;
    gc[j] = codes + (g / 2) * 2 * gbytes + (paired ? (g % 2) * 64 : 0);
    gstep[j] = paired ? 128 : 64;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t g = b / bpg;
    QI lo[MT][NG], hi[MT][NG];
    for (int i = 0; i < MT; ++i) {
      const int64_t at = (m0 + i) * blocks + b;
      for (int j = 0; j < NG; ++j) {
        lo[i][j] = UNIFORM ? qi_set1(cb.zt[at]) : cl_zero_term(zeros + ((g0 + j) * groups + g) * CL_CH, cb.sum[at], off);
        hi[i][j] = qi_set1(0);
      }
    }
    for (int64_t v = 0; v < VPB; ++v) {
      int32_t a0[MT], a1[MT];
      for (int i = 0; i < MT; ++i) {
        const int8_t* ap = q.a.data() + (m0 + i) * K + b * QB + v * S;
        std::memcpy(&a0[i], ap, 4);
        if constexpr (U4) std::memcpy(&a1[i], ap + 4, 4);
      }
      for (int j = 0; j < NG; ++j) {
        CLV wl, wh;
        if constexpr (AHEAD) stream_ahead(gc[j] + (b * VPB + v) * gstep[j], ahead);
        cl_load<U4, SIGNED>(gc[j] + (b * VPB + v) * gstep[j], wl, wh);
        for (int i = 0; i < MT; ++i) {
          if constexpr (U4 && kCLSum16) {  // hi: the block's int16 sums
            hi[i][j] = cl_dot16(cl_dot16(hi[i][j], wl, a0[i]), wh, a1[i]);
          } else if constexpr (U4) {
            lo[i][j] = cl_dot<U4>(lo[i][j], wl, a0[i]);
            hi[i][j] = cl_dot<U4>(hi[i][j], wh, a1[i]);
          } else if (v & 1) {  // two chains a pair (exact integers: the order does not matter)
            hi[i][j] = cl_dot<U4>(hi[i][j], wl, a0[i]);
          } else {
            lo[i][j] = cl_dot<U4>(lo[i][j], wl, a0[i]);
          }
        }
      }
    }
    for (int i = 0; i < MT; ++i) {
      const float d = cb.d[(m0 + i) * blocks + b];
      for (int j = 0; j < NG; ++j) {
        QI t;
        if constexpr (U4 && kCLSum16) {
          t = cl_widen16(lo[i][j], hi[i][j]);
        } else {
          t = cl_total<U4>(lo[i][j], hi[i][j]);
        }
        y[i][j] = qacc(t, qscale(qf_load(scales + ((g0 + j) * groups + g) * CL_CH), d), y[i][j]);
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NG; ++j) qf_store(out + (i * NG + j) * CL_CH, y[i][j]);
}

template <typename T>
void run_cl(const float* xf, int64_t M, int64_t K, int64_t N, bool u4, bool sgn, const uint8_t* w,
            const float* scales, const int32_t* zeros, bool uniform, int64_t group, const T* bias, T* y) {
  thread_local QAct caller_q;  // reused: no allocation per call once grown (the workers read the caller's)
  thread_local CLBlocks caller_b;
  QAct& q = caller_q;
  CLBlocks& cb = caller_b;
  quantize_rows(xf, M, K, false, q);
  const int64_t blocks = K / QB, chunks = K / QC;
  cb.sum.resize(M * blocks);
  cb.d.resize(M * blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lanes = (m * chunks + b / 2) * 16 + (b % 2) * 8;  // quantize_rows' 8 lanes of this block
      int32_t s = 0;
      for (int l = 0; l < 8; ++l) s += q.asum[lanes + l];
      cb.sum[m * blocks + b] = s;
      cb.d[m * blocks + b] = q.dv[lanes];
    }
  if (uniform) {
    const int32_t zc = (u4 ? 0 : kCLU8Off) - zeros[0];
    cb.zt.resize(cb.sum.size());
    for (size_t i = 0; i < cb.sum.size(); ++i) cb.zt[i] = zc * cb.sum[i];
  }
  parallel_blocks((N + CL_NB - 1) / CL_NB, [&](int64_t blk) {
    const int64_t n0 = blk * CL_NB, ng = std::min<int64_t>(CL_NB, N - n0) / CL_CH, g0 = n0 / CL_CH;
    float out[CL_MT * CL_NB];
    // out [rows][width] -> y rows m.., channels c0.. (+ bias)
    const auto emit = [&](int64_t m, int64_t rows, int64_t c0, int64_t width) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < width; ++c) {
          float v = out[i * width + c];
          if (bias != nullptr) v += static_cast<float>(bias[c0 + c]);
          y[(m + i) * N + c0 + c] = static_cast<T>(v);
        }
    };
    const auto go = [&](auto u4c, auto sc, auto unic) {
      constexpr bool U4 = decltype(u4c)::value, S = decltype(sc)::value, UNI = decltype(unic)::value;
      // rows m.. against `groups` lane groups from g (the block's first row tile prefetches its codes)
      const auto tile = [&](auto rows, auto groups, int64_t m, int64_t g) {
        constexpr int R = decltype(rows)::value, G = decltype(groups)::value;
        const int64_t ahead = first_rows_ahead(m);
        if (ahead != 0) {
          cl_tile<U4, S, UNI, R, G, true>(q, cb, m, K, group, w, N / CL_CH, scales, zeros, g, out, ahead);
        } else {
          cl_tile<U4, S, UNI, R, G, false>(q, cb, m, K, group, w, N / CL_CH, scales, zeros, g, out, 0);
        }
      };
      using mt = std::integral_constant<int, CL_MT>;
      using one = std::integral_constant<int, 1>;
      using two = std::integral_constant<int, 2>;
      int64_t m = 0;
      for (; m + CL_MT <= M; m += CL_MT) {
        if (CL_BATCH_NG == 2 && ng == 2) {  // both lane groups in one pass over the block's stream
          tile(mt{}, std::integral_constant<int, CL_BATCH_NG>{}, m, g0);
          emit(m, CL_MT, n0, 2 * CL_CH);
          continue;
        }
        for (int64_t j = 0; j < ng; ++j) {
          tile(mt{}, one{}, m, g0 + j);
          emit(m, CL_MT, n0 + j * CL_CH, CL_CH);
        }
      }
      for (; m < M; ++m) {
        if (ng == 2) {
          tile(one{}, two{}, m, g0);
        } else {
          tile(one{}, one{}, m, g0);
        }
        emit(m, 1, n0, ng * CL_CH);
      }
    };
    static_assert(CL_NB == 2 * CL_CH, "run_cl: one or two lane groups a block");
    using yes = std::true_type;
    using no = std::false_type;
    if (u4) {
      uniform ? go(yes{}, no{}, yes{}) : go(yes{}, no{}, no{});
    } else if (sgn) {
      uniform ? go(no{}, yes{}, yes{}) : go(no{}, yes{}, no{});
    } else {
      uniform ? go(no{}, no{}, yes{}) : go(no{}, no{}, no{});
    }
  });
}

// ---- bfloat16 activations x bfloat16 weights (the dense linears of a bfloat16 model) --------------------------------
// Each pair (row of x, output channel) accumulates 16 float32 lanes over 32 channels at a time: lane i adds the
// product of channels 2i + 1, then that of channel 2i, each product exact (8-bit significands) and added with one
// rounding. That is AVX-512 BF16's vdpbf16ps, one instruction per 32 channels; elsewhere two fused multiply-adds per
// lane do the same (bit for bit, but for denormal inputs, which vdpbf16ps flushes to zero). The 16 lanes are then
// summed in a fixed order: the same for every M, tile and thread (batch invariance). Needs K a multiple of 32.
using bf16 = c10::BFloat16;
constexpr int64_t BC = 32;  // channels per step

#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr int BMT = 4, BNT = 6, BNT1 = 1;  // batch 1: one row at a time streams ~1.4x faster than six
template <int MT, int NT>
inline void btile(const bf16* const* x, const bf16* const* w, int64_t K, float out[MT][NT], int64_t ahead) {
  __m512 acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  if (NT != 1) ahead = 0;  // one weight stream: a step is one 64-byte line
  for (int64_t k = 0; k < K; k += BC) {
    stream_ahead(w[0] + k, ahead);
    __m512bh wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w[j] + k);
    for (int i = 0; i < MT; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[i] + k);
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      v8f h[2];
      std::memcpy(h, &acc[i][j], 64);
      out[i][j] = hsum(h[0] + h[1]);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int BMT = 2, BNT = 2, BNT1 = 1;  // batch 1: one row at a time (measured ~1.8x faster than three)
template <int MT, int NT>
inline void btile(const bf16* const* x, const bf16* const* w, int64_t K, float out[MT][NT], int64_t ahead) {
  __m256 acc[MT][NT][2];  // lanes 0-7 (channels 0-15 of a step), lanes 8-15 (16-31)
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  if (NT != 1) ahead = 0;  // one weight stream: a step is one 64-byte line
  for (int64_t k = 0; k < K; k += BC) {
    stream_ahead(w[0] + k, ahead);
    for (int h = 0; h < 2; ++h) {
      __m256 xo[MT], xe[MT];  // channel 2i + 1 (the high half of each 32-bit word) and 2i, as float32
      for (int i = 0; i < MT; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + k + 16 * h));
        xo[i] = _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask));
        xe[i] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      }
      for (int j = 0; j < NT; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k + 16 * h));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        for (int i = 0; i < MT; ++i)
          acc[i][j][h] = _mm256_fmadd_ps(xe[i], we, _mm256_fmadd_ps(xo[i], wo, acc[i][j][h]));
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      v8f lo, hi;
      std::memcpy(&lo, &acc[i][j][0], 32);
      std::memcpy(&hi, &acc[i][j][1], 32);
      out[i][j] = hsum(lo + hi);
    }
}
#else
constexpr int BMT = 2, BNT = 2, BNT1 = 1;
template <int MT, int NT>
inline void btile(const bf16* const* x, const bf16* const* w, int64_t K, float out[MT][NT], int64_t ahead) {
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      float acc[16] = {};
      if (NT != 1) ahead = 0;
      for (int64_t k = 0; k < K; k += BC) {
        stream_ahead(w[j] + k, ahead);
        for (int l = 0; l < 16; ++l) {
          acc[l] = std::fma(static_cast<float>(x[i][k + 2 * l + 1]), static_cast<float>(w[j][k + 2 * l + 1]), acc[l]);
          acc[l] = std::fma(static_cast<float>(x[i][k + 2 * l]), static_cast<float>(w[j][k + 2 * l]), acc[l]);
        }
      }
      v8f lo, hi;
      std::memcpy(&lo, acc, 32);
      std::memcpy(&hi, acc + 8, 32);
      out[i][j] = hsum(lo + hi);
    }
}
#endif

void run_bf16(const bf16* x, int64_t M, int64_t K, int64_t N, const bf16* w, const bf16* bias, bf16* y) {
  const int64_t blocks = (N + NB - 1) / NB;
  parallel_blocks(blocks, [&](int64_t b) {
    const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, N - n0);
    const bf16* wrow[NB];
    for (int64_t j = 0; j < nb; ++j) wrow[j] = w + (n0 + j) * K;
    auto emit = [&](int64_t m, int64_t n, float v) {
      if (bias != nullptr) v += static_cast<float>(bias[n]);
      y[m * N + n] = static_cast<bf16>(v);
    };
    walk_tiles<BMT, BNT, BNT1>(M, n0, nb, [&](auto mt, auto nt, int64_t m, int64_t j, auto& out) {
      const auto xr = row_ptrs<decltype(mt)::value>(x, m, K);
      btile<decltype(mt)::value, decltype(nt)::value>(xr.data(), wrow + j, K, out, first_rows_ahead(m));
    }, emit);
  });
}

at::Tensor stream_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                         const c10::optional<at::Tensor>& zeros, int64_t kind, int64_t group,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "stream_linear: CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "stream_linear: x [M, K] with contiguous rows expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "stream_linear: float32 or bfloat16 x");
  const bool x_bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t M = x.size(0), K = x.size(1);
  lpx_parts::check_linear(x_bf16, K, w, scales, zeros, kind, group, bias);
  auto out = at::empty({M, w.size(0)}, x.options());
  if (M == 0) return out;
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  const auto xc = x.contiguous();
  lpx_parts::linear_into(xc.data_ptr(), x_bf16, M, K, w, scales, zeros, kind, group, b ? b->data_ptr() : nullptr,
                         out.data_ptr());
  return out;
}

}  // namespace

namespace lpx_parts {

void check_linear(bool x_bf16, int64_t K, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                  const c10::optional<at::Tensor>& zeros, int64_t kind, int64_t group,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.device().is_cpu(), "stream_linear: CPU tensors expected");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2, "stream_linear: contiguous 2-D weight expected");
  const int64_t N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "stream_linear: in_features must be a multiple of 16");
  if (kind == kDense) {
    TORCH_CHECK(w.size(1) == K && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
                "stream_linear: dense weight [N, K] float32 or bfloat16 expected");
  } else {
    TORCH_CHECK(kind >= kU8 && kind <= kU8CLS, "stream_linear: unknown weight kind ", kind);
    const bool u8 = kind == kU8 || kind == kU8A8 || kind == kU8A8I || kind == kU8CL || kind == kU8CLS;
    TORCH_CHECK(kind < kU8A8I || kind > kU4A8I || N % IL_ROWS == 0,
                "stream_linear: interleaved codes need N a multiple of ", IL_ROWS);
    TORCH_CHECK(kind < kU8CL || N % CL_CH == 0, "stream_linear: channel-lane codes need N a multiple of ", CL_CH);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) == (u8 ? K : K / 2),
                "stream_linear: uint8 codes [N, K] (8-bit) or [N, K / 2] (4-bit) expected");
    TORCH_CHECK(group > 0 && group % 16 == 0 && K % group == 0, "stream_linear: group must divide K, multiple of 16");
    TORCH_CHECK(scales.has_value() && zeros.has_value(), "stream_linear: quantized weights need scales and zeros");
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == N * (K / group),
                "stream_linear: scales [N, K / group] float32 expected");
    TORCH_CHECK(zeros->scalar_type() == at::kInt && zeros->is_contiguous() &&
                    (zeros->numel() == N * (K / group) || (kind >= kU8A8 && zeros->numel() == 1)),
                "stream_linear: zeros [N, K / group] int32 expected (or [1], one zero point, with int8 activations)");
    TORCH_CHECK(kind < kU8A8 || (K % QC == 0 && group % QC == 0),
                "stream_linear: int8 activations need in_features and group size multiples of 64");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == (x_bf16 ? at::kBFloat16 : at::kFloat),
                "stream_linear: bias [N] of x's dtype");
  }
}

void linear_into(const void* x, bool x_bf16, int64_t M, int64_t K, const at::Tensor& w,
                 const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& zeros, int64_t kind,
                 int64_t group, const void* bias, void* out) {
  if (M == 0) return;
  const int64_t N = w.size(0);
  const float* s = kind == kDense ? nullptr : scales->data_ptr<float>();
  const int32_t* z = kind == kDense ? nullptr : zeros->data_ptr<int32_t>();
  if (kind == kDense && x_bf16 && w.scalar_type() == at::kBFloat16 && K % BC == 0) {
    run_bf16(static_cast<const bf16*>(x), M, K, N, w.data_ptr<bf16>(), static_cast<const bf16*>(bias),
             static_cast<bf16*>(out));
    return;
  }
  const float* xf = static_cast<const float*>(x);
  thread_local std::vector<float> widened;  // a bfloat16 x in float32 (exact), reused
  if (x_bf16) {
    widened.resize(M * K);
    const bf16* xb = static_cast<const bf16*>(x);
    for (int64_t i = 0; i < M * K; ++i) widened[i] = static_cast<float>(xb[i]);
    xf = widened.data();
  }
  if (kind >= kU8CL) {
    const bool u4 = kind == kU4CL, sgn = kind == kU8CLS, uniform = zeros->numel() == 1;
    const uint8_t* codes = w.data_ptr<uint8_t>();
    if (!x_bf16) {
      run_cl<float>(xf, M, K, N, u4, sgn, codes, s, z, uniform, group, static_cast<const float*>(bias),
                    static_cast<float*>(out));
    } else {
      run_cl<bf16>(xf, M, K, N, u4, sgn, codes, s, z, uniform, group, static_cast<const bf16*>(bias),
                   static_cast<bf16*>(out));
    }
  } else if (kind >= kU8A8) {
    const uint8_t* codes = w.data_ptr<uint8_t>();
    const bool uniform = zeros->numel() == 1;  // (a single group: the same either way)
    if (!x_bf16) {
      run_q<float>(xf, M, K, N, kind, codes, s, z, uniform, group, static_cast<const float*>(bias),
                   static_cast<float*>(out));
    } else {
      run_q<bf16>(xf, M, K, N, kind, codes, s, z, uniform, group, static_cast<const bf16*>(bias),
                  static_cast<bf16*>(out));
    }
  } else if (!x_bf16) {
    run<float>(xf, M, K, N, kind, w.data_ptr(), w.scalar_type(), s, z, group, static_cast<const float*>(bias),
               static_cast<float*>(out));
  } else {
    run<bf16>(xf, M, K, N, kind, w.data_ptr(), w.scalar_type(), s, z, group, static_cast<const bf16*>(bias),
              static_cast<bf16*>(out));
  }
}

}  // namespace lpx_parts

TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def("stream_linear(Tensor x, Tensor w, Tensor? scales, Tensor? zeros, int kind, int group, Tensor? bias) -> Tensor");
  m.impl("stream_linear", c10::DispatchKey::CPU, &stream_linear);
  m.def("channel_lane_u8_kind() -> int");  // the 8-bit channel-lane kind this build reads fastest: 7, or 9
  m.impl("channel_lane_u8_kind", c10::DispatchKey::CatchAll,
         +[]() -> int64_t { return kCLU8Signed ? kU8CLS : kU8CL; });
  m.def("stream_ahead(int? bytes=None) -> int");  // the weight prefetch distance: set it (0: off), get the old
  m.impl("stream_ahead", c10::DispatchKey::CatchAll, +[](c10::optional<int64_t> bytes) -> int64_t {
    if (!bytes.has_value()) return stream_ahead_bytes();
    TORCH_CHECK(*bytes >= 0 && *bytes <= kStreamAheadMax && *bytes % 64 == 0,
                "stream_ahead: a multiple of 64 bytes from 0 to ", kStreamAheadMax, ", not ", *bytes);
    return g_stream_ahead.exchange(*bytes, std::memory_order_relaxed);
  });
}
