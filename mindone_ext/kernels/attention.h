// One query's attention for the native kernels (shared by kernels/*.cc): its scores over `count`
// keys (masked keys at float32's lowest value, as MindSpore's ops mask them: a query that sees
// no key attends to all evenly, finite), their softmax and the weighted sum of the values.
// key(j) and value(j) give the j-th key's and value's `dim` floats wherever they lie.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "exp.h"

namespace native {

template <typename Key, typename Value>
void attend_query(const float *q, int64_t dim, int64_t count, const bool *seen, float scale, Key key, Value value,
                  float *scores, float *out) {
  float top = -FLT_MAX;
  for (int64_t j = 0; j < count; ++j) {
    float score = -FLT_MAX;
    if (seen[j]) {
      const float *kj = key(j);
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += q[d] * kj[d];
      score = dot * scale;
    }
    scores[j] = score;
    top = std::max(top, score);
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < count; ++j) {
    scores[j] = exp_nonpositive(scores[j] - top);
    sum += scores[j];
  }
  std::fill(out, out + dim, 0.f);
  for (int64_t j = 0; j < count; ++j) {
    const float w = scores[j] / sum, *vj = value(j);
    for (int64_t d = 0; d < dim; ++d) out[d] += w * vj[d];
  }
}

}  // namespace native
