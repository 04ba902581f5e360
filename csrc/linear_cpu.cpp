// Packed-panel GEMM for the model's linear layers on the CPU (float32, or bfloat16
// weights and activations with float32 accumulation).
//
// Why: on this project's CPUs the BLAS behind torch.nn.functional.linear reaches a
// small fraction of both the memory bandwidth (decode: a few rows against large
// weights) and the FMA peak (prefill); bench/bench_linear.py measures it. Here the
// weight [N, K] is packed once, at load time, into panels [N/NB][K][NB] whose rows (one
// k step) are one 64-byte cache line: NB = 16 float32 or 32 bfloat16 outputs. A
// register-blocked micro-kernel reads several adjacent panels side by side (one memory
// stream each) and keeps up to 24 vector accumulators: up to 4 rows x 64 outputs, else
// 8 rows x 48 outputs per pass (a panel passes once per 8 rows and stays in L2).
// Inner loops are plain C++ on GCC vector types; target_clones builds AVX-512, AVX2 and
// baseline versions and picks one at run time.
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

constexpr int64_t kPrefetch = 128;  // panel rows ahead (8 KB of each panel)

// A panel row (one k step of a panel) is one cache line: 16 float32 or 32 bfloat16
// outputs.
template <class W>
constexpr int64_t panel_width() {
  return 64 / sizeof(W);
}
inline int64_t panel_width_of(at::ScalarType t) { return t == at::kBFloat16 ? 32 : 16; }

// 16 floats (one AVX-512 register, two AVX2 ones; GCC vector extensions, so each
// target_clones build uses its own registers).
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint32_t v16u_u __attribute__((vector_size(64), aligned(2)));

// One panel row (64 bytes) as NV float vectors. bfloat16: the 32 weights are read as 16
// 32-bit words holding an even and an odd weight each; a shift gives the even ones, a
// mask the odd ones (bfloat16 -> float32 is a 16-bit shift), so outputs 2j and 2j+1 are
// lane j of vectors 0 and 1 (out_at undoes that).
inline __attribute__((always_inline)) void load_row(const float* p, v16f* w) {
  w[0] = *reinterpret_cast<const v16f_u*>(p);
}
inline __attribute__((always_inline)) void load_row(const uint16_t* p, v16f* w) {
  const v16u u = *reinterpret_cast<const v16u_u*>(p);
  const v16u even = u << 16, odd = u & 0xFFFF0000u;
  w[0] = __builtin_bit_cast(v16f, even);
  w[1] = __builtin_bit_cast(v16f, odd);
}
// Output j of a panel row: vector j % NV, lane j / NV.
template <int NV>
inline __attribute__((always_inline)) float out_at(const v16f* acc, int64_t j) {
  return acc[j % NV][j / NV];
}

// MB rows against NP adjacent panels in one pass: NP memory streams per core. A core's
// own misses (L1 fill buffers) cap one stream well below the memory bandwidth; with
// several the hardware prefetcher runs ahead on each. MB * NP * NV accumulator vectors
// (NV = vectors per panel row), at most 24 (panel_rows).
template <int MB, int NP, bool PF = true, class W>
inline __attribute__((always_inline)) void micro(const float* __restrict x, int64_t ldx, int64_t K,
                                                 const W* __restrict p0, const float* __restrict bias,
                                                 float* __restrict out, int64_t ldo, int64_t n0,
                                                 int64_t nvalid_last) {
  constexpr int64_t NB = panel_width<W>();
  constexpr int NV = NB / 16;
  v16f acc[NP][MB][NV];
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 32
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[p][i][v] = v16f{};
  const int64_t ps = K * NB;  // elements per panel
  for (int64_t k = 0; k < K; ++k) {
    v16f w[NP][NV];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      const W* row = p0 + p * ps + k * NB;
      // Ask for the panel well ahead: at several rows per pass the multiply-adds hide
      // less of the memory latency than the hardware prefetcher expects (reading past
      // the panel's end is harmless: prefetches do not fault). Locality 3 (prefetcht0),
      // not 0: prefetchnta made this loop 4x slower on an Intel Xeon (Emerald Rapids) VM,
      // where it stalled on every k step even for panels already in L2.
      if constexpr (PF) __builtin_prefetch(row + kPrefetch * NB, 0, 3);
      load_row(row, w[p]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const float a = x[i * ldx + k];
#pragma GCC unroll 8
      for (int p = 0; p < NP; ++p)
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[p][i][v] += a * w[p][v];
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* o = out + i * ldo + n0;
    for (int p = 0; p < NP; ++p) {
      const int64_t nv = p == NP - 1 ? nvalid_last : NB;
      for (int64_t j = 0; j < nv; ++j) o[p * NB + j] = out_at<NV>(acc[p][i], j) + (bias ? bias[n0 + p * NB + j] : 0.f);
    }
  }
}

// All M rows against NP adjacent panels: passes of up to 8 rows that keep at most 24
// accumulator vectors, then the rest in one more pass (not one pass per leftover row:
// each pass re-reads the panels).
template <int NP, class W>
inline __attribute__((always_inline)) void panel_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const W* p0,
                                                      const float* bias, float* out, int64_t ldo, int64_t n0,
                                                      int64_t nvalid_last) {
  constexpr int R0 = 24 / (NP * (panel_width<W>() / 16)), R = R0 < 8 ? R0 : 8;
  static_assert(R >= 1, "rows per pass");
  int64_t m = 0;
  // Only the first pass prefetches: the later ones find the panels in L2, where the
  // prefetches only cost (prefill, 1024 rows: -6..-9% in an A/B in one process).
  for (; m + R <= M; m += R)
    if (m == 0) micro<R, NP>(x + m * ldx, ldx, K, p0, bias, out + m * ldo, ldo, n0, nvalid_last);
    else micro<R, NP, false>(x + m * ldx, ldx, K, p0, bias, out + m * ldo, ldo, n0, nvalid_last);
  const float* xr = x + m * ldx;
  float* orr = out + m * ldo;
#define LOOM_ROWS_CASE(r)                                                      \
  case r:                                                                      \
    if constexpr (R > r) {                                                     \
      if (m == 0) micro<r, NP>(xr, ldx, K, p0, bias, orr, ldo, n0, nvalid_last); \
      else micro<r, NP, false>(xr, ldx, K, p0, bias, orr, ldo, n0, nvalid_last); \
    }                                                                          \
    break;
  switch (M - m) {
    LOOM_ROWS_CASE(7) LOOM_ROWS_CASE(6) LOOM_ROWS_CASE(5) LOOM_ROWS_CASE(4)
    LOOM_ROWS_CASE(3) LOOM_ROWS_CASE(2) LOOM_ROWS_CASE(1)
    default: break;
  }
#undef LOOM_ROWS_CASE
}

// Panels per pass: up to 4 rows, 64 outputs (float32: 4 panels, 16 accumulators;
// bfloat16: 2); more rows, float32 3 panels (8 rows x 48 outputs, 24 accumulators),
// bfloat16 1 panel (8 rows x 32 outputs, 16).
// A/B in one process against the previous layout (32-output float32 panels, one panel
// per pass above 4 rows, two up to 4), the benchmark model's 53 linears with 8 rows:
// -11..-23% with 2 panels per pass, then 3 panels: another -6% (8 and 6 rows), -2..-7%
// for 16-1024 rows; 4 rows -2..-9%, 1 row -3..-6%; bfloat16 unchanged. Tried: 4 rows
// with 6 or 8 panels (+4%, +25%), 12 rows x 2 panels (spills: 2x slower).
template <class W>
constexpr int group_small() {
  return 64 / panel_width<W>();
}
template <class W>
constexpr int group_large() {
  return sizeof(W) == 4 ? 3 : 1;
}

// Panels [b0, b1) for M rows.
template <class W>
inline __attribute__((always_inline)) void run_panels_t(const float* x, int64_t ldx, int64_t M, int64_t K,
                                                        const W* wp, const float* bias, float* out, int64_t ldo,
                                                        int64_t N, int64_t b0, int64_t b1) {
  constexpr int64_t NB = panel_width<W>();
  constexpr int GS = group_small<W>(), GL = group_large<W>();
  auto last = [&](int64_t b) { return std::min<int64_t>(NB, N - b * NB); };  // valid outputs of panel b
  int64_t b = b0;
  if (M <= 4)
    for (; b + GS <= b1; b += GS) panel_rows<GS>(x, ldx, M, K, wp + b * K * NB, bias, out, ldo, b * NB, last(b + GS - 1));
  if constexpr (GL > 1)
    for (; b + GL <= b1; b += GL) panel_rows<GL>(x, ldx, M, K, wp + b * K * NB, bias, out, ldo, b * NB, last(b + GL - 1));
  for (; b < b1; ++b) panel_rows<1>(x, ldx, M, K, wp + b * K * NB, bias, out, ldo, b * NB, last(b));
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
  const int64_t nb = panel_width_of(w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), Np = (N + nb - 1) / nb * nb;
  at::Tensor padded = w;
  if (Np != N) padded = at::cat({w, at::zeros({Np - N, K}, w.options())});
  // [Np, K] -> [Np/NB, NB, K] -> [Np/NB, K, NB]
  return padded.contiguous().view({Np / nb, nb, K}).transpose(1, 2).contiguous();
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& wp, const c10::optional<at::Tensor>& bias,
                         int64_t n_out) {
  const bool bf16 = wp.scalar_type() == at::kBFloat16;
  TORCH_CHECK(wp.scalar_type() == at::kFloat || bf16, "linear_packed: the packed weight must be float32 or "
              "bfloat16, got ", wp.scalar_type());
  TORCH_CHECK(x.scalar_type() == wp.scalar_type(), "linear_packed: x is ", x.scalar_type(),
              " but the packed weight is ", wp.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "linear_packed: CPU tensors only");
  const int64_t nb = panel_width_of(wp.scalar_type());
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == nb, "linear_packed: weight is not packed (use pack_linear_weight)");
  const int64_t K = wp.size(1);
  TORCH_CHECK(x.size(-1) == K, "linear_packed: x has ", x.size(-1), " features, weight expects ", K);
  TORCH_CHECK(n_out > (wp.size(0) - 1) * nb && n_out <= wp.size(0) * nb,
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
  // Rows [m0, m0 + mm) against panels [b0, b1).
  auto run = [&](int64_t m0, int64_t mm, int64_t b0, int64_t b1) {
    if (bf16)
      run_panels(xp + m0 * K, K, mm, K, reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>()), bp,
                 op + m0 * n_out, n_out, n_out, b0, b1);
    else
      run_panels(xp + m0 * K, K, mm, K, wp.data_ptr<float>(), bp, op + m0 * n_out, n_out, n_out, b0, b1);
  };
  // Work is split in groups of the panels run_panels takes in one pass (so that a
  // thread's share never breaks a group): all of a thread's groups in one call for few
  // rows, (row chunk, group) tasks for many.
  const int64_t g = mtiles == 1 ? (bf16 ? group_small<uint16_t>() : group_small<float>())
                                : (bf16 ? group_large<uint16_t>() : group_large<float>());
  const int64_t ngroups = (nblocks + g - 1) / g;
  at::parallel_for(0, ngroups * mtiles, 1, [&](int64_t t0, int64_t t1) {
    if (mtiles == 1) return run(0, M, t0 * g, std::min(t1 * g, nblocks));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / ngroups) * mchunk, b0 = (t % ngroups) * g;
      run(m0, std::min(mchunk, M - m0), b0, std::min(b0 + g, nblocks));
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
