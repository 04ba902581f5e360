// loom::append_kv on the GPU: k[t], v[t] ([T, Hkv, D]) into pool slot slots[t]
// (= page * page_size + offset). Same semantics as the CPU op (csrc/ops_kv.cpp).
//
// Framework-free: a kernel and a plain C launcher on raw pointers, so it compiles with
// nvcc alone (.ci/check_cuda.sh); the torch-facing checks live in append_kv_cuda.cpp.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// One block per token; its threads copy the token's K and V rows (Hkv * D elements,
// contiguous in both source and pool) in 16-byte words when alignment allows.
template <typename Slot, typename Word>
__global__ void append_kv_kernel(char* __restrict__ k_pool, char* __restrict__ v_pool, const char* __restrict__ k,
                                 const char* __restrict__ v, const Slot* __restrict__ slots, int64_t row_bytes,
                                 int64_t k_stride, int64_t v_stride) {
  const int64_t t = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(slots[t]);
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const Word* ks = reinterpret_cast<const Word*>(k + t * k_stride);
  const Word* vs = reinterpret_cast<const Word*>(v + t * v_stride);
  Word* kd = reinterpret_cast<Word*>(k_pool + slot * row_bytes);
  Word* vd = reinterpret_cast<Word*>(v_pool + slot * row_bytes);
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

template <typename Slot>
cudaError_t launch(void* k_pool, void* v_pool, const void* k, const void* v, const Slot* slots, int64_t tokens,
                   int64_t row_bytes, int64_t k_stride, int64_t v_stride, cudaStream_t stream) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(k_pool) | reinterpret_cast<uintptr_t>(v_pool) |
                         reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) |
                         static_cast<uintptr_t>(row_bytes) | static_cast<uintptr_t>(k_stride) |
                         static_cast<uintptr_t>(v_stride);
  char* kp = static_cast<char*>(k_pool);
  char* vp = static_cast<char*>(v_pool);
  const char* ks = static_cast<const char*>(k);
  const char* vs = static_cast<const char*>(v);
  const int threads = 128;
  if (bits % 16 == 0)
    append_kv_kernel<Slot, uint4><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(kp, vp, ks, vs, slots,
                                                                                        row_bytes, k_stride, v_stride);
  else if (bits % 4 == 0)
    append_kv_kernel<Slot, uint32_t><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
        kp, vp, ks, vs, slots, row_bytes, k_stride, v_stride);
  else
    append_kv_kernel<Slot, uint16_t><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
        kp, vp, ks, vs, slots, row_bytes, k_stride, v_stride);
  return cudaGetLastError();
}

}  // namespace

// Copies `tokens` rows of `row_bytes` bytes (one token of all kv heads) from k / v
// (token strides in bytes) to slot `slots[t]` of k_pool / v_pool. Slots are int64 when
// slots_are_int64, else int32, and must already be checked to lie inside the pools.
extern "C" cudaError_t loom_append_kv_cuda(void* k_pool, void* v_pool, const void* k, const void* v,
                                           const void* slots, int slots_are_int64, int64_t tokens,
                                           int64_t row_bytes, int64_t k_stride, int64_t v_stride,
                                           cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  if (slots_are_int64)
    return launch(k_pool, v_pool, k, v, static_cast<const int64_t*>(slots), tokens, row_bytes, k_stride, v_stride,
                  stream);
  return launch(k_pool, v_pool, k, v, static_cast<const int32_t*>(slots), tokens, row_bytes, k_stride, v_stride,
                stream);
}
