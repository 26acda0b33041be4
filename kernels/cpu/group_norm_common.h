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

constexpr int64_t kBlock = 512;            // at most this many terms per float32 partial sum
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
// The channels run in chunks of kLanes, each summed down a block of kBlock rows into kRowsAtOnce float32
// accumulators per lane (one per row in flight, so that no row waits on the previous row's addition), which
// stay in registers; each accumulator adds at most kBlock / kRowsAtOnce terms before the block's total goes
// into the float64 sums. (Accumulating a whole row of C channels in an array in memory instead, as this did
// before, chained every row's additions through a store and a reload; README, "Native extension".)
constexpr int64_t kLanes = 16;
constexpr int64_t kRowsAtOnce = 4;
static_assert(kRowsAtOnce == 4, "channel_sums adds its kRowsAtOnce accumulators as two pairs");

template <typename T, typename F>
void channel_sums(const T* xn, int64_t rows, int64_t C, std::vector<double>& sums, F term) {
  std::fill(sums.begin(), sums.end(), 0.0);
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    int64_t c0 = 0;
    for (; c0 + kLanes <= C; c0 += kLanes) {
      float acc[kRowsAtOnce][kLanes] = {};
      int64_t r = r0;
      for (; r + kRowsAtOnce <= r1; r += kRowsAtOnce) {
        for (int64_t k = 0; k < kRowsAtOnce; ++k) {
          const T* row = xn + (r + k) * C + c0;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) acc[k][j] += term(to_float(row[j]), c0 + j);
        }
      }
      for (; r < r1; ++r) {
        const T* row = xn + r * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) acc[0][j] += term(to_float(row[j]), c0 + j);
      }
      for (int64_t j = 0; j < kLanes; ++j) sums[c0 + j] += (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
    }
    for (; c0 < C; ++c0) {  // the channels after the last whole chunk, one at a time
      float acc = 0.0f;
      for (int64_t r = r0; r < r1; ++r) acc += term(to_float(xn[r * C + c0]), c0);
      sums[c0] += acc;
    }
  }
}

}  // namespace gn
}  // namespace cpu
}  // namespace fastdiff
