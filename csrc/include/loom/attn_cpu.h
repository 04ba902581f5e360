// The CPU segment-attention kernel: framework-free arguments, work schedule and the
// per-instruction-set entry points. Semantics: engine/attention/plan.py.
//
// Layers: ops_attention.cpp (checks torch tensors, fills AttnArgs) -> attn_cpu_sched.cpp
// (splits the plan into work items) -> attn_cpu_<isa>.cpp (the compute, compiled once
// per instruction set, picked at run time) -> merged rows in AttnArgs::out.
#pragma once

#include <stdint.h>

#include <vector>

namespace loom {
namespace cpu {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct AttnArgs {
  DType dtype;            // of k_pool and v_pool
  DType q_dtype;          // of q: dtype, or F32 over a 16-bit cache (a float32 model's)
  const void* q;          // [T, Hq, D], last dim contiguous
  int64_t q_stride_t;     // in elements
  int64_t q_stride_h;
  const void* k_pool;     // [num_pages, page_size, Hkv, D] contiguous
  const void* v_pool;
  int64_t num_pages;
  int page_size, num_q_heads, num_kv_heads, head_dim;
  int num_rows, num_jobs, num_entries;
  // The plan (int32, see plan.py).
  const int32_t* kv_indptr;
  const int32_t* kv_page_ids;
  const int32_t* kv_len;
  const int32_t* q_indptr;
  const int32_t* q_rows;
  const int32_t* shift;
  const int32_t* causal_limit;
  const int32_t* merge_indptr;
  const int32_t* merge_entries;
  const float* inv_freq;  // [D/2]; read only for entries with a non-zero shift
  float scale;
  void* out;              // [T, Hq, D] of out_dtype, written in full
  DType out_dtype;        // F32, or q's 16-bit type (rounded to nearest even in the merge)
  int num_threads;
};

// One unit of parallel work: rows [e_begin, e_end) of job `job` (entries of one job,
// consecutive), the query heads of kv heads [kvh, kvh_end), keys [k_begin, k_end) of the
// segment (chunk `chunk` of the job). It writes partial states of its entries for that
// chunk. Items take every kv head (with many queries, head after head per key tile),
// unless there would be too few of them for the threads.
struct WorkItem {
  int32_t job, kvh, kvh_end, e_begin, e_end, chunk, k_begin, k_end;
  float cost;
};

// The part of item `it` that is kv head h alone (its share of the cost).
inline WorkItem head_of(const WorkItem& it, int h) {
  WorkItem one = it;
  one.kvh = h;
  one.kvh_end = h + 1;
  one.cost = it.cost / static_cast<float>(it.kvh_end - it.kvh);
  return one;
}

// Tiles shared by the schedule and every kernel build.
constexpr int kKeyTile = 64;      // keys per online-softmax step
constexpr int kMaxQueries = 64;   // query vectors (rows x GQA group) per work item
constexpr int kMinChunk = 256;    // shortest key chunk worth its own partial state
constexpr int kSmallQueries = 4;  // up to this many query vectors: all kv heads per item
constexpr int kSmallTile = 32;    // keys per online-softmax step of such items

// Partial state of (entry e of job j, chunk c) lives at index
// job_state_base[j] + c * E_j + (e - q_indptr[j]) of o_buf [S, Hq, D] / ml_buf [S, Hq, 2].
struct Schedule {
  std::vector<WorkItem> items;        // largest first
  std::vector<int64_t> job_state_base;
  std::vector<int32_t> job_chunks;
  std::vector<int32_t> entry_job;     // [E]
  std::vector<int32_t> entry_rot;     // [E]: row of rot_cos/rot_sin, -1 without shift
  std::vector<float> rot_cos, rot_sin;  // [R, D/2]
  int64_t num_states = 0;
  int max_queries = 1;
  int num_threads = 1;
};

// Plain pointers into a Schedule, handed to the instruction-set builds.
struct ScheduleView {
  const WorkItem* items;
  int64_t num_items;
  const int64_t* job_state_base;
  const int32_t* job_chunks;
  const int32_t* entry_job;
  const int32_t* entry_rot;
  const float* rot_cos;
  const float* rot_sin;
  int64_t num_states;
  int max_queries;
  int num_threads;
};

Schedule make_schedule(const AttnArgs& a);
ScheduleView view_of(const Schedule& s);

// One build per instruction set; o_buf [num_states, Hq, D] / ml_buf [num_states, Hq, 2] hold
// the partial states: o normalised, and (m, l) = (largest score, sum of e^(s - m)).
// segment_attention returns false when it could not allocate its scratch memory.
#define LOOM_DECLARE_ISA(isa)                                                                  \
  namespace isa {                                                                              \
  bool segment_attention(const AttnArgs& a, const ScheduleView& s, float* o_buf, float* ml_buf); \
  void merge_states(const float* o, const float* lse, int64_t heads, int64_t dim,             \
                    const int32_t* merge_indptr, const int32_t* merge_entries, int64_t num_rows, \
                    float* out, int num_threads);                                            \
  bool compiled();                                                                             \
  }
LOOM_DECLARE_ISA(base)
LOOM_DECLARE_ISA(avx2)
LOOM_DECLARE_ISA(avx512)
LOOM_DECLARE_ISA(amx)
#undef LOOM_DECLARE_ISA

// The build to run: the best the CPU supports, unless lowered by set_isa
// ("amx", "avx512", "avx2", "base"; "" restores the automatic choice). Returns its name.
// (amx = avx512 plus AMX tiles: bfloat16 attention, and bfloat16 linears from one row.)
const char* active_isa();
bool set_isa(const char* name);
// The same as a level (the packed GEMM's dispatch follows it too).
enum class IsaLevel : int { base = 0, avx2 = 1, avx512 = 2, amx = 3 };
IsaLevel active_isa_level();

// The active build's entry points.
bool run_segment_attention(const AttnArgs& a, const ScheduleView& s, float* o_buf, float* ml_buf);
void run_merge_states(const float* o, const float* lse, int64_t heads, int64_t dim,
                      const int32_t* merge_indptr, const int32_t* merge_entries, int64_t num_rows,
                      float* out, int num_threads);

}  // namespace cpu
}  // namespace loom
