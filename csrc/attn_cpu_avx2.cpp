// The CPU attention kernel built for AVX2 + FMA (picked at run time when the CPU has it).
#include "loom/attn_cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC push_options
// GCC 12's intrinsic headers trip these on _mm512_undefined_* (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c,bmi2")
#include "loom/attn_math.h"
namespace loom {
namespace cpu {
namespace avx2 {
#define LOOM_VL 8
#define LOOM_QK_KEYS 2
#define LOOM_QK_KEYS1 4
#define LOOM_PV_ROWS 4
#define LOOM_PV_VECS 2
#include "attn_cpu_impl.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace loom
#pragma GCC pop_options
#else
#include "attn_cpu_stub.h"
LOOM_ISA_STUB(avx2)
#endif
