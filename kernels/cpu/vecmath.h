// Float32 log, sin/cos and exp written as straight-line arithmetic, so that loops calling them vectorise
// (`#pragma omp simd`) without -ffast-math or a vector math library. Each one reduces the argument with exact
// or Cody-Waite steps and evaluates a Taylor polynomial whose truncation error is far below float32's ulp,
// so the error is the rounding of the Horner steps (see kernels/tests/vecmath_check.cpp for the measured
// maximum over all inputs the sampler can produce).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastdiff {
namespace vecmath {

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

inline float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Round to the nearest integer (ties to even) for |v| < 2^22 by adding and removing 1.5 * 2^23; the integer
// is also read off the low mantissa bits of the sum, which saves a conversion.
constexpr float kRoundMagic = 0x1.8p+23f;

// ln(2) = kLn2Hi + kLn2Lo with kLn2Hi holding 16 significant bits (k * kLn2Hi is exact for |k| < 256).
constexpr float kLn2Hi = 0x1.62e4p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kLog2e = 0x1.715476p+0f;

// pi/2 = kPio2A + kPio2B + kPio2C, the first two with 12 significant bits (k * kPio2A exact for k <= 4).
constexpr float kPio2A = 0x1.922p+0f;
constexpr float kPio2B = -0x1.2aep-18f;
constexpr float kPio2C = -0x1.de973ep-31f;
constexpr float kTwoOverPi = 0x1.45f306p-1f;

// Natural log of a positive normal float (the sampler's uniforms lie in [2^-24, 1)).
//   u = 2^e * m with m in [sqrt(1/2), sqrt(2)); f = m - 1 (exact);
//   log(m) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716; 2 atanh(s) = 2s + s * z * (2/3 + 2z/5 + 2z^2/7 + 2z^3/9)
//   with z = s^2 (the first dropped term is below 3e-9 relative).
inline float log_f(float u) {
  const uint32_t b = bits_of(u);
  // Move the mantissa into [sqrt(1/2), sqrt(2)) by biasing with the bits of sqrt(1/2) before splitting.
  const uint32_t biased = b - 0x3f3504f3u;
  const int32_t e = static_cast<int32_t>(biased) >> 23;
  const float m = float_of((biased & 0x007fffffu) + 0x3f3504f3u);
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float poly = z * (0x1.555556p-1f + z * (0x1.99999ap-2f + z * (0x1.24924ap-2f + z * 0x1.c71c72p-3f)));
  const float log_m = 2.0f * s + s * poly;
  const float ef = static_cast<float>(e);
  return ef * kLn2Hi + (ef * kLn2Lo + log_m);
}

// sin and cos of theta in [0, 2*pi] (the Box-Muller angle): quadrant k = round(theta * 2/pi), r = theta - k*pi/2
// in [-pi/4, pi/4] by three-part Cody-Waite subtraction (the first step is exact), then Taylor series to r^9
// (sin) and r^10 (cos), whose truncation errors are below 3e-9.
inline void sincos_f(float theta, float* sin_out, float* cos_out) {
  const float kq = theta * kTwoOverPi + kRoundMagic;
  const uint32_t quadrant = bits_of(kq) & 3u;
  const float k = kq - kRoundMagic;
  float r = theta - k * kPio2A;
  r = r - k * kPio2B;
  r = r - k * kPio2C;
  const float r2 = r * r;
  const float sin_r =
      r + r * r2 *
              (-0x1.555556p-3f + r2 * (0x1.111112p-7f + r2 * (-0x1.a01a02p-13f + r2 * 0x1.71de3ap-19f)));
  const float cos_r =
      1.0f + r2 * (-0.5f + r2 * (0x1.555556p-5f +
                                 r2 * (-0x1.6c16c2p-10f + r2 * (0x1.a01a02p-16f + r2 * -0x1.27e4fcp-22f))));
  // sin(theta) = [s, c, -s, -c][quadrant], cos(theta) = [c, -s, -c, s][quadrant].
  const bool swap = quadrant & 1u;
  const float s = swap ? cos_r : sin_r;
  const float c = swap ? sin_r : cos_r;
  *sin_out = (quadrant & 2u) ? -s : s;
  *cos_out = ((quadrant + 1u) & 2u) ? -c : c;
}

// exp(v) for v clamped to [-86, hi], hi <= 88.5 (exp(-86) = 4e-38, exp(88.5) = 2.7e38), so that 2^k stays a
// normal float. k = round(v / ln2), r = v - k ln2 in [-ln2/2, ln2/2], Taylor series to r^7 (truncation below
// 6e-9 relative), scaled by adding k to the exponent bits.
inline float exp_upto(float v, float hi) {
  v = std::min(std::max(v, -86.0f), hi);  // vmaxps/vminps (a NaN stays NaN)
  const float kq = v * kLog2e + kRoundMagic;
  const int32_t ki = static_cast<int32_t>(bits_of(kq) - bits_of(kRoundMagic));
  const float k = kq - kRoundMagic;
  const float r = (v - k * kLn2Hi) - k * kLn2Lo;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (0x1.555556p-3f +
                                          r * (0x1.555556p-5f + r * (0x1.111112p-7f +
                                                                     r * (0x1.6c16c2p-10f + r * 0x1.a01a02p-13f))))));
  return float_of(bits_of(p) + (static_cast<uint32_t>(ki) << 23));
}

inline float exp_f(float v) { return exp_upto(v, 88.5f); }

// The sigmoid caps its exp argument at 60 (sigmoid(-60) = 8.8e-27), not at exp_f's 88.5. A vectorised loop
// computes the clamped arm of the exp for every lane and blends; GCC folds that arm into y * (1 / (1 + e^cap)),
// which for cap 88.5 is y * 3.7e-39: a subnormal product in nearly every lane, and on Intel CPUs a microcode
// assist per vector (on a 2-core Xeon with AVX-512 the native GroupNorm+SiLU lost to torch's two ops until this
// cap; README, "CPU defaults"). With cap 60 the arm stays normal for |y| > 1.4e-12. Below y = -60 silu and its
// gradient are taken as 0 (y * e^y is under 1e-24 in magnitude there): y * sigmoid(-60) alone would grow with
// |y| (-0.88 at y = -1e26), a select the compiler keeps vectorised.
constexpr float kSigmoidExpCap = 60.0f;
inline float sigmoid_f(float y) { return 1.0f / (1.0f + exp_upto(-y, kSigmoidExpCap)); }

// silu(y) = y * sigmoid(y). Written as y * (1 / (1 + exp(-y))) rather than y / (1 + exp(-y)): where the
// compiler specialises the clamped arm of the exp into a constant, that arm is then a multiplication instead of
// a second division per vector.
inline float silu_f(float y) { return y < -kSigmoidExpCap ? 0.0f : y * sigmoid_f(y); }

// d silu / dy = s * (1 + y * (1 - s)), s = sigmoid(y).
inline float silu_grad_f(float y) {
  const float s = sigmoid_f(y);
  return y < -kSigmoidExpCap ? 0.0f : s * (1.0f + y * (1.0f - s));
}

}  // namespace vecmath
}  // namespace fastdiff
