// The decoder kernels' raw-pointer entry points, for the whole-stack call (cpu_decoder_layer.cpp) to run a small
// batch's layers on buffers it holds, with no tensor made, viewed or dispatched per operation. Each runs the code its
// operator runs after checking and allocating (stream_linear and paged_attention call these themselves), so both
// give the same bits.
// T is float or c10::BFloat16.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace lpx_parts {

// cpu_ops.cpp
template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t rows, int64_t dim, float eps);
template <typename T>
void add_rms_norm(const T* x, const T* a, const T* w, T* sum, T* out, int64_t rows, int64_t dim, float eps);
template <typename T>
void silu_and_mul(const T* gate, const T* up, T* out, int64_t rows, int64_t dim, int64_t gate_stride,
                  int64_t up_stride);
template <typename T>  // x: tokens rows of heads * dim, row_stride apart; cos / sin [tokens, dim]
void rotary(T* x, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t dim, int64_t row_stride);

// cpu_attention.cpp: q [T, H, D] contiguous, out [T, H, D]; the tables as paged_attention takes them (checked by
// the caller). With k_new / v_new (T rows of num_kv_heads * head_dim, k_stride / v_stride apart), those rows are
// written to the caches at slot_mapping first.
template <typename T>
void paged_attention(const T* q, T* k_cache, T* v_cache, const int64_t* slot_table, const int64_t* row_index,
                     const int64_t* row_len, T* out, int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim, int64_t table_width, int64_t window, float scale, const T* k_new,
                     int64_t k_stride, const T* v_new, int64_t v_stride, const int64_t* slot_mapping);

// cpu_stream_linear.cpp: out [M, N] = x [M, K] (rows contiguous, x's dtype: float32, or bfloat16 when x_bf16) times
// a streaming linear's weights, which check_linear has accepted for x's dtype and K; bias (x's dtype) may be null
void check_linear(bool x_bf16, int64_t K, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                  const c10::optional<at::Tensor>& zeros, int64_t kind, int64_t group,
                  const c10::optional<at::Tensor>& bias);
void linear_into(const void* x, bool x_bf16, int64_t M, int64_t K, const at::Tensor& w,
                 const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& zeros, int64_t kind,
                 int64_t group, const void* bias, void* out);

// cpu_lora.cpp: y[rows[i]] += B A x[rows[i]] for every row of every segment, A's and B's rows read in place from the
// paged pools, as lora_apply_ computes it (check_lora_rows checks the row tensors, check_lora_pools a module's pools;
// pages must also be < the pools' rows: max_page)
struct LoraRows {
  const int64_t *rows, *starts, *pages, *ranks;  // token rows, segment starts [S + 1], pages [S, max_rank], ranks [S]
  int64_t num_segments, max_rank, max_page;      // max_page: the largest page named (-1: none)
  const float *page_scales, *row_scales;         // null: all 1
};
LoraRows check_lora_rows(const at::Tensor& token_rows, const at::Tensor& seg_starts, const at::Tensor& seg_pages,
                         const at::Tensor& seg_ranks, const at::Tensor& page_scales, const at::Tensor& row_scales,
                         int64_t num_y_rows);
void check_lora_pools(const at::Tensor& a_pool, const at::Tensor& b_pool, int64_t in, int64_t out,
                      at::ScalarType dtype);
template <typename T>
void lora_apply(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* a_pool, const T* b_pool, int64_t in,
                int64_t out, const LoraRows& rows);

}  // namespace lpx_parts
