// Packed-panel GEMM for the model's linear layers on the CPU (float32, or bfloat16
// weights and activations with float32 accumulation).
//
// Why: on this project's CPUs the BLAS behind torch.nn.functional.linear reaches a
// small fraction of both the memory bandwidth (decode: a few rows against large
// weights) and the FMA peak (prefill); bench/bench_linear.py measures it. Here the
// weight [N, K] is packed once, at load time, into panels [N/32][K][32] so that
// each panel streams contiguously; a register-blocked micro-kernel keeps 8 rows x
// 32 outputs in registers while the panel passes once per 8 rows (it stays in L2); up to
// 4 rows, two panels are read side by side (two memory streams per core).
// Inner loops are plain C++ that the compiler vectorises; target_clones builds
// AVX-512, AVX2 and baseline versions and picks one at run time.
// bfloat16: the panels stay bfloat16 (half the bytes to stream, which is what decode
// pays for) and are widened to float32 in registers; activations are widened once per
// call; outputs are rounded to bfloat16 (nearest even), as a float32-accumulating
// bfloat16 GEMM does.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ops.h"

namespace loom {
namespace {

constexpr int64_t kNB = 32;  // outputs per panel
constexpr int64_t kPrefetch = 64;  // k steps ahead (8 KB of panel)

inline __attribute__((always_inline)) float widen(float w) { return w; }
inline __attribute__((always_inline)) float widen(uint16_t w) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(w) << 16);
}

template <int MB, class W>
inline __attribute__((always_inline)) void micro(const float* __restrict x, int64_t ldx, int64_t K,
                                                 const W* __restrict panel,
                                                 const float* __restrict bias,
                                                 float* __restrict out, int64_t ldo, int64_t n0,
                                                 int64_t nvalid) {
  float acc[MB][kNB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < kNB; ++j) acc[i][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const W* w = panel + k * kNB;
    // Ask for the panel well ahead: at several rows per pass the multiply-adds hide less
    // of the memory latency than the hardware prefetcher expects (reading past the
    // panel's end is harmless: prefetches do not fault). Locality 3 (prefetcht0), not 0:
    // prefetchnta made this loop 4x slower on an Intel Xeon (Emerald Rapids) VM, where
    // it stalled on every k step even for panels already in L2.
    __builtin_prefetch(w + kPrefetch * kNB, 0, 3);
    __builtin_prefetch(w + kPrefetch * kNB + 16, 0, 3);
    for (int i = 0; i < MB; ++i) {
      const float a = x[i * ldx + k];
      for (int j = 0; j < kNB; ++j) acc[i][j] += a * widen(w[j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* o = out + i * ldo + n0;
    for (int64_t j = 0; j < nvalid; ++j) o[j] = acc[i][j] + (bias ? bias[n0 + j] : 0.f);
  }
}

// Two adjacent panels at once: two memory streams per core instead of one.
template <int MB, class W>
inline __attribute__((always_inline)) void micro_pair(const float* __restrict x, int64_t ldx, int64_t K,
                                                      const W* __restrict pa, const W* __restrict pb,
                                                      const float* __restrict bias, float* __restrict out,
                                                      int64_t ldo, int64_t n0, int64_t nvalid_b) {
  float acc[2][MB][kNB];
  for (int p = 0; p < 2; ++p)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < kNB; ++j) acc[p][i][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const W* wa = pa + k * kNB;
    const W* wb = pb + k * kNB;
    __builtin_prefetch(wa + kPrefetch * kNB, 0, 3);
    __builtin_prefetch(wa + kPrefetch * kNB + 16, 0, 3);
    __builtin_prefetch(wb + kPrefetch * kNB, 0, 3);
    __builtin_prefetch(wb + kPrefetch * kNB + 16, 0, 3);
    for (int i = 0; i < MB; ++i) {
      const float a = x[i * ldx + k];
      for (int j = 0; j < kNB; ++j) acc[0][i][j] += a * widen(wa[j]);
      for (int j = 0; j < kNB; ++j) acc[1][i][j] += a * widen(wb[j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* o = out + i * ldo + n0;
    for (int64_t j = 0; j < kNB; ++j) o[j] = acc[0][i][j] + (bias ? bias[n0 + j] : 0.f);
    for (int64_t j = 0; j < nvalid_b; ++j) o[kNB + j] = acc[1][i][j] + (bias ? bias[n0 + kNB + j] : 0.f);
  }
}

// All M rows against one panel: blocks of 8 rows, then the rest in one more pass (not one
// pass per leftover row: each pass re-reads the panel).
template <class W>
inline __attribute__((always_inline)) void panel_rows(const float* x, int64_t ldx, int64_t M, int64_t K,
                                                      const W* panel, const float* bias, float* out, int64_t ldo,
                                                      int64_t n0, int64_t nvalid) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) micro<8>(x + m * ldx, ldx, K, panel, bias, out + m * ldo, ldo, n0, nvalid);
  const float* xr = x + m * ldx;
  float* orr = out + m * ldo;
  switch (M - m) {
    case 7: micro<7>(xr, ldx, K, panel, bias, orr, ldo, n0, nvalid); break;
    case 6: micro<6>(xr, ldx, K, panel, bias, orr, ldo, n0, nvalid); break;
    case 5: micro<5>(xr, ldx, K, panel, bias, orr, ldo, n0, nvalid); break;
    case 4: micro<4>(xr, ldx, K, panel, bias, orr, ldo, n0, nvalid); break;
    case 3: micro<3>(xr, ldx, K, panel, bias, orr, ldo, n0, nvalid); break;
    case 2: micro<2>(xr, ldx, K, panel, bias, orr, ldo, n0, nvalid); break;
    case 1: micro<1>(xr, ldx, K, panel, bias, orr, ldo, n0, nvalid); break;
    default: break;
  }
}

// Panels [b0, b1) for M rows; up to 4 rows, two adjacent panels at a time.
template <class W>
inline __attribute__((always_inline)) void run_panels_t(const float* x, int64_t ldx, int64_t M, int64_t K,
                                                        const W* wp, const float* bias, float* out, int64_t ldo,
                                                        int64_t N, int64_t b0, int64_t b1) {
  int64_t b = b0;
  if (M <= 4)
    for (; b + 2 <= b1; b += 2) {
      const W* pa = wp + b * K * kNB;
      const W* pb = pa + K * kNB;
      const int64_t n0 = b * kNB, nvalid_b = std::min(kNB, N - n0 - kNB);
      switch (M) {  // every row in one pass over the pair
        case 4: micro_pair<4>(x, ldx, K, pa, pb, bias, out, ldo, n0, nvalid_b); break;
        case 3: micro_pair<3>(x, ldx, K, pa, pb, bias, out, ldo, n0, nvalid_b); break;
        case 2: micro_pair<2>(x, ldx, K, pa, pb, bias, out, ldo, n0, nvalid_b); break;
        default: micro_pair<1>(x, ldx, K, pa, pb, bias, out, ldo, n0, nvalid_b); break;
      }
    }
  for (; b < b1; ++b)
    panel_rows(x, ldx, M, K, wp + b * K * kNB, bias, out, ldo, b * kNB, std::min(kNB, N - b * kNB));
}

LOOM_CLONES void run_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias,
                            float* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1) {
  run_panels_t(x, ldx, M, K, wp, bias, out, ldo, N, b0, b1);
}

LOOM_CLONES void run_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp,
                            const float* bias, float* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1) {
  run_panels_t(x, ldx, M, K, wp, bias, out, ldo, N, b0, b1);
}

}  // namespace

// The ops (declared in ops.h: csrc/layer_cpu.cpp calls linear_packed directly).

at::Tensor pack_linear_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack_linear_weight: weight must be 2-D [out, in], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "pack_linear_weight: weight must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), "pack_linear_weight: weight must be on the CPU");
  const int64_t N = w.size(0), K = w.size(1), Np = (N + kNB - 1) / kNB * kNB;
  at::Tensor padded = w;
  if (Np != N) padded = at::cat({w, at::zeros({Np - N, K}, w.options())});
  // [Np, K] -> [Np/NB, NB, K] -> [Np/NB, K, NB]
  return padded.contiguous().view({Np / kNB, kNB, K}).transpose(1, 2).contiguous();
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& wp, const c10::optional<at::Tensor>& bias,
                         int64_t n_out) {
  const bool bf16 = wp.scalar_type() == at::kBFloat16;
  TORCH_CHECK(wp.scalar_type() == at::kFloat || bf16, "linear_packed: the packed weight must be float32 or "
              "bfloat16, got ", wp.scalar_type());
  TORCH_CHECK(x.scalar_type() == wp.scalar_type(), "linear_packed: x is ", x.scalar_type(),
              " but the packed weight is ", wp.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "linear_packed: CPU tensors only");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == kNB, "linear_packed: weight is not packed (use pack_linear_weight)");
  const int64_t K = wp.size(1);
  TORCH_CHECK(x.size(-1) == K, "linear_packed: x has ", x.size(-1), " features, weight expects ", K);
  TORCH_CHECK(n_out > (wp.size(0) - 1) * kNB && n_out <= wp.size(0) * kNB,
              "linear_packed: n_out=", n_out, " does not match the packed weight");
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == n_out, "linear_packed: bias has ", b.numel(), " elements for ", n_out, " outputs");
    bp = b.data_ptr<float>();
  }
  // Activations in float32 (a copy only for bfloat16: a few rows in decode).
  at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n_out;
  at::Tensor out = at::empty({M, n_out}, x2.options());
  if (M == 0) return out.to(x.scalar_type()).view(out_sizes);
  const float* xp = x2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t nblocks = wp.size(0);
  // Rows split too when there are many (prefill), so both cores work on small N.
  const int64_t mchunk = M >= 256 ? 64 : M;
  const int64_t mtiles = (M + mchunk - 1) / mchunk;
  // Up to 4 rows (decode of a few threads), run_panels reads two adjacent panels at a time:
  // two memory streams per core. A core's own misses (L1 fill buffers) cap one stream at
  // ~9 GB/s on the Intel CI machine; with two the hardware prefetcher runs ahead on both.
  // Decode step in one process, interleaved (median of per-pair ratios): n=1 -10%, n=4 -12%,
  // bfloat16 n=1 -11%. Not above 4 rows: 8 rows need two passes over the pair (the
  // accumulators of 8 rows x 64 outputs do not fit the registers), and the second pass cost
  // more (n=8 +12%).
  // Rows [m0, m0 + mm) against panels [b0, b1).
  auto run = [&](int64_t m0, int64_t mm, int64_t b0, int64_t b1) {
    if (bf16)
      run_panels(xp + m0 * K, K, mm, K, reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>()), bp,
                 op + m0 * n_out, n_out, n_out, b0, b1);
    else
      run_panels(xp + m0 * K, K, mm, K, wp.data_ptr<float>(), bp, op + m0 * n_out, n_out, n_out, b0, b1);
  };
  at::parallel_for(0, nblocks * mtiles, 1, [&](int64_t t0, int64_t t1) {
    if (mtiles == 1) return run(0, M, t0, t1);  // a thread's panels in one call (pairs need neighbours)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / nblocks) * mchunk;
      run(m0, std::min(mchunk, M - m0), t % nblocks, t % nblocks + 1);
    }
  });
  return (bf16 ? out.to(at::kBFloat16) : out).view(out_sizes);
}

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("pack_linear_weight(Tensor w) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor wp, Tensor? bias, int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("linear_packed", &linear_packed);
}

}  // namespace loom
