// The packed GEMM for bfloat16 weights on AMX tiles (Sapphire Rapids and later), from 16
// rows (prefill, many threads): there the FMA micro-kernels are bound by arithmetic
// (bfloat16 widened to float32), and a tile product does 16 x 16 x 32 multiply-adds. Picked by linear_cpu.cpp when the CPU
// attention runs its amx build (so the CPU has the tiles and the OS granted them).
//
// Per group of up to 8 panels of 32 outputs (linear_cpu.cpp: [K][32] bfloat16), their K rows
// are first rearranged into B tiles (two rows k, k + 1 interleaved: 16 outputs x 2 per
// 32-bit column), then every block of 32 rows of x (A tiles: 16 rows x 32 bfloat16, read
// in place; in L1 across the group's panels) is multiplied into 2 x 2 accumulator tiles
// over all of K: each tile load feeds two products, and the accumulators stay in tiles
// until the end. x is bfloat16 already
// (a bfloat16 model's activations) and the sums are float32, plus the bias, rounded to
// bfloat16 once: the same numbers as the FMA kernels, summed in another order.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "linear_cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#include <immintrin.h>
#pragma GCC push_options
// GCC 12's intrinsic headers trip these on _mm512_undefined_* (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16")
namespace loom {
namespace lin {
namespace amx {

namespace {

#include "amx_tiles.h"

// Rows [m0, m0 + 32) (two A tiles: TWO = false for 16 rows or fewer) of x against one
// panel's B tiles wb [K/32][2][16][32] -> cbuf [32][32] float32.
template <bool TWO>
inline void block(const uint16_t* xa, int64_t lda_bytes, int64_t nkc, const uint16_t* wb, float* cbuf) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const char* a0 = reinterpret_cast<const char*>(xa);
  const char* a1 = a0 + 16 * lda_bytes;
  for (int64_t kc = 0; kc < nkc; ++kc) {
    _tile_loadd(4, a0 + kc * 64, lda_bytes);
    if constexpr (TWO) _tile_loadd(5, a1 + kc * 64, lda_bytes);
    _tile_loadd(6, wb + kc * 1024, 64);
    _tile_loadd(7, wb + kc * 1024 + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (TWO) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf, 128);
  _tile_stored(1, cbuf + 16, 128);
  if constexpr (TWO) {
    _tile_stored(2, cbuf + 16 * 32, 128);
    _tile_stored(3, cbuf + 16 * 32 + 16, 128);
  }
}

}  // namespace

bool run_panels_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp, const float* bias,
                     uint16_t* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1) {
  if (K % 32 != 0) return false;
  const int64_t nkc = K / 32;
  // Panels per pass over the rows: their B tiles up to ~512 KB (in L2). A/B in one
  // process, 1,024 rows: 1 -> 8 panels +8..+24% (N=1536 K=512, N=512 K=1536, N=3072 K=512).
  const int64_t group = K >= 8192 ? 1 : (8192 / K < 8 ? 8192 / K : 8);
  // group panels' B tiles, and up to 32 tail rows of x padded with zero rows
  uint16_t* wb = static_cast<uint16_t*>(aligned_alloc(64, static_cast<size_t>(group * nkc) * 2048));
  uint16_t* xpad = static_cast<uint16_t*>(aligned_alloc(64, static_cast<size_t>(32 * K) * 2));
  if (wb == nullptr || xpad == nullptr) {
    free(wb);
    free(xpad);
    return false;
  }
  alignas(64) float cbuf[32 * 32];
  const __m512i lo = interleave_words(0, 32), hi = interleave_words(16, 48);  // rows k, k + 1
  amx_configure();
  for (int64_t g0 = b0; g0 < b1; g0 += group) {
    const int64_t ng = b1 - g0 < group ? b1 - g0 : group;
    for (int64_t q = 0; q < ng; ++q) {
      const uint16_t* panel = wp + (g0 + q) * K * 32;
      uint16_t* w = wb + q * nkc * 1024;
      for (int64_t kc = 0; kc < nkc; ++kc)
        for (int j = 0; j < 16; ++j) {
          const uint16_t* ra = panel + (kc * 32 + 2 * j) * 32;
          const __m512i va = _mm512_loadu_si512(ra), vb = _mm512_loadu_si512(ra + 32);
          _mm512_store_si512(w + kc * 1024 + j * 32, _mm512_permutex2var_epi16(va, lo, vb));
          _mm512_store_si512(w + kc * 1024 + 512 + j * 32, _mm512_permutex2var_epi16(va, hi, vb));
        }
    }
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const int64_t rows = M - m0 < 32 ? M - m0 : 32;
      const uint16_t* xa = x + m0 * ldx;
      int64_t lda = ldx * 2;
      if (rows < 32) {  // (tile loads read 16 or 32 rows)
        for (int64_t r = 0; r < 32; ++r) {
          if (r < rows)
            memcpy(xpad + r * K, x + (m0 + r) * ldx, static_cast<size_t>(K) * 2);
          else
            memset(xpad + r * K, 0, static_cast<size_t>(K) * 2);
        }
        xa = xpad;
        lda = K * 2;
      }
      for (int64_t q = 0; q < ng; ++q) {  // the rows' block stays in L1 across the group
        if (rows > 16)
          block<true>(xa, lda, nkc, wb + q * nkc * 1024, cbuf);
        else
          block<false>(xa, lda, nkc, wb + q * nkc * 1024, cbuf);
        // + bias, rounded to bfloat16 (nearest even, as Tensor.to)
        const int64_t n0 = (g0 + q) * 32, nn = N - n0 < 32 ? N - n0 : 32;
        const __mmask32 keep = nn == 32 ? ~__mmask32{0} : (__mmask32{1} << nn) - 1;
        __m512 b_lo = _mm512_setzero_ps(), b_hi = _mm512_setzero_ps();
        if (bias) {
          b_lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(keep), bias + n0);
          b_hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(keep >> 16), bias + n0 + 16);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float* c = cbuf + r * 32;
          const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_load_ps(c + 16), b_hi),
                                                 _mm512_add_ps(_mm512_load_ps(c), b_lo));
          _mm512_mask_storeu_epi16(out + (m0 + r) * ldo + n0, keep, (__m512i)v);
        }
      }
    }
  }
  _tile_release();
  free(wb);
  free(xpad);
  return true;
}

}  // namespace amx
}  // namespace lin
}  // namespace loom
#pragma GCC pop_options
#else
namespace loom {
namespace lin {
namespace amx {
bool run_panels_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, const float*, uint16_t*, int64_t,
                     int64_t, int64_t, int64_t) {
  return false;
}
}  // namespace amx
}  // namespace lin
}  // namespace loom
#endif
