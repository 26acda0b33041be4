// Conversions between an activation's storage type and float32 that vectorise inside `#pragma omp simd` loops.
//
// c10::BFloat16's own conversion to bf16 tests for NaN with std::isnan and rounds through a call, which kept
// every bf16 loop of the GroupNorm+SiLU kernels scalar: on a 2-core Zen 5 EPYC the 23 bf16 calls of one mnist5k
// forward took 69-126 ms with it and 11-13 ms with this (benchmarks/bench_native_cpu.py; README, "Native
// extension"). Here a bf16 is the top half of a float32's bits: widening
// is a shift, narrowing rounds to nearest even by integer arithmetic, and a NaN becomes the quiet NaN 0x7fc0,
// as c10 does. Half keeps c10's conversions (fp16 runs on CUDA only).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "vecmath.h"

namespace fastdiff {
namespace cpu {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 v) {
  return vecmath::float_of(static_cast<uint32_t>(v.x) << 16);
}

template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  const uint32_t b = vecmath::bits_of(v);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const uint16_t bits = (b & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

}  // namespace cpu
}  // namespace fastdiff
