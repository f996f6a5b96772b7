// What the native kernels (kernels/*.cc) share about their tensors: checking dtypes, counting
// values, and a row's layer-norm statistics.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace native {

// Whether the first `n` inputs are float32 (a kernel given another dtype fails rather than misread it).
inline bool float32(const char **dtypes, int n) {
  for (int i = 0; i < n; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

inline int64_t count(int ndims, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndims; ++i) n *= shape[i];
  return n;
}

// A row's mean and 1 / sqrt(variance + eps), accumulated in double.
inline void row_moments(const float *x, int64_t dim, double eps, float *mean, float *inverse) {
  double sum = 0.0;
  for (int64_t d = 0; d < dim; ++d) sum += x[d];
  const double m = sum / dim;
  double squares = 0.0;
  for (int64_t d = 0; d < dim; ++d) squares += (x[d] - m) * (x[d] - m);
  *mean = static_cast<float>(m);
  *inverse = static_cast<float>(1.0 / std::sqrt(squares / dim + eps));
}

}  // namespace native
