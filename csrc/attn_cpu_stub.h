// Placeholder for an instruction-set build that this compiler / architecture lacks:
// compiled() is false, so the dispatcher never calls the entry points.
#pragma once

#include <stdlib.h>

#define LOOM_ISA_STUB(isa)                                                                       \
  namespace loom {                                                                               \
  namespace cpu {                                                                                \
  namespace isa {                                                                                \
  bool segment_attention(const AttnArgs&, const ScheduleView&, float*, float*) { abort(); }     \
  void merge_states(const float*, const float*, int64_t, int64_t, const int32_t*, const int32_t*, \
                    int64_t, float*, int) {                                                      \
    abort();                                                                                     \
  }                                                                                              \
  bool compiled() { return false; }                                                              \
  }                                                                                              \
  }                                                                                              \
  }
