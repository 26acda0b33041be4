// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), shared by the CPU
// and CUDA kernels. This is the generator of fastdiff/reference.py, word for word:
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (element / 4, step, stream, 0)
//
// and the four output words become four standard normals (two Box-Muller pairs) for elements 4g .. 4g+3 of a
// sample, with uniforms u = ((r >> 9) + 0.5) * 2^-23 (exact in float32, never 0 or 1).
//
// Plain C++ with no torch or CUDA headers: nvcc compiles it as host+device code, g++ as host code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fastdiff {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

constexpr int kStreamStep = 0;  // per-step noise of sampler_step
constexpr int kStreamInit = 1;  // initial noise x_T

// 2*pi, 2^-23 and 0.5 as the reference multiplies them in float32.
constexpr float kTwoPi = 0x1.921fb6p+2f;
constexpr float kUniformScale = 0x1p-23f;

struct Philox4 {
  uint32_t r0, r1, r2, r3;
};

// One Philox4x32 evaluation. Counter words c1 (step) and c2 (stream) and the key are fixed per call site,
// c0 is the group index; the fourth counter word is 0.
FD_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t k0, uint32_t k1) {
  uint32_t c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    // 32x32 -> 64-bit products; hi/lo halves.
    const uint64_t prod0 = static_cast<uint64_t>(c0) * kPhiloxM0;
    const uint64_t prod1 = static_cast<uint64_t>(c2) * kPhiloxM1;
    const uint32_t hi0 = static_cast<uint32_t>(prod0 >> 32), lo0 = static_cast<uint32_t>(prod0);
    const uint32_t hi1 = static_cast<uint32_t>(prod1 >> 32), lo1 = static_cast<uint32_t>(prod1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

// u = ((r >> 9) + 0.5) * 2^-23: the 23 high bits, centred in their bucket, in (0, 1).
FD_HOST_DEVICE float philox_uniform(uint32_t r) {
  return (static_cast<float>(r >> 9) + 0.5f) * kUniformScale;
}

FD_HOST_DEVICE uint32_t seed_lo(int64_t seed) { return static_cast<uint32_t>(static_cast<uint64_t>(seed)); }
FD_HOST_DEVICE uint32_t seed_hi(int64_t seed) { return static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32); }

}  // namespace fastdiff
