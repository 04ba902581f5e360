// Framework-free attention math for the CPU kernels. (__host__ __device__ under nvcc, but no
// CUDA source of engine._C includes it: the GPU attention is triton_kernels/. The online
// softmax, merge_state and rope_rotate below are the scalar forms of what the CPU kernels do
// vectorised, kept for a CUDA kernel to reuse: tests/test_attn_math.py checks them against
// torch, and .ci/check_cuda.sh compiles them as device code, tests/csrc/attn_math_device.cu.)
//
// Everything here works on one float32 vector at a time and uses the natural log
// throughout: a partial softmax state is (o, lse) with o already normalised and
// lse = log(sum_k exp(s_k)). Functions are `static inline` on purpose: the CPU kernel
// is compiled several times with different instruction sets (see attn_cpu_*.cpp), and
// internal linkage keeps one translation unit's AVX-512 copy from being picked by the
// linker for another's baseline code.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define LOOM_HOST_DEVICE __host__ __device__
#else
#define LOOM_HOST_DEVICE
#endif
#define LOOM_INLINE static inline LOOM_HOST_DEVICE

namespace loom {

// Running state of an online softmax over a stream of scores s_k:
//   m = max_k s_k, l = sum_k exp(s_k - m), acc = sum_k exp(s_k - m) * v_k.
struct OnlineSoftmax {
  float m;
  float l;
};

LOOM_INLINE OnlineSoftmax online_softmax_init() { return OnlineSoftmax{-INFINITY, 0.f}; }

// Moves the state to the new running max max(m, tile_max) and returns the factor the
// accumulator must be multiplied by. A state that has seen only -inf scores keeps
// factor 1 (nothing to rescale) instead of exp(-inf - -inf) = NaN.
LOOM_INLINE float online_softmax_rescale(OnlineSoftmax& st, float tile_max) {
  const float m_new = fmaxf(st.m, tile_max);
  const float alpha = (m_new == -INFINITY) ? 1.f : expf(st.m - m_new);
  st.l *= alpha;
  st.m = m_new;
  return alpha;
}

// Weight of score s under the current running max (0 for a masked score).
LOOM_INLINE float online_softmax_weight(const OnlineSoftmax& st, float s) {
  return (st.m == -INFINITY) ? 0.f : expf(s - st.m);
}

// One score and its value row folded into the state: acc[D] is rescaled in place.
LOOM_INLINE void online_softmax_update(OnlineSoftmax& st, float* acc, const float* v, int D, float s) {
  const float alpha = online_softmax_rescale(st, s);
  const float p = online_softmax_weight(st, s);
  st.l += p;
  for (int d = 0; d < D; ++d) acc[d] = acc[d] * alpha + p * v[d];
}

// Final (o, lse) of a state: o = acc / l; lse = m + log(l), -inf (and o = 0) if no key was seen.
LOOM_INLINE float online_softmax_finish(const OnlineSoftmax& st, float* acc, int D) {
  if (!(st.l > 0.f)) {
    for (int d = 0; d < D; ++d) acc[d] = 0.f;
    return -INFINITY;
  }
  const float inv = 1.f / st.l;
  for (int d = 0; d < D; ++d) acc[d] *= inv;
  return st.m + logf(st.l);
}

// Merges state (o_b, lse_b) into (o_a, lse_a): lse = log(e^a + e^b),
// o = (o_a e^a + o_b e^b) / e^lse, computed relative to max(a, b).
LOOM_INLINE void merge_state(float* o_a, float& lse_a, const float* o_b, float lse_b, int D) {
  const float mx = fmaxf(lse_a, lse_b);
  if (mx == -INFINITY) return;  // both empty: stays empty
  const float wa = expf(lse_a - mx), wb = expf(lse_b - mx);
  const float inv = 1.f / (wa + wb);
  for (int d = 0; d < D; ++d) o_a[d] = (o_a[d] * wa + o_b[d] * wb) * inv;
  lse_a = mx + logf(wa + wb);
}

// Rotate-half RoPE (Hugging Face Llama convention, pairs (i, i + D/2)) of x[D] by the
// angles pos * inv_freq[i]; out may alias x. The angle is one float32 product, as in
// the torch reference, so both sides take cos/sin of the same float.
LOOM_INLINE void rope_rotate(const float* x, float* out, int D, float pos, const float* inv_freq) {
  const int h = D / 2;
  for (int i = 0; i < h; ++i) {
    const float ang = pos * inv_freq[i];
    const float c = cosf(ang), s = sinf(ang);
    const float x1 = x[i], x2 = x[i + h];
    out[i] = x1 * c - x2 * s;
    out[i + h] = x2 * c + x1 * s;
  }
}

// The same rotation with precomputed cos/sin tables of length D/2.
LOOM_INLINE void rope_rotate_cs(const float* x, float* out, int D, const float* cs, const float* sn) {
  const int h = D / 2;
  for (int i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    out[i] = x1 * cs[i] - x2 * sn[i];
    out[i + h] = x2 * cs[i] + x1 * sn[i];
  }
}

LOOM_INLINE float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

LOOM_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x) in branch-free float arithmetic so that loops over it vectorise (libm's expf
// does not without -ffast-math). x = n ln2 + r with |r| <= ln2/2, exp(r) by its
// degree-7 Taylor polynomial (truncation < 6e-9 relative), 2^n built in the exponent
// bits. Inputs below -87 give exactly 0 (so exp(-inf) = 0); inputs above 88 saturate.
LOOM_INLINE float exp_approx(float x) {
  const float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float t = xc * 1.4426950408889634f;
  // Adding 1.5 * 2^23 rounds t to an integer n held in the low mantissa bits.
  const float shifter = 12582912.f;
  const float tn = t + shifter;
  const float n = tn - shifter;
  // Cody-Waite: ln2 split in a short head (n * hi is exact) and a tail.
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const uint32_t ni = float_to_bits(tn) - float_to_bits(shifter);  // n as two's complement
  const float scale = bits_to_float((ni + 127u) << 23);
  const float y = p * scale;
  return x < -87.f ? 0.f : y;
}

// bfloat16 / IEEE half bit patterns to float (exact), without any framework type.
LOOM_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

LOOM_INLINE float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Shifting exponent+mantissa into float position and multiplying by 2^112 rebiases
  // the exponent (15 -> 127) and handles half subnormals exactly.
  const float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  const uint32_t infnan = (em << 13) | 0x7f800000u;
  const uint32_t bits = (em >= 0x7c00u) ? infnan : float_to_bits(mag);
  return bits_to_float(bits | sign);
}

// float to bfloat16 / IEEE half bits, rounded to nearest even (as torch's .to(): NaN
// stays a quiet NaN, overflow gives infinity, half subnormals are rounded, not flushed).
LOOM_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

LOOM_INLINE uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00u | ((a >> 13) & 0x3ffu);  // quiet NaN, payload's top bits
  } else if (a >= 0x477ff000u) {
    h = 0x7c00u;  // >= 65520 (and infinity): rounds past the largest half
  } else if (a < 0x38800000u) {
    // Below 2^-14: a half subnormal. Adding 0.5 puts the value's 2^-24 units in the low
    // mantissa bits, rounded to nearest even by the float addition itself.
    h = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  } else {
    // Rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
    h = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  }
  return static_cast<uint16_t>(h | sign);
}

}  // namespace loom
