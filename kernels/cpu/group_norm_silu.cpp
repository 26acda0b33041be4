// CPU GroupNorm + SiLU forward (the backward is in group_norm_silu_backward.cpp).
//
// Statistics are two-pass (mean, then the sum of squared deviations), in float32 lanes within blocks of
// kBlock elements and float64 across blocks, so a large mean or a long group costs no precision.
//   NCHW: one task per (sample, group); a group is one contiguous run of C/G * HW elements.
//   NHWC (channels_last): one task per sample; every loop runs over a row of C channels, so it vectorises
//   whatever the group size, and per-channel partial sums are folded into groups afterwards.
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

// NCHW with rows of at least kShortRow elements: one task per (sample, group), one loop per channel row.
template <typename T>
void forward_nchw(const GroupNormParams& P, const T* x, T* out, float* mean, float* rstd, int nt) {
  const Layout& L = P.layout;
  const int64_t cpg = L.channels / P.groups, len = cpg * L.spatial, HW = L.spatial;
  const int64_t tasks = L.batch * P.groups;
#pragma omp parallel for num_threads(nt) schedule(static) if (tasks * len >= kParallelMin && nt > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const T* xg = x + task * len;  // (n*C + g*cpg) * HW == task * len
    T* og = out + task * len;
    float m, rs;
    group_moments(xg, len, P.eps, &m, &rs);
    mean[task] = m;
    rstd[task] = rs;
    const int64_t c0 = (task % P.groups) * cpg;
    for (int64_t cl = 0; cl < cpg; ++cl) {
      const float scale = rs * weight_at(P, c0 + cl), shift = bias_at(P, c0 + cl);
      const T* xc = xg + cl * HW;
      T* oc = og + cl * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) oc[i] = static_cast<T>(vecmath::silu_f((static_cast<float>(xc[i]) - m) * scale + shift));
    }
  }
}

// NCHW with short rows (H*W < kShortRow, the low resolutions of a UNet): one task per sample. The affine
// y = x*scale + shift goes row by row into a float32 buffer (a cheap body, so the short loops cost little);
// silu then runs as one long vectorised loop over the sample.
template <typename T>
void forward_nchw_short_rows(const GroupNormParams& P, const T* x, T* out, float* mean, float* rstd, int nt) {
  const Layout& L = P.layout;
  const int64_t C = L.channels, G = P.groups, cpg = C / G, HW = L.spatial, len = cpg * HW, numel = C * HW;
#pragma omp parallel num_threads(nt) if (L.batch * numel >= kParallelMin && nt > 1)
  {
    std::vector<float> y(numel);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < L.batch; ++n) {
      const T* xn = x + n * numel;
      T* on = out + n * numel;
      for (int64_t g = 0; g < G; ++g) {
        float m, rs;
        group_moments(xn + g * len, len, P.eps, &m, &rs);
        mean[n * G + g] = m;
        rstd[n * G + g] = rs;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const float scale = rs * weight_at(P, c), shift = bias_at(P, c);
          const T* xc = xn + c * HW;
          float* yc = y.data() + c * HW;
          for (int64_t i = 0; i < HW; ++i) yc[i] = (static_cast<float>(xc[i]) - m) * scale + shift;
        }
      }
      const float* yn = y.data();
#pragma omp simd
      for (int64_t i = 0; i < numel; ++i) on[i] = static_cast<T>(vecmath::silu_f(yn[i]));
    }
  }
}

template <typename T>
void forward_nhwc(const GroupNormParams& P, const T* x, T* out, float* mean, float* rstd, int nt) {
  const Layout& L = P.layout;
  const int64_t C = L.channels, G = P.groups, cpg = C / G, HW = L.spatial, len = cpg * HW;
#pragma omp parallel num_threads(nt) if (L.batch * C * HW >= kParallelMin && nt > 1)
  {
    std::vector<float> acc(C), meanc(C), scale(C), shift(C);
    std::vector<double> sums(C);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < L.batch; ++n) {
      const T* xn = x + n * HW * C;
      T* on = out + n * HW * C;
      // The mean, from sums of x minus the group's first element (see group_moments).
      for (int64_t g = 0; g < G; ++g) {
        std::fill(meanc.begin() + g * cpg, meanc.begin() + (g + 1) * cpg, static_cast<float>(xn[g * cpg]));
      }
      const float* mc = meanc.data();
      channel_sums(xn, HW, C, acc, sums, [mc](float v, int64_t c) { return v - mc[c]; });
      for (int64_t g = 0; g < G; ++g) {
        double s = 0.0;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += sums[c];
        std::fill(meanc.begin() + g * cpg, meanc.begin() + (g + 1) * cpg, static_cast<float>(meanc[g * cpg] + s / len));
      }
      channel_sums(xn, HW, C, acc, sums, [mc](float v, int64_t c) {
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
          orow[c] = static_cast<T>(vecmath::silu_f((static_cast<float>(row[c]) - meanc[c]) * scale[c] + shift[c]));
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
  } else if (params.layout.spatial < kShortRow) {
    forward_nchw_short_rows(params, x, out, mean, rstd, num_threads);
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
