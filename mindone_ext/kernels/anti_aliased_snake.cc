// BigVGAN's anti-aliased snake-beta activation (bigvgan.py's AntiAliasedActivation) as one CPU
// kernel: per row, upsample x2 (replicate padding, the 12-tap low-pass filter as a transposed
// convolution), snake-beta, downsample x2 (replicate padding, the same filter, stride 2). MindSpore
// runs the same as ~20 kernels, each reading and writing the row at twice its rate; here a row stays
// in the cache. Only the first `valid` samples of a row are real (the rest is a graph's padding):
// they are computed as if the row ended there, and the samples past them are written as zeros.
// Rows are laid out (B, C, n) or (B, C, 1, n) (the vocoder's convolutions run over a height of 1).
// Variants fold in what BigVGAN's residual units do around an activation, each one kernel instead
// of two or three: the bias of the convolution before it, and the residual sum x + y + bias that
// feeds the next unit's activation; and the convolution after an activation, fused with it
// (ActivatedConvolution and its variants: the activation never becomes a graph tensor).
//
// The convolutions ("same" padded, BigVGAN's residual units' and last one) run as blocks of their
// unrolled input, each one oneDNN sgemm call (the library linear.cc calls; this file is built
// against it). MindSpore's CPU convolution unrolls its whole input (K copies of each input row)
// into a buffer it keeps for the graph's life: the tiny vocoder's convolutions made most of its
// graph's ~100 MB of page faults at its first call in a process. Here a block of output samples at
// a time is unrolled into a small buffer of the thread's, reused by the next block and call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tensors.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

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

// below this a thread costs more than it saves (a sample costs ~60 flops and a sine: at 1 << 15 the
// tiny vocoder's activations, ~18k samples a stage, ran on one thread, a 38-frame window in 22 ms; 18-20 split)
const int64_t SAMPLES_PER_THREAD = 1 << 12;
// An activation fused with its convolution is written to a buffer of the calling thread's, kept for
// its next call up to this many values (16 MB: the tiny vocoder's widest at 256 frames is 4 MB).
const size_t KEPT_ACTIVATION = 1 << 22;

// The rows of a (B, C, n) or (B, C, 1, n) input, or false for another shape.
bool row_layout(int ndims, const int64_t *shape, int64_t *channels, int64_t *n, int64_t *rows) {
  if (ndims != 3 && !(ndims == 4 && shape[2] == 1)) return false;
  *channels = shape[1];
  *n = shape[ndims - 1];
  *rows = shape[0] * shape[1];
  return true;
}

// A batch's real samples per row: `valid` int32, one value for every batch row or one per batch row
// (windows of several answers vocoded together), each clipped to 1..n.
struct Valid {
  const int32_t *values;
  bool per_row;

  int64_t of(int64_t batch_row, int64_t n) const {
    return std::min(std::max<int64_t>(values[per_row ? batch_row : 0], 1), n);
  }
};

// `valid` of an entry's inputs (params[at]) for a batch of `batch` rows, or false when it holds
// neither one value nor one per row.
bool valid_input(void **params, int *ndims, int64_t **shapes, int at, int64_t batch, Valid *valid) {
  const int64_t count = native::count(ndims[at], shapes[at]);
  if (count != 1 && count != batch) return false;
  *valid = Valid{static_cast<const int32_t *>(params[at]), count != 1};
  return true;
}

// Activations of `rows` rows of x (each plus bias[channel] when bias is given; y added first when
// given, the sum written to `sum`); a batch row's real samples `valid`; log_alpha, log_beta (C,) as
// the checkpoint holds them (the kernel takes e^alpha and 1 / (e^beta + 1e-9) per channel, which as
// graph ops were 4 kernels per activation); taps (12,).
void activate(const float *x, const float *y, const float *bias, float *sum, Valid valid,
              const float *log_alpha, const float *log_beta, const float *taps, float *out, int64_t channels,
              int64_t n, int64_t rows) {
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
      activate_row(row, shift, n, valid.of(r / channels, n), alpha[c], inv_beta[c], taps, out + r * n, buffers);
    }
  };
  int64_t work = 0;  // real samples
  for (int64_t b = 0; b < rows / channels; ++b) work += channels * valid.of(b, n);
  native::parallel_ranges(rows, work, SAMPLES_PER_THREAD, run);
}

// Output samples per block: the unrolled block (input rows x taps x samples) near 128 KB, 128 to
// 512 samples (measured at the tiny vocoder's shapes, 3840 samples: 64 channels x 7 taps fastest
// at 128, 16 x 7 at 256, 2 x 7 at 512).
int64_t block_for(int64_t depth) {
  int64_t block = 128;
  while (block < 512 && 2 * block * depth <= 32768) block *= 2;
  return block;
}

// out (B, C_out, n) = the "same"-padded convolution of x (B, C_in, n) by weight (C_out, C_in, K):
// per block of output samples, the block's input rows, each shifted by each tap, as rows of the
// unrolled buffer (in the weight's (C_in, K) order, zeros past either end), then out[:, block] =
// weight (C_out, C_in * K) x buffer (C_in * K, samples). Returns sgemm's failure, 0 for none.
int same_convolution(const float *x, int64_t batch, int64_t inputs, int64_t n, const float *weight, int64_t outputs,
                     int64_t taps, int64_t dilation, float *out) {
  const int64_t pad = dilation * (taps - 1) / 2;
  const int64_t depth = inputs * taps, block = block_for(depth), blocks = (n + block - 1) / block;
  std::vector<int> status(batch * blocks, 0);
  auto run = [&](int64_t first, int64_t last) {
    thread_local std::vector<float> unrolled;
    unrolled.resize(depth * block);
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t b = unit / blocks, start = unit % blocks * block, width = std::min(block, n - start);
      for (int64_t i = 0; i < inputs; ++i) {
        const float *row = x + (b * inputs + i) * n;
        for (int64_t t = 0; t < taps; ++t) {
          // to[j] = row[start + j + shift], zero where that lies outside 0..n-1
          const int64_t shift = start + t * dilation - pad;
          const int64_t lo = std::min(width, std::max<int64_t>(0, -shift));
          const int64_t hi = std::max(lo, std::min(width, n - shift));
          float *to = unrolled.data() + (i * taps + t) * width;
          std::fill(to, to + lo, 0.f);
          if (hi > lo) std::memcpy(to + lo, row + shift + lo, (hi - lo) * sizeof(float));
          std::fill(to + hi, to + width, 0.f);
        }
      }
      status[unit] = dnnl_sgemm('N', 'N', outputs, width, depth, 1.f, weight, depth, unrolled.data(), width, 0.f,
                                out + b * outputs * n + start, n);
    }
  };
  native::parallel_ranges(batch * blocks, batch * outputs * n * depth, 1 << 16, run);
  return std::any_of(status.begin(), status.end(), [](int s) { return s != 0; }) ? 1 : 0;
}

// A convolution's weight, (C_out, C_in, 1, K) or (C_out, C_in, K), for x's rows, and its dilation:
// false unless it takes x's channels and its padding is the same on both sides.
bool convolution_shape(int64_t channels, int ndims, const int64_t *shape, int64_t dilation) {
  return (ndims == 3 || (ndims == 4 && shape[2] == 1)) && shape[1] == channels &&
         dilation * (shape[ndims - 1] - 1) % 2 == 0;
}

// The activation of x's rows ([y and] bias as `activate` takes them) into the calling thread's
// buffer, then the convolution of that into out.
int activated_convolution(const float *x, const float *y, const float *bias, float *sum, Valid valid,
                          void **activation, int64_t batch, int64_t channels, int64_t n, void **convolution,
                          int *ndims, int64_t **shapes, int weight_at, float *out) {
  const int64_t dilation = *static_cast<const int32_t *>(convolution[1]);
  if (!convolution_shape(channels, ndims[weight_at], shapes[weight_at], dilation)) return 1;
  thread_local std::vector<float> activated;
  activated.resize(batch * channels * n);
  activate(x, y, bias, sum, valid, static_cast<const float *>(activation[0]), static_cast<const float *>(activation[1]),
           static_cast<const float *>(activation[2]), activated.data(), channels, n, batch * channels);
  const int64_t *weight = shapes[weight_at];
  const int failed = same_convolution(activated.data(), batch, channels, n, static_cast<const float *>(convolution[0]),
                                      weight[0], weight[ndims[weight_at] - 1], dilation, out);
  if (activated.size() > KEPT_ACTIVATION) std::vector<float>().swap(activated);  // a long row's: not kept
  return failed;
}

}  // namespace

// MindSpore's AOT custom-op entries; each `valid` one int32 value, or one per batch row (see Valid).
// AntiAliasedSnake: x, valid, alpha, beta, taps -> out (x's shape).
extern "C" int AntiAliasedSnake(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  int64_t channels, n, rows;
  Valid valid;
  if (nparam != 6 || !row_layout(ndims[0], shapes[0], &channels, &n, &rows) ||
      !valid_input(params, ndims, shapes, 1, shapes[0][0], &valid))
    return 1;
  activate(static_cast<const float *>(params[0]), nullptr, nullptr, nullptr, valid,
           static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
           static_cast<const float *>(params[4]), static_cast<float *>(params[5]), channels, n, rows);
  return 0;
}

// BiasedAntiAliasedSnake: x, bias (C,), valid, alpha, beta, taps -> the activation of x + bias.
extern "C" int BiasedAntiAliasedSnake(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  int64_t channels, n, rows;
  Valid valid;
  if (nparam != 7 || !row_layout(ndims[0], shapes[0], &channels, &n, &rows) ||
      !valid_input(params, ndims, shapes, 2, shapes[0][0], &valid))
    return 1;
  activate(static_cast<const float *>(params[0]), nullptr, static_cast<const float *>(params[1]), nullptr, valid,
           static_cast<const float *>(params[3]), static_cast<const float *>(params[4]),
           static_cast<const float *>(params[5]), static_cast<float *>(params[6]), channels, n, rows);
  return 0;
}

// ResidualAntiAliasedSnake: x, y, bias (C,), valid, alpha, beta, taps -> (x + y + bias, its activation).
extern "C" int ResidualAntiAliasedSnake(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                        void *stream, void *extra) {
  int64_t channels, n, rows;
  Valid valid;
  if (nparam != 9 || !row_layout(ndims[0], shapes[0], &channels, &n, &rows) ||
      !valid_input(params, ndims, shapes, 3, shapes[0][0], &valid))
    return 1;
  activate(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2]), static_cast<float *>(params[7]), valid,
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

// SameConvolution: x (B, C_in, 1, L), weight (C_out, C_in, [1,] K), dilation (1,) int32 -> (B, C_out,
// 1, L), torch's conv1d with stride 1, no bias and "same" zero padding, dilation * (K - 1) / 2 on
// each side.
extern "C" int SameConvolution(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 4 || ndims[0] != 4 || !native::float32(dtypes, 2)) return 1;
  const int64_t dilation = *static_cast<const int32_t *>(params[2]);
  if (!convolution_shape(shapes[0][1], ndims[1], shapes[1], dilation)) return 1;
  return same_convolution(static_cast<const float *>(params[0]), shapes[0][0], shapes[0][1], shapes[0][3],
                          static_cast<const float *>(params[1]), shapes[1][0], shapes[1][ndims[1] - 1], dilation,
                          static_cast<float *>(params[3]));
}

// ActivatedConvolution: x (B, C, 1, n), valid, alpha, beta, taps, weight (C_out, C, [1,] K), dilation ->
// the convolution of x's activation, (B, C_out, 1, n).
extern "C" int ActivatedConvolution(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  Valid valid;
  if (nparam != 8 || ndims[0] != 4 || shapes[0][2] != 1 || !valid_input(params, ndims, shapes, 1, shapes[0][0], &valid))
    return 1;
  return activated_convolution(static_cast<const float *>(params[0]), nullptr, nullptr, nullptr, valid, params + 2,
                               shapes[0][0], shapes[0][1], shapes[0][3], params + 5, ndims, shapes, 5,
                               static_cast<float *>(params[7]));
}

// BiasedActivatedConvolution: x, bias (C,), valid, alpha, beta, taps, weight, dilation -> the
// convolution of the activation of x + bias.
extern "C" int BiasedActivatedConvolution(int nparam, void **params, int *ndims, int64_t **shapes,
                                          const char **dtypes, void *stream, void *extra) {
  Valid valid;
  if (nparam != 9 || ndims[0] != 4 || shapes[0][2] != 1 || !valid_input(params, ndims, shapes, 2, shapes[0][0], &valid))
    return 1;
  return activated_convolution(static_cast<const float *>(params[0]), nullptr, static_cast<const float *>(params[1]),
                               nullptr, valid, params + 3, shapes[0][0], shapes[0][1], shapes[0][3], params + 6,
                               ndims, shapes, 6, static_cast<float *>(params[8]));
}

// ResidualActivatedConvolution: x, y, bias (C,), valid, alpha, beta, taps, weight, dilation ->
// (x + y + bias, the convolution of its activation).
extern "C" int ResidualActivatedConvolution(int nparam, void **params, int *ndims, int64_t **shapes,
                                            const char **dtypes, void *stream, void *extra) {
  Valid valid;
  if (nparam != 11 || ndims[0] != 4 || shapes[0][2] != 1 || ndims[1] != 4 ||
      !valid_input(params, ndims, shapes, 3, shapes[0][0], &valid))
    return 1;
  return activated_convolution(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                               static_cast<const float *>(params[2]), static_cast<float *>(params[9]), valid,
                               params + 4, shapes[0][0], shapes[0][1], shapes[0][3], params + 7, ndims, shapes, 7,
                               static_cast<float *>(params[10]));
}

// AMPBlock: x (B, C, 1, n), valid, taps, then per dilation its 8 weights (the first activation's
// alpha and beta, the first convolution's weight (C, C, 1, K) and bias, the second activation's
// alpha and beta, the second convolution's weight and bias), then the dilations (D,) int32 -> the
// block's output, like x: bigvgan.py's AMPBlock._fused_rows (its 2 D fused activation-convolutions
// and the last residual sum) in one call, the same functions in the same order. A graph of the tiny
// vocoder spent most of its time launching its ~220 kernels.
extern "C" int AMPBlock(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  const int units = (nparam - 5) / 8, dilations_at = nparam - 2;
  Valid valid;
  if (units < 1 || nparam != 5 + 8 * units || ndims[0] != 4 || shapes[0][2] != 1 ||
      native::count(ndims[dilations_at], shapes[dilations_at]) != units ||
      !valid_input(params, ndims, shapes, 1, shapes[0][0], &valid))
    return 1;
  const int64_t batch = shapes[0][0], channels = shapes[0][1], n = shapes[0][3];
  for (int i = 0; i < units; ++i)  // each convolution keeps the channels (the output and buffers are x's size)
    for (int weight : {3 + 8 * i + 2, 3 + 8 * i + 6})
      if (shapes[weight][0] != channels) return 1;
  const int32_t *dilations = static_cast<const int32_t *>(params[dilations_at]);
  static const int32_t one = 1;  // the second convolution's dilation
  float *out = static_cast<float *>(params[nparam - 1]);
  std::vector<float> h(batch * channels * n), sum(batch * channels * n);
  const float *residual = static_cast<const float *>(params[0]);  // the unit's input: x, then the running sums
  int failed = 0;
  for (int i = 0; i < units; ++i) {
    const int at = 3 + 8 * i;  // this unit's weights
    void *first[2] = {params[at + 2], const_cast<int32_t *>(dilations + i)};
    void *first_activation[3] = {params[at], params[at + 1], params[2]};
    if (i == 0) {
      failed |= activated_convolution(residual, nullptr, nullptr, nullptr, valid, first_activation, batch, channels, n,
                                      first, ndims, shapes, at + 2, h.data());
    } else {  // the last unit's sum (its input, its second convolution in out, that one's bias), then on
      failed |= activated_convolution(residual, out, static_cast<const float *>(params[at - 1]), sum.data(), valid,
                                      first_activation, batch, channels, n, first, ndims, shapes, at + 2, h.data());
      residual = sum.data();
    }
    void *second[2] = {params[at + 6], const_cast<int32_t *>(&one)};
    void *second_activation[3] = {params[at + 4], params[at + 5], params[2]};
    failed |= activated_convolution(h.data(), nullptr, static_cast<const float *>(params[at + 3]), nullptr, valid,
                                    second_activation, batch, channels, n, second, ndims, shapes, at + 6, out);
  }
  const float *bias = static_cast<const float *>(params[3 + 8 * units - 1]);
  for (int64_t r = 0; r < batch * channels; ++r)
    residual_row(residual + r * n, out + r * n, bias[r % channels], n, out + r * n);
  return failed;
}
