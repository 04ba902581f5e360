// The packed GEMM's micro-kernels built for AVX-512 (picked at run time when the CPU has it).
#include <stdint.h>

#include "linear_cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2,prefer-vector-width=512")
namespace loom {
namespace lin {
namespace avx512 {
// 32 vector registers: up to 24 accumulators. Up to 4 rows 4 float32 panels (4 rows x
// 64 outputs), else 3 (8 rows x 48 outputs); bfloat16 (rows of 32 outputs, 2 vectors):
// 3 panels (4 rows x 96 outputs), else 2 (6 rows x 64).
// A/B in one process against 32-output float32 panels read one per pass above 4 rows
// and two up to 4 (the benchmark model's 53 linears): 8 rows -25% (2 panels per pass:
// -11..-23%, then 3: another -6%), 16 rows -13%, 4 rows -2..-9%, 1 row -3..-6%, 1024
// rows -2%. bfloat16 against 2 panels up to 4 rows and 1 above: 1, 4 and 8 rows -3..-4%,
// 16 rows -9%, 128 and 1024 rows -8%. Tried: float32 4 rows with 6 or 8 panels (+4%,
// +25%), 12 rows x 2 panels (spills: 2x slower).
constexpr int LVL = 16, LACC = 24, GS32 = 4, GL32 = 3, GS16 = 3, GL16 = 2;
#include "linear_cpu_impl.h"
}  // namespace avx512
}  // namespace lin
}  // namespace loom
#pragma GCC pop_options
#else
LOOM_LIN_STUB(avx512)
#endif
