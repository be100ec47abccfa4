// cuda_emu harness: the FWHT and sparse-sketch kernels (csrc/cuda/linalg_cuda.cu) on the CPU, with their checks
// from csrc/linalg.cpp; the CUDA registration is compiled out (the real extension owns the op names).
#include <torch/library.h>

#include "harness.h"

#include "linalg.cpp"

namespace panther {
void count_call(const char*) {}  // dispatch counting belongs to the real extension
}  // namespace panther

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void cuda_emu_unregistered_##key(torch::Library& m)
#include "linalg_cuda.emu.cpp"
#undef TORCH_LIBRARY_IMPL

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  cuda_emu::bind_runtime(m);
  m.def("fwht", &panther::fwht_cuda);
  m.def("sparse_sketch", &panther::sparse_sketch_cuda);
  m.def("sparse_sketch_t", &panther::sparse_sketch_t_cuda);
}
