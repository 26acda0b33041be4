// CUDA kernels of fastdiff._C: plain CUDA C++ over raw device pointers, with no torch headers, so that they
// compile with nvcc alone (CI checks that on a machine with a CPU-only torch). The torch-facing wrapper is
// kernels/torch_ops_cuda.cpp. This header is plain C++: `stream` is a cudaStream_t passed as void*.
//
// Launch functions return the cudaError_t of the launch as an int (0 = success).
//
// Unverified on a GPU: these kernels are compiled (make ext-cuda-check) but have never run on one. fastdiff never
// selects them by itself (CUDA tensors go to the Triton kernels); only fastdiff.ops.use_backend("native") or
// FASTDIFF_BACKEND=native does, and benchmarks/gpu_suite.sh builds them only with FASTDIFF_NATIVE=1.
#pragma once

#include <cstdint>

#include "../params.h"

namespace fastdiff {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// See cpu::sampler_step. model_out's dtype is x's or float32. x0 may be null.
int sampler_step(const SamplerStepParams& params, DType x_dtype, DType out_dtype, const void* x,
                 const void* model_out, void* x_prev, void* x0, void* stream);

// Standard normals of `stream_id` for `batch` samples into out[batch, numel] (float32). step_ptr as in
// SamplerStepParams.
int philox_normal(const int64_t* seeds, int64_t seed_stride, int64_t batch, int64_t numel, uint32_t step,
                  const int64_t* step_ptr, uint32_t stream_id, float* out, void* stream);

// out = silu(group_norm(x)); mean, rstd: [N, groups] float32.
int group_norm_silu_forward(const GroupNormParams& params, DType dtype, const void* x, void* out, float* mean,
                            float* rstd, void* stream);

// grad_x, and the per-sample partial sums part_db / part_dw ([N, C] float32; the caller sums them over N).
int group_norm_silu_backward(const GroupNormParams& params, DType dtype, const void* grad_out, const void* x,
                             const float* mean, const float* rstd, void* grad_x, float* part_db, float* part_dw,
                             void* stream);

const char* error_string(int error);

}  // namespace cuda
}  // namespace fastdiff
