// The packed GEMM's micro-kernels built for AVX-512 (picked at run time when the CPU has it).
#include <stdint.h>

#include "linear_cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2,prefer-vector-width=512")
namespace loom {
namespace lin {
namespace avx512 {
// 32 vector registers: up to 24 accumulators. Up to 4 rows 4 panels (4 rows x 64
// outputs), else 3 (8 rows x 48 outputs), float32 and bfloat16 alike (16-output panels;
// bfloat16 lines hold two k steps: against the former 32-output bfloat16 panels in 3 / 2
// per pass, 1 row 0.99x, 4 rows 0.94x, 8 rows 0.86-0.92x, 16 rows 0.93x, 1024 1.03x).
// A/B in one process against 32-output float32 panels read one per pass above 4 rows
// and two up to 4 (the benchmark model's 53 linears): 8 rows -25% (2 panels per pass:
// -11..-23%, then 3: another -6%), 16 rows -13%, 4 rows -2..-9%, 1 row -3..-6%, 1024
// rows -2%. bfloat16 against 2 panels up to 4 rows and 1 above: 1, 4 and 8 rows -3..-4%,
// 16 rows -9%, 128 and 1024 rows -8%. Tried: float32 4 rows with 6 or 8 panels (+4%,
// +25%), 12 rows x 2 panels (spills: 2x slower).
constexpr int LVL = 16, LACC = 24, GS32 = 4, GL32 = 3, GS16 = 4, GL16 = 3;
#include "linear_cpu_impl.h"
}  // namespace avx512
}  // namespace lin
}  // namespace loom
#pragma GCC pop_options
#else
LOOM_LIN_STUB(avx512)
#endif
