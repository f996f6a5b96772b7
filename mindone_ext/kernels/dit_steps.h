// The DiT block's element-wise steps, one row of `dim` values each, shared by their own kernels
// (dit_modulation.cc) and the whole block's (dit_block.cc): the AdaLN-zero modulated layer norm,
// LayerNorm(x) * (1 + scale) + shift; the gated residual, x + gate * (y + bias); and GELU's tanh
// form of x + bias, as nn/ops.py's exact_gelu computes it: h sigmoid(h (c + c 0.044715 h h)),
// c = 2 sqrt(2 / pi). The biases are those of the projections before them.
#pragma once
#include <cmath>
#include <cstdint>

#include "exp.h"
#include "tensors.h"

namespace native {

const double DIT_NORM_EPS = 1e-6;  // the reference's LayerNorm epsilon

inline void modulated_norm_row(const float *x, const float *scale, const float *shift, int64_t dim, float *out) {
  float m, inv;
  row_moments(x, dim, DIT_NORM_EPS, &m, &inv);
  for (int64_t d = 0; d < dim; ++d) out[d] = (x[d] - m) * inv * (1.f + scale[d]) + shift[d];
}

inline void gated_residual_row(const float *x, const float *gate, const float *y, const float *bias, int64_t dim,
                               float *out) {
  for (int64_t d = 0; d < dim; ++d) out[d] = x[d] + gate[d] * (y[d] + bias[d]);
}

inline void gelu_tanh_row(const float *x, const float *bias, int64_t dim, float *out) {
  const double c = 2.0 * std::sqrt(2.0 / M_PI);
  const float scale = static_cast<float>(c), cubic = static_cast<float>(c * 0.044715);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    const float h = x[d] + bias[d], u = h * (scale + cubic * h * h);
    out[d] = h * sigmoid(u);
  }
}

}  // namespace native
