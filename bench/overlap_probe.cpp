// Does one core overlap its multiply-adds with a memory stream of its own? A machine probe
// for the attention rows that are a shared prompt's arithmetic plus the threads' own tokens'
// memory time (bench/RESULTS.md): it times, on one core, FMA work whose operands stay in L1
// (register blocks shaped like the CPU kernel's scores and values at 16 queries per kv head),
// a stream of software prefetches over a 256 MB buffer, and the two interleaved, and prints
// the interleaved time against the larger and against the sum of the two alone
// (1.0 x the larger = full overlap, 1.0 x the sum = none). Needs AVX-512 (x86-64):
//
//   g++ -O2 -mavx512f -mfma bench/overlap_probe.cpp -o /tmp/overlap_probe && /tmp/overlap_probe
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

alignas(64) float qt[128 * 16];   // scores: queries [D][16]
alignas(64) float kr[8 * 128];    //         8 key rows of D = 128
alignas(64) float vr[32 * 128];   // values: 32 value rows
alignas(64) float pp[32 * 16];    //         probabilities [key][16 queries]
alignas(64) float out[64 * 16];

// 8 keys x 16 queries over D = 128 (1,024 FMAs): one vector load and 8 broadcasts per 8 FMAs;
// `lines` prefetches from s, in 8 bursts.
template <int HINT>
__attribute__((noinline)) void scores(const char* s, int lines) {
  __m512 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
  const int burst = lines / 8;
  for (int d = 0; d < 128; ++d) {
    if (burst && (d & 15) == 0)
      for (int i = 0; i < burst; ++i) _mm_prefetch(s + (d / 16 * burst + i) * 64, static_cast<_mm_hint>(HINT));
    const __m512 q = _mm512_load_ps(qt + d * 16);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(kr[r * 128 + d]), q, acc[r]);
  }
  for (int r = 0; r < 8; ++r) _mm512_store_ps(out + r * 16, acc[r]);
}

// 6 queries x 64 dims over 32 keys (768 FMAs): 4 vector loads and 6 broadcasts per 24 FMAs.
template <int HINT>
__attribute__((noinline)) void values(const char* s, int lines) {
  __m512 acc[6][4];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i)
#pragma GCC unroll 4
    for (int x = 0; x < 4; ++x) acc[i][x] = _mm512_setzero_ps();
  const int burst = lines / 8;
  for (int k = 0; k < 32; ++k) {
    if (burst && (k & 3) == 0)
      for (int i = 0; i < burst; ++i) _mm_prefetch(s + (k / 4 * burst + i) * 64, static_cast<_mm_hint>(HINT));
    __m512 v[4];
#pragma GCC unroll 4
    for (int x = 0; x < 4; ++x) v[x] = _mm512_load_ps(vr + k * 128 + x * 16);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const __m512 p = _mm512_set1_ps(pp[k * 16 + i]);
#pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) acc[i][x] = _mm512_fmadd_ps(p, v[x], acc[i][x]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i)
#pragma GCC unroll 4
    for (int x = 0; x < 4; ++x) _mm512_store_ps(out + i * 64 + x * 16, acc[i][x]);
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

constexpr int kRuns = 5;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  const size_t bytes = size_t(256) << 20;
  char* buf = static_cast<char*>(aligned_alloc(4096, bytes));
  if (!buf) return 1;
  memset(buf, 1, bytes);
  for (int i = 0; i < 128 * 16; ++i) qt[i] = 1e-3f * (i % 7);
  for (int i = 0; i < 8 * 128; ++i) kr[i] = 1e-3f * (i % 5);
  for (int i = 0; i < 32 * 128; ++i) vr[i] = 1e-3f * (i % 3);
  for (int i = 0; i < 32 * 16; ++i) pp[i] = 1e-3f * (i % 11);
  std::vector<char> flush(size_t(512) << 20, 1);
  auto evict = [&] {
    volatile long sum = 0;
    for (size_t i = 0; i < flush.size(); i += 64) sum += flush[i];
  };
  printf("cpu: %s | one core | FMA work in L1, a 256 MB prefetch stream | medians of %d runs\n",
         cpu_model().c_str(), kRuns);
  printf("%-7s %-5s %5s | %9s %7s | %9s %5s | %9s %6s %6s\n", "work", "hint", "lines", "alone ms", "GFLOP/s",
         "stream ms", "GB/s", "both ms", "/max", "/sum");
  for (int kind = 0; kind < 2; ++kind)
    for (int hint = 0; hint < 2; ++hint)
      for (int lines : {16, 32, 64}) {  // prefetched lines per block of work
        auto work = [&](const char* s, int n) {
          if (kind == 0) hint ? scores<_MM_HINT_T1>(s, n) : scores<_MM_HINT_T0>(s, n);
          else hint ? values<_MM_HINT_T1>(s, n) : values<_MM_HINT_T0>(s, n);
        };
        const size_t blocks = bytes / 64 / lines;
        // the three measurements in turn, kRuns times: medians (this host's speed drifts)
        std::vector<double> boths, streams, alones;
        for (int run = 0; run < kRuns; ++run) {
          evict();
          double t0 = now();
          for (size_t b = 0; b < blocks; ++b) work(buf + b * lines * 64, lines);
          boths.push_back(now() - t0);
          evict();
          t0 = now();
          for (size_t b = 0; b < blocks; ++b) {
            const char* s = buf + b * lines * 64;
            for (int i = 0; i < lines; ++i)
              hint ? _mm_prefetch(s + i * 64, _MM_HINT_T1) : _mm_prefetch(s + i * 64, _MM_HINT_T0);
          }
          streams.push_back(now() - t0);
          t0 = now();
          for (size_t b = 0; b < blocks; ++b) work(buf, 0);
          alones.push_back(now() - t0);
        }
        const double both = median(boths), stream = median(streams), alone = median(alones);
        const double flops = blocks * (kind == 0 ? 1024.0 : 768.0) * 32;
        const double larger = alone > stream ? alone : stream;
        printf("%-7s %-5s %5d | %9.1f %7.0f | %9.1f %5.1f | %9.1f %6.2f %6.2f\n", kind == 0 ? "scores" : "values",
               hint ? "T1" : "T0", lines, alone * 1e3, flops / alone / 1e9, stream * 1e3, bytes / stream / 1e9,
               both * 1e3, both / larger, both / (alone + stream));
      }
  return out[3] == 12345.f;  // (keeps the stores)
}
