// cuda_emu: device guards do nothing (one emulated device, the host).
#pragma once
#include <c10/core/Device.h>

#include <ATen/cuda/CUDAContext.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
using at::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace c10
