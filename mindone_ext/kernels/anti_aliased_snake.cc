// BigVGAN's anti-aliased snake-beta activation (bigvgan.py's AntiAliasedActivation) as one CPU
// kernel: per row, upsample x2 (replicate padding, the 12-tap low-pass filter as a transposed
// convolution), snake-beta, downsample x2 (replicate padding, the same filter, stride 2). MindSpore
// runs the same as ~20 kernels, each reading and writing the row at twice its rate; here a row stays
// in the cache. Only the first `valid` samples of a row are real (the rest is a graph's padding):
// they are computed as if the row ended there, and the samples past them are written as zeros.
// Rows are laid out (B, C, n) or (B, C, 1, n) (the vocoder's convolutions run over a height of 1).
// Variants fold in what BigVGAN's residual units do around an activation, each one kernel instead
// of two or three: the bias of the convolution before it, and the residual sum x + y + bias that
// feeds the next unit's activation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace {

const int HALF = 6;  // taps per phase: the filter has 12

// sin(y)^2, y reduced modulo pi (the period of sin^2) into [-pi/2, pi/2] in double, then an odd
// Taylor polynomial of sin to r^13 (error < 1e-7 there); written so that the compiler vectorizes it
inline float sin_squared(float y) {
  double k = static_cast<double>(y) * 0.31830988618379067 + 6755399441055744.0;  // round to nearest
  k -= 6755399441055744.0;
  float r = static_cast<float>(static_cast<double>(y) - k * 3.141592653589793);
  float u = r * r;
  float s = r * (1.f + u * (-1.6666667e-1f + u * (8.3333333e-3f + u * (-1.9841270e-4f + u * (2.7557319e-6f
              + u * (-2.5052108e-8f + u * 1.6059044e-10f))))));
  return s * s;
}

struct Buffers {
  std::vector<float> padded, even, odd;
};

// One row of n samples, the first v real, each plus `shift`. taps: the 12-tap filter.
void activate_row(const float *x, float shift, int64_t n, int64_t v, float alpha, float inv_beta, const float *taps,
                  float *out, Buffers &b) {
  // padded[i + 3] = x[clip(i, 0, v - 1)] + shift for i = -3 .. v + 2: what the upsampling reads
  b.padded.resize(v + 6);
  for (int64_t i = 0; i < v + 6; ++i) b.padded[i] = x[std::min(std::max<int64_t>(i - 3, 0), v - 1)] + shift;
  // The upsampled row s (2v samples) through its replicate padding (5 before, 6 after), split by
  // parity for the stride-2 filter: even[i] = s[clip(2i - 5)], odd[i] = s[clip(2i - 4)].
  // So s[2q] lands in odd[q + 2] and s[2q + 1] in even[q + 3].
  b.even.assign(v + 6, 0.f);
  b.odd.assign(v + 6, 0.f);
  float *s_even = b.odd.data() + 2, *s_odd = b.even.data() + 3;
  for (int j = 0; j < HALF; ++j) {
    const float to_even = 2.f * taps[2 * j + 1], to_odd = 2.f * taps[2 * j];
    const float *from_even = b.padded.data() + 5 - j, *from_odd = b.padded.data() + 6 - j;
    for (int64_t q = 0; q < v; ++q) {
      s_even[q] += to_even * from_even[q];
      s_odd[q] += to_odd * from_odd[q];
    }
  }
  for (int64_t q = 0; q < v; ++q) {
    s_even[q] += inv_beta * sin_squared(s_even[q] * alpha);
    s_odd[q] += inv_beta * sin_squared(s_odd[q] * alpha);
  }
  for (int i = 0; i < 3; ++i) b.even[i] = s_even[0];
  for (int i = 0; i < 2; ++i) b.odd[i] = s_even[0];
  for (int64_t i = v + 3; i < v + 6; ++i) b.even[i] = s_odd[v - 1];
  for (int64_t i = v + 2; i < v + 6; ++i) b.odd[i] = s_odd[v - 1];
  std::fill(out, out + n, 0.f);
  for (int j = 0; j < HALF; ++j) {
    const float from_even = taps[2 * j], from_odd = taps[2 * j + 1];
    const float *e = b.even.data() + j, *o = b.odd.data() + j;
    for (int64_t t = 0; t < v; ++t) out[t] += from_even * e[t] + from_odd * o[t];
  }
}

// out = x + y + shift over one row of n samples: a residual unit's sum with its convolution's bias
inline void residual_row(const float *x, const float *y, float shift, int64_t n, float *out) {
  for (int64_t t = 0; t < n; ++t) out[t] = x[t] + y[t] + shift;
}

const int64_t SAMPLES_PER_THREAD = 1 << 15;  // below this a thread costs more than it saves

// The rows of a (B, C, n) or (B, C, 1, n) input, or false for another shape.
bool row_layout(int ndims, const int64_t *shape, int64_t *channels, int64_t *n, int64_t *rows) {
  if (ndims != 3 && !(ndims == 4 && shape[2] == 1)) return false;
  *channels = shape[1];
  *n = shape[ndims - 1];
  *rows = shape[0] * shape[1];
  return true;
}

// Activations of `rows` rows of x (each plus bias[channel] when bias is given; y added first when
// given, the sum written to `sum`). valid: int32, one value; log_alpha, log_beta (C,) as the
// checkpoint holds them (the kernel takes e^alpha and 1 / (e^beta + 1e-9) per channel, which as
// graph ops were 4 kernels per activation); taps (12,).
void activate(const float *x, const float *y, const float *bias, float *sum, const void *valid,
              const float *log_alpha, const float *log_beta, const float *taps, float *out, int64_t channels,
              int64_t n, int64_t rows) {
  const int64_t v = std::min(std::max<int64_t>(*static_cast<const int32_t *>(valid), 1), n);
  std::vector<float> alpha(channels), inv_beta(channels);
  for (int64_t c = 0; c < channels; ++c) {
    alpha[c] = std::exp(log_alpha[c]);
    inv_beta[c] = 1.f / (std::exp(log_beta[c]) + 1e-9f);
  }
  auto run = [&](int64_t first, int64_t last) {
    Buffers buffers;
    for (int64_t r = first; r < last; ++r) {
      const int64_t c = r % channels;
      const float *row = x + r * n;
      float shift = bias ? bias[c] : 0.f;
      if (y) {
        residual_row(row, y + r * n, shift, n, sum + r * n);
        row = sum + r * n;
        shift = 0.f;
      }
      activate_row(row, shift, n, v, alpha[c], inv_beta[c], taps, out + r * n, buffers);
    }
  };
  native::parallel_ranges(rows, rows * v, SAMPLES_PER_THREAD, run);
}

}  // namespace

// MindSpore's AOT custom-op entries. AntiAliasedSnake: x, valid, alpha, beta, taps -> out (x's shape).
extern "C" int AntiAliasedSnake(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  int64_t channels, n, rows;
  if (nparam != 6 || !row_layout(ndims[0], shapes[0], &channels, &n, &rows)) return 1;
  activate(static_cast<const float *>(params[0]), nullptr, nullptr, nullptr, params[1],
           static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
           static_cast<const float *>(params[4]), static_cast<float *>(params[5]), channels, n, rows);
  return 0;
}

// BiasedAntiAliasedSnake: x, bias (C,), valid, alpha, beta, taps -> the activation of x + bias.
extern "C" int BiasedAntiAliasedSnake(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  int64_t channels, n, rows;
  if (nparam != 7 || !row_layout(ndims[0], shapes[0], &channels, &n, &rows)) return 1;
  activate(static_cast<const float *>(params[0]), nullptr, static_cast<const float *>(params[1]), nullptr, params[2],
           static_cast<const float *>(params[3]), static_cast<const float *>(params[4]),
           static_cast<const float *>(params[5]), static_cast<float *>(params[6]), channels, n, rows);
  return 0;
}

// ResidualAntiAliasedSnake: x, y, bias (C,), valid, alpha, beta, taps -> (x + y + bias, its activation).
extern "C" int ResidualAntiAliasedSnake(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                        void *stream, void *extra) {
  int64_t channels, n, rows;
  if (nparam != 9 || !row_layout(ndims[0], shapes[0], &channels, &n, &rows)) return 1;
  activate(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2]), static_cast<float *>(params[7]), params[3],
           static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
           static_cast<const float *>(params[6]), static_cast<float *>(params[8]), channels, n, rows);
  return 0;
}

// BiasedResidual: x, y, bias (C,) -> x + y + bias (a residual unit's last sum, no activation after it).
extern "C" int BiasedResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  int64_t channels, n, rows;
  if (nparam != 4 || !row_layout(ndims[0], shapes[0], &channels, &n, &rows)) return 1;
  const float *x = static_cast<const float *>(params[0]), *y = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  // one thread: a sum is too little work per sample for a thread to pay for itself
  for (int64_t r = 0; r < rows; ++r) residual_row(x + r * n, y + r * n, bias[r % channels], n, out + r * n);
  return 0;
}
