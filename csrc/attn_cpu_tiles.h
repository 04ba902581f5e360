// Tile kernels of the CPU attention: scores, masking + online softmax, values.
// A fragment of attn_cpu_impl.h (included inside namespace loom::cpu::<isa>).

// Vector types of VL floats (GCC vector extensions: portable across the builds, and
// __builtin_shuffle becomes one permute instruction); loads through vfu are unaligned.
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int vi __attribute__((vector_size(VL * 4)));

static inline vf load_vf(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void store_vf(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// x in every lane: one broadcast (vf{} + x would be an add, as -0.0 + 0.0 is +0.0; a
// loop over lanes became masked inserts).
static inline vf bcast_vf(float x) {
#if LOOM_VL == 16
  return (vf)_mm512_set1_ps(x);
#elif LOOM_VL == 8
  return (vf)_mm256_set1_ps(x);
#else
  static_assert(VL == 4, "the baseline build's vectors");
  return vf{x, x, x, x};
#endif
}

// ------------------------------------------------------------------ scores
//
// Two layouts of the score tile: the large path keeps S^T [key][mpad] (queries in
// vector lanes, softmax vectorised over queries); the small path (M <= SMALL_M, e.g. one
// decode row with a GQA group of 2) keeps S [M][kSmallTile] (keys contiguous, softmax
// vectorised over keys). PV reads either through (stride per key, stride per query).

// S^T[r][m] for KR keys x MV*VL queries; qt is [D][mpad] (offset to the first query).
// Accumulators are vectors (register-resident: an array of floats was zeroed on the stack
// by rep stos and copied out through it, ~7% of the block's time), one per key and query
// vector. One copy per (KR, MV), called from qk_large's switch.
template <int KR, int MV>
__attribute__((noinline)) static void qk_block(const float* const* krow, const float* qt, int mpad, int D, float* s) {
  vf acc[KR][MV];
#pragma GCC unroll 8
  for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[r][v] = vf{};
  for (int d = 0; d < D; ++d) {
    const float* q = qt + static_cast<int64_t>(d) * mpad;
    vf qv[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) qv[v] = load_vf(q + v * VL);
#pragma GCC unroll 8
    for (int r = 0; r < KR; ++r) {
      const vf kv = bcast_vf(krow[r][d]);
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[r][v] += kv * qv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) store_vf(s + r * mpad + v * VL, acc[r][v]);
}

#define LOOM_QK_CASE(kr, mv) \
  case (kr) * 8 + (mv): qk_block<kr, mv>(krow + k0, qt + m0, mpad, D, s + k0 * mpad + m0); break;

// Large path: every key element is broadcast against VL queries; QK_KEYS keys x up to
// QK_VECS query vectors per block, or QK_KEYS1 keys when the queries fill one vector
// (more keys keep enough independent FMA chains in flight).
// Issues the first `upto` lines of pf spread over the first query group's key blocks.
static void qk_large(const float* const* krow, int nk, const float* qt, int mpad, int D, float* s,
                     LinePrefetch& pf, int upto) {
  for (int m0 = 0; m0 < mpad; m0 += QK_VECS * VL) {
    const int mv = min_int(QK_VECS, (mpad - m0) / VL);
    const int kmax = mv == 1 ? QK_KEYS1 : QK_KEYS;
    const int per = (upto + (nk + kmax - 1) / kmax - 1) / ((nk + kmax - 1) / kmax);
    for (int k0 = 0; k0 < nk; k0 += kmax) {
      const int kr = min_int(kmax, nk - k0);
      pf.issue(per, upto);
      switch (kr * 8 + mv) {
        LOOM_QK_CASE(1, 1) LOOM_QK_CASE(2, 1) LOOM_QK_CASE(3, 1) LOOM_QK_CASE(4, 1)
        LOOM_QK_CASE(5, 1) LOOM_QK_CASE(6, 1) LOOM_QK_CASE(7, 1) LOOM_QK_CASE(8, 1)
        LOOM_QK_CASE(1, 2) LOOM_QK_CASE(2, 2) LOOM_QK_CASE(3, 2) LOOM_QK_CASE(4, 2)
        LOOM_QK_CASE(5, 2) LOOM_QK_CASE(6, 2)
        LOOM_QK_CASE(1, 3) LOOM_QK_CASE(2, 3) LOOM_QK_CASE(3, 3) LOOM_QK_CASE(4, 3)
        LOOM_QK_CASE(5, 3) LOOM_QK_CASE(6, 3)
        LOOM_QK_CASE(1, 4) LOOM_QK_CASE(2, 4) LOOM_QK_CASE(3, 4) LOOM_QK_CASE(4, 4)
        LOOM_QK_CASE(5, 4) LOOM_QK_CASE(6, 4)
        default: break;  // unreachable: QK_KEYS <= 6 and QK_KEYS1 <= 8 (static_assert)
      }
    }
  }
}
#undef LOOM_QK_CASE

// Sums each row of acc[N][VL] into acc[n][0] by halving: stays in vector registers.
template <int N>
static inline void fold_lanes(float (*acc)[VL]) {
  if constexpr (VL >= 16)
    for (int n = 0; n < N; ++n)
      for (int l = 0; l < 8; ++l) acc[n][l] += acc[n][l + 8];
  if constexpr (VL >= 8)
    for (int n = 0; n < N; ++n)
      for (int l = 0; l < 4; ++l) acc[n][l] += acc[n][l + 4];
  for (int n = 0; n < N; ++n)
    for (int l = 0; l < 2; ++l) acc[n][l] += acc[n][l + 2];
  for (int n = 0; n < N; ++n) acc[n][0] += acc[n][1];
}

// The largest of a[0, VL) into a[0], by halving.
static inline void fold_lanes_max(float* a) {
  for (int w = VL / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) a[l] = a[l + w] > a[l] ? a[l + w] : a[l];
}

// K/V rows as the small path reads them: float32 rows (the pool's, or 16-bit ones converted
// into scratch), or bfloat16 rows of the pool itself, widened in registers (a shift):
// converting them into scratch first wrote and re-read twice the pool's bytes.
template <class T> struct Row;
template <> struct Row<float> {
  static constexpr bool kWiden = false;
  static inline vf vec(const float* p) { return load_vf(p); }
  static inline float one(const float* p) { return *p; }
};
template <> struct Row<uint16_t> {  // bfloat16
  static constexpr bool kWiden = true;
  typedef uint16_t vh __attribute__((vector_size(VL * 2), aligned(2)));
  typedef uint32_t vu __attribute__((vector_size(VL * 4)));
  static inline vf vec(const uint16_t* p) {
    // (GCC lowers the generic form for 16 lanes to four instructions more than this)
#if LOOM_VL == 16
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif LOOM_VL == 8
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
    const vu u = __builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
  }
  static inline float one(const uint16_t* p) { return loom::bf16_to_float(*p); }
};
template <> struct Row<Half> {  // IEEE half: one conversion instruction per vector (F16C)
  static constexpr bool kWiden = true;
  static inline vf vec(const Half* p) {
#if LOOM_VL == 16
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif LOOM_VL == 8
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vf f;
    for (int l = 0; l < VL; ++l) f[l] = loom::f16_to_float(p[l].bits);
    return f;
#endif
  }
  static inline float one(const Half* p) { return loom::f16_to_float(p->bits); }
};

// One level of a transpose-reduce: x holds C channels of W partial sums each (channel
// j in lanes [j*W, (j+1)*W)), y C more; returns those 2C channels (x's first) with W/2
// partial sums each, by two permutes and an add.
template <int C, int W>
static inline vf fold_pair(vf x, vf y) {
  vi lo, hi;
  for (int jp = 0; jp < 2 * C; ++jp)
    for (int i = 0; i < W / 2; ++i) {
      const int src = (jp < C ? 0 : VL) + (jp % C) * W + i;
      lo[jp * (W / 2) + i] = src;
      hi[jp * (W / 2) + i] = src + W / 2;
    }
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// out[n] = the sum of v[n]'s lanes, for N (a power of two) vectors: pairs are folded
// level by level, N/2 + N/4 + ... permute pairs in all, instead of log2(VL) levels and
// a scalar extract per vector.
template <int N, int C = 1, int W = VL>
static inline void transpose_reduce(vf* v, float* out) {
  if constexpr (N > 1 && W > 1) {
#pragma GCC unroll 16
    for (int i = 0; i < N / 2; ++i) v[i] = fold_pair<C, W>(v[2 * i], v[2 * i + 1]);
    transpose_reduce<N / 2, 2 * C, W / 2>(v, out);
  } else {
    for (int i = 0; i < N; ++i)  // vector i: channels [i*C, (i+1)*C), W partial sums each
      for (int j = 0; j < C; ++j) {
        float t = 0.f;
        for (int w = 0; w < W; ++w) t += v[i][j * W + w];
        out[i * C + j] = t;
      }
  }
}

// Scores of KR keys x MS queries as dot products over D (lanes along D), qs [MS][D];
// S[m][r] at s[m * kSmallTile + r]. KR * MS must be a power of two.
template <int KR, int MS, class T>
static inline void qk_dot_block(const T* const* krow, const float* qs, int D, float* s) {
  constexpr int N = KR * MS;
  vf acc[N];
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) acc[n] = vf{};
  int d = 0;
  for (; d + VL <= D; d += VL) {
    vf qv[MS];
#pragma GCC unroll 4
    for (int m = 0; m < MS; ++m) qv[m] = load_vf(qs + m * D + d);
#pragma GCC unroll 16
    for (int r = 0; r < KR; ++r) {
      const vf kv = Row<T>::vec(krow[r] + d);
#pragma GCC unroll 4
      for (int m = 0; m < MS; ++m) acc[r * MS + m] += kv * qv[m];
    }
  }
  float sum[N];
  transpose_reduce<N>(acc, sum);
  for (int r = 0; r < KR; ++r)
    for (int m = 0; m < MS; ++m) {
      float tail = 0.f;
      for (int dd = d; dd < D; ++dd) tail += Row<T>::one(krow[r] + dd) * qs[m * D + dd];
      s[m * kSmallTile + r] = sum[r * MS + m] + tail;
    }
}

// All nk keys of one head: blocks of KR keys (KR * MS accumulators: 16 with 32 vector
// registers, 8 with 16), then pairs and single keys. pf (optional): `per` of its lines
// before each whole block, into L2.
constexpr int kSmallAcc = VL >= 16 ? 16 : 8;
constexpr int kHintL2 = 2;  // prefetcht1: a small tile's K/V (~128 KB in bfloat16) fit L2, not L1
template <int MS, class T>
static void qk_small_ms(const T* const* krow, int nk, const float* qs, int D, float* s, LinePrefetch* pf = nullptr,
                        int per = 0) {
  constexpr int KR = kSmallAcc / MS;  // MS in {1, 2, 4}
  int k0 = 0;
  for (; k0 + KR <= nk; k0 += KR) {
    if (pf) pf->issue<kHintL2>(per, pf->n);
    qk_dot_block<KR, MS, T>(krow + k0, qs, D, s + k0);
  }
  if constexpr (KR >= 4)
    for (; k0 + KR / 2 <= nk; k0 += KR / 2) qk_dot_block<KR / 2, MS, T>(krow + k0, qs, D, s + k0);
  for (; k0 < nk; ++k0) qk_dot_block<1, MS, T>(krow + k0, qs, D, s + k0);
}

// Keys per whole block of qk_small for M queries (M = 3: of its first pass).
static inline int small_qk_keys(int M) { return kSmallAcc / (M == 1 ? 1 : M <= 3 ? 2 : 4); }

// Small path: scores of nk keys of one head for M <= SMALL_M queries, S [M][kSmallTile].
template <class T>
static void qk_small(const T* const* krow, int nk, const float* qs, int M, int D, float* s, LinePrefetch* pf = nullptr,
                     int per = 0) {
  switch (M) {
    case 1: qk_small_ms<1, T>(krow, nk, qs, D, s, pf, per); break;
    case 2: qk_small_ms<2, T>(krow, nk, qs, D, s, pf, per); break;
    case 3:  // as two queries, then one
      qk_small_ms<2, T>(krow, nk, qs, D, s, pf, per);
      qk_small_ms<1, T>(krow, nk, qs + 2 * D, D, s + 2 * kSmallTile, pf, per);
      break;
    default: qk_small_ms<4, T>(krow, nk, qs, D, s, pf, per); break;
  }
}

// ------------------------------------------------------------------ softmax

// Keys at or past a query's causal limit get score -inf (t0 = first key of the tile).
static void mask_cols(float* __restrict s, int nk, int mpad, int t0, const int* __restrict lim) {
  for (int k = 0; k < nk; ++k) {
    const int key = t0 + k;
    for (int m0 = 0; m0 < mpad; m0 += VL) {
      float* __restrict row = s + k * mpad + m0;
#pragma omp simd
      for (int m = 0; m < VL; ++m) row[m] = key >= lim[m0 + m] ? -INFINITY : row[m];
    }
  }
}

static void mask_rows(float* s, int nk, int M, int t0, const int* lim) {
  for (int m = 0; m < M; ++m)
    for (int k = max_int(0, lim[m] - t0); k < nk; ++k) s[m * kSmallTile + k] = -INFINITY;
}

// New running max of query m given its tile max; sets alpha / m_use.
static inline void advance_max(HeadState& hs, int m, float tile_max) {
  const float m_old = hs.m_run[m];
  const float m_new = tile_max > m_old ? tile_max : m_old;
  const bool empty = m_new == -INFINITY;
  hs.alpha[m] = empty ? 1.f : loom::exp_approx(m_old - m_new);  // exp(-inf) = 0
  hs.m_use[m] = empty ? 0.f : m_new;  // nothing seen: scores are -inf, exp(-inf - 0) = 0
  hs.m_run[m] = m_new;
}

// advance_max of queries m0 .. m0 + VL.
static inline void advance_max_cols(HeadState& hs, int m0, const float* tile_max) {
#pragma omp simd
  for (int m = 0; m < VL; ++m) advance_max(hs, m0 + m, tile_max[m]);
}

#if LOOM_VL == 16 || LOOM_VL == 8
// MAXPS: the second operand when either is NaN.
static inline vf max_v(vf a, vf b) {
#if LOOM_VL == 16
  return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#else
  return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#endif
}

// The largest of nk score rows s[k * mpad] (VL queries each), in four chains: one chain
// would wait on each max's latency.
static inline vf tile_max_cols(const float* s, int nk, int mpad) {
  vf mx[4];
  for (int c = 0; c < 4; ++c) mx[c] = vf{} - INFINITY;
  int k = 0;
  for (; k + 4 <= nk; k += 4)
    for (int c = 0; c < 4; ++c) mx[c] = max_v(mx[c], load_vf(s + static_cast<int64_t>(k + c) * mpad));
  for (; k < nk; ++k) mx[0] = max_v(mx[0], load_vf(s + static_cast<int64_t>(k) * mpad));
  return max_v(max_v(mx[0], mx[1]), max_v(mx[2], mx[3]));
}

// e^x of a vector for x <= 0 or NaN (a score minus its running maximum): 2^n * 2^f with
// n = round(x log2 e), f = x log2 e - n in [-1/2, 1/2] (one rounding: an FMA), 2^f by a
// degree-6 polynomial (fitted for relative error; 1e-7 evaluated in float32). 2^n:
// AVX-512 by VSCALEFPS (x below -128, e.g. -inf for a masked key, gives exactly 0);
// AVX2 in the exponent bits, x below -87 giving 0 as exp_approx. NaN stays NaN (the
// clamp is a MAXPS with x second).
static inline vf exp_nonpos(vf x) {
  constexpr float kLog2e = 1.4426950408889634f;
#if LOOM_VL == 16
  x = max_v(vf{} - 128.f, x);
  const vf n = (vf)_mm512_roundscale_ps((__m512)(x * kLog2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm512_fmsub_ps((__m512)x, _mm512_set1_ps(kLog2e), (__m512)n);
#else
  const vf x0 = x;
  x = max_v(vf{} - 87.f, x);
  const vf n = (vf)_mm256_round_ps((__m256)(x * kLog2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm256_fmsub_ps((__m256)x, _mm256_set1_ps(kLog2e), (__m256)n);
#endif
  vf p = vf{} + 1.5345784777309746e-04f;
  p = p * f + 1.3399932067841291e-03f;
  p = p * f + 9.6184890717267990e-03f;
  p = p * f + 5.5503286421298980e-02f;
  p = p * f + 2.4022646248340607e-01f;
  p = p * f + 6.9314718246459960e-01f;
  p = p * f + 1.f;
#if LOOM_VL == 16
  return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32((__m256)n), _mm256_set1_epi32(127)), 23);
  const vf y = p * (vf)_mm256_castsi256_ps(e);
  return (vf)_mm256_andnot_ps(_mm256_cmp_ps((__m256)x0, _mm256_set1_ps(-87.f), _CMP_LT_OQ), (__m256)y);
#endif
}
#endif

// Large path: S^T [nk][mpad] scores -> probabilities in place, vectorised over queries,
// VL queries at a time (compile-time inner trip counts: a runtime one costs a peeled
// loop per key). (restrict: the scratch arrays never overlap; without it the loops stay
// scalar.) The AVX-512 and AVX2 builds: the tile's maximum by tile_max_cols and e^x by
// exp_nonpos (the generic loop below: one max chain waiting on each max's latency, and
// exp_approx's ~25 instructions per vector). In-process A/B from memory, new/old time:
// AVX-512 float32, the decode model's shapes N=32 x 8k+8 0.94-0.95, N=32 x 1k+8 0.93-0.97;
// bench_attention's N=32 x 8k+64 0.99, bfloat16 0.96; memory-bound rows 0.98-1.01; the AVX2
// build (on the same CPU) 0.92-0.96.
static void softmax_cols(Scratch& sc, HeadState& hs, int nk, int mpad) {
#if LOOM_VL == 16 || LOOM_VL == 8
  for (int m0 = 0; m0 < mpad; m0 += VL) {
    float* __restrict s = sc.s + m0;
    const vf t_max = tile_max_cols(s, nk, mpad);
    advance_max_cols(hs, m0, reinterpret_cast<const float*>(&t_max));
    const vf mu = load_vf(hs.m_use + m0);
    vf sum0 = vf{}, sum1 = vf{};
    int k = 0;
    for (; k + 2 <= nk; k += 2) {
      const vf p0 = exp_nonpos(load_vf(s + k * mpad) - mu);
      const vf p1 = exp_nonpos(load_vf(s + (k + 1) * mpad) - mu);
      store_vf(s + k * mpad, p0);
      store_vf(s + (k + 1) * mpad, p1);
      sum0 += p0;
      sum1 += p1;
    }
    if (k < nk) {
      const vf p0 = exp_nonpos(load_vf(s + k * mpad) - mu);
      store_vf(s + k * mpad, p0);
      sum0 += p0;
    }
    store_vf(hs.l_run + m0, load_vf(hs.l_run + m0) * load_vf(hs.alpha + m0) + (sum0 + sum1));
  }
#else
  for (int m0 = 0; m0 < mpad; m0 += VL) {
    float* __restrict s = sc.s + m0;
    float t_max[VL], t_sum[VL];
#pragma omp simd
    for (int m = 0; m < VL; ++m) {
      t_max[m] = -INFINITY;
      t_sum[m] = 0.f;
    }
    for (int k = 0; k < nk; ++k)
#pragma omp simd
      for (int m = 0; m < VL; ++m) {
        const float v = s[k * mpad + m];
        t_max[m] = v > t_max[m] ? v : t_max[m];
      }
    advance_max_cols(hs, m0, t_max);
    const float* __restrict alpha = hs.alpha + m0;
    const float* __restrict m_use = hs.m_use + m0;
    float* __restrict l_run = hs.l_run + m0;
    for (int k = 0; k < nk; ++k)
#pragma omp simd
      for (int m = 0; m < VL; ++m) {
        const float p = loom::exp_approx(s[k * mpad + m] - m_use[m]);
        s[k * mpad + m] = p;
        t_sum[m] += p;
      }
#pragma omp simd
    for (int m = 0; m < VL; ++m) l_run[m] = l_run[m] * alpha[m] + t_sum[m];
  }
#endif
}

// Small path: S [M][kSmallTile] -> probabilities in place, vectorised over keys; keys
// past nk get probability 0 (whole vectors: compile-time trip counts, and a lane fold
// instead of a scalar reduction per row).
static void softmax_rows(float* s, HeadState& hs, int nk, int M) {
  static_assert(kSmallTile % VL == 0, "rows of whole vectors");
  for (int m = 0; m < M; ++m) {
    float* __restrict row = s + m * kSmallTile;
    float lane[1][VL];
#pragma omp simd
    for (int l = 0; l < VL; ++l) lane[0][l] = -INFINITY;
    for (int k0 = 0; k0 < kSmallTile; k0 += VL)
#pragma omp simd
      for (int l = 0; l < VL; ++l) {
        const float x = k0 + l < nk ? row[k0 + l] : -INFINITY;
        lane[0][l] = x > lane[0][l] ? x : lane[0][l];
      }
    fold_lanes_max(lane[0]);
    advance_max(hs, m, lane[0][0]);
    const float mu = hs.m_use[m];
#pragma omp simd
    for (int l = 0; l < VL; ++l) lane[0][l] = 0.f;
    for (int k0 = 0; k0 < kSmallTile; k0 += VL)
#pragma omp simd
      for (int l = 0; l < VL; ++l) {
        const float p = k0 + l < nk ? loom::exp_approx(row[k0 + l] - mu) : 0.f;
        row[k0 + l] = p;
        lane[0][l] += p;
      }
    fold_lanes<1>(lane);
    hs.l_run[m] = hs.l_run[m] * hs.alpha[m] + lane[0][0];
  }
}

// ------------------------------------------------------------------ values

// O[i][d0 : d0 + DV*VL] = O * alpha[i] + sum_k P[k, i] V[k][...] for MR queries, where
// P[k, i] = p[k * sk + i * sm]; no alpha: 1.
// FINE: per8 of pf's lines before every 8 keys. Vector accumulators, as qk_block's (an
// array of floats went through the stack on entry and exit).
template <int MR, int DV, class T, bool FINE = false>
static inline void pv_block(const float* p, int sk, int sm, const T* const* vrow, int nk, int d0,
                            float* o, int D, const float* alpha, LinePrefetch* pf = nullptr, int per8 = 0) {
  // The tile's sum from zero, added to O at the end: summed into O key after key, a long
  // segment's output rounded once per key (16k keys: 8x the error of a matmul's blocked sum).
  vf acc[MR][DV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) acc[i][x] = vf{};
  for (int k = 0; k < nk; ++k) {
    if constexpr (FINE)
      if ((k & 7) == 0) pf->issue(per8, pf->n);
    vf vk[DV];
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) vk[x] = Row<T>::vec(vrow[k] + d0 + x * VL);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vf pk = bcast_vf(p[k * sk + i * sm]);
#pragma GCC unroll 4
      for (int x = 0; x < DV; ++x) acc[i][x] += pk * vk[x];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int x = 0; x < DV; ++x) {
      const vf ov = load_vf(o + i * D + d0 + x * VL);
      store_vf(o + i * D + d0 + x * VL, (alpha ? ov * alpha[i] : ov) + acc[i][x]);
    }
}

template <int MR, class T, bool FINE = false>
static void pv_rows(const float* p, int sk, int sm, const T* const* vrow, int nk, float* o, int D,
                    const float* alpha, LinePrefetch* pf = nullptr, int per8 = 0) {
  int d0 = 0;
  for (; d0 + PV_VECS * VL <= D; d0 += PV_VECS * VL)
    pv_block<MR, PV_VECS, T, FINE>(p, sk, sm, vrow, nk, d0, o, D, alpha, pf, per8);
  const int nv = (D - d0) / VL;
  switch (nv) {
    case 1: pv_block<MR, 1, T>(p, sk, sm, vrow, nk, d0, o, D, alpha); break;
    case 2: pv_block<MR, 2, T>(p, sk, sm, vrow, nk, d0, o, D, alpha); break;
    case 3: pv_block<MR, 3, T>(p, sk, sm, vrow, nk, d0, o, D, alpha); break;
    default: break;  // PV_VECS <= 4, so at most 3 whole vectors remain
  }
  for (int d = d0 + nv * VL; d < D; ++d)
    for (int i = 0; i < MR; ++i) {
      float acc = 0.f;
      for (int k = 0; k < nk; ++k) acc += p[k * sk + i * sm] * Row<T>::one(vrow[k] + d);
      o[i * D + d] = (alpha ? o[i * D + d] * alpha[i] : o[i * D + d]) + acc;
    }
}

// pf (optional): its remaining lines are issued spread over the row blocks, or (FINE)
// every 8 keys inside the whole row blocks' register blocks: the large path over a 16-bit
// cache, whose lines are then the next head's K (bfloat16 from memory 0.96-0.99x the
// time of a burst per row block; float32, whose V rows are read in place, 0.97-1.03).
template <class T, bool FINE = false>
static void pv_tile(const float* p, int sk, int sm, int M, const T* const* vrow, int nk, float* o, int D,
                    const float* alpha, LinePrefetch* pf = nullptr) {
  const int blocks = (M + PV_ROWS - 1) / PV_ROWS;
  const int per = pf ? (pf->n - pf->i + blocks - 1) / blocks : 0;
  int per8 = 0;  // (FINE: lines per 8 keys of the whole row blocks' register blocks)
  if constexpr (FINE) {
    const int steps = (M / PV_ROWS) * max_int(1, D / (PV_VECS * VL)) * ((nk + 7) / 8);
    if (steps > 0) per8 = (pf->n - pf->i + steps - 1) / steps;
  }
  int m0 = 0;
  for (; m0 + PV_ROWS <= M; m0 += PV_ROWS) {
    if (pf && !FINE) pf->issue(per, pf->n);
    pv_rows<PV_ROWS, T, FINE>(p + m0 * sm, sk, sm, vrow, nk, o + m0 * D, D, alpha ? alpha + m0 : alpha, pf, per8);
  }
  if (pf) pf->issue(pf->n, pf->n);
#define LOOM_PV_CASE(mr) \
  case mr: pv_rows<mr, T>(p + m0 * sm, sk, sm, vrow, nk, o + m0 * D, D, alpha ? alpha + m0 : alpha); break;
  switch (M - m0) {
    LOOM_PV_CASE(1) LOOM_PV_CASE(2) LOOM_PV_CASE(3) LOOM_PV_CASE(4) LOOM_PV_CASE(5) LOOM_PV_CASE(6)
    LOOM_PV_CASE(7)
    default: break;
  }
#undef LOOM_PV_CASE
}
