// C entry points to csrc/include/loom/attn_math.h's scalar math, for tests/test_attn_math.py
// (built there with the system C++ compiler and loaded with ctypes: no torch involved).
#include "loom/attn_math.h"

extern "C" {

// Online softmax over K scores s[K] of value rows v[K][D]: o[D] and lse as the kernels
// finish them (o = 0, lse = -inf when every score is -inf).
void loom_online_softmax(const float* s, const float* v, int K, int D, float* o, float* lse) {
  loom::OnlineSoftmax st = loom::online_softmax_init();
  for (int d = 0; d < D; ++d) o[d] = 0.f;
  for (int k = 0; k < K; ++k) loom::online_softmax_update(st, o, v + static_cast<long>(k) * D, D, s[k]);
  *lse = loom::online_softmax_finish(st, o, D);
}

// (o_a, lse_a) <- merge of (o_a, lse_a) and (o_b, lse_b).
void loom_merge_state(float* o_a, float* lse_a, const float* o_b, float lse_b, int D) {
  loom::merge_state(o_a, *lse_a, o_b, lse_b, D);
}

// Rotate-half RoPE of x[D] at position pos, from inv_freq[D/2] and from cos / sin tables.
void loom_rope_rotate(const float* x, float* out, int D, float pos, const float* inv_freq) {
  loom::rope_rotate(x, out, D, pos, inv_freq);
}

void loom_rope_rotate_cs(const float* x, float* out, int D, const float* cs, const float* sn) {
  loom::rope_rotate_cs(x, out, D, cs, sn);
}

}  // extern "C"
