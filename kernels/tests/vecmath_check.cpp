// Accuracy of kernels/cpu/vecmath.h against double-precision libm, over every uniform the sampler can draw
// (all 2^23 values of u = ((r >> 9) + 0.5) * 2^-23) for log and sin/cos, and over a dense grid for exp and
// silu. Prints the worst errors and exits 1 when one exceeds its bound. Built and run by CI (ctest).
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "../cpu/vecmath.h"
#include "../philox.h"

namespace vm = fastdiff::vecmath;

// Error of `got` in units in the last place of the exact value `want`.
static double ulps(float got, double want) {
  if (want == 0.0) return got == 0.0f ? 0.0 : INFINITY;
  int e;
  std::frexp(want, &e);
  return std::fabs(static_cast<double>(got) - want) / std::ldexp(1.0, e - 24);
}

int main() {
  double log_max = 0, sin_abs = 0, cos_abs = 0, exp_max = 0, silu_max = 0;
  for (uint32_t m = 0; m < (1u << 23); ++m) {
    const float u = fastdiff::philox_uniform(m << 9);
    log_max = std::fmax(log_max, ulps(vm::log_f(u), std::log(static_cast<double>(u))));
    const float theta = fastdiff::kTwoPi * u;
    float s, c;
    vm::sincos_f(theta, &s, &c);
    sin_abs = std::fmax(sin_abs, std::fabs(s - std::sin(static_cast<double>(theta))));
    cos_abs = std::fmax(cos_abs, std::fabs(c - std::cos(static_cast<double>(theta))));
  }
  const int n = 1 << 24;
  for (int i = 0; i <= n; ++i) {
    const float v = -86.0f + (88.5f + 86.0f) * static_cast<float>(i) / n;
    exp_max = std::fmax(exp_max, ulps(vm::exp_f(v), std::exp(static_cast<double>(v))));
    const float y = -20.0f + 40.0f * static_cast<float>(i) / n;
    const double yd = y;
    silu_max = std::fmax(silu_max, ulps(vm::silu_f(y), yd / (1.0 + std::exp(-yd))));
  }
  // sin/cos errors are absolute (their values pass through 0); 2^-24 is half an ulp of 1.
  std::printf("log   max error %.2f ulp (all 2^23 uniforms)\n", log_max);
  std::printf("sin   max error %.2f x 2^-24 absolute\n", sin_abs * 0x1p24);
  std::printf("cos   max error %.2f x 2^-24 absolute\n", cos_abs * 0x1p24);
  std::printf("exp   max error %.2f ulp on [-86, 88.5]\n", exp_max);
  std::printf("silu  max error %.2f ulp on [-20, 20]\n", silu_max);
  const bool ok = log_max <= 2.0 && sin_abs * 0x1p24 <= 2.0 && cos_abs * 0x1p24 <= 2.0 && exp_max <= 2.0 &&
                  silu_max <= 4.0;
  std::printf("%s\n", ok ? "ok" : "FAILED: an error exceeds its bound");
  return ok ? 0 : 1;
}
