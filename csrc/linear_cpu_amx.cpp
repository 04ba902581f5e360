// The packed GEMM for bfloat16 weights on AMX tiles (Sapphire Rapids and later): there
// the FMA micro-kernels are bound by arithmetic (bfloat16 widened to float32) from a few
// rows, and a tile product does 16 x 16 x 32 multiply-adds. Picked by linear_cpu.cpp when
// the CPU attention runs its amx build (so the CPU has the tiles and the OS granted them).
//
// The packed bfloat16 weight is already in the tiles' layout (linear_cpu.cpp: panels of 16
// outputs, a 64-byte line per k pair holding (k, k + 1) of each output): a B tile (32 k x
// 16 outputs) is 16 consecutive lines, 1 KB, loaded in place. Per group of panels (their
// lines in L2), every block of 32 rows of x (A tiles: 16 rows x 32 bfloat16, read in
// place) is multiplied into 2 x 2 accumulator tiles (2 row blocks x 2 panels) over all of
// K: each tile load feeds two products, and the accumulators stay in tiles until the end.
// x is bfloat16 already (a bfloat16 model's activations) and the sums are float32, plus the
// bias, rounded to bfloat16 once: the same numbers as the FMA kernels, summed in another
// order.
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

// B tiles ahead that a row block's first pass asks for (16 lines each): the weights come
// from memory then, and tile loads stall on each miss. (A/B in one process, the model's
// linears: 5-16 rows -17..-21%, 64 rows -9%, 1,024 rows -1..-3%.)
constexpr int64_t kPrefetchTiles = 4;

// Rows [m0, m0 + 32) (two A tiles: TWO = false for 16 rows or fewer) of x against one or
// two panels (NP) of K/2 lines each, w0 and w1 -> cbuf [32][32] float32 (panel 2 at +16).
// pf: ask for the panels' lines ahead (the first row block).
template <bool TWO, int NP>
inline void block(const uint16_t* xa, int64_t lda_bytes, int64_t nkc, const uint16_t* w0, const uint16_t* w1,
                  float* cbuf, bool pf) {
  _tile_zero(0);
  if constexpr (NP == 2) _tile_zero(1);
  if constexpr (TWO) {
    _tile_zero(2);
    if constexpr (NP == 2) _tile_zero(3);
  }
  const char* a0 = reinterpret_cast<const char*>(xa);
  const char* a1 = a0 + 16 * lda_bytes;
  for (int64_t kc = 0; kc < nkc; ++kc) {
    if (pf) {  // (past the panel's end: harmless, prefetches do not fault)
      const char* n0 = reinterpret_cast<const char*>(w0 + (kc + kPrefetchTiles) * 512);
      const char* n1 = reinterpret_cast<const char*>(w1 + (kc + kPrefetchTiles) * 512);
      for (int l = 0; l < 16; ++l) {
        __builtin_prefetch(n0 + 64 * l, 0, 3);
        if constexpr (NP == 2) __builtin_prefetch(n1 + 64 * l, 0, 3);
      }
    }
    _tile_loadd(4, a0 + kc * 64, lda_bytes);
    if constexpr (TWO) _tile_loadd(5, a1 + kc * 64, lda_bytes);
    _tile_loadd(6, w0 + kc * 512, 64);
    if constexpr (NP == 2) _tile_loadd(7, w1 + kc * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NP == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (TWO) {
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NP == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf, 128);
  if constexpr (NP == 2) _tile_stored(1, cbuf + 16, 128);
  if constexpr (TWO) {
    _tile_stored(2, cbuf + 16 * 32, 128);
    if constexpr (NP == 2) _tile_stored(3, cbuf + 16 * 32 + 16, 128);
  }
}

}  // namespace

bool run_panels_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp, const float* bias,
                     uint16_t* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1) {
  if (K % 32 != 0) return false;
  const int64_t nkc = K / 32, ps = K * 16;  // k chunks; elements per panel
  // Panels per pass over the rows: ~512 KB of them (in L2), an even number in [2, 16].
  int64_t group = (16384 / K) / 2 * 2;
  group = group < 2 ? 2 : group > 16 ? 16 : group;
  // up to 32 tail rows of x padded with zero rows (tile loads read 16 or 32 rows)
  uint16_t* xpad = static_cast<uint16_t*>(aligned_alloc(64, static_cast<size_t>(32 * K) * 2));
  if (xpad == nullptr) return false;
  alignas(64) float cbuf[32 * 32];
  amx_configure();
  for (int64_t g0 = b0; g0 < b1; g0 += group) {
    const int64_t ng = b1 - g0 < group ? b1 - g0 : group;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const int64_t rows = M - m0 < 32 ? M - m0 : 32;
      const uint16_t* xa = x + m0 * ldx;
      int64_t lda = ldx * 2;
      if (rows < 32) {
        const int64_t padded = rows > 16 ? 32 : 16;
        for (int64_t r = 0; r < padded; ++r) {
          if (r < rows)
            memcpy(xpad + r * K, x + (m0 + r) * ldx, static_cast<size_t>(K) * 2);
          else
            memset(xpad + r * K, 0, static_cast<size_t>(K) * 2);
        }
        xa = xpad;
        lda = K * 2;
      }
      for (int64_t q = 0; q < ng; q += 2) {  // the rows' block stays in L1 across the group
        const uint16_t* w0 = wp + (g0 + q) * ps;
        const bool pair = q + 1 < ng;
        if (rows > 16) {
          if (pair) block<true, 2>(xa, lda, nkc, w0, w0 + ps, cbuf, m0 == 0);
          else block<true, 1>(xa, lda, nkc, w0, w0, cbuf, m0 == 0);
        } else {
          if (pair) block<false, 2>(xa, lda, nkc, w0, w0 + ps, cbuf, m0 == 0);
          else block<false, 1>(xa, lda, nkc, w0, w0, cbuf, m0 == 0);
        }
        // + bias, rounded to bfloat16 (nearest even, as Tensor.to)
        const int64_t n0 = (g0 + q) * 16, width = pair ? 32 : 16;
        const int64_t nn = N - n0 < width ? N - n0 : width;
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
