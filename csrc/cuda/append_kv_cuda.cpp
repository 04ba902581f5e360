// CUDA registration of loom::append_kv (built only on request, LOOM_BUILD_CUDA=1 with a
// CUDA torch and nvcc, see setup.py; the engine itself appends through Triton on a GPU):
// checks like the CPU op, then the kernel in append_kv.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

extern "C" cudaError_t loom_append_kv_cuda(void* k_pool, void* v_pool, const void* k, const void* v,
                                           const void* slots, int slots_are_int64, int64_t tokens,
                                           int64_t row_bytes, int64_t k_stride, int64_t v_stride,
                                           cudaStream_t stream);

namespace {

void append_kv_cuda(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& slots) {
  TORCH_CHECK(k_pool.is_cuda() && v_pool.is_cuda() && k.is_cuda() && v.is_cuda() && slots.is_cuda(),
              "append_kv (cuda): all tensors must be on the GPU");
  TORCH_CHECK(k_pool.device() == k.device() && v_pool.device() == k.device() && slots.device() == k.device(),
              "append_kv (cuda): all tensors must be on one device");
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "append_kv: k_pool and v_pool must both be [num_pages, page_size, Hkv, D], got ", k_pool.sizes(),
              " and ", v_pool.sizes());
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "append_kv: k_pool and v_pool must be contiguous");
  const int64_t Hkv = k_pool.size(2), D = k_pool.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == Hkv && k.size(2) == D && v.sizes() == k.sizes(),
              "append_kv: k and v must be [T, ", Hkv, ", ", D, "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == k_pool.scalar_type() &&
                  v_pool.scalar_type() == k_pool.scalar_type(),
              "append_kv: k, v and v_pool must have k_pool's dtype ", k_pool.scalar_type(),
              " (the CPU op also rounds float32 k / v into a 16-bit pool; this one copies bytes)");
  TORCH_CHECK(k_pool.scalar_type() == at::kFloat || k_pool.scalar_type() == at::kBFloat16 ||
                  k_pool.scalar_type() == at::kHalf,
              "append_kv: the pools must be float32, bfloat16 or float16, got ", k_pool.scalar_type());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0), "append_kv: slots must be [T]");
  TORCH_CHECK(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt,
              "append_kv: slots must be int64 or int32, got ", slots.scalar_type());
  if (k.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  // The CPU op's range check (the kernel trusts its slots): one small copy to the host.
  const int64_t num_slots = k_pool.size(0) * k_pool.size(1);
  const auto range = at::aminmax(slots);
  const at::Tensor lohi = at::stack({std::get<0>(range), std::get<1>(range)}).to(at::kLong).cpu();  // (one sync)
  const int64_t lo = lohi[0].item<int64_t>(), hi = lohi[1].item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < num_slots, "append_kv: slots hold ", lo, " .. ", hi, ", outside the pool's ",
              num_slots, " slots");
  // Rows must be contiguous per token; the token stride may be anything.
  const at::Tensor kc = (k.stride(2) == 1 && k.stride(1) == D) ? k : k.contiguous();
  const at::Tensor vc = (v.stride(2) == 1 && v.stride(1) == D) ? v : v.contiguous();
  const at::Tensor sl = slots.contiguous();
  const int64_t es = static_cast<int64_t>(k_pool.element_size());
  const cudaError_t err = loom_append_kv_cuda(
      k_pool.data_ptr(), v_pool.data_ptr(), kc.data_ptr(), vc.data_ptr(), sl.data_ptr(),
      sl.scalar_type() == at::kLong, k.size(0), Hkv * D * es, kc.stride(0) * es, vc.stride(0) * es,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "append_kv (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(loom, CUDA, m) { m.impl("append_kv", &append_kv_cuda); }
