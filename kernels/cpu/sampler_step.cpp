// CPU sampler step and Philox normals.
//
// Work is split into tiles of kTile logical elements of one sample (a multiple of 4, so a tile starts on a
// Philox group); each tile draws its normals into a stack buffer in one vectorised loop and then applies the
// update in a second one. Bytes per element: read x and model_out, write x_prev (and x0): 12-16 for float32.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "../philox.h"
#include "kernels.h"
#include "vecmath.h"

namespace fastdiff {
namespace cpu {
namespace {

constexpr int64_t kTile = 4096;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;

// Normals of Philox groups [g0, g0 + count) of one sample (key k0, k1) into z[0 .. 4*count).
void fill_normals(uint32_t k0, uint32_t k1, uint32_t step, uint32_t stream, int64_t g0, int64_t count, float* z) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(g0 + j), step, stream, k0, k1);
    // Box-Muller, in the reference's order of float32 operations.
    const float rad01 = std::sqrt(-2.0f * vecmath::log_f(philox_uniform(r.r0)));
    const float rad23 = std::sqrt(-2.0f * vecmath::log_f(philox_uniform(r.r2)));
    float sin01, cos01, sin23, cos23;
    vecmath::sincos_f(kTwoPi * philox_uniform(r.r1), &sin01, &cos01);
    vecmath::sincos_f(kTwoPi * philox_uniform(r.r3), &sin23, &cos23);
    z[4 * j + 0] = rad01 * cos01;
    z[4 * j + 1] = rad01 * sin01;
    z[4 * j + 2] = rad23 * cos23;
    z[4 * j + 3] = rad23 * sin23;
  }
}

struct Coefficients {
  float p, q, A, B, sigma;
};

// The update for `count` elements; xs/outs/dst are indexed through `offset(i)` (identity for NCHW tiles).
template <typename T, typename TO, typename Offset>
inline void apply_step(const T* x, const TO* model_out, T* x_prev, T* x0_out, const float* z, int64_t count,
                       const Coefficients& k, bool has_clip, float clip, Offset offset) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const int64_t o = offset(i);
    const float xf = static_cast<float>(x[o]);
    float x0 = k.p * xf + k.q * static_cast<float>(model_out[o]);
    if (has_clip) {
      x0 = x0 < -clip ? -clip : x0;
      x0 = x0 > clip ? clip : x0;
    }
    float xp = k.A * x0 + k.B * xf;
    if (z != nullptr) xp += k.sigma * z[i];
    x_prev[o] = static_cast<T>(xp);
    if (x0_out != nullptr) x0_out[o] = static_cast<T>(x0);
  }
}

}  // namespace

template <typename T, typename TO>
void sampler_step(const SamplerStepParams& params, const T* x, const TO* model_out, T* x_prev, T* x0_out,
                  int num_threads) {
  const Layout& L = params.layout;
  const int64_t numel = L.sample_numel();
  const int64_t tiles_per_sample = (numel + kTile - 1) / kTile;
  const int64_t tiles = L.batch * tiles_per_sample;
  const bool parallel = L.batch * numel >= kParallelMin && num_threads > 1;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = t / tiles_per_sample;
    const int64_t start = (t % tiles_per_sample) * kTile;
    const int64_t count = std::min(kTile, numel - start);
    const Coefficients k{params.p[n], params.q[n], params.A[n], params.B[n], params.sigma[n]};
    alignas(64) float z[kTile];
    const float* noise = nullptr;
    if (k.sigma != 0.0f) {  // sigma = 0 (DDIM eta = 0, the last DDPM step): x_prev needs no noise
      const int64_t seed = params.seeds[n * params.seed_stride];
      fill_normals(seed_lo(seed), seed_hi(seed), params.step, kStreamStep, start / 4, (count + 3) / 4, z);
      noise = z;
    }
    const int64_t base = n * numel;
    if (!L.channels_last) {
      apply_step(x + base + start, model_out + base + start, x_prev + base + start,
                 x0_out != nullptr ? x0_out + base + start : nullptr, noise, count, k, params.has_clip,
                 params.clip, [](int64_t i) { return i; });
    } else {
      // Logical index e = c * HW + hw lives at hw * C + c in an NHWC sample.
      const int64_t hw_count = L.spatial, channels = L.channels;
      apply_step(x + base, model_out + base, x_prev + base, x0_out != nullptr ? x0_out + base : nullptr, noise,
                 count, k, params.has_clip, params.clip, [=](int64_t i) {
                   const int64_t e = start + i;
                   const int64_t c = e / hw_count;
                   return (e - c * hw_count) * channels + c;
                 });
    }
  }
}

void philox_normal(const int64_t* seeds, int64_t seed_stride, int64_t batch, int64_t numel, uint32_t step,
                   uint32_t stream, float* out, int num_threads) {
  const int64_t tiles_per_sample = (numel + kTile - 1) / kTile;
  const int64_t tiles = batch * tiles_per_sample;
  const bool parallel = batch * numel >= kParallelMin && num_threads > 1;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = t / tiles_per_sample;
    const int64_t start = (t % tiles_per_sample) * kTile;
    const int64_t count = std::min(kTile, numel - start);
    const int64_t seed = seeds[n * seed_stride];
    alignas(64) float z[kTile];
    fill_normals(seed_lo(seed), seed_hi(seed), step, stream, start / 4, (count + 3) / 4, z);
    std::copy(z, z + count, out + n * numel + start);
  }
}

#define FASTDIFF_INSTANTIATE_SAMPLER_STEP(T, TO)                                                         \
  template void sampler_step<T, TO>(const SamplerStepParams&, const T*, const TO*, T*, T*, int);
FASTDIFF_INSTANTIATE_SAMPLER_STEP(float, float)
FASTDIFF_INSTANTIATE_SAMPLER_STEP(c10::Half, c10::Half)
FASTDIFF_INSTANTIATE_SAMPLER_STEP(c10::BFloat16, c10::BFloat16)
FASTDIFF_INSTANTIATE_SAMPLER_STEP(c10::Half, float)
FASTDIFF_INSTANTIATE_SAMPLER_STEP(c10::BFloat16, float)
#undef FASTDIFF_INSTANTIATE_SAMPLER_STEP

}  // namespace cpu
}  // namespace fastdiff
