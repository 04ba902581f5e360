// Packed-panel GEMM for the model's linear layers on the CPU (float32, or bfloat16
// weights and activations with float32 accumulation).
//
// Why: on this project's CPUs the BLAS behind torch.nn.functional.linear reaches a
// small fraction of both the memory bandwidth (decode: a few rows against large
// weights) and the FMA peak (prefill); bench/bench_linear.py measures it. Here the
// weight [N, K] is packed once, at load time, into panels of 16 outputs whose lines are
// 64-byte cache lines: float32 [N/16][K][16] (a line per k step), bfloat16
// [N/16][K/2][16][2] (a line per k pair, (k, k + 1) of an output side by side in a
// 32-bit word: the layout of AMX B tiles). A register-blocked micro-kernel reads several
// adjacent panels side by side (one memory stream each) and keeps up to 24 vector
// accumulators (AVX-512): up to 4 rows x 64 outputs, else 8 rows x 48 outputs per pass
// (a panel passes once per 8 rows and stays in L2). The micro-kernels
// (linear_cpu_impl.h) are plain C++ on GCC vector types of the native width, built per
// instruction set (linear_cpu_{avx512,avx2,base}.cpp) and picked at run time.
// bfloat16: the panels stay bfloat16 (half the bytes to stream, which is what decode
// pays for) and are widened to float32 in registers, as are the activations; outputs
// are rounded to bfloat16 (nearest even) as they are stored, as a float32-accumulating
// bfloat16 GEMM does. On CPUs with AMX tiles, bfloat16 layers (K a multiple of 32) run on
// the tiles instead, the panels loaded in place (linear_cpu_amx.cpp: the same products
// and float32 sums).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "linear_cpu_isa.h"
#include "loom/attn_cpu.h"
#include "ops.h"

namespace loom {
namespace {

// A panel is 16 outputs; a line of it (64 bytes, linear_cpu_impl.h) one k step of
// float32 or two of bfloat16 (k, k + 1 side by side in each 32-bit word).
constexpr int64_t kPanel = 16;

// bfloat16 activations of up to this many values are widened by a plain loop into a
// buffer of the calling thread (decode's few rows: at::to's dispatch and allocation took
// longer than the conversion), more by at::to (in parallel).
constexpr int64_t kWidenedByLoop = 1 << 16;

// The micro-kernels of the instruction set the CPU attention runs (the best the CPU has,
// unless lowered by engine._C.cpu_isa).
template <class W, class O>
void run_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const W* wp, const float* bias, O* out,
                int64_t ldo, int64_t N, int64_t b0, int64_t b1) {
  switch (cpu::active_isa_level()) {
    case cpu::IsaLevel::amx:  // (float32, or bfloat16 with K not a multiple of 32: no tiles)
    case cpu::IsaLevel::avx512: return lin::avx512::run_panels(x, ldx, M, K, wp, bias, out, ldo, N, b0, b1);
    case cpu::IsaLevel::avx2: return lin::avx2::run_panels(x, ldx, M, K, wp, bias, out, ldo, N, b0, b1);
    default: return lin::base::run_panels(x, ldx, M, K, wp, bias, out, ldo, N, b0, b1);
  }
}

int panel_group(bool bf16, bool small) {
  switch (cpu::active_isa_level()) {
    case cpu::IsaLevel::amx:
    case cpu::IsaLevel::avx512: return lin::avx512::panel_group(bf16, small);
    case cpu::IsaLevel::avx2: return lin::avx2::panel_group(bf16, small);
    default: return lin::base::panel_group(bf16, small);
  }
}

}  // namespace

// The ops (declared in ops.h: csrc/layer_cpu.cpp calls linear_packed directly).

at::Tensor pack_linear_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack_linear_weight: weight must be 2-D [out, in], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "pack_linear_weight: weight must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), "pack_linear_weight: weight must be on the CPU");
  TORCH_CHECK(w.size(1) > 0, "pack_linear_weight: weight has no input features (shape ", w.sizes(), ")");
  const int64_t nb = kPanel, N = w.size(0), K = w.size(1), Np = (N + nb - 1) / nb * nb;
  at::Tensor padded = w;
  if (Np != N) padded = at::cat({w, at::zeros({Np - N, K}, w.options())});
  if (w.scalar_type() == at::kBFloat16) {
    // [Np, Kp] -> [Np/16, 16, Kp/2, 2] -> [Np/16, Kp/2, 16, 2]: a line per k pair, moved as
    // one 32-bit word (a permute of 2-element runs copied at a sixth of the speed: loading a
    // bfloat16 0.6B model spent 4 of its 4.6 s here)
    const int64_t Kp = K + (K & 1);
    if (Kp != K) padded = at::cat({padded, at::zeros({Np, 1}, w.options())}, 1);
    return padded.contiguous().view(at::kInt).view({Np / nb, nb, Kp / 2}).transpose(1, 2).contiguous()
        .view(at::kBFloat16).view({Np / nb, Kp / 2, 2 * nb});
  }
  // [Np, K] -> [Np/16, 16, K] -> [Np/16, K, 16]
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
  const int64_t nb = kPanel;
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == (bf16 ? 2 : 1) * nb,
              "linear_packed: weight is not packed (use pack_linear_weight)");
  TORCH_CHECK(wp.size(1) > 0, "linear_packed: the packed weight has no input features");
  TORCH_CHECK(wp.is_contiguous(), "linear_packed: the packed weight must be contiguous (as pack_linear_weight "
              "returns it)");
  const int64_t K = x.size(-1);
  // (bfloat16: k pairs, the last one padded when K is odd)
  TORCH_CHECK(bf16 ? (K + 1) / 2 == wp.size(1) : K == wp.size(1), "linear_packed: x has ", K,
              " features, weight expects ", bf16 ? 2 * wp.size(1) : wp.size(1), bf16 ? " (or one less)" : "");
  // An odd K's packing pads its last k pair with zeros: x one feature short of an even-K
  // weight would pass the shape check and drop a real column.
  TORCH_CHECK(!(bf16 && K % 2 == 1) || !wp.select(1, wp.size(1) - 1).slice(1, 1, 2 * nb, 2).any().item<bool>(),
              "linear_packed: x has ", K, " features, weight expects ", K + 1);
  TORCH_CHECK(n_out > (wp.size(0) - 1) * nb && n_out <= wp.size(0) * nb,
              "linear_packed: n_out=", n_out, " does not match the packed weight");
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == n_out, "linear_packed: bias has ", b.numel(), " elements for ", n_out, " outputs");
    bp = b.data_ptr<float>();
  }
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n_out;
  const int64_t nblocks = wp.size(0);
  // A bfloat16 layer on AMX tiles where the CPU attention runs its amx build: from one row
  // (A/B in one process against the FMA kernels on the same panels, the benchmark model's
  // 53 linears: 1-4 rows 0.81-0.87x the time; 5-8 rows, against the former 32-output
  // panels, 0.70-0.88x before the tiles' prefetch, which took 0.79-0.83x more).
  if (bf16 && K % 32 == 0 && cpu::active_isa_level() == cpu::IsaLevel::amx) {
    at::Tensor xb = x.reshape({-1, K}).contiguous();
    const int64_t M = xb.size(0);
    at::Tensor out = at::empty({M, n_out}, xb.options());
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    const auto* w = reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>());
    auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    std::atomic<bool> ok{true};
    at::parallel_for(0, nblocks, 1, [&](int64_t p0, int64_t p1) {
      if (!lin::amx::run_panels_bf16(xp, K, M, K, w, bp, op, n_out, n_out, p0, p1)) ok = false;
    });
    if (ok.load()) return out.view(out_sizes);
  }
  // The kernels read float32 activations (their broadcasts feed the FMAs straight from
  // memory; widening bfloat16 in the kernel made prefill 1.3x slower) with a zero column
  // for the padded k of an odd K; bfloat16 outputs are rounded as the kernels store them.
  // (Was: at::to both ways; a call of 1-8 rows now takes 2-5 us less on one thread,
  // bitwise the same results.)
  const at::Tensor xr = x.reshape({-1, K}).contiguous();
  const int64_t M = xr.size(0);
  const int64_t Kx = bf16 ? 2 * wp.size(1) : K;  // k steps of the kernels
  at::Tensor out = at::empty({M, n_out}, x.options());
  if (M == 0) return out.view(out_sizes);
  const float* xf = nullptr;
  at::Tensor x2;  // (holds a float32 copy made by at::to)
  thread_local std::vector<float> widened;
  if (!bf16) {
    xf = xr.data_ptr<float>();
  } else if (M * Kx <= kWidenedByLoop) {
    widened.resize(M * Kx);
    const auto* src = reinterpret_cast<const uint16_t*>(xr.data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) widened[m * Kx + k] = bf16_to_float(src[m * K + k]);
      if (Kx != K) widened[m * Kx + K] = 0.f;
    }
    xf = widened.data();
  } else {
    x2 = xr.to(at::kFloat);
    if (Kx != K) x2 = at::constant_pad_nd(x2, {0, 1});
    xf = x2.data_ptr<float>();
  }
  // Rows split too when there are many (prefill), so both cores work on small N.
  const int64_t mchunk = M >= 256 ? 64 : M;
  const int64_t mtiles = (M + mchunk - 1) / mchunk;
  // Rows [m0, m0 + mm) against panels [b0, b1).
  void* op = out.data_ptr();
  auto run = [&](int64_t m0, int64_t mm, int64_t b0, int64_t b1) {
    if (bf16)
      run_panels(xf + m0 * Kx, Kx, mm, Kx, reinterpret_cast<const uint16_t*>(wp.data_ptr()), bp,
                 static_cast<uint16_t*>(op) + m0 * n_out, n_out, n_out, b0, b1);
    else
      run_panels(xf + m0 * K, K, mm, K, wp.data_ptr<float>(), bp, static_cast<float*>(op) + m0 * n_out, n_out,
                 n_out, b0, b1);
  };
  // Few rows: each thread takes an equal share of the panels (split at any panel; its
  // share runs in groups of the panels run_panels takes in one pass, the rest in a pass
  // of 2 and single panels). Split in whole groups, 32 panels in groups of 3 went 18 / 14
  // and one core idled at the end of every such layer (A/B in one process, weights from
  // memory, 8 rows: 512 outputs 0.93-0.96x the time, the decode model's 52 linears in
  // sequence 0.98x, bfloat16 0.97x; decode step n=8 0.98x; 1 and 4 rows unchanged).
  // Many rows: (row chunk, group) tasks.
  const int64_t g = panel_group(bf16, M <= 4);
  if (mtiles == 1) {
    at::parallel_for(0, nblocks, g, [&](int64_t b0, int64_t b1) { run(0, M, b0, b1); });
  } else {
    const int64_t ngroups = (nblocks + g - 1) / g;
    at::parallel_for(0, ngroups * mtiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = (t / ngroups) * mchunk, b0 = (t % ngroups) * g;
        run(m0, std::min(mchunk, M - m0), b0, std::min(b0 + g, nblocks));
      }
    });
  }
  return out.view(out_sizes);
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
