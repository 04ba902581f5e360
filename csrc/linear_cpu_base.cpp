// The packed GEMM's micro-kernels built for the compiler's baseline instruction set (any CPU).
#include <stdint.h>

#include "linear_cpu_isa.h"

namespace loom {
namespace lin {
namespace base {
// 16 vector registers (x86-64: SSE2): up to 12 accumulators; one panel per pass. A
// fallback for CPUs without AVX2: correct (tested), not tuned.
constexpr int LVL = 4, LACC = 12, GS32 = 1, GL32 = 1, GS16 = 1, GL16 = 1;
#include "linear_cpu_impl.h"
}  // namespace base
}  // namespace lin
}  // namespace loom
