// CUDA implementations of the fastdiff_native ops: the thin torch-facing side of kernels/cuda/*.cu (which see
// only raw pointers). Built only when both a CUDA toolkit and a CUDA build of torch are present.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kernels.h"
#include "torch_common.h"

namespace fastdiff {
namespace {

using at::Tensor;

cuda::DType cuda_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, op, ": CUDA kernel launch failed: ", cuda::error_string(error));
}

void* current_stream(const Tensor& x) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
}

void check_on_cuda(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x is on ", x.device(), " but another argument is on a CUDA device; put them on ",
              "one device");
}

// step_device: a device scalar the kernel reads (no host sync, safe under CUDA-graph capture), or undefined.
std::tuple<Tensor, Tensor> sampler_step_cuda_impl(const Tensor& x, const Tensor& model_out, const Tensor& p,
                                                  const Tensor& q, const Tensor& A, const Tensor& B,
                                                  const Tensor& sigma, const Tensor& seeds, uint32_t step,
                                                  const Tensor& step_device, std::optional<double> clip,
                                                  bool return_x0) {
  constexpr const char* op = "fastdiff_native.sampler_step";
  check_on_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  wrap::SamplerStepCall call = wrap::prepare_sampler_step(x, model_out, p, q, A, B, sigma, seeds, clip, return_x0);
  call.params.step = step;
  call.params.step_ptr = step_device.defined() ? step_device.data_ptr<int64_t>() : nullptr;
  check_launch(cuda::sampler_step(call.params, cuda_dtype(call.x.scalar_type(), op),
                                  cuda_dtype(call.model_out.scalar_type(), op), call.x.data_ptr(),
                                  call.model_out.data_ptr(), call.x_prev.data_ptr(),
                                  return_x0 ? call.x0.data_ptr() : nullptr, current_stream(call.x)),
               op);
  return wrap::finish_sampler_step(call);
}

std::tuple<Tensor, Tensor> sampler_step_cuda(const Tensor& x, const Tensor& model_out, const Tensor& p,
                                             const Tensor& q, const Tensor& A, const Tensor& B, const Tensor& sigma,
                                             const Tensor& seeds, const Tensor& step, std::optional<double> clip,
                                             bool return_x0) {
  wrap::check_step_tensor(step);
  if (step.is_cuda()) {
    const Tensor step_device = step.to(x.device(), at::kLong).reshape({});
    return sampler_step_cuda_impl(x, model_out, p, q, A, B, sigma, seeds, 0, step_device, clip, return_x0);
  }
  return sampler_step_cuda_impl(x, model_out, p, q, A, B, sigma, seeds, wrap::step_counter(step.item<int64_t>()),
                                Tensor(), clip, return_x0);
}

std::tuple<Tensor, Tensor> sampler_step_int_cuda(const Tensor& x, const Tensor& model_out, const Tensor& p,
                                                 const Tensor& q, const Tensor& A, const Tensor& B,
                                                 const Tensor& sigma, const Tensor& seeds, int64_t step,
                                                 std::optional<double> clip, bool return_x0) {
  return sampler_step_cuda_impl(x, model_out, p, q, A, B, sigma, seeds, wrap::step_counter(step), Tensor(), clip,
                                return_x0);
}

Tensor philox_normal_cuda(const Tensor& seeds, int64_t step, int64_t numel, int64_t stream) {
  constexpr const char* op = "fastdiff_native.philox_normal";
  TORCH_CHECK(seeds.dim() == 1 && !at::isFloatingType(seeds.scalar_type()), op,
              ": seeds must be a 1-D integer tensor, got ", seeds.scalar_type(), " ", seeds.sizes());
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  const c10::cuda::CUDAGuard guard(seeds.device());
  const Tensor s = seeds.to(at::kLong);
  Tensor out = at::empty({s.size(0), numel}, s.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  check_launch(cuda::philox_normal(s.data_ptr<int64_t>(), s.stride(0), s.size(0), numel, wrap::step_counter(step),
                                   nullptr, static_cast<uint32_t>(stream), out.data_ptr<float>(), current_stream(s)),
               op);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_cuda(const Tensor& x, int64_t num_groups,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, double eps) {
  constexpr const char* op = "fastdiff_native.group_norm_silu";
  check_on_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  wrap::GroupNormCall call = wrap::prepare_group_norm(x, num_groups, weight, bias, eps);
  Tensor out = at::empty_like(call.x);
  Tensor mean = at::empty({x.size(0), num_groups}, call.x.options().dtype(at::kFloat));
  Tensor rstd = at::empty_like(mean);
  if (call.x.numel() > 0) {
    check_launch(cuda::group_norm_silu_forward(call.params, cuda_dtype(call.x.scalar_type(), op), call.x.data_ptr(),
                                               out.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                               current_stream(call.x)),
                 op);
  }
  return {out.to(call.result_dtype), mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_backward_cuda(const Tensor& grad_out, const Tensor& x,
                                                                 int64_t num_groups,
                                                                 const std::optional<Tensor>& weight,
                                                                 const std::optional<Tensor>& bias,
                                                                 const Tensor& mean, const Tensor& rstd) {
  constexpr const char* op = "fastdiff_native.group_norm_silu_backward";
  check_on_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  wrap::GroupNormCall call = wrap::prepare_group_norm(x, num_groups, weight, bias, 0.0);
  const auto [dout, m, rs] = wrap::prepare_group_norm_backward(grad_out, call.x, num_groups, mean, rstd);
  Tensor grad_x = at::empty_like(call.x);
  // Per-sample partial sums of grad_bias / grad_weight, summed over the batch below (deterministic).
  Tensor part_db = at::zeros({x.size(0), x.size(1)}, call.x.options().dtype(at::kFloat));
  Tensor part_dw = at::zeros_like(part_db);
  if (call.x.numel() > 0) {
    check_launch(cuda::group_norm_silu_backward(call.params, cuda_dtype(call.x.scalar_type(), op), dout.data_ptr(),
                                                call.x.data_ptr(), m.data_ptr<float>(), rs.data_ptr<float>(),
                                                grad_x.data_ptr(), part_db.data_ptr<float>(),
                                                part_dw.data_ptr<float>(), current_stream(call.x)),
                 op);
  }
  return {grad_x.to(call.result_dtype), wrap::param_grad(part_dw.sum(0), weight),
          wrap::param_grad(part_db.sum(0), bias)};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_native, CUDA, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_cuda);
  m.impl("sampler_step.int", &fastdiff::sampler_step_int_cuda);
  m.impl("philox_normal", &fastdiff::philox_normal_cuda);
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &fastdiff::group_norm_silu_backward_cuda);
}
