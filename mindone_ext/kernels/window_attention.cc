// The DiT's block-window attention with its rotary embedding (dit.py's rotary_window_attention) as
// one CPU kernel: the projections' biases added, the queries and keys rotated, then per query frame
// the scores over its window's key slots (masked slots at float32's lowest value, as the ops do),
// their softmax and the weighted values; without the ops' head transposes, gathered copies of the
// keys and values, padding of the queries to whole blocks, or the ~33 kernels the chain takes.
#include <cstdint>
#include <vector>

#include "attention.h"
#include "parallel.h"
#include "tensors.h"

namespace {

const int64_t WORK_PER_THREAD = 1 << 16;  // query-key products below which a thread costs more than it saves

// x rotated by the interleaved pairs' cos and sin: x cos + (-x1, x0, -x3, x2, ...) sin, as the
// ops compute it (their pair rotation is a matmul whose outputs are each one input, exactly)
void rotate(const float *x, const float *cos, const float *sin, int64_t dim, float *to) {
  for (int64_t d = 0; d < dim; ++d) to[d] = x[d] * cos[d] + (d % 2 == 0 ? -x[d + 1] : x[d - 1]) * sin[d];
}

}  // namespace

// MindSpore's AOT custom-op entry. Inputs: q, k, v (B, T, H * D) float32 as projected, or their
// (B * T, H * D) rows, without their biases; the biases of q, k, v (H * D,); cos, sin
// (H, T, D) float32, each head's rotary table (dit.py's rotation_tables: the heads after the first
// get cos 1, sin 0, which leave them as they are); keys (blocks * width,) int32, the key frame of
// each window slot; valid ([B,] blocks, size, width) bool, which slots a query frame sees (per batch
// row when 4-dimensional); scale (1,) float32. Output like q.
extern "C" int WindowAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 12 || (ndims[0] != 2 && ndims[0] != 3) || ndims[1] != ndims[0] || ndims[2] != ndims[0] ||
      ndims[6] != 3 || (ndims[9] != 3 && ndims[9] != 4))
    return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *q_bias = static_cast<const float *>(params[3]);
  const float *k_bias = static_cast<const float *>(params[4]);
  const float *v_bias = static_cast<const float *>(params[5]);
  const float *cos = static_cast<const float *>(params[6]);
  const float *sin = static_cast<const float *>(params[7]);
  const int32_t *keys = static_cast<const int32_t *>(params[8]);
  const bool *valid = static_cast<const bool *>(params[9]);
  const float scale = *static_cast<const float *>(params[10]);
  float *out = static_cast<float *>(params[11]);
  const int64_t frames = shapes[6][1], heads = shapes[6][0], dim = shapes[6][2];
  const int64_t batch = native::count(ndims[0], shapes[0]) / (frames * heads * dim);  // q may come as rows
  const int rank = ndims[9];
  const int64_t size = shapes[9][rank - 2], width = shapes[9][rank - 1];
  const int64_t row_mask = rank == 4 ? shapes[9][1] * size * width : 0;  // mask values per batch row
  const int64_t pairs = batch * heads, stride = heads * dim;  // a frame's values in q, k, v
  // (B, H, T, D), every query reads them: the keys biased and rotated, the values biased
  std::vector<float> rotated_keys(pairs * frames * dim), values(pairs * frames * dim);
  native::parallel_ranges(pairs, pairs * frames * dim, WORK_PER_THREAD, [&](int64_t first, int64_t last) {
    std::vector<float> biased(dim);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      for (int64_t t = 0; t < frames; ++t) {
        const int64_t at = (b * frames + t) * stride + h * dim, to = (pair * frames + t) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          biased[d] = k[at + d] + k_bias[h * dim + d];
          values[to + d] = v[at + d] + v_bias[h * dim + d];
        }
        rotate(biased.data(), cos + (h * frames + t) * dim, sin + (h * frames + t) * dim, dim,
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
        const bool *seen = valid + b * row_mask + t * width;  // (block, t % size) of the mask
        const int32_t *slots = keys + block * width;
        const int64_t at = (b * frames + t) * stride + h * dim;
        for (int64_t d = 0; d < dim; ++d) biased[d] = q[at + d] + q_bias[h * dim + d];
        rotate(biased.data(), cos + (h * frames + t) * dim, sin + (h * frames + t) * dim, dim, qt.data());
        native::attend_query(
            qt.data(), dim, width, seen, scale, [&](int64_t j) { return ks + static_cast<int64_t>(slots[j]) * dim; },
            [&](int64_t j) { return vs + static_cast<int64_t>(slots[j]) * dim; }, p.data(), out + at);
      }
    }
  };
  native::parallel_ranges(pairs, pairs * frames * width * dim, WORK_PER_THREAD, run);
  return 0;
}
