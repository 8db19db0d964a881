// One Llama decoder layer for inference in one call: the same kernels, in the same order, on the same tensors as
// the module path of engine/models/llama.py takes on CPU with streaming linears (engine/quant/stream.py) and the
// fused elementwise and attention kernels, so its output is bit for bit the module path's. What it removes is the
// per-layer Python and ATen dispatch around them (~85 small operations per layer at batch 1).
//
//   h = rms_norm(x);  qkv = stream_linear(h, Wqkv);  rotary_(q), rotary_(k)  (in place, views of qkv)
//   o = paged_attention(q, caches, k, v written first);  a = stream_linear(o, Wo)
//   x, h = add_rms_norm(x, a);  gu = stream_linear(h, Wgate_up);  m = silu_and_mul(g, u)
//   return x + stream_linear(m, Wdown)
//
// with each projection's LoRA rows added right after its base product (lora_apply_, in place), as the adapter
// wrappers do in the module path.
// The other kernels are reached through the dispatcher (their schemas are this library's), typed once.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "cpu_layer_parts.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <tuple>
#include <vector>

namespace {

using OptT = c10::optional<at::Tensor>;

const auto& stream_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("loraplex_cpu::stream_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, int64_t,
                                               int64_t, const OptT&)>();
  return op;
}
const auto& rms_norm_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("loraplex_cpu::rms_norm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op;
}
const auto& add_rms_norm_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("loraplex_cpu::add_rms_norm", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op;
}
const auto& silu_and_mul_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("loraplex_cpu::silu_and_mul", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op;
}
const auto& rotary_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("loraplex_cpu::rotary_", "")
                             .typed<at::Tensor(at::Tensor, const at::Tensor&, const at::Tensor&)>();
  return op;
}
const auto& paged_attention_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("loraplex_cpu::paged_attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, int64_t, double, const OptT&, const OptT&,
                            const OptT&)>();
  return op;
}

const auto& lora_apply_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("loraplex_cpu::lora_apply_", "")
          .typed<void(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op;
}

constexpr int64_t LORA_ARGS = 8;  // a_pool, b_pool, token_rows, seg_starts, seg_pages, seg_ranks, page_scales, row_scales

// module i's adapter rows (lora[8i, 8i + 8), all None when it has none this step): y += B A x in place, as the
// module path's wrapper does right after the base product (adapters/lora_linear.py, adapters/ops/cpu.py)
// (y: a function giving the output view, so that base-only steps take no views at all)
template <typename Y>
void add_lora(Y&& y, const at::Tensor& x, const c10::List<OptT>& lora, int64_t i) {
  if (lora.size() == 0 || !lora.get(i * LORA_ARGS).has_value()) return;
  auto t = [&](int64_t j) { return *lora.get(i * LORA_ARGS + j); };
  lora_apply_op().call(y(), x, t(0), t(1), t(2), t(3), t(4), t(5), t(6), t(7));
}

// a streaming linear: weight or codes, scales, zeros (None for dense weights), bias (contiguous, or undefined)
struct Linear {
  at::Tensor w;
  OptT scales, zeros;
  at::Tensor bias;
  int64_t kind, group;
};

// from [weight or codes, scales, zeros, bias] (absent ones None)
Linear make_linear(const c10::List<OptT>& t, int64_t kind, int64_t group) {
  TORCH_CHECK(t.size() == 4 && t.get(0).has_value(), "decoder_layer: [weight, scales, zeros, bias] per linear");
  const OptT b = t.get(3);
  return {*t.get(0), t.get(1), t.get(2), b.has_value() && b->defined() ? b->contiguous() : at::Tensor(), kind, group};
}

at::Tensor linear(const at::Tensor& x, const Linear& l) {
  return stream_linear_op().call(x, l.w, l.scales, l.zeros, l.kind, l.group,
                                 l.bias.defined() ? OptT(l.bias) : c10::nullopt);
}

// one layer's weights: [weight, scales, zeros, bias] and (kind, group size) per linear, the norms and its caches
struct LayerWeights {
  at::Tensor input_norm, post_norm;
  double eps;
  Linear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;
};

// the shapes of attention and this step's rows (the same for every layer of a step)
struct StepRows {
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;
  const at::Tensor& slot_table;
  const at::Tensor& row_index;
  const at::Tensor& row_len;
  int64_t window;
  const at::Tensor& slot_mapping;
};

at::Tensor layer_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const LayerWeights& w,
                         const StepRows& s, const c10::List<OptT>& lora) {
  TORCH_CHECK(lora.size() == 0 || lora.size() == 7 * LORA_ARGS, "decoder_layer: lora is empty or 7 x 8 entries");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decoder_layer: x [tokens, hidden] contiguous");
  const int64_t n = x.size(0), q_width = s.num_heads * s.head_dim, kv_width = s.num_kv_heads * s.head_dim;
  const at::Tensor h = rms_norm_op().call(x, w.input_norm, w.eps);
  const at::Tensor qkv_out = linear(h, w.qkv);  // [n, q + 2 kv]
  TORCH_CHECK(qkv_out.size(1) == q_width + 2 * kv_width, "decoder_layer: q/k/v widths disagree with the heads");
  at::Tensor q = qkv_out.narrow(1, 0, q_width).view({n, s.num_heads, s.head_dim});
  at::Tensor k = qkv_out.narrow(1, q_width, kv_width).view({n, s.num_kv_heads, s.head_dim});
  const at::Tensor v = qkv_out.narrow(1, q_width + kv_width, kv_width).view({n, s.num_kv_heads, s.head_dim});
  add_lora([&] { return qkv_out.narrow(1, 0, q_width); }, h, lora, 0);
  add_lora([&] { return qkv_out.narrow(1, q_width, kv_width); }, h, lora, 1);
  add_lora([&] { return qkv_out.narrow(1, q_width + kv_width, kv_width); }, h, lora, 2);
  rotary_op().call(q, cos, sin);
  rotary_op().call(k, cos, sin);
  // a cache in another dtype (bfloat16 under float32): attention runs in the cache's dtype, as attention.py casts
  const auto kv = w.k_cache.scalar_type();
  const at::Tensor attn =
      kv == x.scalar_type()
          ? paged_attention_op().call(q, w.k_cache, w.v_cache, s.slot_table, s.row_index, s.row_len, s.window, s.scale,
                                      k, v, s.slot_mapping)
          : paged_attention_op()
                .call(q.to(kv), w.k_cache, w.v_cache, s.slot_table, s.row_index, s.row_len, s.window, s.scale,
                      k.to(kv), v.to(kv), s.slot_mapping)
                .to(x.scalar_type());
  const at::Tensor attn_rows = attn.view({n, q_width});
  const at::Tensor a = linear(attn_rows, w.o);
  add_lora([&] { return a; }, attn_rows, lora, 3);
  at::Tensor sum, normed;
  std::tie(sum, normed) = add_rms_norm_op().call(x, a, w.post_norm, w.eps);
  const at::Tensor gu = linear(normed, w.gate_up);  // [n, 2 inter]
  const int64_t inter = gu.size(1) / 2;
  const at::Tensor g = gu.narrow(1, 0, inter), u = gu.narrow(1, inter, inter);
  add_lora([&] { return g; }, normed, lora, 4);
  add_lora([&] { return u; }, normed, lora, 5);
  const at::Tensor m = silu_and_mul_op().call(g, u);
  const at::Tensor d = linear(m, w.down);
  add_lora([&] { return d; }, m, lora, 6);
  return sum.add_(d);  // sum is this call's own tensor: x + d in place (the same bits as the module path's x + mlp)
}

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& input_norm, const at::Tensor& post_norm, double eps,
                         const c10::List<OptT>& qkv, int64_t qkv_kind, int64_t qkv_group, const c10::List<OptT>& o,
                         int64_t o_kind, int64_t o_group, const c10::List<OptT>& gate_up, int64_t gate_up_kind,
                         int64_t gate_up_group, const c10::List<OptT>& down, int64_t down_kind, int64_t down_group,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                         const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_table,
                         const at::Tensor& row_index, const at::Tensor& row_len, int64_t window,
                         const at::Tensor& slot_mapping, const c10::List<OptT>& lora) {
  const LayerWeights w{input_norm, post_norm, eps, make_linear(qkv, qkv_kind, qkv_group), make_linear(o, o_kind, o_group),
                       make_linear(gate_up, gate_up_kind, gate_up_group), make_linear(down, down_kind, down_group),
                       k_cache, v_cache};
  return layer_forward(x, cos, sin, w, {num_heads, num_kv_heads, head_dim, scale, slot_table, row_index, row_len,
                                        window, slot_mapping}, lora);
}


// ---- the lean path: a small batch, every layer on buffers the stack holds -------------------------------------------
// The same kernels in the same order as layer_forward, called on raw pointers (cpu_layer_parts.h): no tensor is made,
// viewed or dispatched per operation, and the step's tables (attention's and the adapter rows') are checked once
// instead of once per layer. Bit for bit layer_forward's output (tests/engine/test_fused_layer.py compares them).
constexpr int64_t LEAN_MAX_ROWS = 16;  // decode batches; larger ones (prefill chunks) take layer_forward

// rows x [M, width] (`stride` apart) rounded to bfloat16 into out [M, width], as Tensor.to(bfloat16) rounds
template <typename T>
void to_bf16(const T* x, int64_t M, int64_t width, int64_t stride, c10::BFloat16* out) {
  for (int64_t t = 0; t < M; ++t)
    for (int64_t j = 0; j < width; ++j) out[t * width + j] = c10::BFloat16(static_cast<float>(x[t * stride + j]));
}

template <typename T>
void linear_into(const T* x, int64_t M, int64_t K, const Linear& l, T* out) {
  lpx_parts::linear_into(x, std::is_same<T, c10::BFloat16>::value, M, K, l.w, l.scales, l.zeros, l.kind, l.group,
                         l.bias.defined() ? l.bias.data_ptr() : nullptr, out);
}


// Every decoder layer of a model in one call: each layer exactly as decoder_layer computes it, in order, on the
// weights, caches and LoRA pools given once at construction (engine/layers/fused_layer.py builds it and checks
// it still describes the model), with the step's LoRA rows per target module (shared by every layer). What it
// removes is the per-layer Python and argument conversion of 30 calls a step.
constexpr int64_t LORA_ROWS = LORA_ARGS - 2;  // token_rows, seg_starts, seg_pages, seg_ranks, page_scales, row_scales
constexpr int64_t MODULES = 7;                // q, k, v, o, gate, up, down

struct DecoderStack : torch::CustomClassHolder {
  std::vector<LayerWeights> layers;
  c10::List<OptT> pools;  // per layer and module: a_pool, b_pool (None where no adapter wrapper); empty: no LoRA
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;

  // per layer: 2 norms, 4 x 4 linear tensors, 4 x (kind, group), 1 eps, 2 caches, 7 x 2 pools (or no pools at all)
  DecoderStack(std::vector<at::Tensor> norms, std::vector<double> eps, c10::List<OptT> linears,
               std::vector<int64_t> kinds_groups, std::vector<at::Tensor> caches, c10::List<OptT> pools,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale)
      : pools(pools), num_heads(num_heads), num_kv_heads(num_kv_heads), head_dim(head_dim), scale(scale) {
    const size_t n = eps.size();
    TORCH_CHECK(norms.size() == 2 * n && linears.size() == 16 * n && kinds_groups.size() == 8 * n &&
                    caches.size() == 2 * n && (pools.size() == 0 || pools.size() == 2 * MODULES * n),
                "DecoderStack: per layer 2 norms, 16 linear tensors, 8 kinds/groups, 2 caches, 14 pools or none");
    auto four = [&](size_t at, const int64_t* kind_group) {
      c10::List<OptT> t;
      for (size_t j = 0; j < 4; ++j) t.push_back(linears.get(at + j));
      return make_linear(t, kind_group[0], kind_group[1]);
    };
    for (size_t i = 0; i < n; ++i) {
      const int64_t* kg = kinds_groups.data() + 8 * i;
      layers.push_back(LayerWeights{norms[2 * i], norms[2 * i + 1], eps[i], four(16 * i, kg), four(16 * i + 4, kg + 2),
                                    four(16 * i + 8, kg + 4), four(16 * i + 12, kg + 6), caches[2 * i],
                                    caches[2 * i + 1]});
    }
  }

  // rows: empty (no adapter rows this step) or per module the six row tensors (None where it has none).
  // final_norm: the model's last RMSNorm (weight [hidden] in x's dtype), applied to the last layer's output as the
  // rms_norm operator computes it (the same bits), one Python call fewer after the stack; None: the raw output.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot_table,
                     const at::Tensor& row_index, const at::Tensor& row_len, int64_t window,
                     const at::Tensor& slot_mapping, const c10::List<OptT>& rows, bool lean,
                     const OptT& final_norm, double final_eps) {
    TORCH_CHECK(rows.size() == 0 || (rows.size() == MODULES * LORA_ROWS && pools.size() > 0),
                "DecoderStack: rows are empty or 7 x 6 entries (with pools)");
    TORCH_CHECK(!final_norm.has_value() ||
                    (final_norm->scalar_type() == x.scalar_type() && final_norm->dim() == 1 &&
                     final_norm->size(0) == x.size(-1) && final_norm->is_contiguous() && final_norm->is_cpu() &&
                     (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)),
                "DecoderStack: final_norm [hidden], contiguous, in x's dtype (float32 or bfloat16) expected");
    at::Tensor h;
    if (lean && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= LEAN_MAX_ROWS && x.is_contiguous() &&
        !layers.empty() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)) {
      h = x.scalar_type() == at::kFloat
              ? lean_forward<float>(x, cos, sin, slot_table, row_index, row_len, window, slot_mapping, rows)
              : lean_forward<c10::BFloat16>(x, cos, sin, slot_table, row_index, row_len, window, slot_mapping, rows);
    } else {
      const StepRows s{num_heads, num_kv_heads, head_dim, scale, slot_table, row_index, row_len, window, slot_mapping};
      h = x;
      for (size_t i = 0; i < layers.size(); ++i) h = layer_forward(h, cos, sin, layers[i], s, layer_lora(i, rows));
    }
    if (!final_norm.has_value()) return h;
    const at::Tensor hc = h.contiguous();
    at::Tensor out = at::empty_like(hc);
    const int64_t dim = hc.size(-1), n = dim ? hc.numel() / dim : 0;
    const float eps = static_cast<float>(final_eps);
    if (hc.scalar_type() == at::kFloat)
      lpx_parts::rms_norm<float>(hc.data_ptr<float>(), final_norm->data_ptr<float>(), out.data_ptr<float>(), n, dim,
                                 eps);
    else
      lpx_parts::rms_norm<c10::BFloat16>(hc.data_ptr<c10::BFloat16>(), final_norm->data_ptr<c10::BFloat16>(),
                                         out.data_ptr<c10::BFloat16>(), n, dim, eps);
    return out;
  }

  // layer i's 7 x 8 lora_apply_ arguments: its pools and the step's rows where both exist (empty: no rows this step)
  c10::List<OptT> layer_lora(size_t i, const c10::List<OptT>& rows) const {
    c10::List<OptT> lora;
    if (rows.size() == 0) return lora;
    lora.reserve(MODULES * LORA_ARGS);
    for (int64_t m = 0; m < MODULES; ++m) {
      const int64_t p = (static_cast<int64_t>(i) * MODULES + m) * 2;
      const bool on = pools.get(p).has_value() && rows.get(m * LORA_ROWS).has_value();
      lora.push_back(on ? pools.get(p) : c10::nullopt);
      lora.push_back(on ? pools.get(p + 1) : c10::nullopt);
      for (int64_t j = 0; j < LORA_ROWS; ++j) lora.push_back(on ? rows.get(m * LORA_ROWS + j) : c10::nullopt);
    }
    return lora;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers.size()); }
  int64_t lean_calls() const { return lean_calls_; }

  // the lean path's phases, for profiling (phase_ns's order)
  enum Phase { kNorms, kQkv, kLora, kElementwise, kAttention, kO, kGateUp, kDown, kPhases };
  bool profiling_ = false;
  std::vector<int64_t> phase_ns_ = std::vector<int64_t>(kPhases, 0);
  // profiling on or off (off: no clock read); either way the totals start again from 0
  void set_profiling(bool on) {
    profiling_ = on;
    std::fill(phase_ns_.begin(), phase_ns_.end(), 0);
  }
  // nanoseconds spent in each phase of the lean path since set_profiling, summed over layers and calls:
  // norms, qkv, lora, elementwise (rotary, silu, residual), attention, o, gate_up, down
  std::vector<int64_t> phase_ns() const { return phase_ns_; }
  // the phases' names, in phase_ns's order
  std::vector<std::string> phase_names() const {
    return {"norms", "qkv", "lora", "elementwise", "attention", "o", "gate_up", "down"};
  }

  int64_t lean_calls_ = 0;  // forward calls the lean path took
  at::ScalarType lean_checked = at::ScalarType::Undefined;  // the x dtype every layer's parts were checked for
  at::Tensor arena;                                         // the lean path's buffers (grown, never shrunk)

  // the once-per-dtype checks of what the operators check per call: weights, biases and caches fit x's dtype
  void check_lean(at::ScalarType dt, int64_t hidden) {
    if (lean_checked == dt) return;
    const bool bf = dt == at::kBFloat16;
    const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
    TORCH_CHECK(num_heads % num_kv_heads == 0 && head_dim % 2 == 0, "DecoderStack: head shapes");
    for (size_t i = 0; i < layers.size(); ++i) {
      const LayerWeights& w = layers[i];
      for (const at::Tensor* c : {&w.k_cache, &w.v_cache})
        TORCH_CHECK(c->scalar_type() == layers[0].k_cache.scalar_type() &&
                        (c->scalar_type() == dt || (dt == at::kFloat && c->scalar_type() == at::kBFloat16)) &&
                        c->is_contiguous() && c->dim() == 3 && c->size(1) == num_kv_heads &&
                        c->size(2) == head_dim && c->sizes() == layers[0].k_cache.sizes(),
                    "DecoderStack: caches [S, kv heads, head_dim] of x's dtype (or bfloat16 under float32), the "
                    "same in every layer");
      for (const at::Tensor* n : {&w.input_norm, &w.post_norm})
        TORCH_CHECK(n->scalar_type() == dt && n->is_contiguous() && n->numel() == hidden, "DecoderStack: norms");
      const int64_t inter = w.gate_up.w.size(0) / 2;
      for (const auto& [l, k] : {std::pair<const Linear&, int64_t>{w.qkv, hidden}, {w.o, q_width}, {w.gate_up, hidden},
                                 {w.down, inter}})
        lpx_parts::check_linear(bf, k, l.w, l.scales, l.zeros, l.kind, l.group, l.bias);
      TORCH_CHECK(w.qkv.w.size(0) == q_width + 2 * kv_width && w.o.w.size(0) == hidden && w.down.w.size(0) == hidden &&
                      w.gate_up.w.size(0) % 2 == 0,
                  "DecoderStack: linear widths disagree with the heads or the hidden size");
      // the adapter pools: a [P, in], b [P, out] of x's dtype per module (q, k, v, o, gate, up, down)
      const int64_t in_out[MODULES][2] = {{hidden, q_width}, {hidden, kv_width}, {hidden, kv_width}, {q_width, hidden},
                                          {hidden, inter},   {hidden, inter},    {inter, hidden}};
      for (int64_t j = 0; j < MODULES && pools.size() != 0; ++j) {
        const int64_t p = (static_cast<int64_t>(i) * MODULES + j) * 2;
        const OptT a = pools.get(p), b = pools.get(p + 1);
        TORCH_CHECK(a.has_value() == b.has_value(), "DecoderStack: a module has both pools or neither");
        if (a.has_value()) lpx_parts::check_lora_pools(*a, *b, in_out[j][0], in_out[j][1], dt);
      }
    }
    lean_checked = dt;
  }

  template <typename T>
  at::Tensor lean_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& slot_table, const at::Tensor& row_index, const at::Tensor& row_len,
                          int64_t window, const at::Tensor& slot_mapping, const c10::List<OptT>& rows) {
    const int64_t M = x.size(0), H = x.size(1), L = static_cast<int64_t>(layers.size());
    check_lean(x.scalar_type(), H);
    ++lean_calls_;
    const int64_t D = head_dim, q_width = num_heads * D, kv_width = num_kv_heads * D, qkv_width = q_width + 2 * kv_width;
    const int64_t inter = layers[0].gate_up.w.size(0) / 2;
    // the step's tables, once: what paged_attention checks on every call
    const int64_t S = layers[0].k_cache.size(0);
    const auto table = slot_table.contiguous(), idx = row_index.contiguous(), lens = row_len.contiguous(),
               slots = slot_mapping.contiguous();
    TORCH_CHECK(table.scalar_type() == at::kLong && idx.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
                    slots.scalar_type() == at::kLong && table.dim() == 2 && idx.numel() == M && lens.numel() == M &&
                    slots.numel() == M,
                "DecoderStack: int64 slot_table [R, W], row_index, row_len and slot_mapping [tokens] expected");
    const int64_t W = table.size(1), R = table.size(0);
    const int64_t *tp = table.data_ptr<int64_t>(), *ip = idx.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>(),
                  *sp = slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < R * W; ++i) TORCH_CHECK(tp[i] >= 0 && tp[i] < S, "paged_attention: read slot out of range");
    for (int64_t t = 0; t < M; ++t) {
      TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "paged_attention: write slot out of range");
      TORCH_CHECK(lp[t] >= 0 && lp[t] <= W && ip[t] >= 0 && ip[t] < R, "paged_attention: row_len / row_index");
    }
    const auto c = cos.reshape({M, D}).contiguous(), sn = sin.reshape({M, D}).contiguous();
    TORCH_CHECK(c.scalar_type() == x.scalar_type() && sn.scalar_type() == x.scalar_type(), "rotary_: cos/sin dtype");
    // a bfloat16 cache under float32: attention runs in bfloat16 on copies of q, k, v (as attention.py casts them)
    const bool kv_bf16 = std::is_same<T, float>::value && layers[0].k_cache.scalar_type() == at::kBFloat16;
    using B = c10::BFloat16;
    // buffers: the other residual, h, qkv, q (M > 1), attention, o, normed, gate_up, m, down; then, with a bfloat16
    // cache, q, k, v and attention in bfloat16
    const int64_t kvb = kv_bf16 ? 1 : 0;
    const int64_t sizes[] = {M * H, M * H, M * qkv_width, M * q_width, M * q_width, M * H, M * H, M * 2 * inter,
                             M * inter, M * H, kvb * M * q_width, kvb * M * kv_width, kvb * M * kv_width,
                             kvb * M * q_width};
    constexpr int NBUF = 14;
    int64_t offsets[NBUF], total = 0;
    for (int i = 0; i < NBUF; ++i) {
      offsets[i] = total;
      total += (sizes[i] * static_cast<int64_t>(i < 10 ? sizeof(T) : sizeof(B)) + 63) / 64 * 64;
    }
    if (!arena.defined() || arena.numel() < total) arena = at::empty({total}, at::kByte);
    char* base = static_cast<char*>(arena.data_ptr());
    T* buf[10];
    for (int i = 0; i < 10; ++i) buf[i] = reinterpret_cast<T*>(base + offsets[i]);
    T *tmp = buf[0], *h = buf[1], *qkv = buf[2], *qc = buf[3], *attn = buf[4], *a = buf[5], *normed = buf[6],
      *gu = buf[7], *m = buf[8], *d = buf[9];
    B *qb = reinterpret_cast<B*>(base + offsets[10]), *kb = reinterpret_cast<B*>(base + offsets[11]),
      *vb = reinterpret_cast<B*>(base + offsets[12]), *attn_b = reinterpret_cast<B*>(base + offsets[13]);
    at::Tensor out = at::empty({M, H}, x.options());
    const T* cp = c.data_ptr<T>();
    const T* sp2 = sn.data_ptr<T>();
    const float sc = static_cast<float>(scale);
    const T* xi = x.data_ptr<T>();
    // the step's adapter rows per module, checked once (every layer shares them; the pools are checked by check_lean)
    lpx_parts::LoraRows lora_rows[MODULES];
    bool has_rows[MODULES] = {};
    for (int64_t j = 0; j < MODULES && rows.size() != 0; ++j) {
      if (!rows.get(j * LORA_ROWS).has_value()) continue;
      auto t = [&](int64_t k) { return *rows.get(j * LORA_ROWS + k); };
      lora_rows[j] = lpx_parts::check_lora_rows(t(0), t(1), t(2), t(3), t(4), t(5), M);
      has_rows[j] = true;
    }
    // set_profiling: the time of each phase, summed over layers and calls (phase_ns; profile_decode.py --phases)
    const bool prof = profiling_;
    auto last = prof ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    auto mark = [&](int phase) {
      if (!prof) return;
      const auto now = std::chrono::steady_clock::now();
      phase_ns_[phase] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count();
      last = now;
    };
    for (int64_t i = 0; i < L; ++i) {
      const LayerWeights& w = layers[i];
      const float eps = static_cast<float>(w.eps);
      // module j's adapter rows, in place on y [M, width] (rows `y_stride` apart), input x [M, k]: as the
      // wrappers add them right after the base product, where the module has rows this step and a pool here
      auto add_rows = [&](int64_t j, T* y, int64_t width, int64_t y_stride, const T* in, int64_t k) {
        if (!has_rows[j]) return;
        const int64_t p = (i * MODULES + j) * 2;
        const OptT a = pools.get(p);
        if (!a.has_value()) return;
        const OptT b = pools.get(p + 1);
        TORCH_CHECK(lora_rows[j].max_page < a->size(0), "lora_apply_: page out of range");
        lpx_parts::lora_apply<T>(y, y_stride, in, k, a->data_ptr<T>(), b->data_ptr<T>(), k, width, lora_rows[j]);
      };
      T* sum = (L - 1 - i) % 2 == 0 ? out.data_ptr<T>() : tmp;  // the last layer writes the output
      lpx_parts::rms_norm<T>(xi, w.input_norm.data_ptr<T>(), h, M, H, eps);
      mark(kNorms);
      linear_into<T>(h, M, H, w.qkv, qkv);
      mark(kQkv);
      add_rows(0, qkv, q_width, qkv_width, h, H);
      add_rows(1, qkv + q_width, kv_width, qkv_width, h, H);
      add_rows(2, qkv + q_width + kv_width, kv_width, qkv_width, h, H);
      mark(kLora);
      lpx_parts::rotary<T>(qkv, cp, sp2, M, num_heads, D, qkv_width);
      lpx_parts::rotary<T>(qkv + q_width, cp, sp2, M, num_kv_heads, D, qkv_width);
      mark(kElementwise);
      const T* q = qkv;
      if (M > 1) {
        for (int64_t t = 0; t < M; ++t) std::memcpy(qc + t * q_width, qkv + t * qkv_width, q_width * sizeof(T));
        q = qc;
      }
      // this step's keys and values (rows of qkv) go into the caches first
      if (kv_bf16) {
        to_bf16(q, M, q_width, q == qkv ? qkv_width : q_width, qb);
        to_bf16(qkv + q_width, M, kv_width, qkv_width, kb);
        to_bf16(qkv + q_width + kv_width, M, kv_width, qkv_width, vb);
        lpx_parts::paged_attention<B>(qb, w.k_cache.data_ptr<B>(), w.v_cache.data_ptr<B>(), tp, ip, lp, attn_b, M,
                                      num_heads, num_kv_heads, D, W, window, sc, kb, kv_width, vb, kv_width, sp);
        for (int64_t j = 0; j < M * q_width; ++j) attn[j] = static_cast<T>(static_cast<float>(attn_b[j]));
      } else {
        lpx_parts::paged_attention<T>(q, w.k_cache.data_ptr<T>(), w.v_cache.data_ptr<T>(), tp, ip, lp, attn, M,
                                      num_heads, num_kv_heads, D, W, window, sc, qkv + q_width, qkv_width,
                                      qkv + q_width + kv_width, qkv_width, sp);
      }
      mark(kAttention);
      linear_into<T>(attn, M, q_width, w.o, a);
      mark(kO);
      add_rows(3, a, H, H, attn, q_width);
      mark(kLora);
      lpx_parts::add_rms_norm<T>(xi, a, w.post_norm.data_ptr<T>(), sum, normed, M, H, eps);
      mark(kNorms);
      linear_into<T>(normed, M, H, w.gate_up, gu);
      mark(kGateUp);
      add_rows(4, gu, inter, 2 * inter, normed, H);
      add_rows(5, gu + inter, inter, 2 * inter, normed, H);
      mark(kLora);
      lpx_parts::silu_and_mul<T>(gu, gu + inter, m, M, inter, 2 * inter, 2 * inter);
      mark(kElementwise);
      linear_into<T>(m, M, inter, w.down, d);
      mark(kDown);
      add_rows(6, d, H, H, m, inter);
      mark(kLora);
      for (int64_t j = 0; j < M * H; ++j) sum[j] = static_cast<T>(static_cast<float>(sum[j]) + static_cast<float>(d[j]));
      mark(kElementwise);
      xi = sum;
    }
    return out;
  }
};

}  // namespace


TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def(
      "decoder_layer(Tensor x, Tensor cos, Tensor sin, Tensor input_norm, Tensor post_norm, float eps, "
      "Tensor?[] qkv, int qkv_kind, int qkv_group, Tensor?[] o, int o_kind, int o_group, "
      "Tensor?[] gate_up, int gate_up_kind, int gate_up_group, Tensor?[] down, int down_kind, int down_group, "
      "int num_heads, int num_kv_heads, int head_dim, float scale, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_table, Tensor row_index, Tensor row_len, int window, Tensor slot_mapping, Tensor?[] lora) -> Tensor");
  m.impl("decoder_layer", c10::DispatchKey::CPU, &decoder_layer);
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<double>, c10::List<OptT>, std::vector<int64_t>,
                       std::vector<at::Tensor>, c10::List<OptT>, int64_t, int64_t, int64_t, double>())
      .def("forward", &DecoderStack::forward)
      .def("num_layers", &DecoderStack::num_layers)
      .def("lean_calls", &DecoderStack::lean_calls)
      .def("set_profiling", &DecoderStack::set_profiling)
      .def("phase_ns", &DecoderStack::phase_ns)
      .def("phase_names", &DecoderStack::phase_names);
}
