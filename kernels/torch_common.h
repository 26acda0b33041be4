// Argument checking and preparation shared by the CPU and CUDA wrappers (torch_ops.cpp, torch_ops_cuda.cpp):
// from tensors to the plain launch parameters of params.h, and back.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

#include "params.h"

namespace fastdiff {
namespace wrap {

using at::Tensor;

// x's memory format when the kernels can take it as is (NCHW-contiguous, or channels_last for 4-D).
inline std::optional<at::MemoryFormat> kernel_format(const Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return std::nullopt;
}

// The layout of a tensor the kernels take, seen as [N, C, *] (a 1-D tensor is N samples of one element).
inline Layout layout_of(const Tensor& x) {
  Layout L;
  L.batch = x.size(0);
  L.channels = x.dim() >= 2 ? x.size(1) : 1;
  L.spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) L.spatial *= x.size(d);
  L.channels_last = *kernel_format(x) == at::MemoryFormat::ChannelsLast;
  return L;
}

// x in a dtype (float32, float16, bfloat16; float64 computes in float32 as the reference does) and a layout
// the kernels take; a copy only when needed.
inline Tensor kernel_input(const Tensor& x, const char* op) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected a floating-point tensor, got ", x.scalar_type());
  const auto t = x.scalar_type();
  Tensor xk = (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) ? x : x.to(at::kFloat);
  return kernel_format(xk) ? xk : xk.contiguous();
}

// --- sampler_step -------------------------------------------------------------------------------------------

struct SamplerStepCall {
  Tensor x, model_out, x_prev, x0;  // in kernel dtype and layout; x0 is empty unless return_x0
  Tensor coefs[5], seeds;           // float32 [N] (stride-0 views kept) and int64 [N]: alive during the launch
  at::ScalarType result_dtype;      // x's own dtype
  SamplerStepParams params;
};

inline SampleVector sample_vector(const Tensor& v, const Tensor& x, const char* name, Tensor* keep) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), "fastdiff_native.sampler_step: ", name,
              " must have shape [", x.size(0), "] (one value per sample), got ", v.sizes());
  *keep = v.to(x.device(), at::kFloat);  // no copy when it is float32 on x's device already
  return {keep->data_ptr<float>(), keep->stride(0)};
}

inline SamplerStepCall prepare_sampler_step(const Tensor& x, const Tensor& model_out, const Tensor& p,
                                            const Tensor& q, const Tensor& A, const Tensor& B, const Tensor& sigma,
                                            const Tensor& seeds, std::optional<double> clip, bool return_x0) {
  constexpr const char* op = "fastdiff_native.sampler_step";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension");
  TORCH_CHECK(model_out.sizes() == x.sizes(), op, ": model_out has shape ", model_out.sizes(), " but x has ",
              x.sizes());
  TORCH_CHECK(model_out.device() == x.device(), op, ": model_out is on ", model_out.device(), " but x is on ",
              x.device());
  SamplerStepCall call;
  call.result_dtype = x.scalar_type();
  call.x = kernel_input(x, op);
  const auto format = *kernel_format(call.x);
  // The kernels take a model output in x's dtype or in float32 (exact for every other float type but float64).
  Tensor mo = model_out.scalar_type() == call.x.scalar_type() ? model_out : model_out.to(at::kFloat);
  call.model_out = mo.contiguous(format);
  call.x_prev = at::empty_like(call.x);
  call.x0 = return_x0 ? at::empty_like(call.x) : at::empty({0}, call.x.options());
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == x.size(0), op, ": seeds must have shape [", x.size(0),
              "] (one per sample), got ", seeds.sizes());
  TORCH_CHECK(!at::isFloatingType(seeds.scalar_type()), op, ": seeds must be integers, got ", seeds.scalar_type());
  call.seeds = seeds.to(x.device(), at::kLong);
  SamplerStepParams& P = call.params;
  P.layout = layout_of(call.x);
  P.p = sample_vector(p, x, "p", &call.coefs[0]);
  P.q = sample_vector(q, x, "q", &call.coefs[1]);
  P.A = sample_vector(A, x, "A", &call.coefs[2]);
  P.B = sample_vector(B, x, "B", &call.coefs[3]);
  P.sigma = sample_vector(sigma, x, "sigma", &call.coefs[4]);
  P.seeds = call.seeds.data_ptr<int64_t>();
  P.seed_stride = call.seeds.stride(0);
  P.step = 0;
  P.step_ptr = nullptr;
  P.has_clip = clip.has_value();
  P.clip = clip.has_value() ? static_cast<float>(*clip) : 0.0f;
  return call;
}

inline void check_step_tensor(const Tensor& step) {
  TORCH_CHECK(step.numel() == 1 && !at::isFloatingType(step.scalar_type()) && step.scalar_type() != at::kBool,
              "fastdiff_native.sampler_step: step must be an int or a one-element integer tensor, got ",
              step.scalar_type(), " of shape ", step.sizes());
}

// The step as the generator counts it (the reference masks it to 32 bits).
inline uint32_t step_counter(int64_t step) { return static_cast<uint32_t>(static_cast<uint64_t>(step)); }

inline std::tuple<Tensor, Tensor> finish_sampler_step(const SamplerStepCall& call) {
  if (call.result_dtype == call.x_prev.scalar_type()) return {call.x_prev, call.x0};
  return {call.x_prev.to(call.result_dtype), call.x0.to(call.result_dtype)};
}

// --- group_norm_silu ----------------------------------------------------------------------------------------

struct GroupNormCall {
  Tensor x, weight, bias;  // x in kernel dtype and layout; weight / bias float32 contiguous or undefined
  at::ScalarType result_dtype;
  GroupNormParams params;
};

inline Tensor affine_vector(const std::optional<Tensor>& v, const Tensor& x, const char* name) {
  if (!v.has_value() || !v->defined()) return Tensor();
  TORCH_CHECK(v->dim() == 1 && v->size(0) == x.size(1), "fastdiff_native.group_norm_silu: ", name,
              " must have shape [", x.size(1), "] (one value per channel), got ", v->sizes());
  return v->to(x.device(), at::kFloat).contiguous();
}

inline GroupNormCall prepare_group_norm(const Tensor& x, int64_t num_groups, const std::optional<Tensor>& weight,
                                        const std::optional<Tensor>& bias, double eps) {
  constexpr const char* op = "fastdiff_native.group_norm_silu";
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape [N, C, *], got ", x.sizes());
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, op, ": ", x.size(1),
              " channels are not divisible into num_groups=", num_groups);
  GroupNormCall call;
  call.result_dtype = x.scalar_type();
  call.x = kernel_input(x, op);
  call.weight = affine_vector(weight, x, "weight");
  call.bias = affine_vector(bias, x, "bias");
  GroupNormParams& P = call.params;
  P.layout = layout_of(call.x);
  P.groups = num_groups;
  P.eps = static_cast<float>(eps);
  P.weight = call.weight.defined() ? call.weight.data_ptr<float>() : nullptr;
  P.bias = call.bias.defined() ? call.bias.data_ptr<float>() : nullptr;
  return call;
}

// What the backward takes besides x: grad_out in x's kernel dtype and layout, and the forward's statistics as
// float32 contiguous [N * num_groups], each checked to be on x's device (a kernel given another device's pointer
// would fault).
struct GroupNormBackwardInputs {
  Tensor dout, mean, rstd;
};

inline GroupNormBackwardInputs prepare_group_norm_backward(const Tensor& grad_out, const Tensor& xk,
                                                           int64_t num_groups, const Tensor& mean,
                                                           const Tensor& rstd) {
  constexpr const char* op = "fastdiff_native.group_norm_silu_backward";
  TORCH_CHECK(grad_out.sizes() == xk.sizes(), op, ": grad_out has shape ", grad_out.sizes(), " but x has ",
              xk.sizes());
  const std::pair<const Tensor*, const char*> named[] = {{&grad_out, "grad_out"}, {&mean, "mean"}, {&rstd, "rstd"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK(t->device() == xk.device(), op, ": ", name, " is on ", t->device(), " but x is on ", xk.device());
  }
  GroupNormBackwardInputs in{grad_out.to(xk.scalar_type()).contiguous(*kernel_format(xk)),
                             mean.to(at::kFloat).contiguous(), rstd.to(at::kFloat).contiguous()};
  TORCH_CHECK(in.mean.numel() == xk.size(0) * num_groups && in.rstd.numel() == in.mean.numel(), op,
              ": mean and rstd must have shape [N, num_groups]");
  return in;
}

// grad_weight / grad_bias in the parameter's dtype, or an empty tensor when there is no parameter.
inline Tensor param_grad(const Tensor& grad, const std::optional<Tensor>& param) {
  if (!param.has_value() || !param->defined()) return at::empty({0}, grad.options());
  return grad.to(param->scalar_type());
}

}  // namespace wrap
}  // namespace fastdiff
