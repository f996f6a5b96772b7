// The DiT's block-window attention with its rotary embedding as one CPU kernel (window_attention.h).
#include <cstdint>

#include "tensors.h"
#include "window_attention.h"

// MindSpore's AOT custom-op entry. Inputs: q, k, v (B, T, H * D) float32 as projected, or their
// (B * T, H * D) rows, without their biases; the biases of q, k, v (H * D,); cos, sin
// (H, T, D) float32, each head's rotary table (dit.py's rotation_tables: the heads after the first
// get cos 1, sin 0, which leave them as they are); keys (blocks * width,) int32, the key frame of
// each window slot; valid ([B,] blocks, size, width) bool, which slots a query frame sees (per batch
// row when 4-dimensional); scale (1,) float32. Output like q.
extern "C" int WindowAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  native::Window window;
  if (nparam != 12 || (ndims[0] != 2 && ndims[0] != 3) || ndims[1] != ndims[0] || ndims[2] != ndims[0] ||
      ndims[6] != 3 || !native::window_input(params, ndims, shapes, 8, &window))
    return 1;
  const int64_t frames = shapes[6][1], heads = shapes[6][0], dim = shapes[6][2];
  const int64_t batch = native::count(ndims[0], shapes[0]) / (frames * heads * dim);  // q may come as rows
  native::window_attention(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                           static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                           static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
                           static_cast<const float *>(params[6]), static_cast<const float *>(params[7]), window,
                           *static_cast<const float *>(params[10]), batch, frames, heads, dim,
                           static_cast<float *>(params[11]));
  return 0;
}
