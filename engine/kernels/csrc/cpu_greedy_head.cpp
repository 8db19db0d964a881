// Screened greedy head: greedy token ids of x [M, K] under a dense output head W [V, K], through an 8-bit screening
// copy of it (engine/layers/greedy_head.py holds the maths and the plain-torch reference, `ScreenedGreedyHead`).
//
// One call does what the reference does in a dozen torch operations (~0.4 ms of dispatch and passes over the
// vocabulary at batch 1, as much as the screening product itself): the activation norms, the screening product
// (stream_linear's int8 path on the 8-bit copy), the bound and the candidates (two passes over the vocabulary, split
// between the threads), the exact product of the candidate rows (stream_linear's dense path on those rows gathered:
// each output one float32 dot product in a fixed order, whatever rows share the call) and the argmax, ties to the
// lowest index.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_layer_parts.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;          // input channels per activation scale, as stream_linear's int8 path
constexpr int64_t kVocabChunk = 4096;   // vocabulary rows per parallel task (a multiple of 16)

typedef float v16f __attribute__((vector_size(64)));  // AVX-512 registers, or two AVX2 ones

inline v16f splat(float v) { return v16f{} + v; }
inline v16f load16(const float* p) {
  v16f r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline bool any_reaches(v16f v, float floor) {  // some lane >= floor
  v16f m = v;
  for (int l = 0; l < 16; ++l) m[0] = std::max(m[0], v[l]);
  return m[0] >= floor;
}

// Per row of x (float32, finite): |x|_2, |x - x^|_2 and |x|_1, x^ the int8 rounding stream_linear's int8 path
// multiplies with (d = max|x| / 127 per block of 32, a = round-half-even(x * (1 / d)), x^ = a * d). Sums in double:
// their order does not matter at the bound's slack.
void activation_norms(const float* x, int64_t K, double* x_norm, double* err_norm, double* x_l1) {
  double sx = 0, se = 0, s1 = 0;
  for (int64_t b = 0; b < K; b += kBlock) {
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[b + i]));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    for (int64_t i = 0; i < kBlock; ++i) {
      const float v = x[b + i];
      const float a = std::min(127.f, std::max(-127.f, std::nearbyint(v * id)));
      const double e = static_cast<double>(v) - static_cast<double>(a) * static_cast<double>(d);
      sx += static_cast<double>(v) * v;
      se += e * e;
      s1 += std::fabs(v);
    }
  }
  *x_norm = std::sqrt(sx);
  *err_norm = std::sqrt(se);
  *x_l1 = s1;
}

at::Tensor screened_greedy(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
                           const at::Tensor& scales, const at::Tensor& zeros, int64_t kind, int64_t group,
                           const at::Tensor& norms, double max_abs_weight, double summation_margin, double norm_slack,
                           double bf16_tie) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "screened_greedy: x [M, K] float32 or bfloat16 on the CPU expected");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1) &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "screened_greedy: dense head weight [V, K] float32 or bfloat16 expected");
  const int64_t M = x.size(0), K = x.size(1), V = weight.size(0);
  TORCH_CHECK(K % 64 == 0, "screened_greedy: K a multiple of 64 expected");
  TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.is_contiguous() && norms.dim() == 2 && norms.size(0) == 2 &&
                  norms.size(1) == V, "screened_greedy: norms [2, V] float32 expected");
  TORCH_CHECK(codes.size(0) == V, "screened_greedy: the screening codes have another vocabulary size");
  lpx_parts::check_linear(false, K, codes, scales, zeros, kind, group, c10::nullopt);
  const bool x_bf16 = x.scalar_type() == at::kBFloat16;
  lpx_parts::check_linear(x_bf16, K, weight, c10::nullopt, c10::nullopt, 0, 0, c10::nullopt);
  auto ids = at::empty({M}, x.options().dtype(at::kLong));
  if (M == 0) return ids;

  const auto xc = x.contiguous();
  const auto xf = xc.to(at::kFloat).contiguous();  // exact for bfloat16
  const float* xp = xf.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i)
    if (!std::isfinite(xp[i])) return at::empty({0}, ids.options());  // no bound holds: the caller computes logits
  std::vector<float> c0(M), c1(M), margin(M);
  for (int64_t m = 0; m < M; ++m) {
    double xn, en, l1;
    activation_norms(xp + m * K, K, &xn, &en, &l1);
    c0[m] = static_cast<float>(xn * norm_slack);
    c1[m] = static_cast<float>(en * norm_slack);
    margin[m] = static_cast<float>(summation_margin * max_abs_weight * l1);
  }

  thread_local std::vector<float> screened;  // [M, V], reused between calls (no fresh pages per step)
  screened.resize(M * V);
  lpx_parts::linear_into(xp, false, M, K, codes, scales, zeros, kind, group, nullptr, screened.data());
  const float* a = screened.data();
  const float* n0 = norms.data_ptr<float>();
  const float* n1 = n0 + V;
  const int64_t chunks = (V + kVocabChunk - 1) / kVocabChunk;

  // row m's bound at vocabulary row v (c0 |w - w^|_2 + c1 |w^|_2 + margin), alone or 16 rows at a time
  auto bound1 = [&](int64_t m, int64_t v) { return c0[m] * n0[v] + c1[m] * n1[v] + margin[m]; };
  auto bound16 = [&](int64_t m, int64_t v) {
    return splat(c0[m]) * load16(n0 + v) + splat(c1[m]) * load16(n1 + v) + splat(margin[m]);
  };
  // fn(chunk, m, v0, v1) for every chunk [v0, v1) of the vocabulary and every row m of x, the chunks split between
  // the threads
  auto each_chunk = [&](auto&& fn) {
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c)
        for (int64_t m = 0; m < M; ++m) fn(c, m, c * kVocabChunk, std::min(V, (c + 1) * kVocabChunk));
    });
  };

  // pass 1: per row, the largest a - bound (no exact logit's maximum is below it), chunk by chunk
  std::vector<float> chunk_floor(chunks * M);
  each_chunk([&](int64_t c, int64_t m, int64_t v0, int64_t v1) {
    const float* am = a + m * V;
    v16f best = splat(-std::numeric_limits<float>::infinity());
    int64_t v = v0;
    for (; v + 16 <= v1; v += 16) {
      const v16f lo = load16(am + v) - bound16(m, v);
      best = best > lo ? best : lo;
    }
    float b = -std::numeric_limits<float>::infinity();
    for (int l = 0; l < 16; ++l) b = std::max(b, best[l]);
    for (; v < v1; ++v) b = std::max(b, am[v] - bound1(m, v));
    chunk_floor[c * M + m] = b;
  });
  std::vector<float> floor(M, -std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t m = 0; m < M; ++m) floor[m] = std::max(floor[m], chunk_floor[c * M + m]);
  if (x_bf16)  // bfloat16 logits: a value one rounding step below the top may round to it and tie
    for (int64_t m = 0; m < M; ++m) floor[m] -= std::fabs(floor[m]) * static_cast<float>(bf16_tie);

  // pass 2: the rows some row's exact logit may reach its floor from (few: listed per chunk, then merged)
  std::vector<std::vector<int64_t>> found(chunks);
  each_chunk([&](int64_t c, int64_t m, int64_t v0, int64_t v1) {
    const float* am = a + m * V;
    int64_t v = v0;
    for (; v + 16 <= v1; v += 16) {
      const v16f hi = load16(am + v) + bound16(m, v);
      if (!any_reaches(hi, floor[m])) continue;
      for (int l = 0; l < 16; ++l)
        if (hi[l] >= floor[m]) found[c].push_back(v + l);
    }
    for (; v < v1; ++v)
      if (am[v] + bound1(m, v) >= floor[m]) found[c].push_back(v);
  });
  std::vector<int64_t> rows;
  for (auto& part : found) {  // chunks in order; within a chunk, rows of several x rows interleave
    std::sort(part.begin(), part.end());
    part.erase(std::unique(part.begin(), part.end()), part.end());
    rows.insert(rows.end(), part.begin(), part.end());
  }
  TORCH_CHECK(!rows.empty(), "screened_greedy: no candidate row (internal error)");

  // the exact logits of the candidates, as the dense head computes them
  const int64_t n = static_cast<int64_t>(rows.size());
  auto gathered = at::empty({n, K}, weight.options());
  const int64_t row_bytes = K * weight.element_size();
  const auto* src = static_cast<const uint8_t*>(weight.data_ptr());
  auto* dst = static_cast<uint8_t*>(gathered.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * row_bytes, src + rows[i] * row_bytes, row_bytes);
  auto exact = at::empty({M, n}, xc.options());
  lpx_parts::linear_into(xc.data_ptr(), x_bf16, M, K, gathered, c10::nullopt, c10::nullopt, 0, 0, nullptr,
                         exact.data_ptr());
  const auto exact_f = exact.to(at::kFloat);  // exact for bfloat16
  const float* e = exact_f.data_ptr<float>();
  int64_t* out = ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (e[m * n + i] > e[m * n + best]) best = i;  // strict: ties to the lowest index
    out[m] = rows[best];
  }
  return ids;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def("screened_greedy(Tensor x, Tensor weight, Tensor codes, Tensor scales, Tensor zeros, int kind, int group, "
        "Tensor norms, float max_abs_weight, float summation_margin, float norm_slack, float bf16_tie) -> Tensor");
  m.impl("screened_greedy", c10::DispatchKey::CPU, &screened_greedy);
}
