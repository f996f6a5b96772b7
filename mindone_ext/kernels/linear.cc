// The CPU's large linear layers, x @ weight^T (+ bias), through oneDNN's sgemm on column slices of
// the output, one per core (sgemm.h; nn/native_linear.py says where it is used and what it measured).
#include <cstdint>

#include "sgemm.h"
#include "tensors.h"

namespace {

// Inputs: x (rows, in), weight (out, in)[, bias (out,)]; output (rows, out).
int linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool biased) {
  const int inputs = biased ? 3 : 2;
  if (nparam != inputs + 1 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1] ||
      (biased && (ndims[2] != 1 || shapes[2][0] != shapes[1][0])) || !native::float32(dtypes, inputs))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float *bias = biased ? static_cast<const float *>(params[2]) : nullptr;
  float *out = static_cast<float *>(params[inputs]);
  return native::linear_rows(x, shapes[0][0], shapes[0][1], weight, shapes[1][0], bias, out);  // a slice per thread
}

}  // namespace

extern "C" int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  return linear(nparam, params, ndims, shapes, dtypes, false);
}

extern "C" int LinearBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  return linear(nparam, params, ndims, shapes, dtypes, true);
}
