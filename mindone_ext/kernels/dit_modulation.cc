// The DiT block's element-wise steps around its attention and MLP (dit.py's modulated_norm,
// gated_residual and gelu_tanh) as CPU kernels: the AdaLN-zero modulated layer norm,
// LayerNorm(x) * (1 + scale) + shift, the gated residual, x + gate * (y + bias), and GELU's tanh
// form of x + bias, each one pass over the frames where MindSpore ran 6, 4 and 7 kernels (its
// LayerNorm alone took ~70 us over the tiny checkpoint's 400 x 32 values). The biases are those of
// the projections before them, which the graphs then compute without.
// scale, shift and gate hold one row per batch row, or one row for every batch row.
#include <cstdint>

#include "dit_steps.h"
#include "parallel.h"
#include "tensors.h"

namespace {

// values below which a thread costs more than it saves: a gated residual's value is a multiply-add,
// a normalised or GELU value several times that (16 answers' 32 guided rows of 48 frames, 49k values
// at the tiny checkpoint's width, ran its norms on one thread at 1 << 16)
const int64_t SUM_VALUES_PER_THREAD = 1 << 16;
const int64_t VALUES_PER_THREAD = 1 << 14;

// The frames of each batch row when x (B, T, D), or its (B * T, D) rows, has `rows` rows and the
// per-row values (scale, shift, gate) `per_row` (B, D) or (1, D), shared by all.
int64_t frames_of(int64_t rows, int64_t **shapes, int per_row) {
  return shapes[per_row][0] == 1 ? rows : rows / shapes[per_row][0];
}

}  // namespace

// Inputs: x (B, T, D) float32 or its rows (B * T, D), scale (B or 1, D), shift (B or 1, D); output like x.
extern "C" int ModulatedNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 4 || (ndims[0] != 2 && ndims[0] != 3) || ndims[1] != 2 || ndims[2] != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  const float *shift = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const int64_t dim = shapes[0][ndims[0] - 1], rows = native::count(ndims[0], shapes[0]) / dim;
  const int64_t frames = frames_of(rows, shapes, 1);
  const bool shared = shapes[1][0] == 1;
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t b = shared ? 0 : r / frames;
      native::modulated_norm_row(x + r * dim, scale + b * dim, shift + b * dim, dim, out + r * dim);
    }
  };
  native::parallel_ranges(rows, rows * dim, VALUES_PER_THREAD, run);
  return 0;
}

// Inputs: x (B, T, D) float32 or its rows, gate (B or 1, D), y like x, bias (D,), y's projection's
// bias (it is added here, where the ops add it after the matmul: the same sum); output like x.
extern "C" int GatedResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 5 || (ndims[0] != 2 && ndims[0] != 3) || ndims[1] != 2 || ndims[2] != ndims[0] || ndims[3] != 1)
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gate = static_cast<const float *>(params[1]);
  const float *y = static_cast<const float *>(params[2]);
  const float *bias = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  const int64_t dim = shapes[0][ndims[0] - 1], rows = native::count(ndims[0], shapes[0]) / dim;
  const int64_t frames = frames_of(rows, shapes, 1);
  const bool shared = shapes[1][0] == 1;
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      native::gated_residual_row(x + r * dim, gate + (shared ? 0 : r / frames) * dim, y + r * dim, bias, dim,
                                 out + r * dim);
    }
  };
  native::parallel_ranges(rows, rows * dim, SUM_VALUES_PER_THREAD, run);
  return 0;
}

// GELU's tanh form of x + bias (x's projection's bias, added here as for GatedResidual).
// Inputs: x (..., D), bias (D,); output like x.
extern "C" int GeluTanh(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  if (nparam != 3 || ndims[1] != 1) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  const int64_t dim = shapes[1][0];
  const int64_t n = native::count(ndims[0], shapes[0]);
  auto run = [&](int64_t first, int64_t last) {  // rows first..last
    for (int64_t r = first; r < last; ++r) native::gelu_tanh_row(x + r * dim, bias, dim, out + r * dim);
  };
  native::parallel_ranges(n / dim, n, VALUES_PER_THREAD, run);
  return 0;
}
