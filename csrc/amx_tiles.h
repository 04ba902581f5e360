// AMX tile setup shared by the amx builds of the attention (attn_cpu_amx.h) and the GEMM
// (linear_cpu_amx.cpp), and the word-interleave index of the attention's pair layouts.
// Included inside their namespaces, after <immintrin.h>, under a `#pragma GCC target`
// with amx-tile and avx512bw.

// The 64-byte tile configuration (palette 1) that ldtilecfg reads.
struct AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes: C tiles 0-3 (16 x 16 float32), A tiles 4-5, B tiles
// 6-7 (16 x 32 bfloat16). Per thread, before its first tile instruction.
static inline void amx_configure() {
  alignas(64) AmxTileConfig c;
  memset(&c, 0, sizeof(c));
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// Word index vector for permutexvar / permutex2var: out word 2n = word first + n, 2n + 1 =
// word second + n (n < 16). (permutex2var: the second source's words are 32..63.) Two
// rows interleaved this way are the tiles' pair layout: 2 bfloat16 per 32-bit column.
static inline __m512i interleave_words(int first, int second) {
  alignas(64) uint16_t idx[32];
  for (int n = 0; n < 16; ++n) {
    idx[2 * n] = static_cast<uint16_t>(first + n);
    idx[2 * n + 1] = static_cast<uint16_t>(second + n);
  }
  return _mm512_load_si512(idx);
}
