// CPU GroupNorm + SiLU forward (the backward is in group_norm_silu_backward.cpp).
//
// Statistics are two-pass (the mean from sums of x minus the group's first element, then the sum of squared
// deviations), in float32 lanes of at most kBlock terms each and float64 across blocks, so neither a large mean
// nor a long group costs precision.
//   NCHW: one task per (sample, chunk of consecutive groups); the groups of a sample are contiguous.
//   NHWC (channels_last): one task per sample; the statistics run per channel down the rows (16-channel chunks,
//   `gn::channel_sums`) and the output over each row of C channels, so both vectorise whatever the group size,
//   and the per-channel sums are folded into groups afterwards.
// Forward traffic: x read three times (twice from cache when a sample fits in L2), out written once.
// The output is silu((x - mean) * (rstd * w) + b): folding the mean into the shift, x * scale + (b - mean *
// scale), would cancel catastrophically when |mean| is much larger than the standard deviation.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "group_norm_common.h"
#include "kernels.h"
#include "vecmath.h"

namespace fastdiff {
namespace cpu {
namespace {
using namespace gn;

// NCHW: the groups of a sample are consecutive runs of len = C/G * HW elements, so a chunk of whole groups is
// one contiguous range. One task per (sample, chunk of groups); per group the two-pass moments, then the affine
// y = (x - mean) * rstd * w + b row by row into a float32 buffer (a cheap body, so short rows at the low
// resolutions of a UNet cost little), then silu as one long vectorised loop over the whole chunk.
template <typename T>
void forward_nchw(const GroupNormParams& P, const T* x, T* out, float* mean, float* rstd, int nt) {
  const Layout& L = P.layout;
  const int64_t C = L.channels, G = P.groups, cpg = C / G, HW = L.spatial, len = cpg * HW;
  const int64_t groups_per_chunk = std::min(G, std::max<int64_t>(1, kFlatChunk / std::max<int64_t>(len, 1)));
  const int64_t chunks = (G + groups_per_chunk - 1) / groups_per_chunk;
  // Short rows: w and b expanded to one value per element of a sample, once per call, so that the affine runs
  // flat over each group instead of row by row.
  const bool expand = HW < kShortRow;
  std::vector<float> w_e(expand ? C * HW : 0), b_e(expand ? C * HW : 0);
  for (int64_t c = 0; expand && c < C; ++c) {
    std::fill_n(w_e.begin() + c * HW, HW, weight_at(P, c));
    std::fill_n(b_e.begin() + c * HW, HW, bias_at(P, c));
  }
#pragma omp parallel num_threads(nt) if (L.batch * C * HW >= kParallelMin && nt > 1)
  {
    std::vector<float> y(groups_per_chunk * len);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < L.batch * chunks; ++task) {
      const int64_t n = task / chunks, g0 = (task % chunks) * groups_per_chunk;
      const int64_t g1 = std::min(G, g0 + groups_per_chunk);
      const int64_t start = (n * G + g0) * len;  // first element of the chunk
      for (int64_t g = g0; g < g1; ++g) {
        const T* xg = x + (n * G + g) * len;
        float* yg = y.data() + (g - g0) * len;
        float m, rs;
        group_moments(xg, len, P.eps, &m, &rs);
        mean[n * G + g] = m;
        rstd[n * G + g] = rs;
        if (expand) {
          const float* we = w_e.data() + g * len;
          const float* be = b_e.data() + g * len;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) yg[i] = (to_float(xg[i]) - m) * (rs * we[i]) + be[i];
          continue;
        }
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const float scale = rs * weight_at(P, c), shift = bias_at(P, c);
          const T* xc = xg + (c - g * cpg) * HW;
          float* yc = yg + (c - g * cpg) * HW;
          for (int64_t i = 0; i < HW; ++i) yc[i] = (to_float(xc[i]) - m) * scale + shift;
        }
      }
      const float* yv = y.data();
      T* oc = out + start;
      const int64_t count = (g1 - g0) * len;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) oc[i] = from_float<T>(vecmath::silu_f(yv[i]));
    }
  }
}

template <typename T>
void forward_nhwc(const GroupNormParams& P, const T* x, T* out, float* mean, float* rstd, int nt) {
  const Layout& L = P.layout;
  const int64_t C = L.channels, G = P.groups, cpg = C / G, HW = L.spatial, len = cpg * HW;
#pragma omp parallel num_threads(nt) if (L.batch * C * HW >= kParallelMin && nt > 1)
  {
    std::vector<float> meanc(C), scale(C), shift(C);
    std::vector<double> sums(C);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < L.batch; ++n) {
      const T* xn = x + n * HW * C;
      T* on = out + n * HW * C;
      // The mean, from sums of x minus the group's first element (see group_moments).
      for (int64_t g = 0; g < G; ++g) {
        std::fill(meanc.begin() + g * cpg, meanc.begin() + (g + 1) * cpg, to_float(xn[g * cpg]));
      }
      const float* mc = meanc.data();
      channel_sums(xn, HW, C, sums, [mc](float v, int64_t c) { return v - mc[c]; });
      for (int64_t g = 0; g < G; ++g) {
        double s = 0.0;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += sums[c];
        std::fill(meanc.begin() + g * cpg, meanc.begin() + (g + 1) * cpg, static_cast<float>(meanc[g * cpg] + s / len));
      }
      channel_sums(xn, HW, C, sums, [mc](float v, int64_t c) {
        const float d = v - mc[c];
        return d * d;
      });
      for (int64_t g = 0; g < G; ++g) {
        double s = 0.0;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += sums[c];
        const float m = meanc[g * cpg];
        const float rs = 1.0f / std::sqrt(static_cast<float>(s / len) + P.eps);
        mean[n * G + g] = m;
        rstd[n * G + g] = rs;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          scale[c] = rs * weight_at(P, c);
          shift[c] = bias_at(P, c);
        }
      }
      for (int64_t r = 0; r < HW; ++r) {
        const T* row = xn + r * C;
        T* orow = on + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          orow[c] = from_float<T>(vecmath::silu_f((to_float(row[c]) - meanc[c]) * scale[c] + shift[c]));
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void group_norm_silu_forward(const GroupNormParams& params, const T* x, T* out, float* mean, float* rstd,
                             int num_threads) {
  if (params.layout.channels_last) {
    forward_nhwc(params, x, out, mean, rstd, num_threads);
  } else {
    forward_nchw(params, x, out, mean, rstd, num_threads);
  }
}

#define FASTDIFF_INSTANTIATE_GN_FORWARD(T) \
  template void group_norm_silu_forward<T>(const GroupNormParams&, const T*, T*, float*, float*, int);
FASTDIFF_INSTANTIATE_GN_FORWARD(float)
FASTDIFF_INSTANTIATE_GN_FORWARD(c10::Half)
FASTDIFF_INSTANTIATE_GN_FORWARD(c10::BFloat16)
#undef FASTDIFF_INSTANTIATE_GN_FORWARD

}  // namespace cpu
}  // namespace fastdiff
