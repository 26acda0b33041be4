// The torch.library namespace `fastdiff_native`: op schemas and the CPU implementations (the CUDA ones are in
// torch_ops_cuda.cpp, the fake/meta ones in fastdiff/ops/native.py). The Python/Triton ops of fastdiff own the
// namespace `fastdiff`; these keep their own so that both can be loaded side by side.
//
// The schemas take the arguments of fastdiff.reference: sampler_step has an overload for a Tensor step (a 0-d
// integer tensor, on the host or on the device) and one for an int step (SymInt, so torch.compile can keep
// it symbolic); both return (x_prev, x0), x0 being empty unless return_x0. group_norm_silu also returns the
// per-(sample, group) mean and rstd that its backward uses.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "cpu/kernels.h"
#include "torch_common.h"

namespace fastdiff {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> sampler_step_cpu_impl(const Tensor& x, const Tensor& model_out, const Tensor& p,
                                                 const Tensor& q, const Tensor& A, const Tensor& B,
                                                 const Tensor& sigma, const Tensor& seeds, uint32_t step,
                                                 std::optional<double> clip, bool return_x0) {
  wrap::SamplerStepCall call = wrap::prepare_sampler_step(x, model_out, p, q, A, B, sigma, seeds, clip, return_x0);
  call.params.step = step;
  const int threads = at::get_num_threads();
  const bool same = call.model_out.scalar_type() == call.x.scalar_type();
  auto run = [&](auto x_tag, auto out_tag) {
    using T = decltype(x_tag);
    using TO = decltype(out_tag);
    cpu::sampler_step<T, TO>(call.params, call.x.data_ptr<T>(), call.model_out.data_ptr<TO>(),
                             call.x_prev.data_ptr<T>(), return_x0 ? call.x0.data_ptr<T>() : nullptr, threads);
  };
  switch (call.x.scalar_type()) {
    case at::kFloat:
      run(float{}, float{});
      break;
    case at::kHalf:
      same ? run(at::Half{}, at::Half{}) : run(at::Half{}, float{});
      break;
    case at::kBFloat16:
      same ? run(at::BFloat16{}, at::BFloat16{}) : run(at::BFloat16{}, float{});
      break;
    default:
      TORCH_CHECK(false, "fastdiff_native.sampler_step: unsupported dtype ", call.x.scalar_type());
  }
  return wrap::finish_sampler_step(call);
}

std::tuple<Tensor, Tensor> sampler_step_cpu(const Tensor& x, const Tensor& model_out, const Tensor& p,
                                            const Tensor& q, const Tensor& A, const Tensor& B, const Tensor& sigma,
                                            const Tensor& seeds, const Tensor& step, std::optional<double> clip,
                                            bool return_x0) {
  wrap::check_step_tensor(step);
  const uint32_t counter = wrap::step_counter(step.item<int64_t>());
  return sampler_step_cpu_impl(x, model_out, p, q, A, B, sigma, seeds, counter, clip, return_x0);
}

std::tuple<Tensor, Tensor> sampler_step_int_cpu(const Tensor& x, const Tensor& model_out, const Tensor& p,
                                                const Tensor& q, const Tensor& A, const Tensor& B,
                                                const Tensor& sigma, const Tensor& seeds, int64_t step,
                                                std::optional<double> clip, bool return_x0) {
  return sampler_step_cpu_impl(x, model_out, p, q, A, B, sigma, seeds, wrap::step_counter(step), clip, return_x0);
}

Tensor philox_normal_cpu(const Tensor& seeds, int64_t step, int64_t numel, int64_t stream) {
  TORCH_CHECK(seeds.dim() == 1 && !at::isFloatingType(seeds.scalar_type()),
              "fastdiff_native.philox_normal: seeds must be a 1-D integer tensor, got ", seeds.scalar_type(), " ",
              seeds.sizes());
  TORCH_CHECK(numel >= 0, "fastdiff_native.philox_normal: numel must be >= 0, got ", numel);
  const Tensor s = seeds.to(at::kLong);
  Tensor out = at::empty({s.size(0), numel}, s.options().dtype(at::kFloat));
  cpu::philox_normal(s.data_ptr<int64_t>(), s.stride(0), s.size(0), numel, wrap::step_counter(step),
                     static_cast<uint32_t>(stream), out.data_ptr<float>(), at::get_num_threads());
  return out;
}

template <typename F>
void dispatch_float_types(at::ScalarType t, const char* op, F f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_cpu(const Tensor& x, int64_t num_groups,
                                                       const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias, double eps) {
  wrap::GroupNormCall call = wrap::prepare_group_norm(x, num_groups, weight, bias, eps);
  Tensor out = at::empty_like(call.x);
  Tensor mean = at::empty({x.size(0), num_groups}, call.x.options().dtype(at::kFloat));
  Tensor rstd = at::empty_like(mean);
  if (call.x.numel() == 0) {  // no elements to read (an empty tensor's data pointer is null): as F.group_norm
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {out.to(call.result_dtype), mean, rstd};
  }
  dispatch_float_types(call.x.scalar_type(), "fastdiff_native.group_norm_silu", [&](auto tag) {
    using T = decltype(tag);
    cpu::group_norm_silu_forward<T>(call.params, call.x.data_ptr<T>(), out.data_ptr<T>(), mean.data_ptr<float>(),
                                    rstd.data_ptr<float>(), at::get_num_threads());
  });
  return {out.to(call.result_dtype), mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_backward_cpu(const Tensor& grad_out, const Tensor& x,
                                                                int64_t num_groups,
                                                                const std::optional<Tensor>& weight,
                                                                const std::optional<Tensor>& bias,
                                                                const Tensor& mean, const Tensor& rstd) {
  wrap::GroupNormCall call = wrap::prepare_group_norm(x, num_groups, weight, bias, 0.0);
  const auto [dout, m, rs] = wrap::prepare_group_norm_backward(grad_out, call.x, num_groups, mean, rstd);
  Tensor grad_x = at::empty_like(call.x);
  Tensor grad_w = at::empty({x.size(1)}, call.x.options().dtype(at::kFloat));
  Tensor grad_b = at::empty_like(grad_w);
  if (call.x.numel() == 0) {  // nothing to read; the parameters got no gradient from no elements
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x.to(call.result_dtype), wrap::param_grad(grad_w, weight), wrap::param_grad(grad_b, bias)};
  }
  dispatch_float_types(call.x.scalar_type(), "fastdiff_native.group_norm_silu_backward", [&](auto tag) {
    using T = decltype(tag);
    cpu::group_norm_silu_backward<T>(call.params, dout.data_ptr<T>(), call.x.data_ptr<T>(), m.data_ptr<float>(),
                                     rs.data_ptr<float>(), grad_x.data_ptr<T>(), grad_w.data_ptr<float>(),
                                     grad_b.data_ptr<float>(), at::get_num_threads());
  });
  return {grad_x.to(call.result_dtype), wrap::param_grad(grad_w, weight), wrap::param_grad(grad_b, bias)};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY(fastdiff_native, m) {
  m.def(
      "sampler_step(Tensor x, Tensor model_out, Tensor p, Tensor q, Tensor A, Tensor B, Tensor sigma, "
      "Tensor seeds, Tensor step, float? clip=None, bool return_x0=False) -> (Tensor, Tensor)");
  m.def(
      "sampler_step.int(Tensor x, Tensor model_out, Tensor p, Tensor q, Tensor A, Tensor B, Tensor sigma, "
      "Tensor seeds, SymInt step, float? clip=None, bool return_x0=False) -> (Tensor, Tensor)");
  m.def("philox_normal(Tensor seeds, int step, int numel, int stream=0) -> Tensor");
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, float eps=1e-05) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_backward(Tensor grad_out, Tensor x, int num_groups, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff_native, CPU, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_cpu);
  m.impl("sampler_step.int", &fastdiff::sampler_step_int_cpu);
  m.impl("philox_normal", &fastdiff::philox_normal_cpu);
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &fastdiff::group_norm_silu_backward_cpu);
}
