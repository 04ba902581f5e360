// The many-query path on AMX tiles (Intel Advanced Matrix Extensions: bfloat16 products
// into float32 tiles, 16 x 16 outputs x 32 products per instruction, ~16x the FMA rate
// of a core), for bfloat16 caches. A fragment of attn_cpu_impl.h, included only by the
// amx build (attn_cpu_amx.cpp).
//
// Per tile of kAmxKeys keys of one kv head, M queries (16-query blocks "qb"):
//   scores   S^T[key][q] = K Q^T: A = 16 key rows x 32 dims, read straight from the
//            pool when a page holds 16 consecutive keys (else gathered); B = Q^T in the
//            tiles' pair layout (2 dims per 32-bit column), packed once per item.
//   softmax  column-wise over S^T as the FMA path, with a lazy running max: the max
//            used for exp() moves only when a tile's max exceeds it by more than
//            kLazyMax, so O is rescaled on a few tiles instead of on most.
//   values   O[q][d] += P V: A = P [16 queries x 32 keys] (S^T converted to bfloat16 and
//            transposed 16 x 16 in 32-bit key pairs); B = V in pair layout (2 keys per
//            32-bit column: two V rows interleaved).
// C tiles are blocked 2 x 2 (4 accumulators, 2 A + 2 B tiles: all 8 tile registers),
// so that every tile load feeds two products. Every kv head of an item per key tile: a
// token's heads are adjacent in the pool, so the reads stay sequential.
//
// Float32 queries over a bfloat16 cache (a float32 model's) stay float32-accurate: q is
// split into three bfloat16 parts and P into two (K and V are exact in bfloat16), so the
// scores cost three products and the values two.

constexpr float kLazyMax = 8.f;

#include "amx_tiles.h"

static inline bool amx_head_dim(int D) { return D % 32 == 0; }

// 16 x 16 transpose of 32-bit elements in 64 shuffles: r[i][j] -> r[j][i].
static inline void transpose16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4a + c], 128-bit lane L: rows 4a..4a+3 of column 4L + c
  __m512i u[16];
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // 4 x 4 transpose of 128-bit lanes among u[c], u[4 + c], u[8 + c], u[12 + c]
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// bfloat16 of x (round to nearest even) back in float: the head of a split.
static inline __m512 bf16_head(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

// Q^T of one item in B-tile layout: [part][qb][dc][r][n][2] = q[qb*16 + n][dc*32 + 2r + x]
// (zero past M); q is [M][D] float (scaled, rotated). parts 3 (float32 queries): q as
// the sum of three bfloat16 numbers (8 + 8 + 8 mantissa bits: the scores are then as
// exact as float32's), else 1. Per tile: 16 queries' 32 dims as bfloat16 pairs (one
// 32-bit column per dim pair), transposed.
static void pack_q_amx(const float* q, int M, int mpad, int D, int parts, uint16_t* qp) {
  const int ndc = D / 32, nqb = mpad / 16;
  const int64_t per_part = static_cast<int64_t>(nqb) * ndc * 512;
  for (int qb = 0; qb < nqb; ++qb)
    for (int dc = 0; dc < ndc; ++dc) {
      __m512 ra[16], rb[16];  // what is left of dims 0-15 / 16-31 of each query
      for (int n = 0; n < 16; ++n) {
        const int m = qb * 16 + n;
        const float* src = q + static_cast<int64_t>(m) * D + dc * 32;
        ra[n] = m < M ? _mm512_loadu_ps(src) : _mm512_setzero_ps();
        rb[n] = m < M ? _mm512_loadu_ps(src + 16) : _mm512_setzero_ps();
      }
      for (int part = 0; part < parts; ++part) {
        __m512i x[16];
        for (int n = 0; n < 16; ++n) {
          x[n] = (__m512i)_mm512_cvtne2ps_pbh(rb[n], ra[n]);  // words 0-31 = dims 0-31
          if (part + 1 < parts) {
            ra[n] = _mm512_sub_ps(ra[n], bf16_head(ra[n]));
            rb[n] = _mm512_sub_ps(rb[n], bf16_head(rb[n]));
          }
        }
        transpose16_epi32(x);
        uint16_t* dst = qp + part * per_part + (static_cast<int64_t>(qb) * ndc + dc) * 512;
        for (int r = 0; r < 16; ++r) _mm512_store_si512(dst + r * 32, x[r]);
      }
    }
}

// V of keys with byte offsets off[0, nk) in B-tile layout [kc][db][j][n][2] = V[kc*32 +
// 2j + x][db*16 + n] (zero past nk).
static inline void pack_v_amx(const char* vbase, const int64_t* off, int nk, int D, uint16_t* vp) {
  // words of two rows a, b (b's at 32..63 of permutex2var): d 0-15, then d 16-31
  const __m512i lo_idx = interleave_words(0, 32), hi_idx = interleave_words(16, 48);
  const int nkc = (nk + 31) / 32, ndb = D / 16;
  for (int kc = 0; kc < nkc; ++kc)
    for (int j = 0; j < 16; ++j) {
      const int k = kc * 32 + 2 * j;
      const char* ra = k < nk ? vbase + off[k] : nullptr;
      const char* rb = k + 1 < nk ? vbase + off[k + 1] : nullptr;
      uint16_t* dst = vp + (static_cast<int64_t>(kc) * ndb * 16 + j) * 32;
      for (int c = 0; c < D / 32; ++c) {
        const __m512i va = ra ? _mm512_loadu_si512(ra + c * 64) : _mm512_setzero_si512();
        const __m512i vb = rb ? _mm512_loadu_si512(rb + c * 64) : _mm512_setzero_si512();
        _mm512_store_si512(dst + (2 * c) * 512, _mm512_permutex2var_epi16(va, lo_idx, vb));
        _mm512_store_si512(dst + (2 * c + 1) * 512, _mm512_permutex2var_epi16(va, hi_idx, vb));
      }
    }
}

// S^T blocks of NK key blocks x NQ query blocks: C0 = (k0, q0), C1 = (k1, q0), C2 = (k0,
// q1), C3 = (k1, q1). k0 / k1: first row of each key block (row stride ks bytes); qp0 /
// qp1: the query blocks' B tiles [dc]; q_parts of them (see pack_q_amx), qsplit apart.
template <int NK, int NQ>
static inline void qk_amx(const char* k0, const char* k1, int64_t ks, const uint16_t* qp0, const uint16_t* qp1,
                          int ndc, int64_t qsplit, int q_parts, float* s, int mpad, LinePrefetch& pf, int per_step) {
  _tile_zero(0);
  if constexpr (NK == 2) _tile_zero(1);
  if constexpr (NQ == 2) _tile_zero(2);
  if constexpr (NK == 2 && NQ == 2) _tile_zero(3);
  for (int pass = 0; pass < q_parts; ++pass) {
    const int64_t qo = pass * qsplit;
    for (int dc = 0; dc < ndc; ++dc) {
      pf.issue(per_step, pf.n);
      _tile_loadd(4, k0 + dc * 64, ks);
      if constexpr (NK == 2) _tile_loadd(5, k1 + dc * 64, ks);
      _tile_loadd(6, qp0 + qo + dc * 512, 64);
      if constexpr (NQ == 2) _tile_loadd(7, qp1 + qo + dc * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NK == 2) _tile_dpbf16ps(1, 5, 6);
      if constexpr (NQ == 2) _tile_dpbf16ps(2, 4, 7);
      if constexpr (NK == 2 && NQ == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t ss = static_cast<int64_t>(mpad) * 4;
  _tile_stored(0, s, ss);
  if constexpr (NK == 2) _tile_stored(1, s + 16 * mpad, ss);
  if constexpr (NQ == 2) _tile_stored(2, s + 16, ss);
  if constexpr (NK == 2 && NQ == 2) _tile_stored(3, s + 16 * mpad + 16, ss);
}

// O blocks of NQ query blocks x 2 dim blocks (C0 = (q0, d0), C1 = (q0, d1), C2 = (q1,
// d0), C3 = (q1, d1)) += P V over nkc key chunks. p0 / p1: the query blocks' A tiles
// [kc] (stride 512 elements; p_parts of them, psplit apart); v: B tiles of dim block d0 [kc]
// (stride vstride elements; d1's follow at +512).
template <int NQ>
static inline void pv_amx(float* o, int D, const uint16_t* p0, const uint16_t* p1, int64_t psplit, int p_parts,
                          const uint16_t* v, int64_t vstride, int nkc, LinePrefetch& pf, int per_step) {
  const int64_t os = static_cast<int64_t>(D) * 4;
  _tile_loadd(0, o, os);
  _tile_loadd(1, o + 16, os);
  if constexpr (NQ == 2) {
    _tile_loadd(2, o + 16 * D, os);
    _tile_loadd(3, o + 16 * D + 16, os);
  }
  for (int pass = 0; pass < p_parts; ++pass) {
    const int64_t po = pass * psplit;
    for (int kc = 0; kc < nkc; ++kc) {
      pf.issue(per_step, pf.n);
      _tile_loadd(4, p0 + po + kc * 512, 64);
      if constexpr (NQ == 2) _tile_loadd(5, p1 + po + kc * 512, 64);
      _tile_loadd(6, v + kc * vstride, 64);
      _tile_loadd(7, v + kc * vstride + 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NQ == 2) {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, o, os);
  _tile_stored(1, o + 16, os);
  if constexpr (NQ == 2) {
    _tile_stored(2, o + 16 * D, os);
    _tile_stored(3, o + 16 * D + 16, os);
  }
}

// 2^t for t <= kLazyMax log2(e), relative error 7.5e-5 (far below bfloat16's 2e-3: for P
// that is rounded to bfloat16); t = -inf gives 0. f = t - floor(t) in one VREDUCEPS,
// 2^f on [0, 1) by a degree-3 minimax polynomial, times 2^floor(t) by VSCALEFPS (which
// floors its exponent operand itself): 6 instructions with the caller's FMA that forms
// t = (s - m) log2(e), against 11 for e^x by rounding and a degree-4 polynomial
// (measured: the bfloat16 many-query attention 3-8% faster).
static inline __m512 exp2_bf16(__m512 t) {
  const __m512 f = _mm512_reduce_ps(t, 0x09);  // 0 fraction bits, round down, no precision exception
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.078024514f), f, _mm512_set1_ps(0.22606717f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69583356f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999252f));
  return _mm512_scalef_ps(p, t);
}

// e^x by exp_approx lane by lane (float32 accuracy: the split path). Not exp_nonpos: with
// the lazy max a score may pass m_use, and exp_nonpos is written for x <= 0.
static inline __m512 exp_f32(__m512 x) {
  alignas(64) float v[16];
  _mm512_store_ps(v, x);
#pragma omp simd
  for (int i = 0; i < 16; ++i) v[i] = loom::exp_approx(v[i]);
  return _mm512_load_ps(v);
}

// Scores S^T [nk][mpad] of one head -> the A tiles of P (pp: [qb][kc] tiles of 16 queries
// x 32 keys, bfloat16, zero past nk; with split, remainders at +psplit), the running
// max and sum updated with the lazy max (see the top). Per 16 queries: the tile max, then
// each pair of keys' probabilities side by side in 32-bit columns, 16 pairs transposed
// into one tile. Returns whether some query's accumulators must be rescaled by hs.alpha.
template <bool SPLIT>
static bool softmax_pack_amx(const float* s0, HeadState& hs, int nk, int mpad, uint16_t* pp, int64_t psplit) {
  constexpr int nkc_max = kAmxKeys / 32;
  const int nkc = (nk + 31) / 32;
  const __m512i pairs = interleave_words(0, 16);  // a's word n, then b's
  bool rescale = false;
  for (int m0 = 0; m0 < mpad; m0 += 16) {
    const float* s = s0 + m0;
    const __m512 t_max = (__m512)tile_max_cols(s, nk, mpad);
    const __m512 m_old = _mm512_loadu_ps(hs.m_run + m0);
    const __mmask16 up = _mm512_cmp_ps_mask(t_max, _mm512_add_ps(m_old, _mm512_set1_ps(kLazyMax)), _CMP_GT_OQ);
    const __m512 m_new = _mm512_mask_blend_ps(up, m_old, t_max);
    // Nothing accumulated yet (m_old = -inf): O and l are zero, no rescale.
    const __mmask16 moved = up & _mm512_cmp_ps_mask(m_old, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 alpha = _mm512_mask_blend_ps(moved, _mm512_set1_ps(1.f), exp_f32(_mm512_sub_ps(m_old, m_new)));
    const __m512 m_use = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ),
                                              m_new, _mm512_setzero_ps());
    const __m512 log2e = _mm512_set1_ps(1.4426950408889634f);
    const __m512 neg_mt = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(m_use, log2e));  // -m_use log2(e)
    _mm512_storeu_ps(hs.alpha + m0, alpha);
    _mm512_storeu_ps(hs.m_use + m0, m_use);
    _mm512_storeu_ps(hs.m_run + m0, m_new);
    rescale = rescale || moved != 0;
    __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // (two chains)
    uint16_t* tile = pp + static_cast<int64_t>(m0 / 16) * nkc_max * 512;
    for (int kc = 0; kc < nkc; ++kc, tile += 512) {
      __m512i xh[16], xl[16];
      for (int j = 0; j < 16; ++j) {
        const int k = kc * 32 + 2 * j;
        __m512 pa = _mm512_setzero_ps(), pb = _mm512_setzero_ps();
        if (k < nk) {
          const __m512 xa = _mm512_loadu_ps(s + static_cast<int64_t>(k) * mpad);
          pa = SPLIT ? exp_f32(_mm512_sub_ps(xa, m_use)) : exp2_bf16(_mm512_fmadd_ps(xa, log2e, neg_mt));
        }
        if (k + 1 < nk) {
          const __m512 xb = _mm512_loadu_ps(s + static_cast<int64_t>(k + 1) * mpad);
          pb = SPLIT ? exp_f32(_mm512_sub_ps(xb, m_use)) : exp2_bf16(_mm512_fmadd_ps(xb, log2e, neg_mt));
        }
        sum[j & 1] = _mm512_add_ps(sum[j & 1], _mm512_add_ps(pa, pb));
        // words 0-15 = pa, 16-31 = pb; then pa[q], pb[q] side by side: a key pair per query
        xh[j] = _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(pb, pa));
        if constexpr (SPLIT)
          xl[j] = _mm512_permutexvar_epi16(
              pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(pb, bf16_head(pb)), _mm512_sub_ps(pa, bf16_head(pa))));
      }
      transpose16_epi32(xh);
      for (int q = 0; q < 16; ++q) _mm512_store_si512(tile + q * 32, xh[q]);
      if constexpr (SPLIT) {
        transpose16_epi32(xl);
        for (int q = 0; q < 16; ++q) _mm512_store_si512(tile + psplit + q * 32, xl[q]);
      }
    }
    _mm512_storeu_ps(hs.l_run + m0, _mm512_fmadd_ps(_mm512_loadu_ps(hs.l_run + m0), alpha, _mm512_add_ps(sum[0], sum[1])));
  }
  return rescale;
}

// Kv heads [it.kvh, it.kvh_end), M > SMALL_M queries each, bfloat16 K/V, head dim a
// multiple of 32. hs.q of each head holds its queries as [M][D] float (pack_queries,
// small layout). Every head per key tile: a token's heads are adjacent in the pool, so
// the reads stay sequential (one head alone reads 1 of every Hkv rows).
static void run_large_amx(const AttnArgs& a, const WorkItem& it, Scratch& sc, const int32_t* pages, int M,
                          int mpad, int lo, int k_end) {
  const int D = a.head_dim, ndc = D / 32, ndb = D / 16, nqb = mpad / 16, nh = it.kvh_end - it.kvh;
  const bool split = a.q_dtype == DType::F32;
  const int64_t qsplit = static_cast<int64_t>(nqb) * ndc * 512;
  const int q_parts = split ? 3 : 1, p_parts = split ? 2 : 1;  // (see the top)
  const int64_t qhead = q_parts * qsplit;  // one head's Q tiles
  if (!sc.qp_tiles) {  // (packed already for the same rows' previous key chunk)
    for (int h = 0; h < nh; ++h) pack_q_amx(head_state(sc, h, M, mpad, D).q, M, mpad, D, q_parts, sc.qp + h * qhead);
    sc.qp_tiles = true;
  }
  constexpr int nkc_max = kAmxKeys / 32;
  const int64_t psplit = static_cast<int64_t>(nqb) * nkc_max * 512;

  const char* kbase = static_cast<const char*>(a.k_pool);
  const char* vbase = static_cast<const char*>(a.v_pool);
  const int64_t row_bytes = static_cast<int64_t>(D) * 2;
  const int64_t slot_stride = static_cast<int64_t>(a.num_kv_heads) * row_bytes;
  // A page of whole 16-key blocks: a block's rows are one pool stride apart (rows past
  // the segment's end are still in its last page: read, then ignored).
  const bool direct = a.page_size % 16 == 0;
  constexpr int KT = kAmxKeys;
  int64_t* cur = sc.off;
  int64_t* nxt = sc.off + KT;
  row_offsets<DType::BF16>(a, pages, it.kvh, it.k_begin, min_int(KT, k_end - it.k_begin), cur);
  LinePrefetch pf{kbase, vbase};  // ("V" rows of the helper: the K pool's)
  pf.set_span(kbase, vbase, nh * row_bytes, row_bytes);  // (a token's rows of these heads, adjacent)
  // The next tile's lines (K rows, then V rows) spread evenly over this tile's tile-product
  // steps: issued in bursts they queue behind the core's few outstanding misses and stall
  // the tiles (measured: 0.89x at N=32 x 8k+64 against a burst before each product).
  const int steps = nh * ((nqb + 1) / 2) * ((KT / 16 + 1) / 2 * ndc * q_parts + ndb / 2 * (KT / 32) * p_parts);
  const int per_step = max_int(1, (2 * KT * pf.lpr + steps - 1) / steps);
  amx_configure();
  for (int t0 = it.k_begin; t0 < k_end; t0 += KT) {
    const int nk = min_int(KT, k_end - t0);
    const int nk_next = min_int(KT, k_end - t0 - nk);
    if (nk_next > 0) row_offsets<DType::BF16>(a, pages, it.kvh, t0 + nk, nk_next, nxt);
    pf.voff = pf.koff = nxt;
    pf.reset(max_int(nk_next, 0), 2 * max_int(nk_next, 0));
    const int nkb = (nk + 15) / 16, nkc = (nk + 31) / 32;
    const bool gather = !(direct && t0 % 16 == 0);  // (pages not of whole 16-key blocks)
    for (int h = 0; h < nh; ++h) {
      HeadState hs = head_state(sc, h, M, mpad, D);
      const uint16_t* qp = sc.qp + h * qhead;
      const int64_t ho = h * row_bytes;  // head h's rows: offsets of head kvh + ho
      const char* krows = kbase + ho;
      int64_t ks = slot_stride;
      if (gather) {
        char* g = reinterpret_cast<char*>(sc.kp);
        for (int k = 0; k < nk; ++k) memcpy(g + k * row_bytes, kbase + ho + cur[k], static_cast<size_t>(row_bytes));
        krows = g;
        ks = row_bytes;
      }
      auto key_block = [&](int b) {
        return gather ? krows + static_cast<int64_t>(16 * b) * row_bytes : krows + cur[16 * b];
      };
      // scores
      for (int qb = 0; qb < nqb; qb += 2) {
        const uint16_t* q0 = qp + static_cast<int64_t>(qb) * ndc * 512;
        const uint16_t* q1 = q0 + ndc * 512;
        float* s = sc.s + qb * 16;
        for (int kb = 0; kb < nkb; kb += 2) {
          float* sb = s + static_cast<int64_t>(kb) * 16 * mpad;
          const char* k0 = key_block(kb);
          if (kb + 1 < nkb) {
            const char* k1 = key_block(kb + 1);
            if (qb + 1 < nqb)
              qk_amx<2, 2>(k0, k1, ks, q0, q1, ndc, qsplit, q_parts, sb, mpad, pf, per_step);
            else
              qk_amx<2, 1>(k0, k1, ks, q0, q1, ndc, qsplit, q_parts, sb, mpad, pf, per_step);
          } else {
            if (qb + 1 < nqb)
              qk_amx<1, 2>(k0, k0, ks, q0, q1, ndc, qsplit, q_parts, sb, mpad, pf, per_step);
            else
              qk_amx<1, 1>(k0, k0, ks, q0, q1, ndc, qsplit, q_parts, sb, mpad, pf, per_step);
          }
        }
      }
      pack_v_amx(vbase + ho, cur, nk, D, sc.vp);
      if (t0 + nk > lo) mask_cols(sc.s, nk, mpad, t0, sc.lim);
      const bool rescale = split ? softmax_pack_amx<true>(sc.s, hs, nk, mpad, sc.pp, psplit)
                                 : softmax_pack_amx<false>(sc.s, hs, nk, mpad, sc.pp, psplit);
      if (rescale)
        for (int m = 0; m < mpad; ++m) {
          const float al = hs.alpha[m];
          if (al == 1.f) continue;
          float* o = hs.o + static_cast<int64_t>(m) * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) o[d] *= al;
        }
      // values
      const int64_t vstride = static_cast<int64_t>(ndb) * 512;
      for (int qb = 0; qb < nqb; qb += 2) {
        const uint16_t* p0 = sc.pp + static_cast<int64_t>(qb) * nkc_max * 512;
        const uint16_t* p1 = p0 + nkc_max * 512;
        for (int db = 0; db < ndb; db += 2) {
          float* o = hs.o + static_cast<int64_t>(qb) * 16 * D + db * 16;
          const uint16_t* v = sc.vp + static_cast<int64_t>(db) * 512;
          if (qb + 1 < nqb)
            pv_amx<2>(o, D, p0, p1, psplit, p_parts, v, vstride, nkc, pf, per_step);
          else
            pv_amx<1>(o, D, p0, p1, psplit, p_parts, v, vstride, nkc, pf, per_step);
        }
      }
    }
    pf.issue(pf.n, pf.n);
    int64_t* t = cur;
    cur = nxt;
    nxt = t;
  }
  _tile_release();
}

// ------------------------------------------------------------------ few queries

// The few-query path (M <= SMALL_M: decode of one thread, a thread's own tokens) for
// bfloat16 queries over a bfloat16 cache, on AVX512-BF16 dot products (VDPBF16PS: 32
// bfloat16 products summed pairwise into 16 float32 lanes): K and V rows are used as read
// from the pool instead of widened to float32 (two instructions per 16 elements of every
// row, as many as the products themselves). Measured in one process against the FMA
// products with the same prefetching: N=1 x 8k tokens 4-7% faster from memory (three
// runs), 11% with the rows in cache; N=32 x 512 own tokens 0-5% (memory-bound there).
//   scores  lanes along D, KR keys x MS queries per register block as qk_dot_block; q in
//           bfloat16 (a bfloat16 model's queries, scaled and rotated: rounded once more)
//   values  two keys per product: their V rows interleaved word by word (two permutes
//           per 32 dims), times the pair (P[m][k], P[m][k + 1]) broadcast; P rounded to
//           bfloat16, as the tile path does.
template <int KR, int MS>
static inline void qk_dp_block(const uint16_t* const* krow, const uint16_t* qh, int D, float* s) {
  constexpr int N = KR * MS;
  vf acc[N];
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) acc[n] = vf{};
  for (int d = 0; d < D; d += 32) {
    __m512bh qv[MS];
#pragma GCC unroll 4
    for (int m = 0; m < MS; ++m) qv[m] = (__m512bh)_mm512_loadu_si512(qh + m * D + d);
#pragma GCC unroll 16
    for (int r = 0; r < KR; ++r) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(krow[r] + d);
#pragma GCC unroll 4
      for (int m = 0; m < MS; ++m) acc[r * MS + m] = (vf)_mm512_dpbf16_ps((__m512)acc[r * MS + m], kv, qv[m]);
    }
  }
  float sum[N];
  transpose_reduce<N>(acc, sum);
  for (int r = 0; r < KR; ++r)
    for (int m = 0; m < MS; ++m) s[m * kSmallTile + r] = sum[r * MS + m];
}

// All nk keys of one head (S [MS][kSmallTile]); `per` lines of pf before each whole block.
template <int MS>
static void qk_dp(const uint16_t* const* krow, int nk, const uint16_t* qh, int D, float* s, LinePrefetch& pf,
                  int per) {
  constexpr int KR = kSmallAcc / MS;  // (the block small_points counts)
  int k0 = 0;
  for (; k0 + KR <= nk; k0 += KR) {
    pf.issue<kHintL2>(per, pf.n);
    qk_dp_block<KR, MS>(krow + k0, qh, D, s + k0);
  }
  if constexpr (KR >= 4)
    for (; k0 + KR / 2 <= nk; k0 += KR / 2) qk_dp_block<KR / 2, MS>(krow + k0, qh, D, s + k0);
  for (; k0 < nk; ++k0) qk_dp_block<1, MS>(krow + k0, qh, D, s + k0);
}

// O[m][d0, d0 + 16 DB) = O * alpha[m] (no alpha: 1) + the sum over nk keys of P[m][k] V[k];
// pp[m * kSmallTile / 2 + j] = the bfloat16 pair (P[m][2j], P[m][2j + 1]) as 32 bits.
template <int MS, int DB>
static inline void pv_dp_block(const uint32_t* pp, const uint16_t* const* vrow, int nk, int d0, float* o, int D,
                               const float* alpha) {
  const __m512i lo_idx = interleave_words(0, 32), hi_idx = interleave_words(16, 48);
  __m512 acc[MS][DB];
  for (int m = 0; m < MS; ++m)
    for (int b = 0; b < DB; ++b) {
      const __m512 x = _mm512_loadu_ps(o + m * D + d0 + 16 * b);
      acc[m][b] = alpha ? _mm512_mul_ps(x, _mm512_set1_ps(alpha[m])) : x;
    }
  for (int k = 0; k < nk; k += 2) {
    const uint16_t* ra = vrow[k] + d0;
    const uint16_t* rb = k + 1 < nk ? vrow[k + 1] + d0 : nullptr;
    __m512bh pb[MS];
    for (int m = 0; m < MS; ++m)
      pb[m] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[m * (kSmallTile / 2) + k / 2]));
#pragma GCC unroll 4
    for (int c = 0; c < DB / 2; ++c) {
      const __m512i va = _mm512_loadu_si512(ra + 32 * c);
      const __m512i vb = rb ? _mm512_loadu_si512(rb + 32 * c) : _mm512_setzero_si512();
      const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(va, lo_idx, vb);  // dims 32c .. 32c + 15
      const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(va, hi_idx, vb);
      for (int m = 0; m < MS; ++m) {
        acc[m][2 * c] = _mm512_dpbf16_ps(acc[m][2 * c], lo, pb[m]);
        acc[m][2 * c + 1] = _mm512_dpbf16_ps(acc[m][2 * c + 1], hi, pb[m]);
      }
    }
  }
  for (int m = 0; m < MS; ++m)
    for (int b = 0; b < DB; ++b) _mm512_storeu_ps(o + m * D + d0 + 16 * b, acc[m][b]);
}

template <int MS>
static void pv_dp(const uint32_t* pp, const uint16_t* const* vrow, int nk, float* o, int D, const float* alpha) {
  constexpr int DB = MS <= 2 ? 8 : 4;  // (16 accumulators)
  int d0 = 0;
  for (; d0 + 16 * DB <= D; d0 += 16 * DB) pv_dp_block<MS, DB>(pp, vrow, nk, d0, o, D, alpha);
  for (; d0 < D; d0 += 32) pv_dp_block<MS, 2>(pp, vrow, nk, d0, o, D, alpha);
}

// The dot-product path's pieces of run_small<BF16, true> (which holds the tile loop):
// q of every head in bfloat16, [M][D] per head in sc.qp (from hs.q, the small layout);
// a head's scores; a head's values from its probabilities, in blocks of kPvKeys keys with
// `per` prefetched lines before each.
static void pack_q_bf16(Scratch& sc, int nh, int M, int D) {
  for (int h = 0; h < nh; ++h) {
    const float* q = head_state(sc, h, M, M, D).q;
    uint16_t* qh = sc.qp + static_cast<int64_t>(h) * M * D;
    for (int64_t x = 0; x < static_cast<int64_t>(M) * D; x += 32)
      _mm512_storeu_si512(qh + x, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + x + 16), _mm512_loadu_ps(q + x)));
  }
}

static void scores_dp(const uint16_t* const* kr, int nk, const uint16_t* qh, int M, int D, float* sh,
                      LinePrefetch& pf, int per) {
  switch (M) {
    case 1: qk_dp<1>(kr, nk, qh, D, sh, pf, per); break;
    case 2: qk_dp<2>(kr, nk, qh, D, sh, pf, per); break;
    case 3:  // as two queries, then one
      qk_dp<2>(kr, nk, qh, D, sh, pf, per);
      qk_dp<1>(kr, nk, qh + 2 * D, D, sh + 2 * kSmallTile, pf, per);
      break;
    default: qk_dp<4>(kr, nk, qh, D, sh, pf, per); break;
  }
}

// sh: S [M][kSmallTile] as probabilities (0 past nk, as softmax_rows leaves them).
static void values_dp(const float* sh, const uint16_t* const* vr, int nk, int M, HeadState& hs, int D,
                      LinePrefetch& pf, int per) {
  static_assert(kSmallTile == 32, "a row of P is one vector of bfloat16 pairs");
  static_assert(kPvKeys % 2 == 0, "blocks of whole key pairs");
  alignas(64) uint32_t pp[kSmallQueries * kSmallTile / 2];
  for (int m = 0; m < M; ++m) {
    const float* row = sh + m * kSmallTile;
    _mm512_store_si512(pp + m * (kSmallTile / 2),
                       (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row)));
  }
  for (int k0 = 0; k0 < nk; k0 += kPvKeys) {
    pf.issue<kHintL2>(per, pf.n);
    const uint32_t* pk = pp + k0 / 2;
    const int n = min_int(kPvKeys, nk - k0);
    const float* al = k0 == 0 ? hs.alpha : nullptr;
    switch (M) {
      case 1: pv_dp<1>(pk, vr + k0, n, hs.o, D, al); break;
      case 2: pv_dp<2>(pk, vr + k0, n, hs.o, D, al); break;
      case 3: pv_dp<3>(pk, vr + k0, n, hs.o, D, al); break;
      default: pv_dp<4>(pk, vr + k0, n, hs.o, D, al); break;
    }
  }
}
