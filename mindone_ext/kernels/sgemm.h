// Linear layers on rows, x @ weight^T (+ bias), through oneDNN's sgemm: the library MindSpore's CPU
// backend ships (mindspore/lib/libdnnl.so.2) and its MatMul runs, called directly on column slices of
// the output, one per core when the product is large enough to pay for the threads. Shared by the
// large linears' kernel (linear.cc) and the DiT block's (dit_block.cc); a file including this is
// built against that library (nn/native_linear.py's onednn_library).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace native {

const int64_t SLICE_ALIGN = 16;  // columns: one AVX-512 register of float32

// out (rows, outs) = x (rows, in) @ weight (outs, in)^T [+ bias (outs,)]; the slices depend only on
// the weight's shape and the cores. Below `grain` multiply-adds a call runs on one thread.
// Returns sgemm's failure, 0 for none.
inline int linear_rows(const float *x, int64_t rows, int64_t in, const float *weight, int64_t outs, const float *bias,
                       float *out, int64_t grain = 1) {
  const int64_t cores = usable_cores();
  const int64_t width = std::max(SLICE_ALIGN, (outs / cores + SLICE_ALIGN - 1) / SLICE_ALIGN * SLICE_ALIGN);
  const int64_t slices = (outs + width - 1) / width;
  std::vector<int> status(slices, 0);
  auto run = [&](int64_t first, int64_t last) {
    const int64_t lo = first * width, hi = std::min(outs, last * width);
    status[first] = dnnl_sgemm('N', 'T', rows, hi - lo, in, 1.f, x, in, weight + lo * in, in, 0.f, out + lo, outs);
    if (bias != nullptr)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = lo; c < hi; ++c) out[r * outs + c] += bias[c];
  };
  parallel_ranges(slices, rows * in * outs, grain, run);
  return std::any_of(status.begin(), status.end(), [](int s) { return s != 0; }) ? 1 : 0;
}

}  // namespace native
