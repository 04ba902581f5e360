// loom::append_kv: scatter new K/V rows into their page slots.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstring>

#include "ops.h"

namespace loom {

namespace {

void check_pool_pair(const at::Tensor& k_pool, const at::Tensor& v_pool) {
  TORCH_CHECK(k_pool.device().is_cpu() && v_pool.device().is_cpu(),
              "append_kv: k_pool and v_pool must be CPU tensors, got ", k_pool.device(), " and ",
              v_pool.device());
  TORCH_CHECK(k_pool.dim() == 4, "append_kv: k_pool must be [num_pages, page_size, Hkv, D], got shape ",
              k_pool.sizes());
  TORCH_CHECK(v_pool.sizes() == k_pool.sizes(), "append_kv: v_pool shape ", v_pool.sizes(),
              " differs from k_pool shape ", k_pool.sizes());
  TORCH_CHECK(v_pool.scalar_type() == k_pool.scalar_type(), "append_kv: v_pool dtype ", v_pool.scalar_type(),
              " differs from k_pool dtype ", k_pool.scalar_type());
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "append_kv: k_pool and v_pool must be contiguous");
  const auto t = k_pool.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "append_kv: the pools must be float32, bfloat16 or float16, got ", t);
}

}  // namespace

void append_kv(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots) {
  check_pool_pair(k_pool, v_pool);
  const int64_t Hkv = k_pool.size(2), D = k_pool.size(3);
  TORCH_CHECK(Hkv > 0 && D > 0, "append_kv: the pools' kv heads and head_dim must be >= 1, got [",
              k_pool.size(0), ", ", k_pool.size(1), ", ", Hkv, ", ", D, "]");
  const int64_t num_slots = k_pool.size(0) * k_pool.size(1);
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && slots.device().is_cpu(),
              "append_kv: k, v and slots must be CPU tensors");
  TORCH_CHECK(k.dim() == 3 && k.size(1) == Hkv && k.size(2) == D, "append_kv: k must be [T, ", Hkv, ", ", D,
              "] to match the pool, got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "append_kv: v shape ", v.sizes(), " differs from k shape ", k.sizes());
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "append_kv: k and v dtypes differ: ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() || k.scalar_type() == at::kFloat,
              "append_kv: k and v must have the pool's dtype ", k_pool.scalar_type(),
              " (or be float32, rounded to the pool's), got ", k.scalar_type());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0), "append_kv: slots must be [T] with T = ",
              k.size(0), ", got shape ", slots.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt,
              "append_kv: slots must be int64 or int32, got ", slots.scalar_type());

  const int64_t T = k.size(0);
  if (T == 0) return;
  // A float32 model over a 16-bit cache: rounded to nearest even, as Tensor.to does.
  const at::Tensor kc = k.to(k_pool.scalar_type()).contiguous(), vc = v.to(k_pool.scalar_type()).contiguous();
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "append_kv: slots[", t, "] = ", sp[t],
                " is outside the pool's ", num_slots, " slots");

  const size_t row_bytes = static_cast<size_t>(Hkv * D) * k_pool.element_size();
  const char* ks = static_cast<const char*>(kc.data_ptr());
  const char* vs = static_cast<const char*>(vc.data_ptr());
  char* kd = static_cast<char*>(k_pool.data_ptr());
  char* vd = static_cast<char*>(v_pool.data_ptr());
  // One row per token; a prefill of thousands of tokens is worth a few threads.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / static_cast<int64_t>(row_bytes));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::memcpy(kd + sp[t] * row_bytes, ks + t * row_bytes, row_bytes);
      std::memcpy(vd + sp[t] * row_bytes, vs + t * row_bytes, row_bytes);
    }
  });
}

}  // namespace loom
