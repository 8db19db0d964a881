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

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& input_norm, const at::Tensor& post_norm, double eps,
                         const c10::List<OptT>& qkv, int64_t qkv_kind, int64_t qkv_group, const c10::List<OptT>& o,
                         int64_t o_kind, int64_t o_group, const c10::List<OptT>& gate_up, int64_t gate_up_kind,
                         int64_t gate_up_group, const c10::List<OptT>& down, int64_t down_kind, int64_t down_group,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                         const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_table,
                         const at::Tensor& row_index, const at::Tensor& row_len, int64_t window,
                         const at::Tensor& slot_mapping, const c10::List<OptT>& lora) {
  TORCH_CHECK(lora.size() == 0 || lora.size() == 7 * LORA_ARGS, "decoder_layer: lora is empty or 7 x 8 entries");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decoder_layer: x [tokens, hidden] contiguous");
  const int64_t n = x.size(0), q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const at::Tensor h = rms_norm_op().call(x, input_norm, eps);
  const at::Tensor qkv_out = linear(h, qkv, qkv_kind, qkv_group);  // [n, q + 2 kv]
  TORCH_CHECK(qkv_out.size(1) == q_width + 2 * kv_width, "decoder_layer: q/k/v widths disagree with the heads");
  at::Tensor q = qkv_out.narrow(1, 0, q_width).view({n, num_heads, head_dim});
  at::Tensor k = qkv_out.narrow(1, q_width, kv_width).view({n, num_kv_heads, head_dim});
  const at::Tensor v = qkv_out.narrow(1, q_width + kv_width, kv_width).view({n, num_kv_heads, head_dim});
  add_lora([&] { return qkv_out.narrow(1, 0, q_width); }, h, lora, 0);
  add_lora([&] { return qkv_out.narrow(1, q_width, kv_width); }, h, lora, 1);
  add_lora([&] { return qkv_out.narrow(1, q_width + kv_width, kv_width); }, h, lora, 2);
  rotary_op().call(q, cos, sin);
  rotary_op().call(k, cos, sin);
  const at::Tensor attn = paged_attention_op().call(q, k_cache, v_cache, slot_table, row_index, row_len, window, scale,
                                                    k, v, slot_mapping);
  const at::Tensor attn_rows = attn.view({n, q_width});
  const at::Tensor a = linear(attn_rows, o, o_kind, o_group);
  add_lora([&] { return a; }, attn_rows, lora, 3);
  at::Tensor sum, normed;
  std::tie(sum, normed) = add_rms_norm_op().call(x, a, post_norm, eps);
  const at::Tensor gu = linear(normed, gate_up, gate_up_kind, gate_up_group);  // [n, 2 inter]
  const int64_t inter = gu.size(1) / 2;
  const at::Tensor g = gu.narrow(1, 0, inter), u = gu.narrow(1, inter, inter);
  add_lora([&] { return g; }, normed, lora, 4);
  add_lora([&] { return u; }, normed, lora, 5);
  const at::Tensor m = silu_and_mul_op().call(g, u);
  const at::Tensor d = linear(m, down, down_kind, down_group);
  add_lora([&] { return d; }, m, lora, 6);
  return sum.add_(d);  // sum is this call's own tensor: x + d in place (the same bits as the module path's x + mlp)
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex_cpu, m) {
  m.def(
      "decoder_layer(Tensor x, Tensor cos, Tensor sin, Tensor input_norm, Tensor post_norm, float eps, "
      "Tensor?[] qkv, int qkv_kind, int qkv_group, Tensor?[] o, int o_kind, int o_group, "
      "Tensor?[] gate_up, int gate_up_kind, int gate_up_group, Tensor?[] down, int down_kind, int down_group, "
      "int num_heads, int num_kv_heads, int head_dim, float scale, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_table, Tensor row_index, Tensor row_len, int window, Tensor slot_mapping, Tensor?[] lora) -> Tensor");
  m.impl("decoder_layer", c10::DispatchKey::CPU, &decoder_layer);
}
