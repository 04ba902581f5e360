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
  if (!PyLong_Check(o)) throw BadArg{std::string(what) + " must be an int"};
  return PyLong_AsLongLong(o);
}

double float_at(PyObject* tup, Py_ssize_t i, const char* what) {
  PyObject* o = PyTuple_GET_ITEM(tup, i);
  if (!PyFloat_Check(o) && !PyLong_Check(o)) throw BadArg{std::string(what) + " must be a float"};
  return PyFloat_AsDouble(o);
}

at::Tensor decoder_layer(PyObject* args) {
  if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 7)
    throw BadArg{"decoder_layer takes (h, x, layer, step, k_pool, v_pool, next_ln)"};
  at::Tensor h = tensor_at(args, 0, "h");
  const at::Tensor x = tensor_at(args, 1, "x");
  PyObject* L = PyTuple_GET_ITEM(args, 2);
  PyObject* S = PyTuple_GET_ITEM(args, 3);
  if (!PyTuple_Check(L) || PyTuple_GET_SIZE(L) != kLayerArgs)
    throw BadArg{"layer must be a tuple of " + std::to_string(kLayerArgs) + " items"};
  if (!PyTuple_Check(S) || PyTuple_GET_SIZE(S) != kStepArgs)
    throw BadArg{"step must be a tuple of " + std::to_string(kStepArgs) + " items"};
  at::Tensor k_pool = tensor_at(args, 4, "k_pool");
  at::Tensor v_pool = tensor_at(args, 5, "v_pool");
  const c10::optional<at::Tensor> next_ln = opt_tensor_at(args, 6, "next_ln");

  const int64_t Hq = int_at(S, 15, "num_heads"), Hkv = int_at(S, 16, "num_kv_heads"), D = int_at(S, 17, "head_dim");
  const double eps = float_at(S, 18, "eps");
  const int64_t T = x.size(0);

  const at::Tensor qkv = linear_packed_cpu(x, tensor_at(L, 0, "qkv_w"), opt_tensor_at(L, 1, "qkv_b"),
                                           int_at(L, 2, "qkv_n"));
  auto [q, k, v] = qkv_prep_cpu(qkv, opt_tensor_at(L, 3, "q_norm"), opt_tensor_at(L, 4, "k_norm"),
                                tensor_at(S, 0, "cos"), tensor_at(S, 1, "sin"), tensor_at(S, 2, "positions"), Hq,
                                Hkv, D, eps);
  append_kv(k_pool, v_pool, k, v, tensor_at(S, 3, "slots"));
  const at::Tensor o = segment_attention(
      q, k_pool, v_pool, tensor_at(S, 4, "kv_indptr"), tensor_at(S, 5, "kv_page_ids"), tensor_at(S, 6, "kv_len"),
      tensor_at(S, 7, "q_indptr"), tensor_at(S, 8, "q_rows"), tensor_at(S, 9, "shift"),
      tensor_at(S, 10, "causal_limit"), tensor_at(S, 11, "merge_indptr"), tensor_at(S, 12, "merge_entries"),
      tensor_at(S, 13, "inv_freq"), float_at(S, 14, "scale"));
  const at::Tensor attn_out = linear_packed_cpu(o.reshape({T, Hq * D}), tensor_at(L, 5, "o_w"),
                                                opt_tensor_at(L, 6, "o_b"), int_at(L, 7, "o_n"));
  const at::Tensor xn = add_rms_norm_cpu(h, attn_out, tensor_at(L, 8, "ln2"), eps);
  const at::Tensor gu = linear_packed_cpu(xn, tensor_at(L, 9, "gate_up_w"), opt_tensor_at(L, 10, "gate_up_b"),
                                          int_at(L, 11, "gate_up_n"));
  const at::Tensor mlp = linear_packed_cpu(silu_mul_cpu(gu), tensor_at(L, 12, "down_w"),
                                           opt_tensor_at(L, 13, "down_b"), int_at(L, 14, "down_n"));
  if (next_ln.has_value()) return add_rms_norm_cpu(h, mlp, *next_ln, eps);
  h.add_(mlp);
  return h;
}

}  // namespace

PyObject* decoder_layer_py(PyObject* /*self*/, PyObject* args) {
  try {
    at::Tensor out = decoder_layer(args);
    return THPVariable_Wrap(std::move(out));
  } catch (const BadArg& e) {
    PyErr_SetString(PyExc_TypeError, ("decoder_layer: " + e.what).c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

}  // namespace loom
