// A "same"-padded 1-D convolution (the vocoder's residual units' and last one, bigvgan.py) as
// blocks of its unrolled input, each one oneDNN sgemm call (the library linear.cc calls).
// MindSpore's CPU convolution unrolls its whole input (K copies of each input row) into a buffer it
// keeps for the graph's life: the tiny vocoder's convolutions made most of its graph's ~100 MB of
// page faults at its first call in a process. Here a block of output samples at a time is
// unrolled into a small buffer of the thread's (kept in the cache, reused by the next block and
// call), and nothing outlives the call.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tensors.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

// Output samples per block: the unrolled block (input rows x taps x samples) near 128 KB, 128 to
// 512 samples (measured at the tiny vocoder's shapes, 3840 samples: 64 channels x 7 taps fastest
// at 128, 16 x 7 at 256, 2 x 7 at 512).
int64_t block_for(int64_t depth) {
  int64_t block = 128;
  while (block < 512 && 2 * block * depth <= 32768) block *= 2;
  return block;
}

}  // namespace

// SameConvolution: x (B, C_in, 1, L), weight (C_out, C_in, 1, K), dilation (1,) int32 -> (B, C_out,
// 1, L), torch's conv1d with stride 1, no bias and "same" zero padding, dilation * (K - 1) / 2 on
// each side. Per block of output samples: the block's input rows, each shifted by each tap, as
// rows of the unrolled buffer (in the weight's (C_in, K) order, zeros past either end), then
// out[:, block] = weight (C_out, C_in * K) x buffer (C_in * K, samples).
extern "C" int SameConvolution(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 4 || ndims[0] != 4 || ndims[1] != 4 || shapes[1][1] != shapes[0][1] || !native::float32(dtypes, 2))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const int64_t dilation = *static_cast<const int32_t *>(params[2]);
  if (dilation * (shapes[1][3] - 1) % 2 != 0) return 1;  // no padding the same on both sides
  float *out = static_cast<float *>(params[3]);
  const int64_t batch = shapes[0][0], inputs = shapes[0][1], n = shapes[0][3];
  const int64_t outputs = shapes[1][0], taps = shapes[1][3], pad = dilation * (taps - 1) / 2;
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
