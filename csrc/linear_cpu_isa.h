// The packed GEMM's per-instruction-set builds (linear_cpu_{base,avx2,avx512}.cpp, the
// code in linear_cpu_impl.h); linear_cpu.cpp picks one with the CPU attention's choice
// (loom::cpu::active_isa_level, lowered by engine._C.cpu_isa for tests).
#pragma once

#include <stdint.h>
#include <stdlib.h>

#include "loom/attn_math.h"  // float32 -> bfloat16 bits (no torch)

namespace loom {
namespace lin {

// Rows M of x [M, ldx] (float32) against panels [b0, b1) of the packed weight wp (float32
// or bfloat16 panels of N outputs), out [M, ldo] (bfloat16 panels: bfloat16, rounded as
// stored); panel_group: panels per pass, which callers keep together when they split the
// panels between threads.
#define LOOM_LIN_DECLARE(isa)                                                                            \
  namespace isa {                                                                                        \
  void run_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias,  \
                  float* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1);                            \
  void run_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp,                  \
                  const float* bias, uint16_t* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1);      \
  int panel_group(bool bf16, bool small);                                                                \
  }
LOOM_LIN_DECLARE(base)
LOOM_LIN_DECLARE(avx2)
LOOM_LIN_DECLARE(avx512)
#undef LOOM_LIN_DECLARE

// bfloat16 panels on AMX tiles (linear_cpu_amx.cpp), from one row: x bfloat16 [M, ldx],
// out bfloat16 [M, ldo]. False (nothing written) when it cannot run: K not a multiple of
// 32, no memory, or a build without the tiles.
namespace amx {
bool run_panels_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp, const float* bias,
                     uint16_t* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1);
}  // namespace amx

}  // namespace lin
}  // namespace loom

// Placeholder for a build this compiler / architecture lacks: loom::cpu::active_isa_level
// never picks it.
#define LOOM_LIN_STUB(isa)                                                                                \
  namespace loom {                                                                                        \
  namespace lin {                                                                                         \
  namespace isa {                                                                                         \
  void run_panels(const float*, int64_t, int64_t, int64_t, const float*, const float*, float*, int64_t,    \
                  int64_t, int64_t, int64_t) {                                                            \
    abort();                                                                                              \
  }                                                                                                       \
  void run_panels(const float*, int64_t, int64_t, int64_t, const uint16_t*, const float*, uint16_t*,       \
                  int64_t, int64_t, int64_t, int64_t) {                                                   \
    abort();                                                                                              \
  }                                                                                                       \
  int panel_group(bool, bool) { abort(); }                                                                \
  }                                                                                                       \
  }                                                                                                       \
  }
