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

// a streaming linear's tensors: [weight or codes, scales, zeros, bias] (absent ones None)
at::Tensor linear(const at::Tensor& x, const c10::List<OptT>& t, int64_t kind, int64_t group) {
  TORCH_CHECK(t.size() == 4 && t.get(0).has_value(), "decoder_layer: [weight, scales, zeros, bias] per linear");
  return stream_linear_op().call(x, *t.get(0), t.get(1), t.get(2), kind, group, t.get(3));
}

// one layer's weights: [weight, scales, zeros, bias] and (kind, group size) per linear, the norms and its caches
struct LayerWeights {
  at::Tensor input_norm, post_norm;
  double eps;
  c10::List<OptT> qkv, o, gate_up, down;
  int64_t qkv_kind, qkv_group, o_kind, o_group, gate_up_kind, gate_up_group, down_kind, down_group;
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
  const at::Tensor qkv_out = linear(h, w.qkv, w.qkv_kind, w.qkv_group);  // [n, q + 2 kv]
  TORCH_CHECK(qkv_out.size(1) == q_width + 2 * kv_width, "decoder_layer: q/k/v widths disagree with the heads");
  at::Tensor q = qkv_out.narrow(1, 0, q_width).view({n, s.num_heads, s.head_dim});
  at::Tensor k = qkv_out.narrow(1, q_width, kv_width).view({n, s.num_kv_heads, s.head_dim});
  const at::Tensor v = qkv_out.narrow(1, q_width + kv_width, kv_width).view({n, s.num_kv_heads, s.head_dim});
  add_lora([&] { return qkv_out.narrow(1, 0, q_width); }, h, lora, 0);
  add_lora([&] { return qkv_out.narrow(1, q_width, kv_width); }, h, lora, 1);
  add_lora([&] { return qkv_out.narrow(1, q_width + kv_width, kv_width); }, h, lora, 2);
  rotary_op().call(q, cos, sin);
  rotary_op().call(k, cos, sin);
  const at::Tensor attn = paged_attention_op().call(q, w.k_cache, w.v_cache, s.slot_table, s.row_index, s.row_len,
                                                    s.window, s.scale, k, v, s.slot_mapping);
  const at::Tensor attn_rows = attn.view({n, q_width});
  const at::Tensor a = linear(attn_rows, w.o, w.o_kind, w.o_group);
  add_lora([&] { return a; }, attn_rows, lora, 3);
  at::Tensor sum, normed;
  std::tie(sum, normed) = add_rms_norm_op().call(x, a, w.post_norm, w.eps);
  const at::Tensor gu = linear(normed, w.gate_up, w.gate_up_kind, w.gate_up_group);  // [n, 2 inter]
  const int64_t inter = gu.size(1) / 2;
  const at::Tensor g = gu.narrow(1, 0, inter), u = gu.narrow(1, inter, inter);
  add_lora([&] { return g; }, normed, lora, 4);
  add_lora([&] { return u; }, normed, lora, 5);
  const at::Tensor m = silu_and_mul_op().call(g, u);
  const at::Tensor d = linear(m, w.down, w.down_kind, w.down_group);
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
  const LayerWeights w{input_norm, post_norm, eps, qkv, o, gate_up, down, qkv_kind, qkv_group, o_kind, o_group,
                       gate_up_kind, gate_up_group, down_kind, down_group, k_cache, v_cache};
  return layer_forward(x, cos, sin, w, {num_heads, num_kv_heads, head_dim, scale, slot_table, row_index, row_len,
                                        window, slot_mapping}, lora);
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
    auto four = [&](size_t at) {
      c10::List<OptT> t;
      for (size_t j = 0; j < 4; ++j) t.push_back(linears.get(at + j));
      TORCH_CHECK(t.get(0).has_value(), "DecoderStack: a linear without weights");
      return t;
    };
    for (size_t i = 0; i < n; ++i) {
      const int64_t* kg = kinds_groups.data() + 8 * i;
      layers.push_back(LayerWeights{norms[2 * i], norms[2 * i + 1], eps[i], four(16 * i), four(16 * i + 4),
                                    four(16 * i + 8), four(16 * i + 12), kg[0], kg[1], kg[2], kg[3], kg[4], kg[5],
                                    kg[6], kg[7], caches[2 * i], caches[2 * i + 1]});
    }
  }

  // rows: empty (no adapter rows this step) or per module the six row tensors (None where it has none)
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot_table,
                     const at::Tensor& row_index, const at::Tensor& row_len, int64_t window,
                     const at::Tensor& slot_mapping, const c10::List<OptT>& rows) {
    TORCH_CHECK(rows.size() == 0 || (rows.size() == MODULES * LORA_ROWS && pools.size() > 0),
                "DecoderStack: rows are empty or 7 x 6 entries (with pools)");
    const StepRows s{num_heads, num_kv_heads, head_dim, scale, slot_table, row_index, row_len, window, slot_mapping};
    const c10::List<OptT> none;
    at::Tensor h = x;
    for (size_t i = 0; i < layers.size(); ++i) {
      if (rows.size() == 0) {
        h = layer_forward(h, cos, sin, layers[i], s, none);
        continue;
      }
      c10::List<OptT> lora;  // this layer's 7 x 8 arguments: its pools and the step's rows where both exist
      lora.reserve(MODULES * LORA_ARGS);
      for (int64_t m = 0; m < MODULES; ++m) {
        const int64_t p = (static_cast<int64_t>(i) * MODULES + m) * 2;
        const bool on = pools.get(p).has_value() && rows.get(m * LORA_ROWS).has_value();
        lora.push_back(on ? pools.get(p) : c10::nullopt);
        lora.push_back(on ? pools.get(p + 1) : c10::nullopt);
        for (int64_t j = 0; j < LORA_ROWS; ++j) lora.push_back(on ? rows.get(m * LORA_ROWS + j) : c10::nullopt);
      }
      h = layer_forward(h, cos, sin, layers[i], s, lora);
    }
    return h;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers.size()); }
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
      .def("num_layers", &DecoderStack::num_layers);
}
