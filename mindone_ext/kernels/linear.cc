// The CPU's large linear layers, x @ weight^T (+ bias), through oneDNN's sgemm: the library
// MindSpore's CPU backend ships (mindspore/lib/libdnnl.so.2) and its MatMul runs, called here
// directly on column slices of the output, one per core (nn/native_linear.py says where it is
// used and what it measured). The slices depend only on the weight's shape and the cores.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "tensors.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

const int64_t SLICE_ALIGN = 16;  // columns: one AVX-512 register of float32

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
  const int64_t rows = shapes[0][0], in = shapes[0][1], outs = shapes[1][0];
  const int64_t cores = native::usable_cores();
  const int64_t width = std::max(SLICE_ALIGN, (outs / cores + SLICE_ALIGN - 1) / SLICE_ALIGN * SLICE_ALIGN);
  const int64_t slices = (outs + width - 1) / width;
  std::vector<int> status(slices, 0);
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const int64_t lo = s * width, hi = std::min(outs, lo + width);
      status[s] = dnnl_sgemm('N', 'T', rows, hi - lo, in, 1.f, x, in, weight + lo * in, in, 0.f, out + lo, outs);
      if (bias != nullptr)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = lo; c < hi; ++c) out[r * outs + c] += bias[c];
    }
  };
  native::parallel_ranges(slices, slices, 1, run);  // a slice per thread
  return std::any_of(status.begin(), status.end(), [](int s) { return s != 0; }) ? 1 : 0;
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
