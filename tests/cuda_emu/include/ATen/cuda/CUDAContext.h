// cuda_emu: the device properties and stream of an emulated H100 (sm_90; cuda_emu::rt().sm_count SMs).
#pragma once
#include <c10/core/Device.h>

#include "../../cuda_runtime.h"

namespace at {
namespace cuda {

struct EmulatedDeviceProp {
  int major = 9, minor = 0, multiProcessorCount = 132;
  size_t sharedMemPerBlockOptin = cuda_emu::kMaxSmem;
};

inline EmulatedDeviceProp* getDeviceProperties(c10::DeviceIndex) {
  static EmulatedDeviceProp prop;
  prop.multiProcessorCount = cuda_emu::rt().sm_count;
  return &prop;
}

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace cuda
}  // namespace at
