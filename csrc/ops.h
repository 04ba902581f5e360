// Torch-facing launchers of the loom ops (registered in ops_registry.cpp). Each checks
// dtype, device, contiguity and shapes, then calls a framework-free kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

// Kernels compiled for AVX-512, AVX2 and baseline x86-64, one picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOOM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOOM_CLONES
#endif

namespace loom {

void append_kv(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots);

at::Tensor segment_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                             const at::Tensor& kv_indptr, const at::Tensor& kv_page_ids,
                             const at::Tensor& kv_len, const at::Tensor& q_indptr, const at::Tensor& q_rows,
                             const at::Tensor& shift, const at::Tensor& causal_limit,
                             const at::Tensor& merge_indptr, const at::Tensor& merge_entries,
                             const at::Tensor& inv_freq, double scale);

at::Tensor merge_states(const at::Tensor& o, const at::Tensor& lse, const at::Tensor& merge_indptr,
                        const at::Tensor& merge_entries, int64_t num_rows);

std::vector<at::Tensor> build_plan(const at::Tensor& thread_view_indptr, const at::Tensor& view_seg,
                                   const at::Tensor& view_shift, const at::Tensor& thread_own_seg,
                                   const at::Tensor& thread_num_new, const at::Tensor& seg_len,
                                   const at::Tensor& seg_page_indptr, const at::Tensor& seg_page_ids);

// The fused CPU layer ops (csrc/fused_cpu.cpp) and the packed GEMM (csrc/linear_cpu.cpp).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(at::Tensor& h, const at::Tensor& r, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_prep(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_norm,
                                                        const c10::optional<at::Tensor>& k_norm,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        const at::Tensor& positions, int64_t num_heads,
                                                        int64_t num_kv_heads, int64_t head_dim, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor pack_linear_weight(const at::Tensor& w);
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& wp, const c10::optional<at::Tensor>& bias,
                         int64_t n_out);

// Shared argument checks.
void check_cpu_int32_1d(const at::Tensor& t, const char* name);

}  // namespace loom
