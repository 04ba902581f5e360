// Op schemas and CPU registrations of torch.ops.loom.*, and the Python module engine._C
// whose import runs them. Fake (meta) kernels live in engine/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "loom/attn_cpu.h"
#include "ops.h"

TORCH_LIBRARY(loom, m) {
  m.def("append_kv(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def(
      "segment_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor kv_indptr, Tensor kv_page_ids, "
      "Tensor kv_len, Tensor q_indptr, Tensor q_rows, Tensor shift, Tensor causal_limit, "
      "Tensor merge_indptr, Tensor merge_entries, Tensor inv_freq, float scale) -> Tensor");
  m.def("merge_states(Tensor o, Tensor lse, Tensor merge_indptr, Tensor merge_entries, int num_rows) -> Tensor");
  m.def(
      "build_plan(Tensor thread_view_indptr, Tensor view_seg, Tensor view_shift, Tensor thread_own_seg, "
      "Tensor thread_num_new, Tensor seg_len, Tensor seg_page_indptr, Tensor seg_page_ids) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("append_kv", &loom::append_kv);
  m.impl("segment_attention", &loom::segment_attention);
  m.impl("merge_states", &loom::merge_states);
  m.impl("build_plan", &loom::build_plan);
}

// engine._C.cpu_isa(name=None) -> str: the CPU kernel build in use by the segment attention
// and the packed GEMM ("amx", "avx512", "avx2", "base"). A name lowers it (for tests and
// benchmarks); "" restores the automatic choice.
static PyObject* cpu_isa(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "|z", &name)) return nullptr;
  if (name != nullptr && !loom::cpu::set_isa(name)) {
    PyErr_Format(PyExc_ValueError, "cpu_isa(%R): choose one of 'amx', 'avx512', 'avx2', 'base' or ''.",
                 PyTuple_GET_ITEM(args, 0));
    return nullptr;
  }
  return PyUnicode_FromString(loom::cpu::active_isa());
}

namespace loom {
PyObject* decoder_layer_py(PyObject* self, PyObject* args);  // csrc/layer_cpu.cpp
PyObject* uniform_draws_py(PyObject* self, PyObject* arg);     // csrc/rand_cpu.cpp
}

static PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_VARARGS, "cpu_isa(name=None) -> str: the CPU kernel build in use (attention, packed GEMM)."},
    {"decoder_layer", loom::decoder_layer_py, METH_VARARGS,
     "decoder_layer(h, x, layer, step, k_pool, v_pool, next_ln) -> Tensor: one fused CPU decoder layer "
     "(see csrc/layer_cpu.cpp)."},
    {"uniform_draws", loom::uniform_draws_py, METH_O,
     "uniform_draws(generators) -> float32 Tensor: one torch.rand number from each CPU generator, in order "
     "(see csrc/rand_cpu.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                                     "Loom's C++ ops; importing registers torch.ops.loom.*", -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
