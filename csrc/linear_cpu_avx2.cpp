// The packed GEMM's micro-kernels built for AVX2 + FMA (picked at run time when the CPU has it).
#include <stdint.h>

#include "linear_cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
namespace loom {
namespace lin {
namespace avx2 {
// 16 vector registers; up to 16 accumulators (a few spill: measured faster than 12,
// which splits 4 rows into two passes). Up to 4 rows 2 panels (float32: 4 rows x 32
// outputs), else 1 (8 rows x 16). Run on the AVX-512 machine (engine._C.cpu_isa("avx2")),
// A/B against the AVX2 clone of the previous GEMM (32-output panels): float32 1 and 4
// rows 1.00, 8 rows -23%, 1024 rows -33%; bfloat16 1 row +1..3%, 4 rows -4%, 8 rows -16%.
constexpr int LVL = 8, LACC = 16, GS32 = 2, GL32 = 1, GS16 = 2, GL16 = 1;
#include "linear_cpu_impl.h"
}  // namespace avx2
}  // namespace lin
}  // namespace loom
#pragma GCC pop_options
#else
LOOM_LIN_STUB(avx2)
#endif
