// CUDA sampler step: one thread per Philox group of 4 logical elements of one sample.
//
// x_prev = A*x0 + B*x + sigma*z with x0 = clamp(p*x + q*model_out), z drawn in-kernel (Philox4x32-10, two
// Box-Muller pairs per call, the same stream as fastdiff/reference.py up to the float32 rounding of
// logf/sinf/cosf). Bytes per element: read x and model_out, write x_prev (+ x0); 12-16 for float32.
// NCHW tensors whose sample size is a multiple of 4 use one 4-element vector access per operand.
#include "../philox.h"
#include "device.cuh"

namespace fastdiff {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

__device__ __forceinline__ void normals4(int64_t seed, uint32_t step, uint32_t stream, uint32_t group, float z[4]) {
  const Philox4 r = philox4x32_10(group, step, stream, seed_lo(seed), seed_hi(seed));
  const float rad01 = sqrtf(-2.0f * logf(philox_uniform(r.r0)));
  const float rad23 = sqrtf(-2.0f * logf(philox_uniform(r.r2)));
  float sin01, cos01, sin23, cos23;
  sincosf(kTwoPi * philox_uniform(r.r1), &sin01, &cos01);
  sincosf(kTwoPi * philox_uniform(r.r3), &sin23, &cos23);
  z[0] = rad01 * cos01;
  z[1] = rad01 * sin01;
  z[2] = rad23 * cos23;
  z[3] = rad23 * sin23;
}

__device__ __forceinline__ uint32_t current_step(const SamplerStepParams& P) {
  return P.step_ptr != nullptr ? static_cast<uint32_t>(*P.step_ptr) : P.step;
}

__device__ __forceinline__ float update(const SamplerStepParams& P, int64_t n, float xf, float of, float z,
                                        float* x0_value) {
  float x0 = P.p[n] * xf + P.q[n] * of;
  if (P.has_clip) {  // comparisons rather than fminf/fmaxf: a NaN stays NaN, as with torch.clamp
    x0 = x0 < -P.clip ? -P.clip : x0;
    x0 = x0 > P.clip ? P.clip : x0;
  }
  *x0_value = x0;
  return P.A[n] * x0 + P.B[n] * xf + P.sigma[n] * z;
}

// kVec: NCHW and sample_numel % 4 == 0 with 4-element-aligned pointers. Otherwise element offsets come from
// the layout (NHWC keeps the logical NCHW index e = c*HW + hw for the noise).
template <typename T, typename TO, bool kVec>
__global__ void __launch_bounds__(kThreads) sampler_step_kernel(SamplerStepParams P, const T* __restrict__ x,
                                                                const TO* __restrict__ model_out,
                                                                T* __restrict__ x_prev, T* __restrict__ x0_out) {
  const int64_t numel = P.layout.sample_numel();
  const int64_t groups = (numel + 3) / 4;
  const int64_t total = P.layout.batch * groups;
  const uint32_t step = current_step(P);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = t / groups, g = t - n * groups;
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (P.sigma[n] != 0.0f) normals4(P.seeds[n * P.seed_stride], step, kStreamStep, static_cast<uint32_t>(g), z);
    if constexpr (kVec) {
      const int64_t off = n * numel + 4 * g;
      const Vec4<T> xv = *reinterpret_cast<const Vec4<T>*>(x + off);
      const Vec4<TO> ov = *reinterpret_cast<const Vec4<TO>*>(model_out + off);
      Vec4<T> pv, zv;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float x0;
        pv.v[j] = from_float<T>(update(P, n, to_float(xv.v[j]), to_float(ov.v[j]), z[j], &x0));
        zv.v[j] = from_float<T>(x0);
      }
      *reinterpret_cast<Vec4<T>*>(x_prev + off) = pv;
      if (x0_out != nullptr) *reinterpret_cast<Vec4<T>*>(x0_out + off) = zv;
    } else {
      const int64_t HW = P.layout.spatial, C = P.layout.channels;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = 4 * g + j;
        if (e >= numel) break;
        int64_t off = e;
        if (P.layout.channels_last) {
          const int64_t c = e / HW;
          off = (e - c * HW) * C + c;
        }
        off += n * numel;
        float x0;
        x_prev[off] = from_float<T>(update(P, n, to_float(x[off]), to_float(model_out[off]), z[j], &x0));
        if (x0_out != nullptr) x0_out[off] = from_float<T>(x0);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) philox_normal_kernel(const int64_t* __restrict__ seeds, int64_t seed_stride,
                                                                 int64_t batch, int64_t numel, uint32_t step_value,
                                                                 const int64_t* step_ptr, uint32_t stream,
                                                                 float* __restrict__ out) {
  const int64_t groups = (numel + 3) / 4;
  const uint32_t step = step_ptr != nullptr ? static_cast<uint32_t>(*step_ptr) : step_value;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < batch * groups;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = t / groups, g = t - n * groups;
    float z[4];
    normals4(seeds[n * seed_stride], step, stream, static_cast<uint32_t>(g), z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * g + j < numel) out[n * numel + 4 * g + j] = z[j];
    }
  }
}

unsigned grid_for(int64_t threads_needed) {
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);  // grid-stride beyond
}

bool aligned4(const void* ptr, size_t element_size) {
  return reinterpret_cast<uintptr_t>(ptr) % (4 * element_size) == 0;
}

}  // namespace

int sampler_step(const SamplerStepParams& params, DType x_dtype, DType out_dtype, const void* x,
                 const void* model_out, void* x_prev, void* x0, void* stream) {
  const int64_t numel = params.layout.sample_numel();
  const unsigned grid = grid_for(params.layout.batch * ((numel + 3) / 4));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(x_dtype, [&](auto x_tag) {
    using T = decltype(x_tag);
    auto launch = [&](auto out_tag) {
      using TO = decltype(out_tag);
      const bool vec = !params.layout.channels_last && numel % 4 == 0 && aligned4(x, sizeof(T)) &&
                       aligned4(model_out, sizeof(TO)) && aligned4(x_prev, sizeof(T)) &&
                       (x0 == nullptr || aligned4(x0, sizeof(T)));
      auto xp = static_cast<const T*>(x);
      auto op = static_cast<const TO*>(model_out);
      auto dst = static_cast<T*>(x_prev);
      auto x0p = static_cast<T*>(x0);
      if (vec) {
        sampler_step_kernel<T, TO, true><<<grid, kThreads, 0, s>>>(params, xp, op, dst, x0p);
      } else {
        sampler_step_kernel<T, TO, false><<<grid, kThreads, 0, s>>>(params, xp, op, dst, x0p);
      }
      return launch_status();
    };
    // The model output has x's dtype or float32 (the wrapper converts anything else).
    if (out_dtype == x_dtype) return launch(T{});
    return launch(float{});
  });
}

int philox_normal(const int64_t* seeds, int64_t seed_stride, int64_t batch, int64_t numel, uint32_t step,
                  const int64_t* step_ptr, uint32_t stream_id, float* out, void* stream) {
  const unsigned grid = grid_for(batch * ((numel + 3) / 4));
  philox_normal_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(seeds, seed_stride, batch, numel,
                                                                                step, step_ptr, stream_id, out);
  return launch_status();
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace cuda
}  // namespace fastdiff
