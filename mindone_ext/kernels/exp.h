// e^x and the sigmoid for the native kernels (shared by kernels/*.cc) without a library call, so
// that the compiler vectorises the loops around them: std::exp, one value at a time, was the
// costliest step of a softmax row and of the DiT's GELU (a quarter of its graph's one busy thread).
#pragma once
#include <cstdint>
#include <cstring>

namespace native {

// e^x for x <= 0 (a softmax's shifted scores): x = n ln2 + r, e^r by Cephes' expf polynomial
// (relative error ~1e-7), 2^n put into the exponent's bits. Below -87 (e^-87 ~ 1.6e-38, the
// smallest normal float's order) it is 0, as std::exp's underflow: a masked key's weight must be
// 0, not a denormal (each product with a denormal weight costs ~100x a normal one on x86: giving
// masked keys e^-87 made a prefill over a mostly empty cache 2.4x slower).
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;
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
  return x < -87.f ? 0.f : (p * r * r + r + 1.f) * power;
}

// 1 / (1 + e^-u), from e^-|u| (never overflows): 1 / (1 + e) for u >= 0, e / (1 + e) below
inline float sigmoid(float u) {
  const float e = exp_nonpositive(u < 0.f ? u : -u);
  return (u < 0.f ? e : 1.f) / (1.f + e);
}

}  // namespace native
