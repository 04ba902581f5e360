// The CPU attention kernel built for the compiler's baseline instruction set (any CPU).
#include "loom/attn_cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "loom/attn_math.h"
namespace loom {
namespace cpu {
namespace base {
#define LOOM_VL 4
#define LOOM_QK_KEYS 2
#define LOOM_QK_KEYS1 4
#define LOOM_PV_ROWS 4
#define LOOM_PV_VECS 2
#include "attn_cpu_impl.h"
}  // namespace base
}  // namespace cpu
}  // namespace loom
