// cuda_emu harness: the fused small-token linear kernel (csrc/cuda/linear_cuda.cu) on the CPU, with the GEMM forms
// and checks of csrc/linear.cpp; the op registrations are compiled out (the real extension owns the op names).
#include <torch/library.h>

#include "harness.h"

#include "linear.cpp"

namespace panther {
void count_call(const char*) {}  // dispatch counting belongs to the real extension
}  // namespace panther

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void cuda_emu_unregistered_##key(torch::Library& m)
#undef TORCH_LIBRARY_FRAGMENT
#define TORCH_LIBRARY_FRAGMENT(ns, m) [[maybe_unused]] static void cuda_emu_unregistered_fragment(torch::Library& m)
#include "linear_cuda.emu.cpp"
#undef TORCH_LIBRARY_FRAGMENT
#undef TORCH_LIBRARY_IMPL

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  cuda_emu::bind_runtime(m);
  m.def("lowrank_linear", &panther::lowrank_linear_cuda);
  m.def("sketched_linear", &panther::sketched_linear_cuda);
  m.def("fused_limits", &panther::fused_limits);
}
