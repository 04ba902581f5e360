// engine._C.uniform_draws: one uniform number from each of many CPU generators, in one call.
//
// Why: the sampler draws one number per sampling thread and step from the thread's own
// torch.Generator (engine/sampler.py); torch.rand(1, generator=g) costs ~4.5 us a call in
// Python (argument parsing, a tensor, the dispatcher), 1.2 ms a step at 256 threads, more
// than their whole draw (pick_from_logits). This draws the same number torch.rand does for
// a float32 tensor of one element, from the same state (ATen's CPU uniform_kernel: the
// generator's next 32-bit output, its low 24 bits times 2^-24, under the generator's
// mutex), so each generator ends in the same state and the draws are bit-identical
// (tests/test_sampler.py checks it against torch.rand).
//
//   uniform_draws(generators: list[torch.Generator]) -> float32 tensor [len(generators)]
//     the i-th number from generators[i], drawn in list order (a generator listed twice
//     gives its next two numbers, as two torch.rand calls in that order would)
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/python_variable.h>

#include <mutex>
#include <vector>

namespace loom {

PyObject* uniform_draws_py(PyObject* /*self*/, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "uniform_draws takes a list of torch.Generator");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<at::CPUGeneratorImpl*> gens(n);
  std::vector<at::Generator> keep(n);  // (holds each generator while it is drawn from)
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int is_gen = THPGenerator_Check(items[i]);
    if (is_gen != 1) {
      Py_DECREF(seq);
      if (is_gen == 0) PyErr_SetString(PyExc_TypeError, "uniform_draws: every item must be a torch.Generator");
      return nullptr;
    }
    keep[i] = THPGenerator_Unwrap(items[i]);
    if (keep[i].device().type() != at::kCPU) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_ValueError, "uniform_draws: CPU generators only");
      return nullptr;
    }
    gens[i] = keep[i].get<at::CPUGeneratorImpl>();
  }
  Py_DECREF(seq);
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::kFloat);
  float* o = out.data_ptr<float>();
  constexpr uint32_t kMask = (1u << 24) - 1;       // std::numeric_limits<float>::digits bits
  constexpr float kScale = 1.0f / (1u << 24);
  for (Py_ssize_t i = 0; i < n; ++i) {
    std::lock_guard<std::mutex> lock(gens[i]->mutex_);
    o[i] = static_cast<float>(gens[i]->random() & kMask) * kScale;  // (from 0, to 1: x * 1 + 0)
  }
  return THPVariable_Wrap(std::move(out));
}

}  // namespace loom
