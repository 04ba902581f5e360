// The CPU attention kernel built for AVX-512 with AMX tiles (Sapphire Rapids and later;
// picked at run time when the CPU has AMX-BF16 and the OS lets this process use the
// tiles): the avx512 build plus the bfloat16 many-query path of attn_cpu_amx.h.
#include "loom/attn_cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#include <immintrin.h>
#pragma GCC push_options
// GCC 12's intrinsic headers trip these on _mm512_undefined_* (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2,amx-tile,amx-bf16,prefer-vector-width=512")
#include "loom/attn_math.h"
namespace loom {
namespace cpu {
namespace amx {
// (the FMA paths tuned as in attn_cpu_avx512.cpp)
#define LOOM_VL 16
#define LOOM_QK_KEYS 6
#define LOOM_QK_KEYS1 8
#define LOOM_PV_ROWS 6
#define LOOM_PV_VECS 4
#define LOOM_AMX 1
#ifndef LOOM_AMX_KEYS
#define LOOM_AMX_KEYS 64
#endif
#include "attn_cpu_impl.h"
}  // namespace amx
}  // namespace cpu
}  // namespace loom
#pragma GCC pop_options
#else
#include "attn_cpu_stub.h"
LOOM_ISA_STUB(amx)
#endif
