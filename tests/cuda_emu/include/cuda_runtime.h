// A host emulation of the CUDA execution model, enough to run this project's kernels on the CPU in tests
// (tests/cuda_emu/README.md). Every CUDA thread of a block is a fiber (ucontext) on one OS thread; the
// scheduler runs each fiber until it reaches a barrier, in thread order (or reversed), so a read of another
// thread's shared-memory write that lacks its __syncthreads / __syncwarp sees the old value and the results
// differ between the two orders. Checked at run time, with a clear error instead of a wrong answer:
//   * launch limits (block ≤ 1024 threads, grid.y/z ≤ 65535, dynamic shared memory ≤ 48 KiB unless
//     cudaFuncSetAttribute raised the kernel's limit, ≤ 227 KiB in any case: the H100's opt-in maximum);
//   * barriers: __syncthreads after a thread of the block exited, __syncwarp / shuffles with a lane gone,
//     and deadlocks (a barrier that not every thread reaches);
//   * shared memory: filled with 0xFF bytes (NaN as float / bfloat16) at every block start, so reading what no
//     thread wrote shows up as NaN, and a canary past the end of the dynamic allocation catches overflows;
//   * wmma pointer alignment (32 bytes) and leading dimensions (a multiple of 16 bytes), in mma.h.
// Not modelled: timing, memory consistency between blocks (blocks run one after another), warp divergence
// inside a wmma call, and the GPU's float rounding of tensor-core sums (the emulation sums in float, in order).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t) { return "no error (cuda_emu)"; }

// The built-in index variables: the scheduler sets them before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

using std::isfinite;
using std::max;
using std::min;

namespace cuda_emu {

constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024, kCanary = 256;
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  bool done = false;
  enum { kRunning, kBlockBarrier, kWarpBarrier } wait = kRunning;
  uint64_t generation = 0;  // of the barrier it waits at
  unsigned shuffles = 0;    // warp shuffles so far: picks the exchange buffer
};

struct Launch {
  dim3 grid, block;
  size_t smem;
};

struct Runtime {
  // configuration
  bool reverse = false;
  int sm_count = 132;
  // per kernel: the dynamic shared memory limit raised by cudaFuncSetAttribute
  std::map<const void*, size_t> smem_limit;
  std::vector<Launch> launches;

  // the block being run
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  int current = -1, live = 0;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<int> warp_arrived, warp_live, warp_size;
  std::vector<uint64_t> warp_generation;
  std::vector<uint64_t> exchange;  // per warp: two buffers of 32 lanes
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  unsigned char* dynamic = nullptr;
  size_t dynamic_bytes = 0;
  std::map<int, std::unique_ptr<unsigned char[]>> statics;
  std::string error;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Fiber& self() { return rt().fibers[rt().current]; }
inline int linear_tid(const dim3& t) { return t.x + blockDim.x * (t.y + blockDim.y * t.z); }

// Stops the calling fiber and the launch: the scheduler reports `message` once control is back on its stack.
[[noreturn]] inline void fail(const std::string& message) {
  Runtime& r = rt();
  if (r.error.empty())
    r.error = message + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
              std::to_string(blockIdx.z) + ", thread " + std::to_string(threadIdx.x) + "," +
              std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + ")";
  self().done = true;
  setcontext(&r.scheduler);
  std::abort();  // unreachable
}

inline void yield() { swapcontext(&self().ctx, &rt().scheduler); }

inline void block_barrier() {
  Runtime& r = rt();
  if (r.live < static_cast<int>(r.fibers.size())) fail("__syncthreads after a thread of the block exited");
  if (++r.block_arrived == r.live) {
    r.block_arrived = 0;
    ++r.block_generation;
    return;
  }
  self().wait = Fiber::kBlockBarrier;
  self().generation = r.block_generation;
  yield();
}

inline void warp_barrier() {
  Runtime& r = rt();
  const int w = r.current / 32;
  if (r.warp_live[w] < r.warp_size[w]) fail("warp-synchronous call after a lane of the warp exited");
  if (++r.warp_arrived[w] == r.warp_size[w]) {
    r.warp_arrived[w] = 0;
    ++r.warp_generation[w];
    return;
  }
  self().wait = Fiber::kWarpBarrier;
  self().generation = r.warp_generation[w];
  yield();
}

inline int lane() { return rt().current % 32; }

// Every lane publishes x, then reads lane `source(lane)`'s value. Two buffers alternate, so one barrier per
// shuffle is enough: a lane can only overwrite a buffer after every lane has passed the next shuffle's barrier,
// that is after every lane read it.
template <typename T, typename Source>
T shuffle(unsigned mask, T x, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  if (mask != 0xffffffffu) fail("cuda_emu models full-warp shuffles only");
  Runtime& r = rt();
  uint64_t* buffer = &r.exchange[(r.current / 32 * 2 + (self().shuffles++ & 1)) * 32];
  std::memcpy(&buffer[lane()], &x, sizeof(T));
  warp_barrier();
  const int from = source(lane());
  if (from < 0 || from >= r.warp_size[r.current / 32]) return x;
  T y;
  std::memcpy(&y, &buffer[from], sizeof(T));
  return y;
}

inline void fiber_main() {
  Runtime& r = rt();
  r.body(r.body_arg);
  Fiber& f = self();
  f.done = true;
  --r.live;
  --r.warp_live[r.current / 32];
  if (r.block_arrived > 0) fail("a thread exited while others wait at __syncthreads");
  if (r.warp_arrived[r.current / 32] > 0) fail("a lane exited while others wait at a warp-synchronous call");
  // returning resumes uc_link, the scheduler
}

inline void fill_shared(unsigned char* p, size_t bytes) { std::memset(p, 0xFF, bytes); }

// Runs one block: every thread from the start of the kernel to its end.
inline void run_block(const dim3& block) {
  Runtime& r = rt();
  const int n = static_cast<int>(block.x * block.y * block.z), warps = (n + 31) / 32;
  r.fibers.assign(n, Fiber{});
  if (r.stacks.size() < n * kStackBytes) r.stacks.resize(n * kStackBytes);
  r.live = n;
  r.block_arrived = 0;
  r.warp_arrived.assign(warps, 0);
  r.warp_generation.assign(warps, 0);
  r.warp_size.assign(warps, 32);
  r.warp_size.back() = n - 32 * (warps - 1);
  r.warp_live = r.warp_size;
  r.exchange.assign(warps * 64, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.tid = dim3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks.data() + i * kStackBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    bool any = false, ran = false;
    for (int k = 0; k < n; ++k) {
      const int i = r.reverse ? n - 1 - k : k;
      Fiber& f = r.fibers[i];
      if (f.done) continue;
      any = true;
      if (f.wait == Fiber::kBlockBarrier && f.generation == r.block_generation) continue;
      if (f.wait == Fiber::kWarpBarrier && f.generation == r.warp_generation[i / 32]) continue;
      f.wait = Fiber::kRunning;
      r.current = i;
      threadIdx = f.tid;
      swapcontext(&r.scheduler, &f.ctx);
      ran = true;
      if (!r.error.empty()) return;
    }
    if (!any) return;
    if (!ran) {
      r.error = "deadlock: some threads wait at a barrier that the others never reach (block " +
                std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
      return;
    }
  }
}

template <typename T>
T* dynamic_smem() {
  Runtime& r = rt();
  if (r.dynamic_bytes == 0) fail("extern __shared__ memory used by a kernel launched with 0 bytes of it");
  return reinterpret_cast<T*>(r.dynamic);
}

// One `__shared__ T name;` of the block (T may be an array type), keyed by its place in the source.
template <typename T, int kId>
T& static_smem() {
  auto& slot = rt().statics[kId];
  if (!slot) {
    slot.reset(new (std::align_val_t(128)) unsigned char[sizeof(T)]);
    fill_shared(slot.get(), sizeof(T));
  }
  return *reinterpret_cast<T*>(slot.get());
}

inline void run_grid(const dim3& grid, const dim3& block, size_t smem, void (*body)(void*), void* arg) {
  Runtime& r = rt();
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error("cuda_emu: invalid block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    throw std::runtime_error("cuda_emu: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ")");
  r.body = body;
  r.body_arg = arg;
  blockDim = block;
  gridDim = grid;
  std::unique_ptr<unsigned char[]> dynamic(new (std::align_val_t(1024)) unsigned char[smem + kCanary]);
  r.dynamic = dynamic.get();
  r.dynamic_bytes = smem;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        fill_shared(r.dynamic, smem + kCanary);
        r.statics.clear();
        run_block(block);
        if (r.error.empty())
          for (size_t i = 0; i < kCanary; ++i)
            if (r.dynamic[smem + i] != 0xFF) {
              r.error = "write past the end of the " + std::to_string(smem) + " bytes of dynamic shared memory (block " +
                        std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
              break;
            }
        if (!r.error.empty()) {
          std::string message = "cuda_emu: " + r.error;
          r.error.clear();
          r.statics.clear();
          throw std::runtime_error(message);
        }
      }
  r.statics.clear();
}

// kernel<<<grid, block, smem, stream>>>(args...): the arguments are converted to the kernel's parameter types
// once, as CUDA copies them, and every thread calls the kernel with them.
template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...), A&&... args) {
  Runtime& r = rt();
  const auto raised = r.smem_limit.find(reinterpret_cast<const void*>(kernel));
  const size_t limit = raised == r.smem_limit.end() ? kDefaultSmem : std::max(kDefaultSmem, raised->second);
  if (smem > limit)
    throw std::runtime_error("cuda_emu: launch with " + std::to_string(smem) + " bytes of dynamic shared memory, over the " +
                             std::to_string(limit) + " allowed (cudaFuncSetAttribute raises it up to " +
                             std::to_string(kMaxSmem) + ")");
  r.launches.push_back({grid, block, smem});
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(grid, block, smem, [](void* p) {
    Call* c = static_cast<Call*>(p);
    std::apply(c->kernel, c->params);
  }, &call);
}

}  // namespace cuda_emu

template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > cuda_emu::kMaxSmem)
      throw std::runtime_error("cuda_emu: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                               ") is over the device's " + std::to_string(cuda_emu::kMaxSmem) + " bytes");
    cuda_emu::rt().smem_limit[reinterpret_cast<const void*>(kernel)] = value;
  }
  return cudaSuccess;
}

inline void __syncthreads() { cuda_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) cuda_emu::fail("cuda_emu models full-warp __syncwarp only");
  cuda_emu::warp_barrier();
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int lane_mask, int width = 32) {
  return cuda_emu::shuffle(mask, x, [&](int l) { return width == 32 ? l ^ lane_mask : -1; });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T x, unsigned delta, int width = 32) {
  return cuda_emu::shuffle(mask, x, [&](int l) { return width == 32 && l + static_cast<int>(delta) < 32 ? l + static_cast<int>(delta) : -1; });
}
[[noreturn]] inline void __trap() { cuda_emu::fail("__trap()"); }
// Fibers never run concurrently and an atomic never yields, so a plain update is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
