// The encoders' attention within segments (an image's windows or frames, with the queries and keys
// rotated: 2D rotary, rotate_half form; an audio clip's windows, without) as one CPU kernel
// (nn/encoder_kernels.py says where it runs and what it measured). Per (segment, head): the keys
// rotated once, then the queries in chunks of QUERY_ROWS: their scores over the segment's keys and
// the weighted values as two oneDNN sgemm calls (the library linear.cc calls), the softmax between
// them in float32. It reads q, k, v where the projections wrote them and writes each head's output
// in place: none of the ops' gathers into padded segments, head transposes, key mask or scatter back.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include "exp.h"
#include "parallel.h"
#include "tensors.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

const int64_t QUERY_ROWS = 256;  // a thread holds QUERY_ROWS x (a segment's length) scores at once
const int64_t WORK_PER_THREAD = 1 << 16;  // query-key products below which a thread costs more than it saves

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void softmax_rows(float *scores, int64_t rows, int64_t count) {
  for (int64_t i = 0; i < rows; ++i) {
    float *__restrict row = scores + i * count;
    float top = -FLT_MAX;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < count; ++j) top = std::max(top, row[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < count; ++j) {
      row[j] = native::exp_nonpositive(row[j] - top);
      sum += row[j];
    }
    const float inverse = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) row[j] *= inverse;
  }
}

// rows of one head's `dim` values (`stride` apart), rotated: x cos + rotate_half(x) sin, with
// rotate_half(x) = (-x[half:], x[:half]) and each row's cos and sin (`dim` values, shared by heads)
void rotate_rows(const float *x, int64_t stride, const float *cos, const float *sin, int64_t rows, int64_t dim,
                 float *to) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < rows; ++i) {
    const float *xi = x + i * stride, *c = cos + i * dim, *s = sin + i * dim;
    float *o = to + i * dim;
    for (int64_t d = 0; d < half; ++d) o[d] = xi[d] * c[d] + -xi[d + half] * s[d];
    for (int64_t d = half; d < dim; ++d) o[d] = xi[d] * c[d] + xi[d - half] * s[d];
  }
}

// q, k, v (N, H, D) as projected (biases included); with `rotary`, q and k are rotated by cos and
// sin (N, 1, D). segments (S, 2) int32: (first row, length) of each, in row order, not
// overlapping (lengths of 0 allowed: padding of the count); rows in no segment come out zero.
int segment_attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool rotary) {
  const int at = rotary ? 5 : 3;  // the segments' input; the scale after it, the output after that
  if (nparam != at + 3 || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[at] != 2 ||
      shapes[at][1] != 2 || !native::float32(dtypes, at) || std::strcmp(dtypes[at], "int32") != 0 ||
      std::strcmp(dtypes[at + 1], "float32") != 0 || (rotary && (ndims[3] != 3 || shapes[3][0] != shapes[0][0])))
    return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *cos = rotary ? static_cast<const float *>(params[3]) : nullptr;
  const float *sin = rotary ? static_cast<const float *>(params[4]) : nullptr;
  const int32_t *pairs = static_cast<const int32_t *>(params[at]);
  const float scale = *static_cast<const float *>(params[at + 1]);
  float *out = static_cast<float *>(params[at + 2]);
  const int64_t tokens = shapes[0][0], heads = shapes[0][1], dim = shapes[0][2], segments = shapes[at][0];
  const int64_t stride = heads * dim;  // a row's values in q, k, v and out
  if (rotary && (dim % 2 != 0 || shapes[3][2] != dim)) return 1;
  int64_t longest = 0, work = 0, end = 0;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t start = pairs[2 * s], length = pairs[2 * s + 1];
    if (start < end || length < 0 || start + length > tokens) return 1;
    std::fill(out + end * stride, out + start * stride, 0.f);  // the rows before it, in no segment
    end = start + length;
    longest = std::max(longest, length);
    work += length * length * heads;
  }
  std::fill(out + end * stride, out + tokens * stride, 0.f);
  std::vector<int> status(segments * heads, 0);
  auto run = [&](int64_t first, int64_t last) {  // (segment, head) pairs first..last
    const int64_t chunk = std::min(QUERY_ROWS, longest);
    std::vector<float> keys(rotary ? longest * dim : 0), queries(rotary ? chunk * dim : 0), scores(chunk * longest);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t s = pair / heads, h = pair % heads, start = pairs[2 * s], length = pairs[2 * s + 1];
      if (length == 0) continue;
      const int64_t origin = start * stride + h * dim;  // the segment's first row of this head
      const float *key_rows = k + origin, *query_rows = q + origin;
      int64_t key_stride = stride, query_stride = stride;
      if (rotary) {
        rotate_rows(k + origin, stride, cos + start * dim, sin + start * dim, length, dim, keys.data());
        key_rows = keys.data(), key_stride = dim, query_stride = dim;
      }
      for (int64_t i = 0; i < length; i += QUERY_ROWS) {
        const int64_t rows = std::min(QUERY_ROWS, length - i);
        if (rotary)
          rotate_rows(q + origin + i * stride, stride, cos + (start + i) * dim, sin + (start + i) * dim, rows, dim,
                      queries.data());
        const float *chunk_rows = rotary ? queries.data() : query_rows + i * stride;
        int failed = dnnl_sgemm('N', 'T', rows, length, dim, scale, chunk_rows, query_stride, key_rows, key_stride,
                                0.f, scores.data(), length);
        softmax_rows(scores.data(), rows, length);
        failed |= dnnl_sgemm('N', 'N', rows, dim, length, 1.f, scores.data(), length, v + origin, stride, 0.f,
                             out + origin + i * stride, stride);
        status[pair] |= failed;
      }
    }
  };
  native::parallel_ranges(segments * heads, work * dim, WORK_PER_THREAD, run);
  return std::any_of(status.begin(), status.end(), [](int s) { return s != 0; }) ? 1 : 0;
}

}  // namespace

// MindSpore's AOT custom-op entries. Inputs: q, k, v (N, H, D) float32; [cos, sin (N, 1, D) float32;]
// segments (S, 2) int32; scale (1,) float32. Output (N, H, D).
extern "C" int RotarySegmentAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  return segment_attention(nparam, params, ndims, shapes, dtypes, true);
}

extern "C" int SegmentAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  return segment_attention(nparam, params, ndims, shapes, dtypes, false);
}
