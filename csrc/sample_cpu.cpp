// Inverse-CDF draws for the sampler (engine/sampler.py).
//
// pick_from_probs(probs [R, V] float32 >= 0, u [R] float32 in [0, 1)) -> int64 [R]:
// row r's token is the first index whose inclusive prefix sum exceeds u[r] * total,
// where total is the row's sum (rows need not be normalised). Tokens of zero
// probability are never picked. Instead of a cumulative sum (a serial chain of V
// dependent adds per row) it sums blocks of 256 with vector adds, walks the block sums,
// then scans inside one block.
//
// pick_from_logits(logits [R, V] float32, temperature [R] > 0, u [R]) -> int64 [R]: the
// same draw from softmax(logits / temperature), with the exponentials computed in one
// pass per row into a scratch row (no [R, V] probability tensor, no normalisation).
//
// top_logits(logits [R, V] float32, k) -> (values [R, k] float32, indices [R, k] int64):
// each row's first k entries when sorted by value, descending, equal values in index
// order (a stable sort's first k, so ties at the k-th value keep the lowest indices). One
// pass per row instead of torch.topk's: blocks of 16 whose max is not above the current
// threshold are skipped; candidates above it collect in a buffer, cut back to the best k
// (which raises the threshold) when it fills. A row with a NaN gets NaN as its first value.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "loom/attn_math.h"

namespace loom {
namespace {

constexpr int64_t kBlock = 256;

int64_t pick_row(const float* p, int64_t V, float u, float* block_sums) {
  const int64_t nb = (V + kBlock - 1) / kBlock;
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * kBlock, i1 = std::min(V, i0 + kBlock);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) s += p[i];
    block_sums[b] = s;
    total += s;
  }
  int64_t last_nonzero = -1;
  for (int64_t i = V - 1; i >= 0; --i)
    if (p[i] > 0.f) {
      last_nonzero = i;
      break;
    }
  if (last_nonzero < 0 || !std::isfinite(total)) return -1;  // all zero, or a NaN / inf: the caller reports it
  const double target = static_cast<double>(u) * total;
  double acc = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    if (acc + block_sums[b] > target) {
      const int64_t i0 = b * kBlock, i1 = std::min(V, i0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) {
        acc += p[i];
        if (p[i] > 0.f && acc > target) return i;
      }
      // rounding: the block's own sum said the target lies inside; take its last token
      for (int64_t i = i1 - 1; i >= i0; --i)
        if (p[i] > 0.f) return i;
    }
    acc += block_sums[b];
  }
  return last_nonzero;  // u * total rounded up to total
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void exp_row(const float* x, int64_t V, float inv_t, float* p) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < V; ++i) m = x[i] > m ? x[i] : m;
  if (m == -INFINITY) m = 0.f;  // an all -inf row: every p is 0 (reported by pick_row)
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) p[i] = loom::exp_approx((x[i] - m) * inv_t);
}

at::Tensor pick_from_logits(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& u) {
  TORCH_CHECK(logits.device().is_cpu() && temperature.device().is_cpu() && u.device().is_cpu(),
              "pick_from_logits: CPU tensors only");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && temperature.scalar_type() == at::kFloat &&
                  u.scalar_type() == at::kFloat,
              "pick_from_logits: logits, temperature and u must be float32");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "pick_from_logits: logits must be [rows, vocab], got ",
              logits.sizes());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(u.dim() == 1 && u.size(0) == R && temperature.dim() == 1 && temperature.size(0) == R,
              "pick_from_logits: temperature and u must have one number per row");
  at::Tensor x = logits.contiguous(), tc = temperature.contiguous(), uc = u.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* tp = tc.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(tp[r] > 0.f, "pick_from_logits: temperature must be > 0 (row ", r, " has ", tp[r], ")");
  at::Tensor out = at::empty({R}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> p(V), sums((V + kBlock - 1) / kBlock);
    for (int64_t r = r0; r < r1; ++r) {
      exp_row(xp + r * V, V, 1.f / tp[r], p.data());
      op[r] = pick_row(p.data(), V, up[r], sums.data());
    }
  });
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(op[r] >= 0, "pick_from_logits: row ", r, " has a NaN / +inf logit, or no finite one");
  return out;
}

at::Tensor pick_from_probs(const at::Tensor& probs, const at::Tensor& u) {
  TORCH_CHECK(probs.device().is_cpu() && u.device().is_cpu(), "pick_from_probs: CPU tensors only");
  TORCH_CHECK(probs.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat,
              "pick_from_probs: probs and u must be float32");
  TORCH_CHECK(probs.dim() == 2 && probs.size(1) > 0, "pick_from_probs: probs must be [rows, vocab], got ",
              probs.sizes());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == probs.size(0), "pick_from_probs: u must have one number per row");
  at::Tensor p = probs.contiguous(), uc = u.contiguous();
  const int64_t R = p.size(0), V = p.size(1);
  at::Tensor out = at::empty({R}, p.options().dtype(at::kLong));
  const float* pp = p.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> sums((V + kBlock - 1) / kBlock);
    for (int64_t r = r0; r < r1; ++r) op[r] = pick_row(pp + r * V, V, up[r], sums.data());
  });
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(op[r] >= 0, "pick_from_probs: row ", r, " has a NaN / inf probability, or no positive one");
  return out;
}

using Cand = std::pair<float, int64_t>;

bool ranks_before(const Cand& a, const Cand& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

void top_row(const float* x, int64_t V, int64_t k, float* ov, int64_t* oi, std::vector<Cand>& buf) {
  const size_t cap = static_cast<size_t>(std::max<int64_t>(2 * k, 256));
  buf.clear();
  bool cut = false;  // after the first cut: buf holds the best k so far, thr the k-th's value
  float thr = -INFINITY;
  for (int64_t i0 = 0; i0 < V; i0 += 16) {
    const int64_t i1 = std::min(V, i0 + 16);
    float m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(+ : nan)
    for (int64_t i = i0; i < i1; ++i) {
      m = x[i] > m ? x[i] : m;
      nan += x[i] != x[i];
    }
    if (nan) {  // (the caller reports the row)
      for (int64_t j = 0; j < k; ++j) ov[j] = NAN, oi[j] = 0;
      return;
    }
    if (cut && !(m > thr)) continue;
    // (a later value equal to thr ranks after every kept one: its index is larger)
    for (int64_t i = i0; i < i1; ++i)
      if (!cut || x[i] > thr) buf.emplace_back(x[i], i);
    if (buf.size() >= cap) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), ranks_before);
      buf.resize(k);
      thr = std::min_element(buf.begin(), buf.end(), [](const Cand& a, const Cand& b) { return a.first < b.first; })->first;
      cut = true;
    }
  }
  if (buf.size() > static_cast<size_t>(k)) {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), ranks_before);
    buf.resize(k);
  }
  std::sort(buf.begin(), buf.end(), ranks_before);
  for (int64_t j = 0; j < k; ++j) ov[j] = buf[j].first, oi[j] = buf[j].second;
}

std::tuple<at::Tensor, at::Tensor> top_logits(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat,
              "top_logits: logits must be a float32 CPU tensor");
  TORCH_CHECK(logits.dim() == 2, "top_logits: logits must be [rows, vocab], got ", logits.sizes());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "top_logits: k must be in [1, vocab] (", V, "), got ", k);
  at::Tensor x = logits.contiguous();
  at::Tensor values = at::empty({R, k}, x.options());
  at::Tensor indices = at::empty({R, k}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Cand> buf;
    for (int64_t r = r0; r < r1; ++r) top_row(xp + r * V, V, k, vp + r * k, ip + r * k, buf);
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("top_logits(Tensor logits, int k) -> (Tensor, Tensor)");
  m.def("pick_from_probs(Tensor probs, Tensor u) -> Tensor");
  m.def("pick_from_logits(Tensor logits, Tensor temperature, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("pick_from_probs", &pick_from_probs);
  m.impl("pick_from_logits", &pick_from_logits);
  m.impl("top_logits", &top_logits);
}

}  // namespace loom
