// Autograd kernels of the ops whose forward and backward have native kernels (linear and attention), registered
// with TORCH_LIBRARY_IMPL(panther, Autograd, m) so that a call never leaves C++: with the Python autograd wrapper
// of a custom op, a one-token lowrank_linear forward took 22 µs instead of 11 and its forward+backward 322 µs
// instead of 155 (CPU, torch 2.13, benchmarks/call_overhead.py). The formulas are those of the Python
// register_autograd fallbacks in panther_fx/ops (used when this extension is not loaded): save the inputs, and in
// the backward call the op's backward op through the dispatcher with the flags of the inputs that need a
// gradient. The backward ops themselves have no derivatives: create_graph=True raises, as it does without the
// extension.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "attention.h"  // AttentionGrads
#include "linear.h"     // OptTensor, LowrankGrads, SketchedGrads

namespace panther {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

void check_no_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "panther::", op, ": double backward (create_graph=True) is not supported");
}

// Which of the N tensor inputs need a gradient, the last being optional (saved undefined when absent):
// needs_input_grad counts the tensor arguments that were given, so an absent optional one has no autograd edge.
template <size_t N>
std::array<bool, N> needs_grad(AutogradContext* ctx, const at::Tensor& saved_optional) {
  std::array<bool, N> needs{};
  for (size_t i = 0; i + 1 < N; ++i) needs[i] = ctx->needs_input_grad(i);
  needs[N - 1] = saved_optional.defined() && ctx->needs_input_grad(N - 1);
  return needs;
}

using LowrankSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&);
using LowrankWithTSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const OptTensor&);
using LowrankBackwardSig = LowrankGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        std::array<bool, 4>);

// When A needs a gradient, the forward keeps the rank-r intermediate t = x Bᵀ (r/in of x's size) and the
// backward takes gA = gyᵀ t from it: recomputing t would read x once more, one of the backward's five
// passes over an (N, in) or (N, out) tensor.
class LowrankLinear : public torch::autograd::Function<LowrankLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                            const OptTensor& bias, bool keep_t) {
    static const auto op = find_op<LowrankSig>("panther::lowrank_linear");
    static const auto op_with_t = find_op<LowrankWithTSig>("panther::lowrank_linear_with_t");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y, t;
    if (keep_t) {
      std::tie(y, t) = op_with_t.call(x, A, B, bias);
    } else {
      y = op.call(x, A, B, bias);
    }
    ctx->save_for_backward({x, A, B, or_undefined(bias), t});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LowrankBackwardSig>("panther::lowrank_linear_backward");
    check_no_double_backward("lowrank_linear");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& t = saved[4];
    const bool gA_from_t = t.defined() && ctx->needs_input_grad(1);
    auto needs = needs_grad<4>(ctx, saved[3]);
    needs[1] = needs[1] && !gA_from_t;
    auto [gx, gA, gB, gbias] = op.call(grads[0], saved[0], saved[1], saved[2], needs);
    if (gA_from_t) {
      const auto& A = saved[1];
      gA = at::mm(grads[0].reshape({-1, A.size(0)}).t(), t.reshape({-1, A.size(1)}));
    }
    return {or_undefined(gx), or_undefined(gA), or_undefined(gB), or_undefined(gbias), at::Tensor()};
  }
};

using SketchedSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const OptTensor&);
using SketchedBackwardSig = SketchedGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, std::array<bool, 6>);

class SketchedLinear : public torch::autograd::Function<SketchedLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2,
                            const at::Tensor& U1, const at::Tensor& U2, const OptTensor& bias) {
    static const auto op = find_op<SketchedSig>("panther::sketched_linear");
    ctx->save_for_backward({x, S1, S2, U1, U2, or_undefined(bias)});
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, S1, S2, U1, U2, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<SketchedBackwardSig>("panther::sketched_linear_backward");
    check_no_double_backward("sketched_linear");
    const auto s = ctx->get_saved_variables();
    const auto needs = needs_grad<6>(ctx, s[5]);
    const auto [gx, gS1, gS2, gU1, gU2, gbias] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], needs);
    return {or_undefined(gx),  or_undefined(gS1), or_undefined(gS2),
            or_undefined(gU1), or_undefined(gU2), or_undefined(gbias)};
  }
};

using AttentionSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const OptTensor&, c10::string_view, bool, std::optional<double>);
using AttentionBackwardSig = AttentionGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view,
                                            bool, std::optional<double>, std::array<bool, 5>);

class PerformerAttention : public torch::autograd::Function<PerformerAttention> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& features, const OptTensor& key_padding_mask, c10::string_view kernel_fn,
                            bool causal, std::optional<double> scale) {
    static const auto op = find_op<AttentionSig>("panther::performer_attention");
    ctx->save_for_backward({q, k, v, features, or_undefined(key_padding_mask)});
    ctx->saved_data["kernel_fn"] = std::string(kernel_fn);
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(q, k, v, features, key_padding_mask, kernel_fn, causal, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<AttentionBackwardSig>("panther::performer_attention_backward");
    check_no_double_backward("performer_attention");
    const auto s = ctx->get_saved_variables();
    const auto needs = needs_grad<5>(ctx, s[4]);
    const OptTensor mask = s[4].defined() ? OptTensor(s[4]) : std::nullopt;
    const std::string kernel_fn = ctx->saved_data["kernel_fn"].toStringRef();
    const auto scale = ctx->saved_data["scale"].toOptional<double>();
    const auto [gq, gk, gv, gW, gmask] = op.call(grads[0], s[0], s[1], s[2], s[3], mask, kernel_fn,
                                                 ctx->saved_data["causal"].toBool(), scale, needs);
    // One entry per forward argument: the last three (kernel_fn, causal, scale) are not tensors.
    return {or_undefined(gq), or_undefined(gk), or_undefined(gv), or_undefined(gW), or_undefined(gmask),
            at::Tensor(),     at::Tensor(),     at::Tensor()};
  }
};

at::Tensor lowrank_linear_autograd(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                   const OptTensor& bias) {
  const bool keep_t = at::GradMode::is_enabled() && A.requires_grad();
  return LowrankLinear::apply(x, A, B, bias, keep_t);
}

at::Tensor sketched_linear_autograd(const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2,
                                    const at::Tensor& U1, const at::Tensor& U2, const OptTensor& bias) {
  return SketchedLinear::apply(x, S1, S2, U1, U2, bias);
}

at::Tensor performer_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& features, const OptTensor& key_padding_mask,
                                        c10::string_view kernel_fn, bool causal, std::optional<double> scale) {
  return PerformerAttention::apply(q, k, v, features, key_padding_mask, kernel_fn, causal, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(panther, Autograd, m) {
  m.impl("lowrank_linear", &lowrank_linear_autograd);
  m.impl("sketched_linear", &sketched_linear_autograd);
  m.impl("performer_attention", &performer_attention_autograd);
  // Called with inputs that require grad (create_graph=True, or directly), these raise "not implemented".
  m.impl("lowrank_linear_with_t", torch::autograd::autogradNotImplementedFallback());
  m.impl("lowrank_linear_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("sketched_linear_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("performer_attention_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace panther
