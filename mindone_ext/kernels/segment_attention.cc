// The vision encoder's attention within segments (an image's windows, or its frames), its queries
// and keys rotated (2D rotary, rotate_half form), as one CPU kernel (nn/encoder_kernels.py says
// where it runs and what it measured). Per (segment, head): the keys rotated once, then the queries
// in chunks of QUERY_ROWS: their scores over the segment's keys and the weighted values as two
// oneDNN sgemm calls (the library linear.cc calls), the softmax between them in float32. It reads
// q, k, v where the projections wrote them and writes each head's output in place: none of the
// ops' gathers into padded segments, head transposes, key mask or scatter back.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tensors.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

const int64_t QUERY_ROWS = 256;  // a thread holds QUERY_ROWS x (a segment's length) scores at once
const int64_t WORK_PER_THREAD = 1 << 16;  // query-key products below which a thread costs more than it saves

// e^x for x <= 0 (a softmax's shifted scores): x = n ln2 + r, e^r by Cephes' expf polynomial
// (relative error ~1e-7), 2^n put into the exponent's bits. No library call, so the compiler
// vectorises the loop over a row (std::exp, one value at a time, was the row's costliest step).
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;  // e^-87 ~ 1.6e-38: the smallest normal float's order
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  const float shifted = clamped * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  const float r = clamped - n * 0.693359375f - n * -2.12194440e-4f;  // ln2 in two parts (Cody-Waite)
  const float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                   1.6666665459e-1f) * r + 5.0000001201e-1f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // n + 127 in the exponent: 2^n
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return (p * r * r + r + 1.f) * power;
}

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
      row[j] = exp_nonpositive(row[j] - top);
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

}  // namespace

// MindSpore's AOT custom-op entry. Inputs: q, k, v (N, H * D) float32 as projected (biases
// included), q and k not yet rotated; cos, sin (N, 1, D) float32; lengths (S,) int32, the
// segments' lengths in token order (zeros allowed: padding of the segment count), summing to at
// most N; scale (1,) float32. Output (N, H * D): rows past the segments are zeros.
extern "C" int SegmentAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 8 || ndims[0] != 2 || ndims[3] != 3 || ndims[5] != 1 || !native::float32(dtypes, 5) ||
      std::strcmp(dtypes[5], "int32") != 0)
    return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *cos = static_cast<const float *>(params[3]);
  const float *sin = static_cast<const float *>(params[4]);
  const int32_t *lengths = static_cast<const int32_t *>(params[5]);
  const float scale = *static_cast<const float *>(params[6]);
  float *out = static_cast<float *>(params[7]);
  const int64_t tokens = shapes[0][0], stride = shapes[0][1], dim = shapes[3][2], segments = shapes[5][0];
  if (dim % 2 != 0 || stride % dim != 0 || shapes[3][0] != tokens) return 1;
  const int64_t heads = stride / dim;
  std::vector<int64_t> starts(segments + 1, 0);
  int64_t longest = 0, work = 0;
  for (int64_t s = 0; s < segments; ++s) {
    if (lengths[s] < 0) return 1;
    starts[s + 1] = starts[s] + lengths[s];
    longest = std::max<int64_t>(longest, lengths[s]);
    work += static_cast<int64_t>(lengths[s]) * lengths[s] * heads;
  }
  if (starts[segments] > tokens) return 1;
  std::fill(out + starts[segments] * stride, out + tokens * stride, 0.f);
  std::vector<int> status(segments * heads, 0);
  auto run = [&](int64_t first, int64_t last) {  // (segment, head) pairs first..last
    std::vector<float> keys(longest * dim), queries(std::min(QUERY_ROWS, longest) * dim),
        scores(std::min(QUERY_ROWS, longest) * longest);
    for (int64_t pair = first; pair < last; ++pair) {
      const int64_t s = pair / heads, h = pair % heads, start = starts[s], length = lengths[s];
      if (length == 0) continue;
      rotate_rows(k + start * stride + h * dim, stride, cos + start * dim, sin + start * dim, length, dim,
                  keys.data());
      for (int64_t i = 0; i < length; i += QUERY_ROWS) {
        const int64_t rows = std::min(QUERY_ROWS, length - i), at = (start + i) * stride + h * dim;
        rotate_rows(q + at, stride, cos + (start + i) * dim, sin + (start + i) * dim, rows, dim, queries.data());
        int failed = dnnl_sgemm('N', 'T', rows, length, dim, scale, queries.data(), dim, keys.data(), dim, 0.f,
                                scores.data(), length);
        softmax_rows(scores.data(), rows, length);
        failed |= dnnl_sgemm('N', 'N', rows, dim, length, 1.f, scores.data(), length, v + start * stride + h * dim,
                             stride, 0.f, out + at, stride);
        status[pair] |= failed;
      }
    }
  };
  native::parallel_ranges(segments * heads, work * dim, WORK_PER_THREAD, run);
  return std::any_of(status.begin(), status.end(), [](int s) { return s != 0; }) ? 1 : 0;
}
