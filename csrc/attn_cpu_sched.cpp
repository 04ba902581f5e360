// Splits a plan into CPU work items (attn_cpu.h) and picks the instruction-set build.
//
// Work item = (job, block of rows, key chunk), every kv head. Rows of one job are blocked
// so that rows x group <= kMaxQueries query vectors share each K/V tile. Long segments are
// cut into key chunks (Flash-Decoding) when the job would otherwise leave threads idle:
// e.g. one 8k-token shared prompt read by a few rows still keeps every core busy; the
// chunks' extra partial states are merged with the others.
#include <math.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "loom/attn_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace loom {
namespace cpu {

namespace {

// Rough cost of one item in multiply-adds per key: its queries plus a fixed share for
// reading K/V and the softmax bookkeeping.
inline float item_cost(int64_t keys, int queries) {
  return static_cast<float>(keys) * static_cast<float>(((queries + 15) / 16) * 16 + 24);
}

struct RowBlock {
  int32_t e_begin, e_end, max_limit;
};

}  // namespace

Schedule make_schedule(const AttnArgs& a) {
  Schedule s;
  const int J = a.num_jobs, E = a.num_entries;
  const int G = a.num_q_heads / a.num_kv_heads;
  const int rows_per_block = std::max(1, kMaxQueries / G);
  s.max_queries = std::max(1, std::min(rows_per_block, std::max(E, 1)) * G);

  s.entry_job.assign(E, 0);
  std::vector<RowBlock> blocks;
  std::vector<int32_t> job_block0(J + 1, 0);
  std::vector<float> job_max_cost(J, 0.f);
  double total = 0.0;
  for (int j = 0; j < J; ++j) {
    const int e0 = a.q_indptr[j], e1 = a.q_indptr[j + 1], L = a.kv_len[j];
    job_block0[j] = static_cast<int32_t>(blocks.size());
    for (int e = e0; e < e1; ++e) s.entry_job[e] = j;
    for (int b = e0; b < e1; b += rows_per_block) {
      RowBlock rb{b, std::min(e1, b + rows_per_block), 0};
      for (int e = rb.e_begin; e < rb.e_end; ++e)
        rb.max_limit = std::max(rb.max_limit, std::min(std::max(a.causal_limit[e], 0), L));
      const float c = item_cost(rb.max_limit, (rb.e_end - rb.e_begin) * G) * a.num_kv_heads;
      job_max_cost[j] = std::max(job_max_cost[j], c);
      total += static_cast<double>(c);
      blocks.push_back(rb);
    }
  }
  job_block0[J] = static_cast<int32_t>(blocks.size());

  // Threads: all of them unless the whole step is tiny (a fork costs a few microseconds).
  s.num_threads = (total < 2.0e4) ? 1 : std::max(1, a.num_threads);
  // Chunk a job when its largest item exceeds ~1/4 of a thread's fair share (each chunk
  // repacks its queries and writes a partial state: 1/8 cost the amx path 5-7%).
  const double target = total / (4.0 * s.num_threads);

  s.job_state_base.assign(J, 0);
  s.job_chunks.assign(J, 1);
  int64_t states = 0;
  for (int j = 0; j < J; ++j) {
    const int e0 = a.q_indptr[j], Ej = a.q_indptr[j + 1] - e0, L = a.kv_len[j];
    int chunks = 1;
    if (s.num_threads > 1 && job_max_cost[j] > target && L > kMinChunk) {
      const int by_cost = static_cast<int>(std::ceil(job_max_cost[j] / target));
      chunks = std::max(1, std::min(by_cost, L / kMinChunk));
    }
    const int chunk_len = ((L + chunks - 1) / chunks + kKeyTile - 1) / kKeyTile * kKeyTile;
    if (chunk_len > 0) chunks = std::max(1, (L + chunk_len - 1) / chunk_len);
    s.job_chunks[j] = chunks;
    s.job_state_base[j] = states;
    states += static_cast<int64_t>(chunks) * Ej;
    for (int c = 0; c < chunks; ++c) {
      const int kb = c * chunk_len, ke = std::min(L, kb + chunk_len);
      for (int b = job_block0[j]; b < job_block0[j + 1]; ++b) {
        const RowBlock& rb = blocks[b];
        const int keys = std::max(0, std::min(ke, rb.max_limit) - kb);
        const int queries = (rb.e_end - rb.e_begin) * G;
        // All kv heads in one item: the kernel reads a token's heads together (with
        // many queries, head after head within each key tile), so that its reads are
        // whole tokens, adjacent in the pool.
        s.items.push_back(WorkItem{j, 0, a.num_kv_heads, rb.e_begin, rb.e_end, c, kb, ke,
                                   item_cost(keys, queries) * a.num_kv_heads});
      }
    }
  }
  s.num_states = states;
  // Too few items with many queries to keep every thread busy (short segments that were
  // not worth chunking): those take one kv head each instead.
  auto many = [G](const WorkItem& it) { return (it.e_end - it.e_begin) * G > kSmallQueries; };
  const int64_t n_many = std::count_if(s.items.begin(), s.items.end(), many);
  if (s.num_threads > 1 && a.num_kv_heads > 1 && n_many > 0 && n_many < 2 * s.num_threads) {
    std::vector<WorkItem> split;
    for (const WorkItem& it : s.items) {
      if (!many(it)) {
        split.push_back(it);
        continue;
      }
      for (int h = it.kvh; h < it.kvh_end; ++h) split.push_back(head_of(it, h));
    }
    s.items.swap(split);
  }
  // Largest first, so dynamic scheduling ends with small items (balanced finish).
  std::stable_sort(s.items.begin(), s.items.end(),
                   [](const WorkItem& x, const WorkItem& y) { return x.cost > y.cost; });

  // cos / sin of the extra rotation of each shifted entry, shared by all heads.
  s.entry_rot.assign(E, -1);
  const int half = a.head_dim / 2;
  int rot_rows = 0;
  for (int e = 0; e < E; ++e)
    if (a.shift[e] != 0) s.entry_rot[e] = rot_rows++;
  if (rot_rows > 0) {
    s.rot_cos.resize(static_cast<size_t>(rot_rows) * half);
    s.rot_sin.resize(static_cast<size_t>(rot_rows) * half);
    for (int e = 0; e < E; ++e) {
      const int r = s.entry_rot[e];
      if (r < 0) continue;
      const float pos = -static_cast<float>(a.shift[e]);
      for (int i = 0; i < half; ++i) {
        const float ang = pos * a.inv_freq[i];  // one float32 product, as the reference
        s.rot_cos[static_cast<size_t>(r) * half + i] = cosf(ang);
        s.rot_sin[static_cast<size_t>(r) * half + i] = sinf(ang);
      }
    }
  }
  return s;
}

ScheduleView view_of(const Schedule& s) {
  return ScheduleView{s.items.data(),     static_cast<int64_t>(s.items.size()),
                      s.job_state_base.data(), s.job_chunks.data(),
                      s.entry_job.data(), s.entry_rot.data(),
                      s.rot_cos.data(),   s.rot_sin.data(),
                      s.num_states,       s.max_queries,
                      s.num_threads};
}

// ------------------------------------------------------------------ instruction set

namespace {

constexpr int kBase = static_cast<int>(IsaLevel::base), kAvx2 = static_cast<int>(IsaLevel::avx2),
              kAvx512 = static_cast<int>(IsaLevel::avx512), kAmx = static_cast<int>(IsaLevel::amx);

// AMX-TILE, AMX-BF16 and AVX512-BF16 on the CPU, and the kernel's permission for this
// process to use the tile registers (Linux asks each process to request them).
bool amx_usable() {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tiles = (d >> 24) & 1u, tile_bf16 = (d >> 22) & 1u;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = (a >> 5) & 1u;
  if (!(tiles && tile_bf16 && avx512_bf16)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // arch_prctl, asm/prctl.h
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

int detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (avx512::compiled() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return amx::compiled() && amx_usable() ? kAmx : kAvx512;
  if (avx2::compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2"))
    return kAvx2;
#endif
  return kBase;
}

int best_isa() {
  static const int best = detect_isa();
  return best;
}

std::atomic<int> forced_isa{-1};

const char* isa_name(int isa) {
  return isa == kAmx ? "amx" : isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "base";
}

int current_isa() {
  const int f = forced_isa.load();
  return f >= 0 ? std::min(f, best_isa()) : best_isa();
}

}  // namespace

const char* active_isa() { return isa_name(current_isa()); }

IsaLevel active_isa_level() { return static_cast<IsaLevel>(current_isa()); }

bool set_isa(const char* name) {
  if (name == nullptr || name[0] == '\0') {
    forced_isa.store(-1);
    return true;
  }
  for (int isa : {kBase, kAvx2, kAvx512, kAmx})
    if (std::strcmp(name, isa_name(isa)) == 0) {
      forced_isa.store(isa);
      return true;
    }
  return false;
}

bool run_segment_attention(const AttnArgs& a, const ScheduleView& s, float* o_buf, float* ml_buf) {
  switch (current_isa()) {
    case kAmx: return amx::segment_attention(a, s, o_buf, ml_buf);
    case kAvx512: return avx512::segment_attention(a, s, o_buf, ml_buf);
    case kAvx2: return avx2::segment_attention(a, s, o_buf, ml_buf);
    default: return base::segment_attention(a, s, o_buf, ml_buf);
  }
}

void run_merge_states(const float* o, const float* lse, int64_t heads, int64_t dim,
                      const int32_t* merge_indptr, const int32_t* merge_entries, int64_t num_rows,
                      float* out, int num_threads) {
  switch (current_isa()) {
    case kAmx:  // (the merge has no tile work: the avx512 build's)
    case kAvx512:
      return avx512::merge_states(o, lse, heads, dim, merge_indptr, merge_entries, num_rows, out, num_threads);
    case kAvx2:
      return avx2::merge_states(o, lse, heads, dim, merge_indptr, merge_entries, num_rows, out, num_threads);
    default:
      return base::merge_states(o, lse, heads, dim, merge_indptr, merge_entries, num_rows, out, num_threads);
  }
}

}  // namespace cpu
}  // namespace loom
