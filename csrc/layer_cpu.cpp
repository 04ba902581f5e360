// engine._C.decoder_layer: one decoder layer of the fused CPU forward in one call.
//
// Why: a decode step of a small model spends ~1.5 ms outside the kernels, most of it
// in the ~10 op calls per layer (Python frame + dispatcher boxing, a few us each) and
// the Python between them. This runs the same launchers in the same order as
// CausalLM._forward_fused's per-op loop (engine/model.py), called directly, so the
// results are bit-identical; the registered ops stay the public, tested interface.
//
//   decoder_layer(h, x, layer, step, k_pool, v_pool, next_ln) -> x_next
//     h        [T, hidden] residual stream, updated in place
//     x        [T, hidden] the layer's normed input
//     layer    (qkv_w, qkv_b, qkv_n, q_norm, k_norm, o_w, o_b, o_n, ln2,
//               gate_up_w, gate_up_b, gate_up_n, down_w, down_b, down_n)   packed weights
//     step     (cos, sin, positions, slots, kv_indptr, kv_page_ids, kv_len, q_indptr,
//               q_rows, shift, causal_limit, merge_indptr, merge_entries, inv_freq,
//               scale, num_heads, num_kv_heads, head_dim, eps)
//     next_ln  the next layer's input norm weight, or None for the last layer
//   Returns the next layer's normed input, or h (after h += mlp) for the last layer.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <c10/util/Exception.h>

#include <string>

#include "ops.h"

namespace loom {
namespace {

constexpr Py_ssize_t kLayerArgs = 15, kStepArgs = 19;

struct BadArg {
  std::string what;
};

at::Tensor tensor_at(PyObject* tup, Py_ssize_t i, const char* what) {
  PyObject* o = PyTuple_GET_ITEM(tup, i);
  if (!THPVariable_Check(o)) throw BadArg{std::string(what) + " must be a tensor"};
  return THPVariable_Unpack(o);
}

c10::optional<at::Tensor> opt_tensor_at(PyObject* tup, Py_ssize_t i, const char* what) {
  if (PyTuple_GET_ITEM(tup, i) == Py_None) return c10::nullopt;
  return tensor_at(tup, i, what);
}

int64_t int_at(PyObject* tup, Py_ssize_t i, const char* what) {
  PyObject* o = PyTuple_GET_ITEM(tup, i);
  const long long v = PyLong_Check(o) ? PyLong_AsLongLong(o) : -1;
  if (!PyLong_Check(o) || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    throw BadArg{std::string(what) + " must be an int (of 64 bits)"};
  }
  return v;
}

double float_at(PyObject* tup, Py_ssize_t i, const char* what) {
  PyObject* o = PyTuple_GET_ITEM(tup, i);
  const double v = PyFloat_Check(o) || PyLong_Check(o) ? PyFloat_AsDouble(o) : -1.0;
  if ((!PyFloat_Check(o) && !PyLong_Check(o)) || (v == -1.0 && PyErr_Occurred())) {
    PyErr_Clear();
    throw BadArg{std::string(what) + " must be a float"};
  }
  return v;
}

// The arguments, unpacked while the GIL is held.
struct LayerCall {
  at::Tensor h, x, k_pool, v_pool;
  c10::optional<at::Tensor> next_ln;
  at::Tensor qkv_w, o_w, ln2, gu_w, down_w;
  c10::optional<at::Tensor> qkv_b, o_b, gu_b, down_b, q_norm, k_norm;
  int64_t qkv_n, o_n, gu_n, down_n;
  at::Tensor cos, sin, positions, slots, plan[9], inv_freq;
  double scale, eps;
  int64_t Hq, Hkv, D;
};

LayerCall parse(PyObject* args) {
  if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 7)
    throw BadArg{"decoder_layer takes (h, x, layer, step, k_pool, v_pool, next_ln)"};
  LayerCall c;
  c.h = tensor_at(args, 0, "h");
  c.x = tensor_at(args, 1, "x");
  PyObject* L = PyTuple_GET_ITEM(args, 2);
  PyObject* S = PyTuple_GET_ITEM(args, 3);
  if (!PyTuple_Check(L) || PyTuple_GET_SIZE(L) != kLayerArgs)
    throw BadArg{"layer must be a tuple of " + std::to_string(kLayerArgs) + " items"};
  if (!PyTuple_Check(S) || PyTuple_GET_SIZE(S) != kStepArgs)
    throw BadArg{"step must be a tuple of " + std::to_string(kStepArgs) + " items"};
  c.k_pool = tensor_at(args, 4, "k_pool");
  c.v_pool = tensor_at(args, 5, "v_pool");
  c.next_ln = opt_tensor_at(args, 6, "next_ln");
  c.qkv_w = tensor_at(L, 0, "qkv_w");
  c.qkv_b = opt_tensor_at(L, 1, "qkv_b");
  c.qkv_n = int_at(L, 2, "qkv_n");
  c.q_norm = opt_tensor_at(L, 3, "q_norm");
  c.k_norm = opt_tensor_at(L, 4, "k_norm");
  c.o_w = tensor_at(L, 5, "o_w");
  c.o_b = opt_tensor_at(L, 6, "o_b");
  c.o_n = int_at(L, 7, "o_n");
  c.ln2 = tensor_at(L, 8, "ln2");
  c.gu_w = tensor_at(L, 9, "gate_up_w");
  c.gu_b = opt_tensor_at(L, 10, "gate_up_b");
  c.gu_n = int_at(L, 11, "gate_up_n");
  c.down_w = tensor_at(L, 12, "down_w");
  c.down_b = opt_tensor_at(L, 13, "down_b");
  c.down_n = int_at(L, 14, "down_n");
  c.cos = tensor_at(S, 0, "cos");
  c.sin = tensor_at(S, 1, "sin");
  c.positions = tensor_at(S, 2, "positions");
  c.slots = tensor_at(S, 3, "slots");
  static const char* const kPlan[9] = {"kv_indptr", "kv_page_ids", "kv_len", "q_indptr", "q_rows",
                                       "shift", "causal_limit", "merge_indptr", "merge_entries"};
  for (int i = 0; i < 9; ++i) c.plan[i] = tensor_at(S, 4 + i, kPlan[i]);
  c.inv_freq = tensor_at(S, 13, "inv_freq");
  c.scale = float_at(S, 14, "scale");
  c.Hq = int_at(S, 15, "num_heads");
  c.Hkv = int_at(S, 16, "num_kv_heads");
  c.D = int_at(S, 17, "head_dim");
  c.eps = float_at(S, 18, "eps");
  return c;
}

// The fused forward's per-layer ops, in CausalLM._forward_fused's order.
at::Tensor run(LayerCall& c) {
  const int64_t T = c.x.size(0);
  const at::Tensor qkv = linear_packed(c.x, c.qkv_w, c.qkv_b, c.qkv_n);
  auto [q, k, v] = qkv_prep(qkv, c.q_norm, c.k_norm, c.cos, c.sin, c.positions, c.Hq, c.Hkv, c.D, c.eps);
  append_kv(c.k_pool, c.v_pool, k, v, c.slots);
  const at::Tensor* p = c.plan;
  const at::Tensor o = segment_attention(q, c.k_pool, c.v_pool, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                                         p[8], c.inv_freq, c.scale);
  const at::Tensor attn_out = linear_packed(o.reshape({T, c.Hq * c.D}), c.o_w, c.o_b, c.o_n);
  const at::Tensor xn = add_rms_norm(c.h, attn_out, c.ln2, c.eps);
  const at::Tensor gu = linear_packed(xn, c.gu_w, c.gu_b, c.gu_n);
  const at::Tensor mlp = linear_packed(silu_mul(gu), c.down_w, c.down_b, c.down_n);
  if (c.next_ln.has_value()) return add_rms_norm(c.h, mlp, *c.next_ln, c.eps);
  c.h.add_(mlp);
  return c.h;
}

}  // namespace

PyObject* decoder_layer_py(PyObject* /*self*/, PyObject* args) {
  LayerCall c;
  try {
    c = parse(args);
  } catch (const BadArg& e) {
    PyErr_SetString(PyExc_TypeError, ("decoder_layer: " + e.what).c_str());
    return nullptr;
  }
  // The compute touches no Python object: other Python threads run meanwhile.
  at::Tensor out;
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  try {
    out = run(c);
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    error = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  return THPVariable_Wrap(std::move(out));
}

}  // namespace loom
