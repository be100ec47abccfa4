// CPU kernels for the panther linear ops (forward and backward), registered over the Python reference bodies.
#include <torch/library.h>

#include "../linear.h"

namespace panther {
namespace {

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const OptTensor& bias) {
  check_lowrank(x, A, B, bias);
  count_call("lowrank_linear.cpu");
  return lowrank_linear_gemm(x, A, B, bias);
}

at::Tensor sketched_linear_cpu(const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& U1,
                               const at::Tensor& U2, const OptTensor& bias) {
  check_sketched(x, S1, S2, U1, U2, bias);
  count_call("sketched_linear.cpu");
  return sketched_linear_gemm(x, S1, S2, U1, U2, bias);
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_t_cpu(const at::Tensor& x, const at::Tensor& A,
                                                             const at::Tensor& B, const OptTensor& bias) {
  check_lowrank(x, A, B, bias);
  count_call("lowrank_linear_with_t.cpu");
  return lowrank_linear_with_t_gemm(x, A, B, bias);
}

LowrankGrads lowrank_linear_backward_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A,
                                         const at::Tensor& B, std::array<bool, 4> needs) {
  count_call("lowrank_linear_backward.cpu");
  return lowrank_linear_backward_gemm(gy, x, A, B, needs);
}

SketchedGrads sketched_linear_backward_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& S1,
                                           const at::Tensor& S2, const at::Tensor& U1, const at::Tensor& U2,
                                           std::array<bool, 6> needs) {
  count_call("sketched_linear_backward.cpu");
  return sketched_linear_backward_gemm(gy, x, S1, S2, U1, U2, needs);
}

}  // namespace

TORCH_LIBRARY_IMPL(panther, CPU, m) {
  m.impl("lowrank_linear", &lowrank_linear_cpu);
  m.impl("lowrank_linear_with_t", &lowrank_linear_with_t_cpu);
  m.impl("sketched_linear", &sketched_linear_cpu);
  m.impl("lowrank_linear_backward", &lowrank_linear_backward_cpu);
  m.impl("sketched_linear_backward", &sketched_linear_backward_cpu);
}

}  // namespace panther
