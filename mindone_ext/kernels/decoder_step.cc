// A Qwen2 decoder step's chains of small ops as CPU kernels (nn/decoder_kernels.py): the RMS norm,
// the SiLU-gated unit, and a cached step's attention with its rotary embedding (a decode step's,
// a prompt piece's), which also writes the step's keys and values into the cache. On the tiny
// checkpoint a step's graph is bound by its kernel count (~15 us each to launch, ~2 us to compute;
// a loaded graph's first call ~0.3 ms each to build): these take 6, 3 and ~35 MindSpore kernels to
// 1 each.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "parallel.h"
#include "tensors.h"

namespace {

const int64_t VALUES_PER_THREAD = 1 << 16;  // below this a thread costs more than it saves

using native::count;
using native::float32;

// x + bias rotated: (x + bias) cos + rotate_half(x + bias) sin, rotate_half(y) = (-y2, y1)
void rotate_biased(const float *x, const float *bias, const float *c, const float *s, int64_t dim, float *to) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const float turned = d < half ? -(x[d + half] + bias[d + half]) : x[d - half] + bias[d - half];
    to[d] = (x[d] + bias[d]) * c[d] + turned * s[d];
  }
}

// What both cached-attention kernels take: q (B, T, H * D) or its (B * T, H * D) rows, k and v (B,
// T, KV * D) or their rows, as projected, without their biases; the biases of q (H * D,), k and v
// (KV * D,); cos, sin (B, T, D) (which tell B and T); the layer's key and value buffers (rows x KV x
// slots, D); rows (B,) int32, the buffer row of each batch row; the step's write plan (see
// CachePool._write_plan): written and pick (B * KV * T,) int32, the flat buffer slot each new
// (row, KV head, token) vector goes to and which one it is; mask (B, 1, T, span) bool for a piece,
// (B, 1, 1, span + 1) for a decode step (the past slots, then the new key); scale (1,) float32;
// slots (1,) int32, the buffer's slots per row. Output: like q.
struct StepInputs {
  const float *q, *k, *v, *q_bias, *k_bias, *v_bias, *cos, *sin;
  float *keys, *values;
  const int32_t *rows, *written, *pick;
  const bool *mask;
  float scale;
  int64_t batch, tokens, dim, heads, kv_heads, group, slots, plan;
  float *out;
  StepInputs(void **params, int *ndims, int64_t **shapes) {
    const float **floats[] = {&q, &k, &v, &q_bias, &k_bias, &v_bias, &cos, &sin};
    for (int i = 0; i < 8; ++i) *floats[i] = static_cast<const float *>(params[i]);
    keys = static_cast<float *>(params[8]), values = static_cast<float *>(params[9]);
    rows = static_cast<const int32_t *>(params[10]);
    written = static_cast<const int32_t *>(params[11]), pick = static_cast<const int32_t *>(params[12]);
    mask = static_cast<const bool *>(params[13]);
    scale = *static_cast<const float *>(params[14]);
    slots = *static_cast<const int32_t *>(params[15]);
    out = static_cast<float *>(params[16]);
    batch = shapes[6][0], tokens = shapes[6][1], dim = shapes[6][2], plan = shapes[11][0];
    heads = shapes[0][ndims[0] - 1] / dim, kv_heads = shapes[1][ndims[1] - 1] / dim, group = heads / kv_heads;
  }
  // the inputs' count and ranks as above
  static bool shaped(int nparam, int *ndims) {
    return nparam == 17 && (ndims[0] == 2 || ndims[0] == 3) && ndims[1] == ndims[0] && ndims[2] == ndims[0] &&
           ndims[6] == 3 && ndims[8] == 2 && ndims[11] == 1 && ndims[12] == 1 && ndims[13] == 4;
  }
  // The new keys and values into the buffers, after every read of them: in place (the buffers are
  // Parameters the step graph takes; MindSpore's ScatterUpdate and the gather feeding it were ~8
  // kernels a layer, and their side effects ~30 more nodes for a loaded graph's first call to build).
  void write(const std::vector<float> &k_new, const std::vector<float> &v_new) const {
    for (int64_t i = 0; i < plan; ++i) {
      std::memcpy(keys + static_cast<int64_t>(written[i]) * dim, k_new.data() + pick[i] * dim, dim * sizeof(float));
      std::memcpy(values + static_cast<int64_t>(written[i]) * dim, v_new.data() + pick[i] * dim, dim * sizeof(float));
    }
  }
};

}  // namespace

// Qwen2RMSNorm in float32: weight * (x / sqrt(mean(x^2) + eps)). Inputs: x (..., E), weight (E,),
// eps (1,); output like x.
extern "C" int RMSNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  if (nparam != 4 || ndims[1] != 1 || !float32(dtypes, 3)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const int64_t dim = shapes[1][0], rows = count(ndims[0], shapes[0]) / dim;
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float *xr = x + r * dim;
      double squares = 0.0;
      for (int64_t d = 0; d < dim; ++d) squares += static_cast<double>(xr[d]) * xr[d];
      const float variance = static_cast<float>(squares / dim) + eps;  // float32, as the ops add eps
      const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(variance)));
      float *o = out + r * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = weight[d] * (xr[d] * inv);
    }
  };
  native::parallel_ranges(rows, rows * dim, VALUES_PER_THREAD, run);
  return 0;
}

// The gated MLP's middle, silu(gate) * up = gate * sigmoid(gate) * up. Inputs: gate, up (same
// shape); output like them.
extern "C" int SiluGate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  if (nparam != 3 || !float32(dtypes, 2)) return 1;
  const float *gate = static_cast<const float *>(params[0]);
  const float *up = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  const int64_t n = count(ndims[0], shapes[0]);
  auto run = [&](int64_t first, int64_t last) {
#pragma omp simd
    for (int64_t i = first; i < last; ++i) out[i] = gate[i] * native::sigmoid(gate[i]) * up[i];
  };
  native::parallel_ranges(n, n, VALUES_PER_THREAD, run);
  return 0;
}

// One decode step's attention (nn/decoder.py's attend with a cache, one token per row): the
// projections' biases added, the new query and key rotated (x cos + rotate_half(x) sin), each
// query head's scores over its row's past
// slots in the cache (read where they lie) and over the new key, masked slots at float32's lowest
// value, the softmax and the weighted values. Grouped-query: head h reads KV head h / (H / KV).
// Inputs as StepInputs, T = 1; the new (row, KV head) vectors in that order (pick: the identity).
extern "C" int DecodeAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (!StepInputs::shaped(nparam, ndims) || !float32(dtypes, 10)) return 1;
  const StepInputs in(params, ndims, shapes);
  if (in.tokens != 1 || in.plan != in.batch * in.kv_heads) return 1;
  const bool *mask = in.mask;
  const float scale = in.scale;
  const int64_t slots = in.slots;
  float *out = in.out;
  const int64_t batch = in.batch, dim = in.dim, heads = in.heads, kv_heads = in.kv_heads, group = in.group;
  const int64_t span = shapes[13][3] - 1;
  std::vector<float> keys(batch * kv_heads * dim), values(keys.size());
  float *k_new = keys.data(), *v_new = values.data();
  // the new keys and values first: each pair below reads its own as the last key
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t at = (b * kv_heads + g) * dim;
      rotate_biased(in.k + at, in.k_bias + g * dim, in.cos + b * dim, in.sin + b * dim, dim, k_new + at);
      for (int64_t d = 0; d < dim; ++d) v_new[at + d] = in.v[at + d] + in.v_bias[g * dim + d];
    }
  auto run = [&](int64_t first, int64_t last) {  // (batch row, KV head) pairs first..last
    std::vector<float> p(span + 1), qr(dim);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t b = pair / kv_heads, g = pair % kv_heads;
      const bool *seen = mask + b * (span + 1);
      const int64_t base = (static_cast<int64_t>(in.rows[b]) * kv_heads + g) * slots * dim;
      const float *kp = in.keys + base, *vp = in.values + base;
      const float *kn = k_new + pair * dim, *vn = v_new + pair * dim;
      for (int64_t r = 0; r < group; ++r) {
        const int64_t h = g * group + r;
        rotate_biased(in.q + (b * heads + h) * dim, in.q_bias + h * dim, in.cos + b * dim, in.sin + b * dim, dim,
                      qr.data());
        native::attend_query(
            qr.data(), dim, span + 1, seen, scale, [&](int64_t j) { return j < span ? kp + j * dim : kn; },
            [&](int64_t j) { return j < span ? vp + j * dim : vn; }, p.data(), out + (b * heads + h) * dim);
      }
    }
  };
  const int64_t pairs = batch * kv_heads;
  native::parallel_ranges(pairs, pairs * group * (span + 1) * dim, VALUES_PER_THREAD, run);
  in.write(keys, values);
  return 0;
}

// A prompt piece's attention (nn/decoder.py's attend with a cache, T tokens per row), as
// DecodeAttention does a decode step's: the biases added, queries and new keys rotated, each query
// head's scores over its row's slots 0..span-1 read where they lie, except the slots the piece
// writes (start..start+T-1), which hold its own new keys and values (the write comes after this
// reads the buffers). A row's start is its first new key's slot in the write plan. Inputs as
// StepInputs; the new vectors in (row, KV head, token) order.
extern "C" int PieceAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (!StepInputs::shaped(nparam, ndims) || !float32(dtypes, 10)) return 1;
  const StepInputs in(params, ndims, shapes);
  if (in.plan != in.batch * in.kv_heads * in.tokens) return 1;
  const int32_t *written = in.written;
  const bool *mask = in.mask;
  const float scale = in.scale;
  const int64_t slots = in.slots;
  float *out = in.out;
  const int64_t batch = in.batch, tokens = in.tokens, dim = in.dim, heads = in.heads, kv_heads = in.kv_heads;
  const int64_t group = in.group, span = shapes[13][3];
  std::vector<float> keys(batch * kv_heads * tokens * dim), values(keys.size());
  float *k_new = keys.data(), *v_new = values.data();
  std::vector<int64_t> starts(batch);
  for (int64_t b = 0; b < batch; ++b) {
    starts[b] = written[b * kv_heads * tokens] - static_cast<int64_t>(in.rows[b]) * kv_heads * slots;
  }
  // the new keys and values first, in (row, KV head, token) order
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t from = (b * tokens + t) * kv_heads * dim + g * dim, to = ((b * kv_heads + g) * tokens + t) * dim;
        const int64_t at = (b * tokens + t) * dim;
        rotate_biased(in.k + from, in.k_bias + g * dim, in.cos + at, in.sin + at, dim, k_new + to);
        for (int64_t d = 0; d < dim; ++d) v_new[to + d] = in.v[from + d] + in.v_bias[g * dim + d];
      }
  auto run = [&](int64_t first, int64_t last) {  // queries (batch row, head, token) first..last
    std::vector<float> p(span), qr(dim);
    for (int64_t query = first; query < last; ++query) {
      const int64_t b = query / (heads * tokens), h = query / tokens % heads, t = query % tokens, g = h / group;
      const int64_t start = starts[b], base = (static_cast<int64_t>(in.rows[b]) * kv_heads + g) * slots * dim;
      const float *kp = in.keys + base, *vp = in.values + base;
      const float *kn = k_new + (b * kv_heads + g) * tokens * dim, *vn = v_new + (b * kv_heads + g) * tokens * dim;
      const int64_t at = (b * tokens + t) * dim;
      rotate_biased(in.q + (b * tokens + t) * heads * dim + h * dim, in.q_bias + h * dim, in.cos + at, in.sin + at, dim,
                    qr.data());
      auto mine = [&](int64_t j) { return j >= start && j - start < tokens; };
      native::attend_query(
          qr.data(), dim, span, mask + (b * tokens + t) * span, scale,
          [&](int64_t j) { return mine(j) ? kn + (j - start) * dim : kp + j * dim; },
          [&](int64_t j) { return mine(j) ? vn + (j - start) * dim : vp + j * dim; }, p.data(),
          out + (b * tokens + t) * heads * dim + h * dim);
    }
  };
  const int64_t queries = batch * heads * tokens;
  native::parallel_ranges(queries, queries * span * dim, VALUES_PER_THREAD, run);
  in.write(keys, values);
  return 0;
}
