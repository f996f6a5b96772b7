// The DiT's block-window attention (dit.py's window_attention) as one CPU kernel: per query frame,
// the scores over its window's key slots (masked slots at float32's lowest value, as the ops do),
// their softmax and the weighted values, without the ops' gathered copies of the keys and values,
// their padding of the queries to whole blocks, or the ~16 kernels the chain takes.
#include <cstdint>
#include <vector>

#include "attention.h"
#include "parallel.h"

namespace {

const int64_t WORK_PER_THREAD = 1 << 16;  // query-key products below which a thread costs more than it saves

}  // namespace

// MindSpore's AOT custom-op entry. Inputs: q, k, v (B, H, T, D) float32; keys (blocks * width,)
// int32, the key frame of each window slot; valid ([B,] blocks, size, width) bool, which slots a
// query frame sees (per batch row when 4-dimensional); scale (1,) float32. Output (B, T, H * D).
extern "C" int WindowAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 7 || ndims[0] != 4 || (ndims[4] != 3 && ndims[4] != 4)) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const int32_t *keys = static_cast<const int32_t *>(params[3]);
  const bool *valid = static_cast<const bool *>(params[4]);
  const float scale = *static_cast<const float *>(params[5]);
  float *out = static_cast<float *>(params[6]);
  const int64_t batch = shapes[0][0], heads = shapes[0][1], frames = shapes[0][2], dim = shapes[0][3];
  const int rank = ndims[4];
  const int64_t size = shapes[4][rank - 2], width = shapes[4][rank - 1];
  const int64_t row_mask = rank == 4 ? shapes[4][1] * size * width : 0;  // mask values per batch row
  auto run = [&](int64_t first, int64_t last) {  // (batch row, head) pairs first..last
    std::vector<float> p(width);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      const float *qs = q + pair * frames * dim, *ks = k + pair * frames * dim, *vs = v + pair * frames * dim;
      for (int64_t t = 0; t < frames; ++t) {
        const int64_t block = t / size;
        const bool *seen = valid + b * row_mask + t * width;  // (block, t % size) of the mask
        const int32_t *slots = keys + block * width;
        float *o = out + (b * frames + t) * heads * dim + h * dim;
        native::attend_query(
            qs + t * dim, dim, width, seen, scale, [&](int64_t j) { return ks + static_cast<int64_t>(slots[j]) * dim; },
            [&](int64_t j) { return vs + static_cast<int64_t>(slots[j]) * dim; }, p.data(), o);
      }
    }
  };
  const int64_t pairs = batch * heads;
  native::parallel_ranges(pairs, pairs * frames * width * dim, WORK_PER_THREAD, run);
  return 0;
}
