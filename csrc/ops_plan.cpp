// loom::build_plan: the thread-tree step plan (engine/attention/plan.py) in C++.
//
// Same output as build_plan_py: jobs in order of first appearance of their segment;
// entries of a job sorted by row (stable: a row's entries keep view order); each row's
// merge list in its view's order (written with the entries: no pass over the entries
// by row afterwards). Two passes over the threads' views, no sort.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "ops.h"

namespace loom {

std::vector<at::Tensor> build_plan(const at::Tensor& thread_view_indptr, const at::Tensor& view_seg,
                                   const at::Tensor& view_shift, const at::Tensor& thread_own_seg,
                                   const at::Tensor& thread_num_new, const at::Tensor& seg_len,
                                   const at::Tensor& seg_page_indptr, const at::Tensor& seg_page_ids) {
  const std::pair<const at::Tensor*, const char*> ins[] = {
      {&thread_view_indptr, "build_plan: thread_view_indptr"}, {&view_seg, "build_plan: view_seg"},
      {&view_shift, "build_plan: view_shift"},                 {&thread_own_seg, "build_plan: thread_own_seg"},
      {&thread_num_new, "build_plan: thread_num_new"},         {&seg_len, "build_plan: seg_len"},
      {&seg_page_indptr, "build_plan: seg_page_indptr"},       {&seg_page_ids, "build_plan: seg_page_ids"}};
  for (const auto& [t, name] : ins) check_cpu_int32_1d(*t, name);
  const int64_t Th = thread_own_seg.numel(), V = view_seg.numel(), S = seg_len.numel();
  TORCH_CHECK(thread_view_indptr.numel() == Th + 1 && thread_num_new.numel() == Th,
              "build_plan: thread_view_indptr must have num_threads + 1 = ", Th + 1,
              " elements and thread_num_new num_threads, got ", thread_view_indptr.numel(), " and ",
              thread_num_new.numel());
  TORCH_CHECK(view_shift.numel() == V, "build_plan: view_shift must match view_seg (", V, " elements)");
  TORCH_CHECK(seg_page_indptr.numel() == S + 1, "build_plan: seg_page_indptr must have num_segments + 1 = ", S + 1,
              " elements");
  const int32_t* tvi = thread_view_indptr.data_ptr<int32_t>();
  const int32_t* vseg = view_seg.data_ptr<int32_t>();
  const int32_t* vsh = view_shift.data_ptr<int32_t>();
  const int32_t* own = thread_own_seg.data_ptr<int32_t>();
  const int32_t* nnew = thread_num_new.data_ptr<int32_t>();
  const int32_t* slen = seg_len.data_ptr<int32_t>();
  const int32_t* spi = seg_page_indptr.data_ptr<int32_t>();
  const int32_t* spid = seg_page_ids.data_ptr<int32_t>();
  TORCH_CHECK(tvi[0] == 0 && tvi[Th] == V, "build_plan: thread_view_indptr must run from 0 to ", V);
  TORCH_CHECK(spi[0] == 0 && spi[S] <= seg_page_ids.numel(), "build_plan: seg_page_indptr must start at 0 and end "
              "within seg_page_ids");
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(spi[s + 1] >= spi[s], "build_plan: seg_page_indptr decreases at index ", s + 1);
  for (int64_t th = 0; th < Th; ++th)  // (all of it first: a thread's range is read before the next is seen)
    TORCH_CHECK(tvi[th + 1] >= tvi[th], "build_plan: thread_view_indptr decreases at index ", th + 1);

  // Pass 1: jobs by first appearance, entry counts, rows.
  std::vector<int32_t> job_of(S, -1), seg_of_job, job_count;
  int64_t rows = 0, entries = 0, pages = 0;
  for (int64_t th = 0; th < Th; ++th) {
    TORCH_CHECK(tvi[th + 1] >= tvi[th], "build_plan: thread_view_indptr decreases at index ", th + 1);
    TORCH_CHECK(nnew[th] >= 0, "build_plan: thread_num_new[", th, "] = ", nnew[th], " is negative");
    TORCH_CHECK(own[th] >= 0 && own[th] < S && slen[own[th]] >= 0, "build_plan: thread_own_seg[", th, "] = ",
                own[th], " is not a known segment");
    TORCH_CHECK(slen[own[th]] >= nnew[th], "build_plan: thread ", th, "'s own segment ", own[th], " has ",
                slen[own[th]], " tokens, fewer than its ", nnew[th], " new ones (its length counts them)");
    for (int32_t i = tvi[th]; i < tvi[th + 1]; ++i) {
      const int32_t seg = vseg[i];
      TORCH_CHECK(seg >= 0 && seg < S && slen[seg] >= 0, "build_plan: view_seg[", i, "] = ", seg,
                  " is not a known segment");
      if (job_of[seg] < 0) {
        job_of[seg] = static_cast<int32_t>(seg_of_job.size());
        seg_of_job.push_back(seg);
        job_count.push_back(0);
        pages += spi[seg + 1] - spi[seg];
      }
      job_count[job_of[seg]] += nnew[th];
      entries += nnew[th];
    }
    rows += nnew[th];
  }
  TORCH_CHECK(entries < (int64_t{1} << 31) && pages < (int64_t{1} << 31) && rows < (int64_t{1} << 31),
              "build_plan: plan too large for int32");
  const int64_t J = static_cast<int64_t>(seg_of_job.size());

  const auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor kv_indptr = at::empty({J + 1}, i32), kv_page_ids = at::empty({pages}, i32);
  at::Tensor kv_len = at::empty({J}, i32), q_indptr = at::empty({J + 1}, i32);
  at::Tensor q_rows = at::empty({entries}, i32), shift = at::empty({entries}, i32);
  at::Tensor causal_limit = at::empty({entries}, i32), merge_indptr = at::empty({rows + 1}, i32);
  at::Tensor merge_entries = at::empty({entries}, i32);
  int32_t* kvi = kv_indptr.data_ptr<int32_t>();
  int32_t* kvp = kv_page_ids.data_ptr<int32_t>();
  int32_t* kvl = kv_len.data_ptr<int32_t>();
  int32_t* qi = q_indptr.data_ptr<int32_t>();
  int32_t* qr = q_rows.data_ptr<int32_t>();
  int32_t* sh = shift.data_ptr<int32_t>();
  int32_t* cl = causal_limit.data_ptr<int32_t>();
  int32_t* mi = merge_indptr.data_ptr<int32_t>();
  int32_t* me = merge_entries.data_ptr<int32_t>();

  kvi[0] = 0;
  qi[0] = 0;
  for (int64_t j = 0; j < J; ++j) {
    const int32_t seg = seg_of_job[j];
    for (int32_t p = spi[seg]; p < spi[seg + 1]; ++p) kvp[kvi[j] + p - spi[seg]] = spid[p];
    kvi[j + 1] = kvi[j] + (spi[seg + 1] - spi[seg]);
    kvl[j] = slen[seg];
    qi[j + 1] = qi[j] + job_count[j];
  }

  // Pass 2: entries. Rows grow thread by thread, and a row's view items are visited in
  // order, so appending at each job's cursor yields entries sorted (stably) by row.
  std::vector<int32_t> cursor(qi, qi + J);
  int32_t row = 0;
  mi[0] = 0;
  for (int64_t th = 0; th < Th; ++th) {
    const int32_t n = nnew[th], own_len = slen[own[th]];
    const int32_t v0 = tvi[th], v1 = tvi[th + 1];
    for (int32_t i = 0; i < n; ++i, ++row) {
      int32_t* row_list = me + mi[row];
      for (int32_t v = v0; v < v1; ++v) {
        const int32_t seg = vseg[v];
        const int32_t e = cursor[job_of[seg]]++;
        qr[e] = row;
        sh[e] = vsh[v];
        cl[e] = seg == own[th] ? own_len - n + i + 1 : slen[seg];
        row_list[v - v0] = e;
      }
      mi[row + 1] = mi[row] + (v1 - v0);
    }
  }

  return {kv_indptr, kv_page_ids, kv_len, q_indptr, q_rows, shift, causal_limit, merge_indptr, merge_entries};
}

}  // namespace loom
