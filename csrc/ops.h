// Torch-facing launchers of the loom ops (registered in ops_registry.cpp). Each checks
// dtype, device, contiguity and shapes, then calls a framework-free kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

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

// Shared argument checks.
void check_cpu_int32_1d(const at::Tensor& t, const char* name);

}  // namespace loom
