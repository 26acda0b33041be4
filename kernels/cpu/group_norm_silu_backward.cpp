// CPU backward of silu(group_norm(x)), from the forward's saved mean and rstd.
//
// With xhat = (x - mean) * rstd, y = w * xhat + b and dy = grad_out * silu'(y):
//   grad_b[c] = sum dy,   grad_w[c] = sum dy * xhat            (over samples and positions)
//   grad_x    = rstd * (w * dy - mean_g(w * dy) - xhat * mean_g(w * dy * xhat))   (means over the group)
// Pass 1 computes dy once (one exp per element) into a per-thread scratch buffer together with the
// per-channel sums; pass 2 writes grad_x. Per-sample partial sums of grad_w / grad_b are reduced over the
// batch at the end, in a fixed order (the result does not depend on the thread count).
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

// sum(dy) and sum(dy * xhat) over one NCHW channel row: vectorised blocks for long rows, a plain loop for short
// ones (a vector reduction's set-up and final horizontal sum cost more than a few scalar additions).
template <typename T>
inline void row_sums(const float* dy, const T* x, int64_t HW, float m, float rs, double* db, double* dw) {
  if (HW >= kShortRow) {
    *db = blocked_sum(HW, [&](int64_t i) { return dy[i]; });
    *dw = blocked_sum(HW, [&](int64_t i) { return dy[i] * ((to_float(x[i]) - m) * rs); });
    return;
  }
  float sb = 0.0f, sw = 0.0f;
  for (int64_t i = 0; i < HW; ++i) {
    sb += dy[i];
    sw += dy[i] * ((to_float(x[i]) - m) * rs);
  }
  *db = sb;
  *dw = sw;
}

// Per (sample, group) of an NCHW tensor. part_db / part_dw are [N, C]. The loops per channel row have cheap
// bodies (affine, sums, the final combination); the one with the exponential runs flat over the whole group,
// so short rows (the low resolutions of a UNet) cost no more per element than long ones.
template <typename T>
void backward_nchw(const GroupNormParams& P, const T* dout, const T* x, const float* mean, const float* rstd,
                   T* dx, float* part_db, float* part_dw, int nt) {
  const Layout& L = P.layout;
  const int64_t C = L.channels, G = P.groups, cpg = C / G, HW = L.spatial, len = cpg * HW;
  const int64_t tasks = L.batch * G;
#pragma omp parallel num_threads(nt) if (tasks * len >= kParallelMin && nt > 1)
  {
    std::vector<float> dy(len);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / G, c0 = (task % G) * cpg;
      const T* xg = x + task * len;
      const T* dg = dout + task * len;
      const float m = mean[task], rs = rstd[task];
      float* dyg = dy.data();
      for (int64_t cl = 0; cl < cpg; ++cl) {  // y = w * xhat + b, into dy for now
        const float scale = rs * weight_at(P, c0 + cl), shift = bias_at(P, c0 + cl);
        const T* xc = xg + cl * HW;
        float* yc = dyg + cl * HW;
        for (int64_t i = 0; i < HW; ++i) yc[i] = (to_float(xc[i]) - m) * scale + shift;
      }
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dyg[i] = to_float(dg[i]) * vecmath::silu_grad_f(dyg[i]);
      double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
      for (int64_t cl = 0; cl < cpg; ++cl) {
        const T* xc = xg + cl * HW;
        const float* dyc = dyg + cl * HW;
        double db, dw;
        row_sums(dyc, xc, HW, m, rs, &db, &dw);
        part_db[n * C + c0 + cl] = static_cast<float>(db);
        part_dw[n * C + c0 + cl] = static_cast<float>(dw);
        sum_dxhat += weight_at(P, c0 + cl) * db;
        sum_dxhat_xhat += weight_at(P, c0 + cl) * dw;
      }
      const float k2 = static_cast<float>(rs * sum_dxhat / len);
      const float k3 = static_cast<float>(rs * sum_dxhat_xhat / len);
      T* dxg = dx + task * len;
      for (int64_t cl = 0; cl < cpg; ++cl) {
        const float k1 = rs * weight_at(P, c0 + cl);
        const T* xc = xg + cl * HW;
        const float* dyc = dyg + cl * HW;
        T* dxc = dxg + cl * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const float xhat = (to_float(xc[i]) - m) * rs;
          dxc[i] = from_float<T>(k1 * dyc[i] - k2 - k3 * xhat);
        }
      }
    }
  }
}

// Per sample of an NHWC tensor; every inner loop runs over the C channels of one position.
template <typename T>
void backward_nhwc(const GroupNormParams& P, const T* dout, const T* x, const float* mean, const float* rstd,
                   T* dx, float* part_db, float* part_dw, int nt) {
  const Layout& L = P.layout;
  const int64_t C = L.channels, G = P.groups, cpg = C / G, HW = L.spatial, len = cpg * HW;
#pragma omp parallel num_threads(nt) if (L.batch * C * HW >= kParallelMin && nt > 1)
  {
    std::vector<float> dy(HW * C), meanc(C), rstdc(C), scale(C), shift(C), acc_b(C), acc_w(C), k1(C), k2(C), k3(C);
    std::vector<double> db(C), dw(C);
    const int64_t block_rows = std::max<int64_t>(1, kBlock / C);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < L.batch; ++n) {
      const T* xn = x + n * HW * C;
      const T* dn = dout + n * HW * C;
      for (int64_t c = 0; c < C; ++c) {
        meanc[c] = mean[n * G + c / cpg];
        rstdc[c] = rstd[n * G + c / cpg];
        scale[c] = rstdc[c] * weight_at(P, c);
        shift[c] = bias_at(P, c);
      }
      std::fill(db.begin(), db.end(), 0.0);
      std::fill(dw.begin(), dw.end(), 0.0);
      for (int64_t r0 = 0; r0 < HW; r0 += block_rows) {
        std::fill(acc_b.begin(), acc_b.end(), 0.0f);
        std::fill(acc_w.begin(), acc_w.end(), 0.0f);
        for (int64_t r = r0; r < std::min(HW, r0 + block_rows); ++r) {
          const T* xrow = xn + r * C;
          const T* drow = dn + r * C;
          float* dyrow = dy.data() + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float xv = to_float(xrow[c]);
            const float d = to_float(drow[c]) * vecmath::silu_grad_f((xv - meanc[c]) * scale[c] + shift[c]);
            dyrow[c] = d;
            acc_b[c] += d;
            acc_w[c] += d * ((xv - meanc[c]) * rstdc[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          db[c] += acc_b[c];
          dw[c] += acc_w[c];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          sum_dxhat += weight_at(P, c) * db[c];
          sum_dxhat_xhat += weight_at(P, c) * dw[c];
        }
        const double rs = rstd[n * G + g];
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          k1[c] = static_cast<float>(rs * weight_at(P, c));
          k2[c] = static_cast<float>(rs * sum_dxhat / len);
          k3[c] = static_cast<float>(rs * sum_dxhat_xhat / len);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        part_db[n * C + c] = static_cast<float>(db[c]);
        part_dw[n * C + c] = static_cast<float>(dw[c]);
      }
      T* dxn = dx + n * HW * C;
      for (int64_t r = 0; r < HW; ++r) {
        const T* xrow = xn + r * C;
        const float* dyrow = dy.data() + r * C;
        T* dxrow = dxn + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float xhat = (to_float(xrow[c]) - meanc[c]) * rstdc[c];
          dxrow[c] = from_float<T>(k1[c] * dyrow[c] - k2[c] - k3[c] * xhat);
        }
      }
    }
  }
}

// grad[c] = sum over samples of part[n, c], in sample order.
void reduce_over_batch(const std::vector<float>& part, int64_t N, int64_t C, float* grad) {
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0;
    for (int64_t n = 0; n < N; ++n) s += part[n * C + c];
    grad[c] = static_cast<float>(s);
  }
}

}  // namespace

template <typename T>
void group_norm_silu_backward(const GroupNormParams& params, const T* grad_out, const T* x, const float* mean,
                              const float* rstd, T* grad_x, float* grad_weight, float* grad_bias, int num_threads) {
  const int64_t N = params.layout.batch, C = params.layout.channels;
  std::vector<float> part_db(N * C), part_dw(N * C);
  if (params.layout.channels_last) {
    backward_nhwc(params, grad_out, x, mean, rstd, grad_x, part_db.data(), part_dw.data(), num_threads);
  } else {
    backward_nchw(params, grad_out, x, mean, rstd, grad_x, part_db.data(), part_dw.data(), num_threads);
  }
  if (grad_weight != nullptr) reduce_over_batch(part_dw, N, C, grad_weight);
  if (grad_bias != nullptr) reduce_over_batch(part_db, N, C, grad_bias);
}

#define FASTDIFF_INSTANTIATE_GN_BACKWARD(T)                                                                   \
  template void group_norm_silu_backward<T>(const GroupNormParams&, const T*, const T*, const float*, const float*, \
                                            T*, float*, float*, int);
FASTDIFF_INSTANTIATE_GN_BACKWARD(float)
FASTDIFF_INSTANTIATE_GN_BACKWARD(c10::Half)
FASTDIFF_INSTANTIATE_GN_BACKWARD(c10::BFloat16)
#undef FASTDIFF_INSTANTIATE_GN_BACKWARD

}  // namespace cpu
}  // namespace fastdiff
