// CUDA GroupNorm + SiLU, forward and backward: one thread block per (sample, group).
//
// Forward: when the group fits in shared memory (kCacheBytes), x is read from global memory once and written
// once (8 bytes per element in float32); otherwise it is read three times (mean, squared deviations, output),
// the later reads mostly from L2. Statistics are two-pass in float32 (stable for a large mean).
// Backward: pass 1 recomputes dy = grad_out * silu'(y) per channel and reduces sum(dy) and sum(dy * xhat) with
// deterministic block reductions (per-sample partials; the wrapper sums them over the batch); pass 2 writes
// grad_x. Reads x and grad_out twice, writes grad_x once.
//
// Element i of group (n, g) is channel g*cpg + i / HW, position i % HW in NCHW, and position i / cpg, channel
// g*cpg + i % cpg in NHWC, so that consecutive threads touch consecutive addresses in both layouts.
#include "device.cuh"

namespace fastdiff {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kScratch = 32;  // floats of static shared memory: one partial sum per warp (block_sum)
// The dynamic shared memory a block gets without opting in: 48 KiB for static and dynamic together, so the
// static scratch comes off it (a launch asking for all 48 KiB is refused with "invalid argument").
constexpr int64_t kCacheBytes = 48 * 1024 - kScratch * static_cast<int64_t>(sizeof(float));

struct GroupView {
  int64_t base;  // offset of the sample
  int64_t c0;    // first channel of the group
  int64_t cpg, HW, C;
  bool channels_last;
  __device__ int64_t len() const { return cpg * HW; }
  // Memory offset and channel of element i of the group.
  __device__ void locate(int64_t i, int64_t* offset, int64_t* channel) const {
    if (channels_last) {
      const int64_t hw = i / cpg, cl = i - hw * cpg;
      *channel = c0 + cl;
      *offset = base + hw * C + c0 + cl;
    } else {
      *channel = c0 + i / HW;
      *offset = base + c0 * HW + i;
    }
  }
};

__device__ GroupView group_view(const GroupNormParams& P, int64_t n, int64_t g) {
  const Layout& L = P.layout;
  const int64_t cpg = L.channels / P.groups;
  return {n * L.channels * L.spatial, g * cpg, cpg, L.spatial, L.channels, L.channels_last};
}

__device__ __forceinline__ float weight_at(const GroupNormParams& P, int64_t c) {
  return P.weight != nullptr ? P.weight[c] : 1.0f;
}
__device__ __forceinline__ float bias_at(const GroupNormParams& P, int64_t c) {
  return P.bias != nullptr ? P.bias[c] : 0.0f;
}

__device__ __forceinline__ float silu(float y) { return y / (1.0f + expf(-y)); }

__device__ __forceinline__ float silu_grad(float y) {
  const float s = 1.0f / (1.0f + expf(-y));
  return s * (1.0f + y * (1.0f - s));
}

template <typename T, bool kCache>
__global__ void __launch_bounds__(kThreads) gn_silu_forward_kernel(GroupNormParams P, const T* __restrict__ x,
                                                                   T* __restrict__ out, float* __restrict__ mean,
                                                                   float* __restrict__ rstd) {
  extern __shared__ float cache[];
  __shared__ float scratch[kScratch];
  const int64_t n = blockIdx.x / P.groups, g = blockIdx.x % P.groups;
  const GroupView v = group_view(P, n, g);
  const int64_t len = v.len();
  // Sums of x - x0 (x0 the group's first element) keep the partial sums small whatever the mean's magnitude.
  int64_t off0, c0;
  v.locate(0, &off0, &c0);
  const float x0 = to_float(x[off0]);
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    int64_t off, c;
    v.locate(i, &off, &c);
    const float xv = to_float(x[off]);
    if (kCache) cache[i] = xv;
    sum += xv - x0;
  }
  const float m = x0 + block_sum(sum, scratch) / static_cast<float>(len);
  float ssd = 0.0f;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    int64_t off, c;
    v.locate(i, &off, &c);
    const float d = (kCache ? cache[i] : to_float(x[off])) - m;
    ssd += d * d;
  }
  const float rs = rsqrtf(block_sum(ssd, scratch) / static_cast<float>(len) + P.eps);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = m;
    rstd[blockIdx.x] = rs;
  }
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    int64_t off, c;
    v.locate(i, &off, &c);
    const float xv = kCache ? cache[i] : to_float(x[off]);
    const float scale = rs * weight_at(P, c);
    out[off] = from_float<T>(silu((xv - m) * scale + bias_at(P, c)));  // not x*scale + (b - m*scale): cancels
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_silu_backward_kernel(GroupNormParams P, const T* __restrict__ grad_out, const T* __restrict__ x,
                            const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ grad_x,
                            float* __restrict__ part_db, float* __restrict__ part_dw) {
  __shared__ float scratch[kScratch];
  const int64_t n = blockIdx.x / P.groups, g = blockIdx.x % P.groups;
  const GroupView v = group_view(P, n, g);
  const float m = mean[blockIdx.x], rs = rstd[blockIdx.x];
  // Pass 1, one channel at a time: sum(dy) and sum(dy * xhat) over its HW positions.
  float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;  // meaningful in every thread after each block_sum
  for (int64_t cl = 0; cl < v.cpg; ++cl) {
    const int64_t c = v.c0 + cl;
    const float w = weight_at(P, c), scale = rs * w, shift = bias_at(P, c);
    float db = 0.0f, dw = 0.0f;
    for (int64_t hw = threadIdx.x; hw < v.HW; hw += blockDim.x) {
      const int64_t off = v.channels_last ? v.base + hw * v.C + c : v.base + c * v.HW + hw;
      const float xv = to_float(x[off]);
      const float d = to_float(grad_out[off]) * silu_grad((xv - m) * scale + shift);
      db += d;
      dw += d * ((xv - m) * rs);
    }
    db = block_sum(db, scratch);
    dw = block_sum(dw, scratch);
    if (threadIdx.x == 0) {
      part_db[n * v.C + c] = db;
      part_dw[n * v.C + c] = dw;
    }
    sum_dxhat += w * db;
    sum_dxhat_xhat += w * dw;
  }
  const float len = static_cast<float>(v.len());
  const float k2 = rs * sum_dxhat / len, k3 = rs * sum_dxhat_xhat / len;
  // Pass 2: grad_x = rstd * w * dy - k2 - k3 * xhat.
  for (int64_t i = threadIdx.x; i < v.len(); i += blockDim.x) {
    int64_t off, c;
    v.locate(i, &off, &c);
    const float xv = to_float(x[off]);
    const float scale = rs * weight_at(P, c);
    const float d = to_float(grad_out[off]) * silu_grad((xv - m) * scale + bias_at(P, c));
    grad_x[off] = from_float<T>(scale * d - k2 - k3 * ((xv - m) * rs));
  }
}

}  // namespace

int group_norm_silu_forward(const GroupNormParams& params, DType dtype, const void* x, void* out, float* mean,
                            float* rstd, void* stream) {
  const Layout& L = params.layout;
  const int64_t blocks = L.batch * params.groups;
  if (blocks == 0) return 0;
  const int64_t cache_bytes = (L.channels / params.groups) * L.spatial * static_cast<int64_t>(sizeof(float));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto xp = static_cast<const T*>(x);
    auto op = static_cast<T*>(out);
    if (cache_bytes <= kCacheBytes) {
      gn_silu_forward_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, cache_bytes, s>>>(params, xp, op, mean, rstd);
    } else {
      gn_silu_forward_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(params, xp, op, mean, rstd);
    }
    return launch_status();
  });
}

int group_norm_silu_backward(const GroupNormParams& params, DType dtype, const void* grad_out, const void* x,
                             const float* mean, const float* rstd, void* grad_x, float* part_db, float* part_dw,
                             void* stream) {
  const int64_t blocks = params.layout.batch * params.groups;
  if (blocks == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    gn_silu_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(params, static_cast<const T*>(grad_out),
                                                           static_cast<const T*>(x), mean, rstd,
                                                           static_cast<T*>(grad_x), part_db, part_dw);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace fastdiff
