// cuda_emu harnesses: the bindings every harness module has, for the emulator's own controls.
#pragma once

#include <cuda_runtime.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace cuda_emu {

// configure(reverse, sm_count=132): thread order and the emulated SM count; take_launches(): (grid x, y, z,
// threads, dynamic shared bytes) of every launch since the last call.
inline void bind_runtime(pybind11::module_& m) {
  m.def("configure", [](bool reverse, int sm_count) {
    rt().reverse = reverse;
    rt().sm_count = sm_count;
  }, pybind11::arg("reverse"), pybind11::arg("sm_count") = 132);
  m.def("take_launches", [] {
    std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> out;
    for (const auto& l : rt().launches)
      out.emplace_back(l.grid.x, l.grid.y, l.grid.z, l.block.x * l.block.y * l.block.z, static_cast<int64_t>(l.smem));
    rt().launches.clear();
    return out;
  });
}

}  // namespace cuda_emu
