// Compile check (.ci/check_cuda.sh, nvcc -arch=sm_90): csrc/include/loom/attn_math.h's online
// softmax, state merge and rotation called from device code, as a CUDA kernel would reuse
// them. Not built into engine._C and never launched here (no GPU).
#include "loom/attn_math.h"

// One thread per row: the online softmax of its K scores over V, rotated query unused
// beyond the first element, merged with a second state.
__global__ void attn_math_device_check(const float* s, const float* v, const float* q, const float* inv_freq,
                                       float* o, float* lse, float* q_rot, int K, int D, float pos) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  float* acc = o + static_cast<long>(row) * D;
  loom::OnlineSoftmax st = loom::online_softmax_init();
  for (int k = 0; k < K; ++k) loom::online_softmax_update(st, acc, v + static_cast<long>(k) * D, D, s[row * K + k]);
  float l = loom::online_softmax_finish(st, acc, D);
  loom::merge_state(acc, l, v, loom::exp_approx(s[row]), D);
  lse[row] = l;
  loom::rope_rotate(q + static_cast<long>(row) * D, q_rot + static_cast<long>(row) * D, D, pos, inv_freq);
  q_rot[row] += loom::bf16_to_float(loom::float_to_bf16(l)) + loom::f16_to_float(loom::float_to_f16(l));
}
