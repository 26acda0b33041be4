// CPU kernels of fastdiff._C: plain C++17 over raw pointers, parallel with OpenMP, inner loops written for the
// compiler to vectorise (`#pragma omp simd`). The torch-facing wrappers live in kernels/torch_ops.cpp.
//
// Element type T is the storage type of the activations (float, c10::Half or c10::BFloat16); all arithmetic
// and all statistics are float32, as in fastdiff/reference.py.
#pragma once

#include <cstdint>

#include "../params.h"

namespace fastdiff {
namespace cpu {

// x0 = p*x + q*model_out (clamped to [-clip, clip]); x_prev = A*x0 + B*x + sigma*z, z the Philox normals of
// (seed, step, logical NCHW element index). x0_out may be null. TO is T or float (a model output in float32).
template <typename T, typename TO>
void sampler_step(const SamplerStepParams& params, const T* x, const TO* model_out, T* x_prev, T* x0_out,
                  int num_threads);

// Standard normals of `stream` for `batch` samples of `numel` elements into out[batch, numel] (row-major).
void philox_normal(const int64_t* seeds, int64_t seed_stride, int64_t batch, int64_t numel, uint32_t step,
                   uint32_t stream, float* out, int num_threads);

// out = silu(group_norm(x)); mean and rstd are [N, groups] float32 (biased variance, as GroupNorm).
template <typename T>
void group_norm_silu_forward(const GroupNormParams& params, const T* x, T* out, float* mean, float* rstd,
                             int num_threads);

// Gradients of silu(group_norm(x)) from the saved mean and rstd: grad_x, and grad_weight / grad_bias ([C]
// float32) when non-null.
template <typename T>
void group_norm_silu_backward(const GroupNormParams& params, const T* grad_out, const T* x, const float* mean,
                              const float* rstd, T* grad_x, float* grad_weight, float* grad_bias, int num_threads);

}  // namespace cpu
}  // namespace fastdiff
