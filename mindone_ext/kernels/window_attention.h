// The DiT's block-window attention with its rotary embedding (dit.py's rotary_window_attention),
// shared by its own kernel (window_attention.cc) and the whole DiT block's (dit_block.cc): the
// projections' biases added, the queries and keys rotated, then per query frame the scores over
// its window's key slots (masked slots at float32's lowest value, as the ops do), their softmax and
// the weighted values; without the ops' head transposes, gathered copies of the keys and values,
// padding of the queries to whole blocks, or the ~33 kernels the chain takes.
#pragma once
#include <cstdint>
#include <vector>

#include "attention.h"
#include "parallel.h"

namespace native {

// x rotated by the interleaved pairs' cos and sin: x cos + (-x1, x0, -x3, x2, ...) sin, as the
// ops compute it (their pair rotation is a matmul whose outputs are each one input, exactly)
inline void rotate_pairs(const float *x, const float *cos, const float *sin, int64_t dim, float *to) {
  for (int64_t d = 0; d < dim; ++d) to[d] = x[d] * cos[d] + (d % 2 == 0 ? -x[d + 1] : x[d - 1]) * sin[d];
}

// Which key frames each query frame sees: `keys` (blocks * width,) the key frame of each window
// slot; `valid` ([B,] blocks, size, width), with `row_mask` values per batch row (0: one mask for all).
struct Window {
  const int32_t *keys;
  const bool *valid;
  int64_t size, width, row_mask;
};

// q, k, v (batch x frames rows of heads * dim) as projected, without their biases (q_bias, k_bias,
// v_bias (heads * dim,)); cos, sin (heads, frames, dim) each head's rotary table (dit.py's
// rotation_tables) -> out, like q.
inline void window_attention(const float *q, const float *k, const float *v, const float *q_bias, const float *k_bias,
                             const float *v_bias, const float *cos, const float *sin, Window window, float scale,
                             int64_t batch, int64_t frames, int64_t heads, int64_t dim, float *out) {
  const int64_t work_per_thread = 1 << 16;  // query-key products below which a thread costs more than it saves
  const int64_t pairs = batch * heads, stride = heads * dim;  // a frame's values in q, k, v
  const int64_t size = window.size, width = window.width;
  // (B, H, T, D), every query reads them: the keys biased and rotated, the values biased
  std::vector<float> rotated_keys(pairs * frames * dim), values(pairs * frames * dim);
  parallel_ranges(pairs, pairs * frames * dim, work_per_thread, [&](int64_t first, int64_t last) {
    std::vector<float> biased(dim);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      for (int64_t t = 0; t < frames; ++t) {
        const int64_t at = (b * frames + t) * stride + h * dim, to = (pair * frames + t) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          biased[d] = k[at + d] + k_bias[h * dim + d];
          values[to + d] = v[at + d] + v_bias[h * dim + d];
        }
        rotate_pairs(biased.data(), cos + (h * frames + t) * dim, sin + (h * frames + t) * dim, dim,
                     rotated_keys.data() + to);
      }
    }
  });
  auto run = [&](int64_t first, int64_t last) {  // (batch row, head) pairs first..last
    std::vector<float> p(width), biased(dim), qt(dim);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      const float *ks = rotated_keys.data() + pair * frames * dim, *vs = values.data() + pair * frames * dim;
      for (int64_t t = 0; t < frames; ++t) {
        const int64_t block = t / size;
        const bool *seen = window.valid + b * window.row_mask + t * width;  // (block, t % size) of the mask
        const int32_t *slots = window.keys + block * width;
        const int64_t at = (b * frames + t) * stride + h * dim;
        for (int64_t d = 0; d < dim; ++d) biased[d] = q[at + d] + q_bias[h * dim + d];
        rotate_pairs(biased.data(), cos + (h * frames + t) * dim, sin + (h * frames + t) * dim, dim, qt.data());
        attend_query(
            qt.data(), dim, width, seen, scale, [&](int64_t j) { return ks + static_cast<int64_t>(slots[j]) * dim; },
            [&](int64_t j) { return vs + static_cast<int64_t>(slots[j]) * dim; }, p.data(), out + at);
      }
    }
  };
  parallel_ranges(pairs, pairs * frames * width * dim, work_per_thread, run);
}

// The Window of a kernel's keys and valid inputs (params[at], params[at + 1]); false for a mask
// neither 3- nor 4-dimensional.
inline bool window_input(void **params, int *ndims, int64_t **shapes, int at, Window *window) {
  const int rank = ndims[at + 1];
  if (rank != 3 && rank != 4) return false;
  const int64_t *shape = shapes[at + 1];
  *window = Window{static_cast<const int32_t *>(params[at]), static_cast<const bool *>(params[at + 1]),
                   shape[rank - 2], shape[rank - 1], rank == 4 ? shape[1] * shape[rank - 2] * shape[rank - 1] : 0};
  return true;
}

}  // namespace native
