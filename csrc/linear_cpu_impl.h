// The packed-panel GEMM's micro-kernels (see linear_cpu.cpp), included once per
// instruction set by linear_cpu_{base,avx2,avx512}.cpp inside `namespace
// loom::lin::<isa>` after a `#pragma GCC target`.
//
// Needs LVL (floats per vector register), LACC (accumulator vectors per pass), GS32 /
// GL32 (float32 panels per pass up to 4 rows / above) and GS16 / GL16 (bfloat16).
// Nothing from the standard library's templates is used here: their inline code must
// not be compiled for a wider instruction set than its other callers'.

// Panel lines ahead (3 KB of each panel). With up to 4 streams per pass, 128 lines
// each kept more misses in flight than a core's fill buffers take: the 52 linears of
// the decode model plus its vocabulary head in sequence, weights from memory, A/B in
// one process against 128: float32 1 row 0.96x the time, 4 rows 0.92x, 8 rows 0.99x;
// bfloat16 0.94x, 0.93x, 0.97x; AVX2 build 0.98x / 1.00x; 1024 rows unchanged
// (192 or 256 lines: 1.14-1.21x).
constexpr int64_t kPrefetch = 48;

// A panel is 16 outputs; its rows are 64-byte cache lines: one k step of float32, or
// two of bfloat16 (a pair of consecutive k per 32-bit word, the layout of AMX B tiles).
template <class W>
constexpr int64_t line_elems() {
  return 64 / sizeof(W);
}
constexpr int64_t NB = 16;  // outputs per panel

// Native vectors of LVL floats (GCC vector extensions: wider ones are lowered badly,
// through memory, on a narrower instruction set) and of LVL 32-bit words.
typedef float vf __attribute__((vector_size(LVL * 4)));
typedef float vf_u __attribute__((vector_size(LVL * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(LVL * 4)));
typedef uint32_t vu_u __attribute__((vector_size(LVL * 4), aligned(2)));

// Vectors per panel row: 16 outputs.
constexpr int NV = 16 / LVL;

// One panel line (64 bytes) as NV float vectors per k step: float32, one k step;
// bfloat16, two: the words hold (k, k + 1) of one output each, and a shift gives k's
// weights, a mask k + 1's (bfloat16 -> float32 is a 16-bit shift).
inline __attribute__((always_inline)) void load_line(const float* p, vf* w0, vf*) {
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) w0[v] = *reinterpret_cast<const vf_u*>(p + v * LVL);
}
inline __attribute__((always_inline)) void load_line(const uint16_t* p, vf* w0, vf* w1) {
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const vu x = *reinterpret_cast<const vu_u*>(p + 2 * v * LVL);
    const vu even = x << 16, odd = x & 0xFFFF0000u;
    w0[v] = __builtin_bit_cast(vf, even);
    w1[v] = __builtin_bit_cast(vf, odd);
  }
}

// An output from float32 (bfloat16: rounded to nearest even, as torch's .to()).
inline __attribute__((always_inline)) void put(float* o, float v) { *o = v; }
inline __attribute__((always_inline)) void put(uint16_t* o, float v) { *o = loom::float_to_bf16(v); }

// MB rows against NP adjacent panels in one pass: NP memory streams per core. A core's
// own misses (L1 fill buffers) cap one stream well below the memory bandwidth; with
// several the hardware prefetcher runs ahead on each. MB * NP * NV accumulator vectors,
// at most LACC (panel_rows). K: k steps (even for bfloat16: the packing pads it, and x).
template <int MB, int NP, bool PF = true, class W, class O>
inline __attribute__((always_inline)) void micro(const float* __restrict x, int64_t ldx, int64_t K,
                                                 const W* __restrict p0, const float* __restrict bias,
                                                 O* __restrict out, int64_t ldo, int64_t n0,
                                                 int64_t nvalid_last) {
  constexpr int64_t LE = line_elems<W>();
  constexpr int KS = sizeof(W) == 2 ? 2 : 1;  // k steps per line
  vf acc[NP][MB][NV];
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 32
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[p][i][v] = vf{};
  const int64_t ps = K * NB;  // elements per panel
  // Past its panel's end a stream's prefetches go to its panel in the next group (the
  // next NP panels), not into the next panel of this group, which another stream has
  // already read: otherwise each group's other NP - 1 streams start cold (their first
  // kPrefetch lines unasked). A/B in one process at 128 lines ahead, weights from
  // memory, 8 rows: float32 K=512 0.95-0.97x the time, bfloat16 0.84-0.92x, K=1536
  // unchanged; the decode step (n=8) 0.96x.
  const int64_t next_group = (NP - 1) * ps, k_last = K / KS - kPrefetch;
  for (int64_t k = 0; k < K; k += KS) {
    const int64_t ahead = kPrefetch * LE + (k / KS >= k_last ? next_group : 0);  // (elements past `row`)
    vf w0[NP][NV], w1[NP][NV];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      const W* row = p0 + p * ps + (k / KS) * LE;
      // Ask for the panel well ahead: at several rows per pass the multiply-adds hide
      // less of the memory latency than the hardware prefetcher expects (reading past
      // the last panel's end is harmless: prefetches do not fault). Locality 3 (prefetcht0),
      // not 0: prefetchnta made this loop 4x slower on an Intel Xeon (Emerald Rapids) VM,
      // where it stalled on every k step even for panels already in L2.
      if constexpr (PF) __builtin_prefetch(row + ahead, 0, 3);
      load_line(row, w0[p], w1[p]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const float a = x[i * ldx + k];
#pragma GCC unroll 8
      for (int p = 0; p < NP; ++p)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[p][i][v] += a * w0[p][v];
      if constexpr (KS == 2) {
        const float b = x[i * ldx + k + 1];
#pragma GCC unroll 8
        for (int p = 0; p < NP; ++p)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[p][i][v] += b * w1[p][v];
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    O* o = out + i * ldo + n0;
    for (int p = 0; p < NP; ++p) {
      const int64_t nv = p == NP - 1 ? nvalid_last : NB;
      for (int64_t j = 0; j < nv; ++j)
        put(o + p * NB + j, acc[p][i][j / LVL][j % LVL] + (bias ? bias[n0 + p * NB + j] : 0.f));
    }
  }
}

// All M rows against NP adjacent panels: passes of up to 8 rows that keep at most LACC
// accumulator vectors, then the rest in one more pass (not one pass per leftover row:
// each pass re-reads the panels).
template <int NP, class W, class O>
inline __attribute__((always_inline)) void panel_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const W* p0,
                                                      const float* bias, O* out, int64_t ldo, int64_t n0,
                                                      int64_t nvalid_last) {
  constexpr int R0 = LACC / (NP * NV), R = R0 < 1 ? 1 : R0 < 8 ? R0 : 8;
  int64_t m = 0;
  // Only the first pass prefetches: the later ones find the panels in L2, where the
  // prefetches only cost (prefill, 1024 rows: -6..-9% in an A/B in one process).
  for (; m + R <= M; m += R)
    if (m == 0) micro<R, NP>(x + m * ldx, ldx, K, p0, bias, out + m * ldo, ldo, n0, nvalid_last);
    else micro<R, NP, false>(x + m * ldx, ldx, K, p0, bias, out + m * ldo, ldo, n0, nvalid_last);
  const float* xr = x + m * ldx;
  O* orr = out + m * ldo;
#define LOOM_ROWS_CASE(r)                                                      \
  case r:                                                                      \
    if constexpr (R > r) {                                                     \
      if (m == 0) micro<r, NP>(xr, ldx, K, p0, bias, orr, ldo, n0, nvalid_last); \
      else micro<r, NP, false>(xr, ldx, K, p0, bias, orr, ldo, n0, nvalid_last); \
    }                                                                          \
    break;
  switch (M - m) {
    LOOM_ROWS_CASE(7) LOOM_ROWS_CASE(6) LOOM_ROWS_CASE(5) LOOM_ROWS_CASE(4)
    LOOM_ROWS_CASE(3) LOOM_ROWS_CASE(2) LOOM_ROWS_CASE(1)
    default: break;
  }
#undef LOOM_ROWS_CASE
}

// Panels [b0, b1) for M rows: groups of GS32 / GS16 panels per pass up to 4 rows, of
// GL32 / GL16 above (float32 / bfloat16), then a pass of 2 and single panels.
template <class W, class O>
inline __attribute__((always_inline)) void run_panels_t(const float* x, int64_t ldx, int64_t M, int64_t K,
                                                        const W* wp, const float* bias, O* out, int64_t ldo,
                                                        int64_t N, int64_t b0, int64_t b1) {
  constexpr bool bf16 = sizeof(W) == 2;
  constexpr int GS = bf16 ? GS16 : GS32, GL = bf16 ? GL16 : GL32;
  auto last = [&](int64_t b) { return N - b * NB < NB ? N - b * NB : NB; };  // valid outputs of panel b
  int64_t b = b0;
  if (M <= 4)
    for (; b + GS <= b1; b += GS) panel_rows<GS>(x, ldx, M, K, wp + b * K * NB, bias, out, ldo, b * NB, last(b + GS - 1));
  if constexpr (GL > 1)
    for (; b + GL <= b1; b += GL) panel_rows<GL>(x, ldx, M, K, wp + b * K * NB, bias, out, ldo, b * NB, last(b + GL - 1));
  if constexpr (GL > 2)
    if (b + 2 <= b1) {
      panel_rows<2>(x, ldx, M, K, wp + b * K * NB, bias, out, ldo, b * NB, last(b + 1));
      b += 2;
    }
  for (; b < b1; ++b) panel_rows<1>(x, ldx, M, K, wp + b * K * NB, bias, out, ldo, b * NB, last(b));
}

void run_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias,
                float* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1) {
  run_panels_t(x, ldx, M, K, wp, bias, out, ldo, N, b0, b1);
}

void run_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* wp, const float* bias,
                uint16_t* out, int64_t ldo, int64_t N, int64_t b0, int64_t b1) {
  run_panels_t(x, ldx, M, K, wp, bias, out, ldo, N, b0, b1);
}


int panel_group(bool bf16, bool small) {
  return bf16 ? (small ? GS16 : GL16) : (small ? GS32 : GL32);
}
