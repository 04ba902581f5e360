// loom::segment_attention and loom::merge_states on the CPU: checks, then the
// framework-free kernel of attn_cpu_*.cpp. Semantics: engine/attention/plan.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <mutex>

#include "loom/attn_cpu.h"
#include "ops.h"

namespace loom {

void check_cpu_int32_1d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

namespace {

// An int32 CSR offsets array: starts at 0, never decreases, ends at most at `limit`.
void check_indptr(const at::Tensor& t, const char* name, int64_t limit) {
  const int32_t* p = t.data_ptr<int32_t>();
  const int64_t n = t.numel();
  TORCH_CHECK(n >= 1 && p[0] == 0, "segment_attention: ", name, " must start at 0");
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK(p[i] >= p[i - 1], "segment_attention: ", name, " decreases at index ", i);
  TORCH_CHECK(p[n - 1] <= limit, "segment_attention: ", name, " ends at ", p[n - 1], " past its ", limit,
              " elements");
}

void check_range(const at::Tensor& t, const char* name, int64_t hi) {
  const int32_t* p = t.data_ptr<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < hi, "segment_attention: ", name, "[", i, "] = ", p[i], " is outside [0, ",
                hi, ")");
}

cpu::DType kernel_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return cpu::DType::F32;
    case at::kBFloat16: return cpu::DType::BF16;
    case at::kHalf: return cpu::DType::F16;
    default:
      TORCH_CHECK(false, "segment_attention: q, k_pool and v_pool must be float32, bfloat16 or float16, got ",
                  q.scalar_type());
  }
}

}  // namespace

// The partial states (o, lse) of a call, in a buffer kept for the next call: allocated
// afresh, the pages of a large one (100 MB at 1,000 threads x 50 segments) fault in on
// every call, which took a fifth of the call's time. It shrinks when a call needs less
// than an eighth of it (say, decode after a long prefill). One buffer for the process, held
// for the call (a buffer per calling thread was kept by every Python thread that ever ran a
// call, each the size of the largest it had needed, for as long as the thread lived: a
// server's idle worker threads held one each); a call that finds it in use (another LLM's,
// in another thread) takes one of its own, freed when the call ends.
class StateBuffer {
 public:
  explicit StateBuffer(int64_t floats) : lock_(mutex(), std::try_to_lock) {
    at::Tensor& buf = lock_.owns_lock() ? shared() : own_;
    if (buf.defined() && (buf.numel() < floats || buf.numel() / 8 > floats)) buf = at::Tensor();  // free it first
    if (!buf.defined()) buf = at::empty({floats + floats / 4}, at::TensorOptions().dtype(at::kFloat));
    data_ = buf.data_ptr<float>();
  }
  float* data() const { return data_; }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static at::Tensor& shared() {
    static at::Tensor* buf = new at::Tensor();  // (never destroyed: no tensor freed after torch at exit)
    return *buf;
  }
  std::unique_lock<std::mutex> lock_;
  at::Tensor own_;
  float* data_ = nullptr;
};

at::Tensor segment_attention(const at::Tensor& q_in, const at::Tensor& k_pool, const at::Tensor& v_pool,
                             const at::Tensor& kv_indptr, const at::Tensor& kv_page_ids,
                             const at::Tensor& kv_len, const at::Tensor& q_indptr, const at::Tensor& q_rows,
                             const at::Tensor& shift, const at::Tensor& causal_limit,
                             const at::Tensor& merge_indptr, const at::Tensor& merge_entries,
                             const at::Tensor& inv_freq, double scale) {
  TORCH_CHECK(q_in.device().is_cpu() && k_pool.device().is_cpu() && v_pool.device().is_cpu(),
              "segment_attention (cpu): q, k_pool and v_pool must be CPU tensors");
  TORCH_CHECK(q_in.dim() == 3, "segment_attention: q must be [T, Hq, D], got shape ", q_in.sizes());
  TORCH_CHECK(k_pool.dim() == 4, "segment_attention: k_pool must be [num_pages, page_size, Hkv, D], got shape ",
              k_pool.sizes());
  TORCH_CHECK(v_pool.sizes() == k_pool.sizes(), "segment_attention: v_pool shape ", v_pool.sizes(),
              " differs from k_pool shape ", k_pool.sizes());
  TORCH_CHECK(v_pool.scalar_type() == k_pool.scalar_type(), "segment_attention: v_pool dtype ",
              v_pool.scalar_type(), " differs from k_pool dtype ", k_pool.scalar_type());
  TORCH_CHECK(k_pool.scalar_type() == q_in.scalar_type() || q_in.scalar_type() == at::kFloat,
              "segment_attention: k_pool and v_pool must have q's dtype ", q_in.scalar_type(),
              " (or q float32 over a bfloat16 / float16 cache), got ", k_pool.scalar_type());
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(),
              "segment_attention: k_pool and v_pool must be contiguous");
  const cpu::DType q_dtype = kernel_dtype(q_in), dtype = kernel_dtype(k_pool);
  const int64_t T = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t N = k_pool.size(0), ps = k_pool.size(1), Hkv = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == D, "segment_attention: head_dim of q (", D, ") and k_pool (", k_pool.size(3),
              ") differ");
  TORCH_CHECK(Hq > 0 && Hkv > 0 && Hq % Hkv == 0, "segment_attention: query heads (", Hq,
              ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(ps > 0, "segment_attention: page_size must be positive");

  const std::pair<const at::Tensor*, const char*> plan[] = {
      {&kv_indptr, "kv_indptr"}, {&kv_page_ids, "kv_page_ids"},   {&kv_len, "kv_len"},
      {&q_indptr, "q_indptr"},   {&q_rows, "q_rows"},             {&shift, "shift"},
      {&causal_limit, "causal_limit"}, {&merge_indptr, "merge_indptr"}, {&merge_entries, "merge_entries"}};
  for (const auto& [t, name] : plan) check_cpu_int32_1d(*t, name);
  const int64_t J = kv_len.numel(), E = q_rows.numel(), P = kv_page_ids.numel();
  TORCH_CHECK(kv_indptr.numel() == J + 1 && q_indptr.numel() == J + 1,
              "segment_attention: kv_indptr and q_indptr must have num_jobs + 1 = ", J + 1, " elements, got ",
              kv_indptr.numel(), " and ", q_indptr.numel());
  TORCH_CHECK(shift.numel() == E && causal_limit.numel() == E && merge_entries.numel() == E,
              "segment_attention: q_rows, shift, causal_limit and merge_entries must all have num_entries = ", E,
              " elements");
  TORCH_CHECK(merge_indptr.numel() == T + 1, "segment_attention: merge_indptr must have T + 1 = ", T + 1,
              " elements (T = q.size(0)), got ", merge_indptr.numel());
  TORCH_CHECK(E < (int64_t{1} << 31) && P < (int64_t{1} << 31), "segment_attention: plan too large");
  check_indptr(kv_indptr, "kv_indptr", P);
  check_indptr(q_indptr, "q_indptr", E);
  TORCH_CHECK(q_indptr.data_ptr<int32_t>()[J] == E, "segment_attention: q_indptr must end at num_entries");
  check_indptr(merge_indptr, "merge_indptr", E);
  check_range(kv_page_ids, "kv_page_ids", N);
  check_range(q_rows, "q_rows", T);
  check_range(merge_entries, "merge_entries", E);
  {
    const int32_t* kp = kv_indptr.data_ptr<int32_t>();
    const int32_t* kl = kv_len.data_ptr<int32_t>();
    for (int64_t j = 0; j < J; ++j)
      TORCH_CHECK(kl[j] >= 0 && kl[j] <= static_cast<int64_t>(kp[j + 1] - kp[j]) * ps, "segment_attention: kv_len[",
                  j, "] = ", kl[j], " does not fit the job's ", kp[j + 1] - kp[j], " pages of ", ps, " tokens");
  }
  bool any_shift = false;
  {
    const int32_t* sp = shift.data_ptr<int32_t>();
    for (int64_t e = 0; e < E && !any_shift; ++e) any_shift = sp[e] != 0;
  }
  at::Tensor freq;
  if (any_shift) {
    TORCH_CHECK(D % 2 == 0, "segment_attention: shifted entries need an even head_dim, got ", D);
    TORCH_CHECK(inv_freq.device().is_cpu() && inv_freq.numel() >= D / 2,
                "segment_attention: inv_freq must be a CPU tensor of head_dim / 2 = ", D / 2, " elements, got ",
                inv_freq.numel());
    freq = inv_freq.to(at::kFloat).contiguous();
  }

  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  // Written by the merge in q's dtype (a float32 result converted afterwards cost an extra
  // pass and a wake of ATen's thread pool: 5% of bfloat16 decode attention, N=1 to 32).
  at::Tensor out = at::empty({T, Hq, D}, q.options());

  cpu::AttnArgs a{};
  a.dtype = dtype;
  a.q_dtype = q_dtype;
  a.q = q.data_ptr();
  a.q_stride_t = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.k_pool = k_pool.data_ptr();
  a.v_pool = v_pool.data_ptr();
  a.num_pages = N;
  a.page_size = static_cast<int>(ps);
  a.num_q_heads = static_cast<int>(Hq);
  a.num_kv_heads = static_cast<int>(Hkv);
  a.head_dim = static_cast<int>(D);
  a.num_rows = static_cast<int>(T);
  a.num_jobs = static_cast<int>(J);
  a.num_entries = static_cast<int>(E);
  a.kv_indptr = kv_indptr.data_ptr<int32_t>();
  a.kv_page_ids = kv_page_ids.data_ptr<int32_t>();
  a.kv_len = kv_len.data_ptr<int32_t>();
  a.q_indptr = q_indptr.data_ptr<int32_t>();
  a.q_rows = q_rows.data_ptr<int32_t>();
  a.shift = shift.data_ptr<int32_t>();
  a.causal_limit = causal_limit.data_ptr<int32_t>();
  a.merge_indptr = merge_indptr.data_ptr<int32_t>();
  a.merge_entries = merge_entries.data_ptr<int32_t>();
  a.inv_freq = any_shift ? freq.data_ptr<float>() : nullptr;
  a.scale = static_cast<float>(scale);
  a.out = out.data_ptr();
  a.out_dtype = q_dtype;
  a.num_threads = at::get_num_threads();

  const cpu::Schedule sched = cpu::make_schedule(a);
  const int64_t S = std::max<int64_t>(sched.num_states, 1);
  const StateBuffer states(S * Hq * D + 2 * S * Hq);  // (o, then each state's (m, l))
  float* o_buf = states.data();
  const bool ok = cpu::run_segment_attention(a, cpu::view_of(sched), o_buf, o_buf + S * Hq * D);
  TORCH_CHECK(ok, "segment_attention: out of memory for the kernel's scratch buffers");
  return out;
}

at::Tensor merge_states(const at::Tensor& o_in, const at::Tensor& lse_in, const at::Tensor& merge_indptr,
                        const at::Tensor& merge_entries, int64_t num_rows) {
  TORCH_CHECK(o_in.device().is_cpu() && lse_in.device().is_cpu(), "merge_states (cpu): o and lse must be CPU tensors");
  TORCH_CHECK(o_in.dim() == 3, "merge_states: o must be [E, H, D], got shape ", o_in.sizes());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == o_in.size(0) && lse_in.size(1) == o_in.size(1),
              "merge_states: lse must be [E, H] = [", o_in.size(0), ", ", o_in.size(1), "], got shape ",
              lse_in.sizes());
  TORCH_CHECK(o_in.scalar_type() == at::kFloat && lse_in.scalar_type() == at::kFloat,
              "merge_states: o and lse must be float32 partial states, got ", o_in.scalar_type(), " and ",
              lse_in.scalar_type());
  TORCH_CHECK(num_rows >= 0, "merge_states: num_rows must be >= 0, got ", num_rows);
  check_cpu_int32_1d(merge_indptr, "merge_indptr");
  check_cpu_int32_1d(merge_entries, "merge_entries");
  const int64_t E = o_in.size(0), H = o_in.size(1), D = o_in.size(2);
  TORCH_CHECK(merge_indptr.numel() == num_rows + 1, "merge_states: merge_indptr must have num_rows + 1 = ",
              num_rows + 1, " elements, got ", merge_indptr.numel());
  const int32_t* mi = merge_indptr.data_ptr<int32_t>();
  TORCH_CHECK(mi[0] == 0, "merge_states: merge_indptr must start at 0");
  for (int64_t t = 0; t < num_rows; ++t)
    TORCH_CHECK(mi[t + 1] >= mi[t], "merge_states: merge_indptr decreases at index ", t + 1);
  TORCH_CHECK(mi[num_rows] <= merge_entries.numel(), "merge_states: merge_indptr ends at ", mi[num_rows],
              " past the ", merge_entries.numel(), " merge entries");
  const int32_t* me = merge_entries.data_ptr<int32_t>();
  for (int64_t i = 0; i < mi[num_rows]; ++i)
    TORCH_CHECK(me[i] >= 0 && me[i] < E, "merge_states: merge_entries[", i, "] = ", me[i], " is outside [0, ", E,
                ")");
  const at::Tensor o = o_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor out = at::empty({num_rows, H, D}, o.options());
  const int threads = (mi[num_rows] * H * D < (1 << 16)) ? 1 : at::get_num_threads();
  cpu::run_merge_states(o.data_ptr<float>(), lse.data_ptr<float>(), H, D, mi, me, num_rows,
                        out.data_ptr<float>(), threads);
  return out;
}

}  // namespace loom
