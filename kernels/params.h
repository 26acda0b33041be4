// Launch parameters shared by the CPU and CUDA kernels: plain structs over raw pointers (no torch, no CUDA
// headers), filled in by the torch-facing wrappers in torch_ops*.cpp.
#pragma once

#include <cstdint>

#include "philox.h"

namespace fastdiff {

// Memory layout of an [N, C, *spatial] tensor: NCHW-contiguous, or channels_last (NHWC) for 4-D tensors.
struct Layout {
  int64_t batch;     // N
  int64_t channels;  // C
  int64_t spatial;   // H * W (product of the trailing dimensions)
  bool channels_last;
  FD_HOST_DEVICE int64_t sample_numel() const { return channels * spatial; }
};

// A per-sample vector of shape [batch] with any stride (0 for an expanded scalar).
struct SampleVector {
  const float* data;
  int64_t stride;
  FD_HOST_DEVICE float operator[](int64_t n) const { return data[n * stride]; }
};

struct SamplerStepParams {
  Layout layout;
  SampleVector p, q, A, B, sigma;
  const int64_t* seeds;
  int64_t seed_stride;
  uint32_t step;            // the step as the generator counts it (step & 0xffffffff) ...
  const int64_t* step_ptr;  // ... or, when non-null, read from this device scalar (CUDA graphs: no host sync)
  bool has_clip;
  float clip;
};

struct GroupNormParams {
  Layout layout;
  int64_t groups;
  float eps;
  const float* weight;  // [C] or null (1)
  const float* bias;    // [C] or null (0)
};

}  // namespace fastdiff
