// Accuracy of kernels/cpu/vecmath.h against double-precision libm, over every uniform the sampler can draw
// (all 2^23 values of u = ((r >> 9) + 0.5) * 2^-23) for log and sin/cos, and over a dense grid for exp and
// silu; and that vectorised silu and silu-gradient loops, built as the kernels are, compute no subnormal (x86's
// sticky underflow flag). Prints the worst errors and exits 1 when one exceeds its bound. Built and run by CI
// (ctest).
#include <cmath>
#include <cstdint>
#include <cstdio>

#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

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

// The loops of kernels/cpu/group_norm_silu*.cpp in miniature: noinline, so that each is vectorised on its own.
__attribute__((noinline)) static void silu_loop(const float* y, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = vm::silu_f(y[i]);
}

__attribute__((noinline)) static void silu_grad_loop(const float* y, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = vm::silu_grad_f(y[i]);
}

// Whether the loops raise the underflow flag on inputs in [-20, 20], whose exact results are all normal: a
// subnormal intermediate costs a microcode assist per vector on Intel CPUs (see sigmoid_f). Without SSE there
// is no flag to read, and the check passes.
static bool loops_underflow() {
#if defined(__SSE__)
  const int64_t n = 1 << 16;
  std::vector<float> y(n), out(n);
  for (int64_t i = 0; i < n; ++i) y[i] = -20.0f + 40.0f * static_cast<float>(i) / n;
  _mm_setcsr(_mm_getcsr() & ~_MM_EXCEPT_MASK);
  silu_loop(y.data(), out.data(), n);
  silu_grad_loop(y.data(), out.data(), n);
  return (_mm_getcsr() & _MM_EXCEPT_UNDERFLOW) != 0;
#else
  return false;
#endif
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
  const bool underflow = loops_underflow();
  std::printf("silu loops: %s\n", underflow ? "a subnormal was computed" : "no subnormal");
  const bool ok = !underflow && log_max <= 2.0 && sin_abs * 0x1p24 <= 2.0 && cos_abs * 0x1p24 <= 2.0 &&
                  exp_max <= 2.0 && silu_max <= 4.0;
  std::printf("%s\n", ok ? "ok" : "FAILED: an error exceeds its bound or a loop computed a subnormal");
  return ok ? 0 : 1;
}
