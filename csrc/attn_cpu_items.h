// Work items, the log-sum-exp merge and the entry points of the CPU attention.
// A fragment of attn_cpu_impl.h (included inside namespace loom::cpu::<isa>).

// ------------------------------------------------------------------ one work item

// Queries of kv head `kvh`, in float, rotated for shifted entries and multiplied by
// scale: [M][D] when small, else transposed to [D][mpad] with zero padding queries.
// (q's dtype is a.q_dtype, which may differ from the cache's DT.)
static inline void load_query(const AttnArgs& a, int64_t at, float* dst, int D) {
  switch (a.q_dtype) {
    case DType::F32: load_row<DType::F32>(static_cast<const float*>(a.q) + at, dst, D); break;
    case DType::BF16: load_row<DType::BF16>(static_cast<const uint16_t*>(a.q) + at, dst, D); break;
    case DType::F16: load_row<DType::F16>(static_cast<const uint16_t*>(a.q) + at, dst, D); break;
  }
}

static void pack_queries(const AttnArgs& a, const ScheduleView& sv, const WorkItem& it, int kvh, Scratch& sc,
                         float* qdst, bool small, int mpad) {
  const int D = a.head_dim, G = a.num_q_heads / a.num_kv_heads, Dp = round_up(D, VL);
  const int half = D / 2;
  const float scale = a.scale;
  // Large path: VL query rows are gathered in sc.tmp, then written column by column
  // (whole vectors) instead of one scattered element per (query, d).
  int m = 0, nb = 0;
  auto flush = [&]() {
    const int m0 = m - nb;
    for (int d = 0; d < D; ++d) {
      float* dst = qdst + static_cast<int64_t>(d) * mpad + m0;
      for (int j = 0; j < nb; ++j) dst[j] = sc.tmp[j * Dp + d] * scale;
    }
    nb = 0;
  };
  for (int e = it.e_begin; e < it.e_end; ++e) {
    const int64_t row = a.q_rows[e];
    const int rot = sv.entry_rot[e];
    for (int g = 0; g < G; ++g) {
      const int head = kvh * G + g;
      float* r = sc.tmp + static_cast<int64_t>(small ? 0 : nb) * Dp;
      load_query(a, row * a.q_stride_t + head * a.q_stride_h, r, D);
      if (rot >= 0)
        loom::rope_rotate_cs(r, r, D, sv.rot_cos + static_cast<int64_t>(rot) * half,
                             sv.rot_sin + static_cast<int64_t>(rot) * half);
      if (small) {
        for (int d = 0; d < D; ++d) qdst[m * D + d] = r[d] * scale;
        ++m;
      } else {
        ++m;
        if (++nb == VL) flush();
      }
    }
  }
  if (!small) {
    if (nb > 0) flush();
    for (int d = 0; d < D; ++d)
      for (int mm = m; mm < mpad; ++mm) qdst[static_cast<int64_t>(d) * mpad + mm] = 0.f;
  }
}

// Pool slots of a segment's keys t0, t0 + 1, ...: walks its pages instead of dividing
// per key.
struct PageWalk {
  const int32_t* pages;
  int ps, page, off;
  PageWalk(const int32_t* p, int page_size, int t0)
      : pages(p), ps(page_size), page(t0 / page_size), off(t0 % page_size) {}
  inline int64_t next() {
    const int64_t slot = static_cast<int64_t>(pages[page]) * ps + off;
    if (++off == ps) {
      off = 0;
      ++page;
    }
    return slot;
  }
};

// Small-path tile row x of K and V: pointers to element offset `at` of the pools kp / vp
// (float32 rows into krow / vrow; 16-bit ones, read in place, into krow16 / vrow16).
template <DType DT>
static inline void put_row(const typename Elem<DT>::T* kp, const typename Elem<DT>::T* vp, Scratch& sc, int x,
                           int64_t at) {
  if constexpr (DT == DType::F32) {
    sc.krow[x] = kp + at;
    sc.vrow[x] = vp + at;
  } else {
    sc.krow16[x] = kp + at;
    sc.vrow16[x] = vp + at;
  }
}

template <DType DT>
static inline const typename Elem<DT>::T* pool(const void* p) {
  return static_cast<const typename Elem<DT>::T*>(p);
}

// Rows of keys [t0, t0 + nk) of kv heads [kvh, kvh + nh): row h * stride + k.
// Token-major: all heads of a token before the next token (contiguous reads).
template <DType DT>
static void gather_rows(const AttnArgs& a, const int32_t* pages, int kvh, int nh, int t0, int nk, int stride,
                        Scratch& sc) {
  const auto *kp = pool<DT>(a.k_pool), *vp = pool<DT>(a.v_pool);
  const int D = a.head_dim, Hkv = a.num_kv_heads;
  PageWalk walk(pages, a.page_size, t0);
  for (int k = 0; k < nk; ++k) {
    const int64_t slot = walk.next();
    for (int h = 0; h < nh; ++h)
      put_row<DT>(kp, vp, sc, h * stride + k, (slot * Hkv + kvh + h) * D);
  }
}

// Ask for the K/V of keys [t0, t0 + nk) of kv heads [kvh, kvh + nh) ahead of use: pages
// are scattered over the pool, and each page boundary would otherwise stall the stream
// until the hardware prefetcher catches up.
template <DType DT>
static inline void prefetch_rows(const AttnArgs& a, const int32_t* pages, int kvh, int nh, int t0, int nk) {
  using T = typename Elem<DT>::T;
  const int D = a.head_dim, Hkv = a.num_kv_heads, ps = a.page_size;
  const char* kp = static_cast<const char*>(a.k_pool);
  const char* vp = static_cast<const char*>(a.v_pool);
  const int64_t bytes = static_cast<int64_t>(nh) * D * sizeof(T);
  PageWalk walk(pages, ps, t0);
  for (int t = t0; t < t0 + nk; ++t) {
    const int64_t slot = walk.next();
    const int64_t at = (slot * Hkv + kvh) * D * static_cast<int64_t>(sizeof(T));
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(kp + at + b, 0, 1);
      __builtin_prefetch(vp + at + b, 0, 1);
    }
  }
}

// Byte offsets (the same in the K and the V pool) of keys [t0, t0 + nk) of kv head kvh.
template <DType DT>
static inline void row_offsets(const AttnArgs& a, const int32_t* pages, int kvh, int t0, int nk, int64_t* off) {
  const int64_t bytes = static_cast<int64_t>(a.head_dim) * sizeof(typename Elem<DT>::T);
  PageWalk walk(pages, a.page_size, t0);
  for (int k = 0; k < nk; ++k) off[k] = (walk.next() * a.num_kv_heads + kvh) * bytes;
}

// The small path's spread prefetch (see run_small): keys per value block, and the
// points per tile where lines are issued (one per block of keys of the scores and of
// the values, every head).
constexpr int kPvKeys = 8;
static inline int small_points(int M, int nk, int nh) {
  const int kr = small_qk_keys(M);
  return nh * ((nk + kr - 1) / kr + (nk + kPvKeys - 1) / kPvKeys);
}

// Sets pf to the K rows, then the V rows, of keys [t0, t0 + nk) of kv heads [kvh, kvh +
// nh) (offsets into off); returns how many lines to issue at each of `points` points.
template <DType DT>
static inline int prefetch_share(const AttnArgs& a, const int32_t* pages, int kvh, int nh, int t0, int nk,
                                 int64_t* off, int points, LinePrefetch& pf) {
  if (nk <= 0) {
    pf.reset(0, 0);
    return 0;
  }
  row_offsets<DT>(a, pages, kvh, t0, nk, off);
  pf.voff = pf.koff = off;
  const int64_t row = static_cast<int64_t>(a.head_dim) * sizeof(typename Elem<DT>::T);
  pf.set_span(a.k_pool, a.v_pool, nh * row, row);
  pf.reset(nk, 2 * nk);
  return (pf.n + points - 1) / points;
}

// The first keys (up to a small tile, every kv head) of the item this thread runs next:
// the small paths over 16-bit rows prefetch them during their last tile, which has no
// tile of its own to fetch, so that the next item does not start with its first tile
// missing (an own item of 64 tokens is two tiles). Measured (bfloat16, from memory, in
// one process against none): N=32 x 1k+64 0.86, N=32 x 64 own tokens 0.92, N=8 x 1k+64
// 0.92, N=32 x 8k+512 0.95.
struct NextRows {
  const int32_t* pages = nullptr;
  int kvh = 0, nh = 0, t0 = 0, nk = 0;
};
static inline NextRows next_rows(const AttnArgs& a, const WorkItem* next) {
  NextRows r;
  if (next == nullptr) return r;
  r.pages = a.kv_page_ids + a.kv_indptr[next->job];
  r.kvh = next->kvh;
  r.nh = next->kvh_end - next->kvh;
  r.t0 = next->k_begin;
  r.nk = max_int(0, min_int(kSmallTile, next->k_end - next->k_begin));
  return r;
}

// Row element of the small path's kernels: float32 rows, or 16-bit rows read from the
// pool in place and widened in registers (bfloat16 by a shift, half by F16C's
// conversion; converting them into float32 scratch first wrote and re-read twice the
// pool's bytes: N=1 x 8k half rows read 9.5 GB/s that way, float32 rows 22.4).
template <DType DT> struct SmallRow { using T = float; };
template <> struct SmallRow<DType::BF16> { using T = uint16_t; };
template <> struct SmallRow<DType::F16> { using T = Half; };

#ifdef LOOM_AMX
#include "attn_cpu_amx.h"  // (the tile path, and the dot-product pieces run_small<BF16, true> takes)
#endif

// Few queries (M <= SMALL_M), every kv head: memory-bound. Tiles of kSmallTile tokens,
// gathered token by token across heads (contiguous reads), then each head's scores,
// softmax and values over the whole tile, the rows read in place (SmallRow).
// The next tile's K/V lines: for float32 asked for all at once before the tile
// (prefetch_rows). 16-bit rows cost twice the arithmetic per byte, and with that
// burst a tile cost about its memory time plus its arithmetic (measured: N=32 x 512 own
// tokens 4.9 ms, a pass that only touches the same lines 3.2 ms, the arithmetic alone
// 1.8 ms), so theirs are spread over the tile's products into L2, a few lines before
// every block of keys (prefetch_share; 0.86-0.94x the time). float32 rows keep the burst:
// spread, they ran 1.2-1.4x slower (their own reads already reach the read bandwidth).
// DP (amx build, bfloat16 queries over a bfloat16 cache): the products on AVX512-BF16
// dot products (attn_cpu_amx.h: scores_dp, values_dp).
template <DType DT, bool DP = false>
static void run_small(const AttnArgs& a, const WorkItem& it, Scratch& sc, const int32_t* pages, int M, int lo,
                      int k_end, const NextRows& nr) {
  static_assert(!DP || DT == DType::BF16, "the dot-product path reads bfloat16 rows");
  const int D = a.head_dim, nh = it.kvh_end - it.kvh;
  constexpr bool in_place = DT != DType::F32;
  using R = typename SmallRow<DT>::T;  // row element the kernels read
  const R* const* krow;
  const R* const* vrow;
  if constexpr (in_place) {
    krow = reinterpret_cast<const R* const*>(sc.krow16);
    vrow = reinterpret_cast<const R* const*>(sc.vrow16);
  } else {
    krow = sc.krow;
    vrow = sc.vrow;
  }
  constexpr bool spread = in_place;
  LinePrefetch pf{static_cast<const char*>(a.k_pool), static_cast<const char*>(a.v_pool)};  // ("V" rows: K's)
#ifdef LOOM_AMX
  if constexpr (DP) {
    pack_q_bf16(sc, nh, M, D);
    sc.qp_tiles = false;
  }
#endif
  for (int t0 = it.k_begin; t0 < k_end; t0 += kSmallTile) {
    const int nk = min_int(kSmallTile, k_end - t0);
    const int nk_next = min_int(kSmallTile, k_end - t0 - nk);
    gather_rows<DT>(a, pages, it.kvh, nh, t0, nk, kSmallTile, sc);
    int per = 0;
    const bool last = nk_next <= 0;  // then the next item's first rows
    if (spread)
      per = last ? prefetch_share<DT>(a, nr.pages, nr.kvh, nr.nh, nr.t0, nr.nk, sc.off, small_points(M, nk, nh), pf)
                 : prefetch_share<DT>(a, pages, it.kvh, nh, t0 + nk, nk_next, sc.off, small_points(M, nk, nh), pf);
    else if (!last)  // (float32: the next item's rows before the last tile measured no gain)
      prefetch_rows<DT>(a, pages, it.kvh, nh, t0 + nk, nk_next);
    for (int h = 0; h < nh; ++h) {
      float* sh = sc.s + h * M * kSmallTile;
#ifdef LOOM_AMX
      if constexpr (DP) {
        scores_dp(krow + h * kSmallTile, nk, sc.qp + static_cast<int64_t>(h) * M * D, M, D, sh, pf, per);
        continue;
      }
#endif
      qk_small<R>(krow + h * kSmallTile, nk, head_state(sc, h, M, M, D).q, M, D, sh, spread ? &pf : nullptr, per);
    }
    for (int h = 0; h < nh; ++h) {
      HeadState hs = head_state(sc, h, M, M, D);
      float* sh = sc.s + h * M * kSmallTile;
      if (t0 + nk > lo) mask_rows(sh, nk, M, t0, sc.lim);
      softmax_rows(sh, hs, nk, M);
    }
    // Values, a head's whole tile per call (the rescale by alpha folded into the
    // accumulator load), or in blocks of kPvKeys keys with prefetches between them.
    for (int h = 0; h < nh; ++h) {
      HeadState hs = head_state(sc, h, M, M, D);
      const float* sh = sc.s + h * M * kSmallTile;
      const R* const* vr = vrow + h * kSmallTile;
      if (!spread) {
        pv_tile<R>(sh, 1, kSmallTile, M, vr, nk, hs.o, D, hs.alpha);
        continue;
      }
#ifdef LOOM_AMX
      if constexpr (DP) {
        values_dp(sh, vr, nk, M, hs, D, pf, per);
        continue;
      }
#endif
      for (int k0 = 0; k0 < nk; k0 += kPvKeys) {
        pf.issue<kHintL2>(per, pf.n);
        pv_tile<R>(sh + k0, 1, kSmallTile, M, vr + k0, min_int(kPvKeys, nk - k0), hs.o, D, k0 == 0 ? hs.alpha : nullptr);
      }
    }
    if (spread) pf.issue<kHintL2>(pf.n, pf.n);
  }
}

// One head's tile rows of one pool (K or V) from their byte offsets (row_offsets) plus
// `ho` (that head's rows are ho bytes past the offsets' head): pointers into the pool
// (float32), or the rows converted into buf (16-bit).
template <DType DT>
static inline void gather_tile(const void* pool_, const int64_t* off, int64_t ho, int nk, int D, float* buf,
                               const float** rows) {
  using T = typename Elem<DT>::T;
  const T* p = static_cast<const T*>(pool_);
  for (int k = 0; k < nk; ++k) {
    const T* src = p + (off[k] + ho) / static_cast<int64_t>(sizeof(T));
    if constexpr (DT == DType::F32) {
      rows[k] = src;
    } else {
      float* dst = buf + static_cast<int64_t>(k) * round_up(D, VL);
      load_row<DT>(src, dst, D);
      rows[k] = dst;
    }
  }
}

// Many queries, every kv head of the item per key tile: compute-bound register-blocked
// tiles of kKeyTile keys. Head after head within a tile, so that a tile's K/V are read
// in whole tokens (a token's heads are adjacent in the pool): taking one head over all
// keys, then the next, reads 1 of every Hkv rows per pass (measured: ~1.2x the time
// of the same compute with the rows in cache, against ~1.0x this way).
template <DType DT>
static void run_large(const AttnArgs& a, const WorkItem& it, Scratch& sc, const int32_t* pages, int M, int mpad,
                      int lo, int k_end) {
  const int D = a.head_dim, nh = it.kvh_end - it.kvh;
  // float32 (rows read in place): this head's V lines go out during its scores, the next
  // head's (or the next tile's first head's) K lines during its values: L1 then holds two
  // half-tiles (K and V, or V and the next K), not three. 16-bit rows are read by their
  // conversion (K at the head's start, V after its scores): the next head's V lines go
  // out during the scores and its K lines during the values (bfloat16 from memory
  // 0.93-1.00x the time of the next K alone). Row offsets (of the item's first head) are
  // computed one tile ahead.
  const int64_t bytes = static_cast<int64_t>(D) * sizeof(typename Elem<DT>::T);
  const char* vpool = static_cast<const char*>(a.v_pool);
  const char* kpool = static_cast<const char*>(a.k_pool);
  LinePrefetch pf{vpool, kpool};
  pf.set_span(a.k_pool, a.v_pool, bytes, bytes);  // (one head's rows at a time)
  // Keys per tile: at most 16 queries per kv head do the least work per key, and 64 keys'
  // float32 rows (32 KB of K and as much of V at D = 128) with the tile's scores, queries
  // and outputs outgrow L1: 32 keys (in-process A/B from memory, N=8 threads: float32
  // 0.95-1.02x the time, bfloat16 0.97-0.99x; 16 keys 1.01-1.05x; at 32-64 queries neutral).
  const int kt = M <= 16 ? kKeyTile / 2 : kKeyTile;
  int64_t* cur = sc.off;
  int64_t* nxt = sc.off + kKeyTile;
  row_offsets<DT>(a, pages, it.kvh, it.k_begin, min_int(kt, k_end - it.k_begin), cur);
  for (int t0 = it.k_begin; t0 < k_end; t0 += kt) {
    const int nk = min_int(kt, k_end - t0);
    const int nk_next = min_int(kt, k_end - t0 - nk);
    if (nk_next > 0) row_offsets<DT>(a, pages, it.kvh, t0 + nk, nk_next, nxt);
    for (int h = 0; h < nh; ++h) {
      HeadState hs = head_state(sc, h, M, mpad, D);
      const int64_t ho = h * bytes;
      gather_tile<DT>(a.k_pool, cur, ho, nk, D, sc.kbuf, sc.krow);
      const bool last = h + 1 == nh;
      const int n_next = last ? max_int(nk_next, 0) : nk;  // rows of the next head's tile
      const int64_t next_ho = last ? 0 : ho + bytes;
      const int64_t* next_off = last ? nxt : cur;
      pf.kbase = kpool + next_ho;
      pf.koff = next_off;
      if constexpr (DT == DType::F32) {
        pf.vbase = vpool + ho;
        pf.voff = cur;
        pf.reset(nk, nk + n_next);
      } else {
        pf.vbase = vpool + next_ho;
        pf.voff = next_off;
        pf.reset(n_next, 2 * n_next);
      }
      const int upto = pf.nv * pf.lpr;  // (the V lines: during the scores)
      qk_large(sc.krow, nk, hs.q, mpad, D, sc.s, pf, upto);
      if (t0 + nk > lo) mask_cols(sc.s, nk, mpad, t0, sc.lim);
      softmax_cols(sc, hs, nk, mpad);
      // (16-bit: V converted into the buffer K was, after the scores: L1 then holds one
      // tile of floats, not two; bfloat16 0.92-0.99x the time with both converted first)
      gather_tile<DT>(a.v_pool, cur, ho, nk, D, sc.kbuf, sc.vrow);
      pv_tile<float, DT != DType::F32>(sc.s, mpad, 1, M, sc.vrow, nk, hs.o, D, hs.alpha, &pf);
    }
    int64_t* t = cur;
    cur = nxt;
    nxt = t;
  }
}


template <DType DT>
static void run_item(const AttnArgs& a, const ScheduleView& sv, const WorkItem& it, const WorkItem* next,
                     Scratch& sc, float* o_buf, float* ml_buf) {
  const int D = a.head_dim, Hq = a.num_q_heads, G = Hq / a.num_kv_heads;
  const int j = it.job, nh = it.kvh_end - it.kvh;
  const int e0 = a.q_indptr[j], Ej = a.q_indptr[j + 1] - e0;
  const int nrows = it.e_end - it.e_begin, M = nrows * G;
  const bool small = M <= SMALL_M;
#ifdef LOOM_AMX
  const bool amx = DT == DType::BF16 && !small && amx_head_dim(D);  // on the tiles
#else
  const bool amx = false;
#endif
  const int mpad = small ? M : round_up(M, VL);
  const int L = a.kv_len[j];

  int lo = L, hi = 0;  // smallest / largest causal limit of the item's queries
  for (int r = 0; r < nrows; ++r) {
    const int lim = max_int(0, min_int(a.causal_limit[it.e_begin + r], L));
    lo = min_int(lo, lim);
    hi = max_int(hi, lim);
    for (int g = 0; g < G; ++g) sc.lim[r * G + g] = lim;
  }
  for (int m = M; m < mpad; ++m) sc.lim[m] = hi;  // padding queries never force a mask
  for (int h = 0; h < nh; ++h) {
    HeadState hs = head_state(sc, h, M, mpad, D);
    for (int m = 0; m < mpad; ++m) {
      hs.m_run[m] = -INFINITY;
      hs.l_run[m] = 0.f;
    }
    for (int64_t x = 0; x < static_cast<int64_t>(mpad) * D; ++x) hs.o[x] = 0.f;
  }

  const int k_end = min_int(it.k_end, hi);
  if (k_end > it.k_begin) {
    if (!(sc.q_of == QueryKey::of(it))) {
      for (int h = 0; h < nh; ++h)  // (the amx path takes the queries as [M][D] too)
        pack_queries(a, sv, it, it.kvh + h, sc, head_state(sc, h, M, mpad, D).q, small || amx, mpad);
      sc.q_of = QueryKey::of(it);
      sc.qp_tiles = false;
    }
    const int32_t* pages = a.kv_page_ids + a.kv_indptr[j];
    if (small) {
      bool dp = false;  // (run_small's DP)
#ifdef LOOM_AMX
      if constexpr (DT == DType::BF16) {
        dp = a.q_dtype == DType::BF16 && amx_head_dim(D);
        if (dp) run_small<DT, true>(a, it, sc, pages, M, lo, k_end, next_rows(a, next));
      }
#endif
      if (!dp) run_small<DT>(a, it, sc, pages, M, lo, k_end, next_rows(a, next));
    }
#ifdef LOOM_AMX
    else if (amx)
      run_large_amx(a, it, sc, pages, M, mpad, lo, k_end);
#endif
    else
      run_large<DT>(a, it, sc, pages, M, mpad, lo, k_end);
  }

  // Partial states of this chunk: o normalised, and its softmax scalars as (m, l), the
  // largest score and the sum of e^(s - m) (not lse = m + log l: a float32 lse near 30-40
  // keeps its log-sum to ~4e-6, which every merge of a long segment's chunks passed on to
  // its weights: 10x the error of one pass at 16k keys).
  const int64_t base = sv.job_state_base[j] + static_cast<int64_t>(it.chunk) * Ej - e0;
  for (int h = 0; h < nh; ++h) {
    const HeadState hs = head_state(sc, h, M, mpad, D);
    for (int r = 0; r < nrows; ++r) {
      const int64_t st = base + it.e_begin + r;
      for (int g = 0; g < G; ++g) {
        const int m = r * G + g, head = (it.kvh + h) * G + g;
        float* dst = o_buf + (st * Hq + head) * D;
        const float* acc = hs.o + static_cast<int64_t>(m) * D;
        const float l = hs.l_run[m];
        float* ml = ml_buf + 2 * (st * Hq + head);
        if (l > 0.f) {
          const float inv = 1.f / l;
          for (int d = 0; d < D; ++d) dst[d] = acc[d] * inv;
          ml[0] = hs.m_run[m];
          ml[1] = l;
        } else if (l != l) {  // a NaN / inf in q, K or the scale: NaN out, as the reference (not dropped)
          for (int d = 0; d < D; ++d) dst[d] = NAN;
          ml[0] = ml[1] = NAN;
        } else {
          for (int d = 0; d < D; ++d) dst[d] = 0.f;
          ml[0] = -INFINITY;
          ml[1] = 0.f;
        }
      }
    }
  }
}

// ------------------------------------------------------------------ merge

// out[H][D] = the merge of n states; state(i) gives the index into o [*, H, D] and ml
// [*, H, 2]: each state's softmax scalars (m, l), its weight l e^(m - max m). (A state
// given by its lse instead: ml_of_lse, m = lse and l = 1.) No finite state: zeros; a NaN
// state: NaN.
template <class StateAt, class ScalarsAt>
static void merge_row(const float* o, int64_t H, int64_t D, int n, StateAt state, ScalarsAt ml_of, float* out) {
  for (int64_t h = 0; h < H; ++h) {
    float* dst = out + h * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = 0.f;
    float mx = -INFINITY;
    bool nan = false;
    for (int i = 0; i < n; ++i) {
      float m, l;
      ml_of(state(i), h, &m, &l);
      mx = m > mx ? m : mx;
      nan = nan || m != m || l != l;
    }
    if (nan) {
      for (int64_t d = 0; d < D; ++d) dst[d] = NAN;
      continue;
    }
    if (mx == -INFINITY) continue;
    float wsum = 0.f;
    for (int i = 0; i < n; ++i) {
      const int64_t st = state(i);
      float m, l;
      ml_of(st, h, &m, &l);
      const float w = l * expf(m - mx);
      if (!(w > 0.f)) continue;
      wsum += w;
      const float* src = o + (st * H + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
    }
    const float inv = 1.f / wsum;
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
  }
}

// n floats rounded into 16-bit out of type dt (BF16 / F16).
static void store_row(const float* src, DType dt, uint16_t* out, int64_t n) {
  if (dt == DType::BF16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = loom::float_to_bf16(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = loom::float_to_f16(src[i]);
  }
}

// ------------------------------------------------------------------ entry points

// State indices of row t of a segment attention: every chunk of every entry in its merge
// list. Returns how many; `buf` grows as needed (false: out of memory).
static bool row_states(const AttnArgs& a, const ScheduleView& sv, int64_t t, int64_t** buf, int64_t* cap,
                       int* n_out) {
  const int32_t* ents = a.merge_entries + a.merge_indptr[t];
  const int ne = a.merge_indptr[t + 1] - a.merge_indptr[t];
  int64_t n = 0;
  for (int i = 0; i < ne; ++i) n += sv.job_chunks[sv.entry_job[ents[i]]];
  if (n > *cap) {
    int64_t* grown = static_cast<int64_t*>(realloc(*buf, static_cast<size_t>(n) * sizeof(int64_t)));
    if (grown == nullptr) return false;
    *buf = grown;
    *cap = n;
  }
  int64_t k = 0;
  for (int i = 0; i < ne; ++i) {
    const int e = ents[i], j = sv.entry_job[e];
    const int e0 = a.q_indptr[j], ej = a.q_indptr[j + 1] - e0;
    for (int c = 0; c < sv.job_chunks[j]; ++c)
      (*buf)[k++] = sv.job_state_base[j] + static_cast<int64_t>(c) * ej + (e - e0);
  }
  *n_out = static_cast<int>(n);
  return true;
}

template <DType DT>
static bool run_attention(const AttnArgs& a, const ScheduleView& sv, float* o_buf, float* ml_buf) {
  const int64_t Hq = a.num_q_heads, D = a.head_dim;
  bool failed = false;
  // Items largest first, taken one ahead: a thread claims its next item when it starts
  // one, so that the current item can prefetch the next one's first rows (NextRows).
  std::atomic<int64_t> claim{0};
#pragma omp parallel num_threads(sv.num_threads)
  {
    Scratch sc;
    bool ok = scratch_alloc(sc, sv.max_queries, a.num_kv_heads, a.head_dim);
    int64_t i = claim.fetch_add(1, std::memory_order_relaxed);
    while (i < sv.num_items) {
      const int64_t n = claim.fetch_add(1, std::memory_order_relaxed);
      if (ok) run_item<DT>(a, sv, sv.items[i], n < sv.num_items ? &sv.items[n] : nullptr, sc, o_buf, ml_buf);
      i = n;
    }
    free(sc.block);
#pragma omp barrier
    // (every partial state is written)
    int64_t* states = nullptr;
    int64_t cap = 0;
    // 16-bit outputs: each row merged in float32, then rounded into out (one pass, not a
    // float32 tensor converted afterwards).
    const bool wide = a.out_dtype == DType::F32;
    float* row = wide ? nullptr : static_cast<float*>(malloc(static_cast<size_t>(Hq * D) * sizeof(float)));
    if (!wide && row == nullptr) ok = false;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.num_rows; ++t) {
      int n = 0;
      if (ok && row_states(a, sv, t, &states, &cap, &n)) {
        const int64_t* st = states;
        float* dst = wide ? static_cast<float*>(a.out) + t * Hq * D : row;
        merge_row(o_buf, Hq, D, n, [st](int i) { return st[i]; },
                  [ml_buf, Hq](int64_t j, int64_t h, float* m, float* l) {
                    *m = ml_buf[2 * (j * Hq + h)];
                    *l = ml_buf[2 * (j * Hq + h) + 1];
                  }, dst);
        if (!wide) store_row(row, a.out_dtype, static_cast<uint16_t*>(a.out) + t * Hq * D, Hq * D);
      } else {
        ok = false;
      }
    }
    free(row);
    free(states);
    if (!ok) {
#pragma omp atomic write
      failed = true;
    }
  }
  return !failed;
}

bool segment_attention(const AttnArgs& a, const ScheduleView& s, float* o_buf, float* ml_buf) {
  switch (a.dtype) {
    case DType::F32: return run_attention<DType::F32>(a, s, o_buf, ml_buf);
    case DType::BF16: return run_attention<DType::BF16>(a, s, o_buf, ml_buf);
    case DType::F16: return run_attention<DType::F16>(a, s, o_buf, ml_buf);
  }
  return false;
}

void merge_states(const float* o, const float* lse, int64_t heads, int64_t dim, const int32_t* merge_indptr,
                  const int32_t* merge_entries, int64_t num_rows, float* out, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t t = 0; t < num_rows; ++t) {
    const int32_t* ents = merge_entries + merge_indptr[t];
    auto state = [ents](int i) -> int64_t { return ents[i]; };
    auto ml_of_lse = [lse, heads](int64_t j, int64_t h, float* m, float* l) {
      *m = lse[j * heads + h];
      *l = *m == -INFINITY ? 0.f : 1.f;
    };
    merge_row(o, heads, dim, merge_indptr[t + 1] - merge_indptr[t], state, ml_of_lse, out + t * heads * dim);
  }
}

bool compiled() { return true; }
