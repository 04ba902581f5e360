// The CPU segment-attention compute, included once per instruction set by
// attn_cpu_{base,avx2,avx512}.cpp inside `namespace loom::cpu::<isa>` after a
// `#pragma GCC target`. Nothing from the standard library's templates is used here:
// their inline code must not be compiled for a wider instruction set than the caller's.
//
// Needs LOOM_VL (floats per vector register), LOOM_QK_KEYS / LOOM_QK_KEYS1 (keys per
// QK register block; the latter when the queries fill one vector), LOOM_PV_ROWS
// (queries, <= 8) and LOOM_PV_VECS (head-dim vectors, <= 4) per PV register block.
//
// A work item (see attn_cpu.h) holds M = rows x group query vectors of each of its kv
// heads (usually all of them). Per tile of keys, head after head:
//   scores  S[k][m] = K[k] . Q[m]            (queries pre-scaled and, for shifted
//                                              entries, pre-rotated)
//   mask    keys at or past an entry's causal limit -> -inf
//   softmax running max / sum per query
//   values  O[m][:] = O[m][:] * alpha[m] + sum_k P[k][m] V[k][:]
// Inner loops have compile-time trip counts so the compiler keeps the accumulators
// in vector registers (no intrinsics: plain loops the auto-vectoriser handles, with
// `omp simd` / `GCC unroll` where it would otherwise pick the wrong loop).

constexpr int VL = LOOM_VL;
constexpr int QK_KEYS = LOOM_QK_KEYS;
constexpr int QK_KEYS1 = LOOM_QK_KEYS1;  // keys per QK block when the queries fill one vector
static_assert(QK_KEYS <= 6 && QK_KEYS1 <= 8, "qk_large has register blocks up to 6 (8) keys");
constexpr int QK_VECS = 4;    // query vectors (of VL queries) per QK register block
constexpr int PV_ROWS = LOOM_PV_ROWS;
constexpr int PV_VECS = LOOM_PV_VECS;
constexpr int SMALL_M = kSmallQueries;  // up to this many queries: scores are dot products over D

// Keys per step of the amx path (a multiple of kKeyTile: key chunks are; the amx build
// sets it, 64). Longer steps load and store the accumulator tiles less often, but a
// step's S, P, packed V and K then outgrow L1: from memory 128 keys ran 1.01-1.12x the
// time of 64 (12 pairs) and 256 keys 0.98-1.10x the time of 128 (bfloat16, N=8 / 32
// threads, in-process A/B), though with the pages in cache 64 keys are 1.04x slower.
#ifdef LOOM_AMX
constexpr int kAmxKeys = LOOM_AMX_KEYS;
#else
constexpr int kAmxKeys = kKeyTile;
#endif
static_assert(kAmxKeys % kKeyTile == 0, "amx key tiles hold whole kKeyTile tiles");

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
static inline int min_int(int a, int b) { return a < b ? a : b; }
static inline int max_int(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------ element access

template <DType DT> struct Elem;
template <> struct Elem<DType::F32> {
  using T = float;
  static inline float load(const T* p, int64_t i) { return p[i]; }
};
template <> struct Elem<DType::BF16> {
  using T = uint16_t;
  static inline float load(const T* p, int64_t i) { return loom::bf16_to_float(p[i]); }
};
template <> struct Elem<DType::F16> {
  using T = uint16_t;
  static inline float load(const T* p, int64_t i) { return loom::f16_to_float(p[i]); }
};

template <DType DT>
static inline void load_row(const typename Elem<DT>::T* src, float* dst, int n) {
  int i = 0;
  if constexpr (DT == DType::F16) {  // F16C where the build has it: 16 or 8 per instruction
#if LOOM_VL == 16
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif LOOM_VL == 8
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  }
  for (; i < n; ++i) dst[i] = Elem<DT>::load(src, i);
}

// An IEEE half as the small path reads it in place: its own type, so that the row kernels
// (templated on the element) widen it as a half, not as the bfloat16 that uint16_t is.
struct Half {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2, "a half is two bytes");

// ------------------------------------------------------------------ per-thread scratch

// Running state of one kv head's queries within a work item.
struct HeadState {
  float* q;       // packed queries: [D][mpad] (large path) or [M][D] (small path)
  float* o;       // accumulators [M][D]
  float* m_run;   // [mpad] running max
  float* l_run;   // [mpad] running sum
  float* alpha;   // [mpad] rescale factor of this tile
  float* m_use;   // [mpad] max to subtract (0 while nothing was seen)
};

// Per-thread scratch: the states of every kv head of an item. Keys are read token by
// token across heads, so the reads stay contiguous (one token of all heads is often
// exactly one memory page) instead of taking one row from every page, which halves
// the achieved memory bandwidth with few queries (decode) and costs ~10% with many.
// The queries of an item: rows [e0, e1) of a job, the query heads of kv heads [h0, h1).
struct QueryKey {
  int job = -1, e0 = 0, e1 = 0, h0 = 0, h1 = 0;
  static QueryKey of(const WorkItem& it) { return QueryKey{it.job, it.e_begin, it.e_end, it.kvh, it.kvh_end}; }
  bool operator==(const QueryKey& o) const {
    return job == o.job && e0 == o.e0 && e1 == o.e1 && h0 == o.h0 && h1 == o.h1;
  }
};

struct Scratch {
  float* q;       // HeadState::q of every head slot
  float* o;
  float* m_run;   // HeadState vectors of every head slot
  float* l_run;
  float* alpha;
  float* m_use;
  float* s;       // S^T [kKeyTile][mpad] (large path; kAmxKeys on amx) or S [head][M][kSmallTile] (small path)
  float* kbuf;    // K, then V, rows of one large-path tile converted to float (16-bit inputs)
  float* tmp;     // VL query rows [VL][round_up(D, VL)]
  int* lim;       // [mpad] causal limit of each query
  const float** krow;  // row pointers of the tile: [kKeyTile] or [head][kSmallTile]
  const float** vrow;
  const uint16_t** krow16;  // small path over a 16-bit pool: rows in place [head][kSmallTile]
  const uint16_t** vrow16;
  int64_t* off;        // byte offsets of the K/V rows of this tile and the next (large path): [2][kAmxKeys]
  uint16_t* qp;        // amx build: Q^T tiles (and split parts) [head][3][mpad][D]
  uint16_t* pp;        // amx build: P tiles (and remainders) [2][mpad][kAmxKeys]
  uint16_t* kp;        // amx build: gathered key rows [kAmxKeys][D]
  uint16_t* vp;        // amx build: V tiles [kAmxKeys][D]
  void* block;
  // Whose queries q holds, packed by pack_queries (job < 0: nobody's); qp_tiles: qp holds
  // them in the amx path's tiles too. A job's key chunks are items of their own, mostly
  // claimed back to back by one thread: the queries are then packed once, not per chunk.
  QueryKey q_of;
  bool qp_tiles = false;
};

// Cache lines to prefetch, issued a few at a time between the register blocks of the
// compute before their use, so that K/V stream in while the core computes. (Issued all
// at once, they queue behind the core's few outstanding misses and stall it.) The lines
// are those of K/V rows given by their byte offsets: rows [0, nv) of the V pool (this
// tile), then rows [nv, nr) of the K pool (the next tile), lpr lines per row (walked
// with a cursor: listing every line first cost ~10% of the large path).
struct LinePrefetch {
  const char* vbase;
  const char* kbase;
  const int64_t* voff = nullptr;  // byte offsets of the V rows
  const int64_t* koff = nullptr;  // byte offsets of the K rows
  int nv = 0, nr = 0, lpr = 1;
  int n = 0;  // lines in all: nr * lpr
  int i = 0;  // lines issued
  int row = 0, line = 0;
  const char* cur = nullptr;  // first line of `row`
  inline void reset(int n_v, int n_rows) {
    nv = n_v;
    nr = n_rows;
    n = n_rows * lpr;
    i = row = line = 0;
    cur = at(0);
  }
  inline const char* at(int r) const {
    if (r >= nr) return nullptr;
    const char* p = r < nv ? vbase + voff[r] : kbase + koff[r - nv];
    return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63});
  }
  // Lines per prefetched row of `span` bytes (a token's rows of the item's heads, each
  // `row` bytes), one more when a row may start mid-line.
  inline void set_span(const void* k_pool, const void* v_pool, int64_t span, int64_t row) {
    const bool aligned = span % 64 == 0 && row % 64 == 0 && reinterpret_cast<uintptr_t>(k_pool) % 64 == 0 &&
                         reinterpret_cast<uintptr_t>(v_pool) % 64 == 0;
    lpr = static_cast<int>(aligned ? span / 64 : (span + 126) / 64);
  }
  template <int HINT = 3>  // __builtin_prefetch's locality: 3 = L1 (prefetcht0), 2 = L2 (prefetcht1)
  inline void issue(int count, int upto) {
    const int e = upto < i + count ? upto : i + count;
    // A row's lines in one plain loop: per line one prefetch and an add (a check per
    // line for the row's end cost more instructions than the products of a few-query
    // tile: 16-bit rows with the lines in cache 0.84-0.94x the time this way).
    while (i < e) {
      const int take = lpr - line < e - i ? lpr - line : e - i;
      const char* p = cur + 64 * line;
      for (int l = 0; l < take; ++l) __builtin_prefetch(p + 64 * l, 0, HINT);
      i += take;
      line += take;
      if (line == lpr) {
        line = 0;
        cur = at(++row);
      }
    }
  }
};

static inline size_t pad64(size_t bytes) { return (bytes + 63) / 64 * 64; }
static inline size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

// Room for `heads` heads of up to max_m queries each, or of up to SMALL_M.
static bool scratch_alloc(Scratch& sc, int max_m, int heads, int D) {
  const size_t mp = static_cast<size_t>(round_up(max_m, VL));
  const size_t Dp = static_cast<size_t>(round_up(D, VL));
  const size_t hq = static_cast<size_t>(heads) * SMALL_M;  // queries over all head slots
  const size_t mh = static_cast<size_t>(heads) * mp;  // every head's queries
  const size_t qo = max_size(mh * Dp, hq * Dp);
  const size_t vec = max_size(mh, hq);
  const size_t rows = max_size(kKeyTile, static_cast<size_t>(heads) * kSmallTile);
  const size_t f = sizeof(float);
  const size_t sizes[] = {pad64(qo * f),
                          pad64(qo * f),
                          pad64(vec * f),
                          pad64(vec * f),
                          pad64(vec * f),
                          pad64(vec * f),
                          pad64(max_size(kAmxKeys * mp, hq * kSmallTile) * f),
                          pad64(static_cast<size_t>(kKeyTile) * Dp * f),
                          pad64(VL * Dp * f),
                          pad64(mp * sizeof(int)),
                          pad64(rows * sizeof(float*)),
                          pad64(rows * sizeof(float*)),
                          pad64(rows * sizeof(uint16_t*)),
                          pad64(rows * sizeof(uint16_t*)),
                          pad64(2 * static_cast<size_t>(kAmxKeys) * sizeof(int64_t)),
                          pad64(3 * mh * Dp * 2),
                          pad64(2 * mp * kAmxKeys * 2),
                          pad64(kAmxKeys * Dp * 2),
                          pad64(kAmxKeys * Dp * 2)};
  size_t total = 0;
  for (size_t b : sizes) total += b;
  char* p = static_cast<char*>(aligned_alloc(64, total));
  sc.block = p;
  if (p == nullptr) return false;
  float** fl[] = {&sc.q, &sc.o, &sc.m_run, &sc.l_run, &sc.alpha, &sc.m_use,
                  &sc.s, &sc.kbuf, &sc.tmp};
  int i = 0;
  for (float** dst : fl) {
    *dst = reinterpret_cast<float*>(p);
    p += sizes[i++];
  }
  sc.lim = reinterpret_cast<int*>(p);
  p += sizes[i++];
  sc.krow = reinterpret_cast<const float**>(p);
  p += sizes[i++];
  sc.vrow = reinterpret_cast<const float**>(p);
  p += sizes[i++];
  sc.krow16 = reinterpret_cast<const uint16_t**>(p);
  p += sizes[i++];
  sc.vrow16 = reinterpret_cast<const uint16_t**>(p);
  p += sizes[i++];
  sc.off = reinterpret_cast<int64_t*>(p);
  p += sizes[i++];
  uint16_t** hw[] = {&sc.qp, &sc.pp, &sc.kp, &sc.vp};
  for (uint16_t** dst : hw) {
    *dst = reinterpret_cast<uint16_t*>(p);
    p += sizes[i++];
  }
  return true;
}

static inline HeadState head_state(const Scratch& sc, int slot, int M, int mpad, int D) {
  const int64_t qo = static_cast<int64_t>(slot) * mpad * round_up(D, VL);
  const int64_t v = static_cast<int64_t>(slot) * mpad;
  (void)M;
  return HeadState{sc.q + qo, sc.o + qo, sc.m_run + v, sc.l_run + v, sc.alpha + v, sc.m_use + v};
}

// The tile kernels (scores, softmax, values), then work items, merge and entry points.
#include "attn_cpu_tiles.h"
#include "attn_cpu_items.h"
