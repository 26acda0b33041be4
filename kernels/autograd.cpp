// Autograd of fastdiff_native::group_norm_silu, in C++ at the Autograd dispatch key (for CPU and CUDA alike):
// the forward saves x, weight, bias and the per-group mean and rstd, the backward calls
// fastdiff_native::group_norm_silu_backward through the dispatcher (so it runs on the tensors' device, or on
// fake tensors under torch.compile). In C++ rather than torch.library.register_autograd because the Python
// autograd layer costs tens of microseconds per call, more than the kernel itself on a small UNet's shapes.
// sampler_step has no backward (fastdiff.ops.native sends calls that need gradients to the reference).
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastdiff {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, const std::optional<Tensor>&,
                                                      const std::optional<Tensor>&, double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t,
                                                       const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                       const Tensor&, const Tensor&);

std::optional<Tensor> defined_or_none(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

class GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t num_groups,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
    static const auto op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastdiff_native::group_norm_silu", "")
                                .typed<ForwardSig>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = op.call(x, num_groups, weight, bias, eps);
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastdiff_native::group_norm_silu_backward", "")
                                .typed<BackwardSig>();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    // grads[1] and grads[2] (of mean and rstd) are not differentiable and stay undefined.
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(x);
    auto [grad_x, grad_w, grad_b] = op.call(grad_out, x, ctx->saved_data["num_groups"].toInt(),
                                            defined_or_none(weight), defined_or_none(bias), mean, rstd);
    // One gradient per forward argument; needs_input_grad counts only the tensor inputs (x, weight?, bias?).
    const size_t weight_edge = 1, bias_edge = weight.defined() ? 2 : 1;
    return {ctx->needs_input_grad(0) ? grad_x : Tensor(), Tensor(),
            weight.defined() && ctx->needs_input_grad(weight_edge) ? grad_w : Tensor(),
            bias.defined() && ctx->needs_input_grad(bias_edge) ? grad_b : Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_autograd(const Tensor& x, int64_t num_groups,
                                                            const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, double eps) {
  const variable_list out = GroupNormSiLUFunction::apply(x, num_groups, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_native, Autograd, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_autograd);
}
