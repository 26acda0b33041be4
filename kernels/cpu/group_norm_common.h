// Helpers shared by the CPU GroupNorm + SiLU forward and backward kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "convert.h"
#include "kernels.h"

namespace fastdiff {
namespace cpu {
namespace gn {

constexpr int64_t kBlock = 512;            // elements per float32 partial sum
constexpr int64_t kParallelMin = 1 << 14;  // elements below which one thread is faster
// NCHW rows (H*W) shorter than this are not worth a loop each: the forward runs its affine flat over the group
// with w and b expanded per element, the backward reduces them with plain loops (a vector reduction's set-up and
// final horizontal sum cost more than a few scalar additions).
constexpr int64_t kShortRow = 32;
// Elements per flat silu loop of the NCHW forward (whole groups, at least one): long enough to amortise the
// loop set-up, small enough for its float32 buffer to stay in L1/L2.
constexpr int64_t kFlatChunk = 4096;

template <typename F>
inline double blocked_sum(int64_t count, F term) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < count; i0 += kBlock) {
    const int64_t i1 = std::min(count, i0 + kBlock);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = i0; i < i1; ++i) acc += term(i);
    total += acc;
  }
  return total;
}

// Mean and 1/sqrt(var + eps) of a contiguous group, in two passes: the mean (summing x - x[0], so that the
// float32 partial sums stay small and exact-ish whatever the mean's magnitude), then squared deviations from it.
template <typename T>
inline void group_moments(const T* xg, int64_t len, float eps, float* mean, float* rstd) {
  const float x0 = to_float(xg[0]);
  const double shifted = blocked_sum(len, [&](int64_t i) { return to_float(xg[i]) - x0; });
  const float m = static_cast<float>(x0 + shifted / len);
  const double ssd = blocked_sum(len, [&](int64_t i) {
    const float d = to_float(xg[i]) - m;
    return d * d;
  });
  *mean = m;
  *rstd = 1.0f / std::sqrt(static_cast<float>(ssd / len) + eps);
}

inline float weight_at(const GroupNormParams& P, int64_t c) { return P.weight != nullptr ? P.weight[c] : 1.0f; }
inline float bias_at(const GroupNormParams& P, int64_t c) { return P.bias != nullptr ? P.bias[c] : 0.0f; }

// Per-channel sums over the HW rows of one NHWC sample: sums[c] += sum_hw term(row[c], c).
template <typename T, typename F>
void channel_sums(const T* xn, int64_t rows, int64_t C, std::vector<float>& acc, std::vector<double>& sums,
                  F term) {
  std::fill(sums.begin(), sums.end(), 0.0);
  const int64_t block_rows = std::max<int64_t>(1, kBlock / C);
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64_t r1 = std::min(rows, r0 + block_rows);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = xn + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[c] += term(to_float(row[c]), c);
    }
    for (int64_t c = 0; c < C; ++c) sums[c] += acc[c];
  }
}

}  // namespace gn
}  // namespace cpu
}  // namespace fastdiff
