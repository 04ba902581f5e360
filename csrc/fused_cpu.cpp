// Fused element-wise steps of the decoder layer for the CPU, float32 or bfloat16.
//
// Why: in a decode step the model runs a few rows through ~50 small ATen ops per
// layer (RMSNorm alone is six); at a few microseconds of dispatch each they cost more
// than the layer's attention. These ops do the same math in one pass each:
//   rms_norm        y = w * (x / sqrt(mean(x^2) + eps))
//   add_rms_norm    h += r (in place), then rms_norm(h)      (residual + next norm)
//   qkv_prep        split the fused qkv rows, optional q/k RMSNorm per head, RoPE
//                   (rotate-half) at each row's position from cos/sin tables
//   silu_mul        silu(gate) * up from the fused gate_up rows
// Semantics follow the Hugging Face Llama-family code: statistics in float32, and in
// bfloat16 a rounding to bfloat16 wherever the ATen ops of that code produce a
// bfloat16 tensor (the norm before its weight, each RoPE product, the SiLU before the
// gate product), so that the fused model computes what the unfused one does. Rows are
// split across threads only when there are many (prefill): for a few decode rows a
// parallel region costs more than the work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "ops.h"

namespace loom {
namespace {

// Element type: load as float, store rounded; rnd = the rounding of a stored value.
template <class T> struct Num;
template <> struct Num<float> {
  static inline float ld(float x) { return x; }
  static inline float st(float x) { return x; }
  static inline float rnd(float x) { return x; }
};
template <> struct Num<at::BFloat16> {
  static inline float ld(at::BFloat16 x) { return static_cast<float>(x); }
  static inline at::BFloat16 st(float x) { return at::BFloat16(x); }  // round to nearest even
  static inline float rnd(float x) { return static_cast<float>(at::BFloat16(x)); }
};

inline int64_t grain_for(int64_t row_elems) {
  // ~32k elements per task: below that one thread does everything (rows of no elements: any)
  if (row_elems <= 0) return 1;
  return std::max<int64_t>(1, (32768 + row_elems - 1) / row_elems);
}

// y = w * round(x / rms(x)), all as floats (y is rounded by the caller when stored).
template <class T>
inline __attribute__((always_inline)) void norm_row(const T* __restrict x, const T* __restrict w,
                                                    float* __restrict y, int64_t D, float eps) {
  using N = Num<T>;
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) ss += N::ld(x[i]) * N::ld(x[i]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) y[i] = N::ld(w[i]) * N::rnd(N::ld(x[i]) * inv);
}

template <class T>
inline __attribute__((always_inline)) void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = Num<T>::st(src[i]);
}

constexpr int64_t kMaxRow = 16384;  // features per row the fused norms handle on the stack

void check_cpu(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " is ", t.scalar_type(), ", expected ", dtype,
              " like the other inputs");
}

// Calls f with a value of the element type (float or at::BFloat16).
template <class F>
inline void dispatch(at::ScalarType dt, F&& f) {
  if (dt == at::kBFloat16)
    f(at::BFloat16());
  else
    f(0.f);
}

// Rows [r0, r1) of y = rms_norm(h (+ r)) * w; with r, h += r first, in place.
template <class T>
inline __attribute__((always_inline)) void norm_rows_t(T* h, const T* r, const T* w, T* y, int64_t r0, int64_t r1,
                                                       int64_t D, float eps) {
  using N = Num<T>;
  float buf[kMaxRow];
  for (int64_t i = r0; i < r1; ++i) {
    T* hr = h + i * D;
    if (r != nullptr) {
      const T* rr = r + i * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) hr[j] = N::st(N::ld(hr[j]) + N::ld(rr[j]));
    }
    norm_row(hr, w, buf, D, eps);
    store_row(buf, y + i * D, D);
  }
}

// (Per instruction set, like silu_mul_rows: the loops vectorise 16 wide on AVX-512.)
LOOM_CLONES void norm_rows_range(float* h, const float* r, const float* w, float* y, int64_t r0, int64_t r1,
                                 int64_t D, float eps) {
  norm_rows_t(h, r, w, y, r0, r1, D, eps);
}

LOOM_CLONES void norm_rows_range(at::BFloat16* h, const at::BFloat16* r, const at::BFloat16* w, at::BFloat16* y,
                                 int64_t r0, int64_t r1, int64_t D, float eps) {
  norm_rows_t(h, r, w, y, r0, r1, D, eps);
}

template <class T>
void norm_rows(T* h, const T* r, const T* w, T* y, int64_t R, int64_t D, float eps) {
  at::parallel_for(0, R, grain_for(D),
                   [&](int64_t r0, int64_t r1) { norm_rows_range(h, r, w, y, r0, r1, D, eps); });
}

// Checks shared by the norms; returns the number of features.
int64_t check_norm(const char* op, const at::Tensor& x, const at::Tensor& w) {
  check_cpu(x, op, "x", x.scalar_type());
  check_cpu(w, op, "w", x.scalar_type());
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D, op, ": weight has shape ", w.sizes(), ", x has ", D, " features");
  TORCH_CHECK(D <= kMaxRow, op, ": at most ", kMaxRow, " features, got ", D);
  return D;
}

// One head row: optional RMSNorm (rounded as stored), then rotate-half RoPE with
// cos/sin [D/2], each product and the sum rounded as the ATen ops round them.
template <class T>
inline __attribute__((always_inline)) void prep_head(const T* __restrict x, const T* __restrict nw,
                                                     const T* __restrict c, const T* __restrict s, T* __restrict y,
                                                     int64_t D, float eps) {
  using N = Num<T>;
  const int64_t h = D / 2;
  float buf[1024];
  if (nw != nullptr) {
    norm_row(x, nw, buf, D, eps);
    for (int64_t i = 0; i < D; ++i) buf[i] = N::rnd(buf[i]);
  } else {
    for (int64_t i = 0; i < D; ++i) buf[i] = N::ld(x[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const float a = buf[i], b = buf[i + h], ci = N::ld(c[i]), si = N::ld(s[i]);
    y[i] = N::st(N::rnd(a * ci) - N::rnd(b * si));
    y[i + h] = N::st(N::rnd(b * ci) + N::rnd(a * si));
  }
}

template <class T>
struct PrepArgs {
  const T *x, *c, *s, *qn, *kn;
  T *q, *k, *v;
  const int64_t* pos;
  int64_t W, D, Hq, Hk;
  float eps;
};

// Tokens [t0, t1) of qkv_prep.
template <class T>
inline __attribute__((always_inline)) void prep_rows_t(const PrepArgs<T>& a, int64_t t0, int64_t t1) {
  const int64_t D = a.D, Hq = a.Hq, Hk = a.Hk;
  for (int64_t t = t0; t < t1; ++t) {
    const T* row = a.x + t * a.W;
    const T* c = a.c + a.pos[t] * (D / 2);
    const T* s = a.s + a.pos[t] * (D / 2);
    for (int64_t h = 0; h < Hq; ++h) prep_head(row + h * D, a.qn, c, s, a.q + (t * Hq + h) * D, D, a.eps);
    for (int64_t h = 0; h < Hk; ++h) prep_head(row + (Hq + h) * D, a.kn, c, s, a.k + (t * Hk + h) * D, D, a.eps);
    std::memcpy(a.v + t * Hk * D, row + (Hq + Hk) * D, sizeof(T) * Hk * D);
  }
}

LOOM_CLONES void prep_rows(const PrepArgs<float>& a, int64_t t0, int64_t t1) { prep_rows_t(a, t0, t1); }

LOOM_CLONES void prep_rows(const PrepArgs<at::BFloat16>& a, int64_t t0, int64_t t1) { prep_rows_t(a, t0, t1); }

// exp(x) for float32 in a form the compiler vectorises (std::exp is a scalar libm call):
// Cephes' range reduction x = n ln2 + r and degree-6 polynomial, about 1 ulp. Above
// ~88.38 it gives +inf (n = 128: the exponent field all ones), so that SiLU of a very
// negative gate is -0 and of -inf NaN, as torch's (a finite cap made silu(-1e38) -0.42).
static inline __attribute__((always_inline)) float vexp(float x) {
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.5f ? 88.5f : x;  // (n = floor(88.5 log2(e) + 0.5) = 128 at most)
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  return y * __builtin_bit_cast(float, bits);
}

template <class T>
inline __attribute__((always_inline)) void silu_mul_rows_t(const T* xp, T* yp, int64_t r0, int64_t r1, int64_t I) {
  using N = Num<T>;
  // Two passes per chunk (1 + exp(-g), then the quotient): in one fused loop GCC 12
  // if-converts vexp's input clamps into masked divisions that ran ~10x slower
  // (13 cycles per element) on an Intel Xeon.
  constexpr int64_t kChunk = 256;
  float t[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = xp + r * 2 * I;
    const T* u = g + I;
    T* o = yp + r * I;
    for (int64_t c = 0; c < I; c += kChunk) {
      const int64_t n = std::min(kChunk, I - c);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) t[i] = 1.f + vexp(-N::ld(g[c + i]));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[c + i] = N::st(N::rnd(N::ld(g[c + i]) / t[i]) * N::ld(u[c + i]));
    }
  }
}

LOOM_CLONES void silu_mul_rows(const float* xp, float* yp, int64_t r0, int64_t r1, int64_t I) {
  silu_mul_rows_t(xp, yp, r0, r1, I);
}

LOOM_CLONES void silu_mul_rows(const at::BFloat16* xp, at::BFloat16* yp, int64_t r0, int64_t r1, int64_t I) {
  silu_mul_rows_t(xp, yp, r0, r1, I);
}

}  // namespace

// The ops (declared in ops.h: csrc/layer_cpu.cpp calls them directly).

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t D = check_norm("rms_norm", x, w);
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    // h is only read when there is no residual
    norm_rows<scalar_t>(const_cast<scalar_t*>(xc.data_ptr<scalar_t>()), nullptr, wc.data_ptr<scalar_t>(),
                        y.data_ptr<scalar_t>(), D ? xc.numel() / D : 0, D, static_cast<float>(eps));
  });
  return y;
}

at::Tensor add_rms_norm(at::Tensor& h, const at::Tensor& r, const at::Tensor& w, double eps) {
  const int64_t D = check_norm("add_rms_norm", h, w);
  check_cpu(r, "add_rms_norm", "r", h.scalar_type());
  TORCH_CHECK(h.is_contiguous(), "add_rms_norm: h must be contiguous (it is updated in place)");
  TORCH_CHECK(r.sizes() == h.sizes(), "add_rms_norm: h ", h.sizes(), " and r ", r.sizes(), " differ");
  at::Tensor rc = r.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(h);
  dispatch(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    norm_rows<scalar_t>(h.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                        y.data_ptr<scalar_t>(), D ? h.numel() / D : 0, D, static_cast<float>(eps));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_prep(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_norm,
                                                        const c10::optional<at::Tensor>& k_norm,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        const at::Tensor& positions, int64_t num_heads,
                                                        int64_t num_kv_heads, int64_t head_dim, double eps) {
  const auto dt = qkv.scalar_type();
  check_cpu(qkv, "qkv_prep", "qkv", dt);
  check_cpu(cos, "qkv_prep", "cos", dt);
  check_cpu(sin, "qkv_prep", "sin", dt);
  const int64_t D = head_dim, Hq = num_heads, Hk = num_kv_heads;
  TORCH_CHECK(D > 0 && D % 2 == 0 && D <= 1024, "qkv_prep: head_dim must be even and <= 1024, got ", D);
  TORCH_CHECK(Hq > 0 && Hk > 0 && Hq % Hk == 0, "qkv_prep: num_heads (", Hq, ") must be a positive multiple of "
              "num_kv_heads (", Hk, ")");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (Hq + 2 * Hk) * D, "qkv_prep: qkv must be [T, (", Hq, " + 2 x ",
              Hk, ") x ", D, "], got ", qkv.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D / 2 && sin.sizes() == cos.sizes(),
              "qkv_prep: cos/sin tables must be [positions, head_dim / 2], got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == qkv.size(0),
              "qkv_prep: positions must be int64 [T]");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "qkv_prep: give both q_norm and k_norm or neither");
  at::Tensor qnc, knc;
  if (q_norm.has_value()) {
    check_cpu(*q_norm, "qkv_prep", "q_norm", dt);
    check_cpu(*k_norm, "qkv_prep", "k_norm", dt);
    TORCH_CHECK(q_norm->numel() == D && k_norm->numel() == D, "qkv_prep: q/k norm weights must have head_dim=",
                D, " elements");
    qnc = q_norm->contiguous();
    knc = k_norm->contiguous();
  }
  at::Tensor x = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor pos = positions.contiguous();
  const int64_t T = x.size(0), P = cc.size(0);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "qkv_prep: position ", pp[t], " is outside the rotary tables (", P,
                " positions)");
  at::Tensor q = at::empty({T, Hq, D}, x.options());
  at::Tensor k = at::empty({T, Hk, D}, x.options());
  at::Tensor v = at::empty({T, Hk, D}, x.options());
  const int64_t W = (Hq + 2 * Hk) * D;
  const float e = static_cast<float>(eps);
  dispatch(dt, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cc.data_ptr<scalar_t>();
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    const scalar_t* qn = qnc.defined() ? qnc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* kn = knc.defined() ? knc.data_ptr<scalar_t>() : nullptr;
    scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const PrepArgs<scalar_t> pa{xp, cp, sp, qn, kn, qp, kp, vp, pp, W, D, Hq, Hk, e};
    at::parallel_for(0, T, grain_for(W), [&](int64_t t0, int64_t t1) { prep_rows(pa, t0, t1); });
  });
  return {q, k, v};
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_cpu(gu, "silu_mul", "gate_up", gu.scalar_type());
  TORCH_CHECK(gu.size(-1) % 2 == 0, "silu_mul: the last dimension (gate | up) must be even, got ", gu.size(-1));
  at::Tensor x = gu.contiguous();
  const int64_t I = x.size(-1) / 2, R = I ? x.numel() / (2 * I) : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = I;
  at::Tensor y = at::empty(sizes, x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_for(2 * I), [&](int64_t r0, int64_t r1) { silu_mul_rows(xp, yp, r0, r1, I); });
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) h, Tensor r, Tensor w, float eps) -> Tensor");
  m.def("qkv_prep(Tensor qkv, Tensor? q_norm, Tensor? k_norm, Tensor cos, Tensor sin, Tensor positions, "
        "int num_heads, int num_kv_heads, int head_dim, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("qkv_prep", &qkv_prep);
  m.impl("silu_mul", &silu_mul);
}

}  // namespace loom
