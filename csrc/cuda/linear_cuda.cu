// CUDA kernels for the panther linear ops.
//
// Large token counts: the device-generic GEMM forms (csrc/linear.cpp: cuBLAS through ATen in the op's dtype,
// so fp32 stays fp32 unless torch.backends.cuda.matmul.allow_tf32 is set; scale and bias in the epilogue).
// Small token counts (decode-like): one fused kernel per call. Each block takes TN tokens and a tile of output
// columns, computes the rank-R intermediate t = x·left for its tokens into shared memory (fp32 accumulation for
// every dtype), then y = alpha·t·right + bias for its columns. Every block recomputes t for its tokens, so the
// kernel only pays while tokens·I·R is small; beyond `max_work` (and beyond 256 tokens) the GEMMs run instead.
// All launches go to the current CUDA stream (CUDA graphs and user streams rely on that).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../linear.h"

namespace panther {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kOTile = kThreads;  // output columns per block (one per thread in the sketched layout)
constexpr int kIChunk = 128;      // input features of x staged in shared memory per step
constexpr int64_t kMaxRank = 1024;

// Limits of the fused path (tunable for measurements through panther::_cuda_fused_limits).
std::atomic<int64_t> g_fused_max_tokens{256};
// tokens * in_features * rank. Each block recomputes the rank-r intermediate, so the kernel only beats cuBLAS
// where that work is tiny: on an H100 (bf16) it won at 1 token of 1024x1024, r = 32, and lost up to 8x at
// 1 token of 8192x8192, r = 512 (docs/benchmarks-linear.md).
std::atomic<int64_t> g_fused_max_work{int64_t{1} << 17};

// Factor pointers of one call. lowrank: A (O, R), B (R, I). sketched: S1, U2 (L, I, k); U1, S2 (L, k, O).
template <typename scalar_t>
struct Factors {
  const scalar_t* A;
  const scalar_t* B;
  const scalar_t* S1;
  const scalar_t* S2;
  const scalar_t* U1;
  const scalar_t* U2;
  int64_t k;
};

template <int TN>
__device__ __forceinline__ void warp_sum(float (&acc)[TN]) {
#pragma unroll
  for (int n = 0; n < TN; ++n) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[n] += __shfl_down_sync(0xffffffffu, acc[n], offset);
  }
}

// ts[n][j] += Σ_{i in chunk} xs[n][i] · left(i0 + i, j)
template <typename scalar_t, int TN, bool kSketched>
__device__ void accumulate_t(const Factors<scalar_t>& f, float (*xs)[kIChunk], float* ts, int64_t i0, int ic,
                             int64_t I, int64_t R) {
  const int tid = threadIdx.x;
  if constexpr (kSketched) {
    // Thread per column j (coalesced along the k columns of one term), input rows split over `groups`.
    const int64_t groups = R >= kThreads ? 1 : kThreads / R;
    const int64_t g = tid / (R >= kThreads ? kThreads : R);
    if (g >= groups) return;
    for (int64_t j = R >= kThreads ? tid : tid % R; j < R; j += (R >= kThreads ? kThreads : R)) {
      const int64_t term = j / f.k, c = j % f.k;
      const scalar_t* F = (term % 2 == 0 ? f.S1 : f.U2) + (term / 2) * I * f.k + c;
      float acc[TN] = {};
      for (int64_t i = g; i < ic; i += groups) {
        const float w = static_cast<float>(F[(i0 + i) * f.k]);
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[n] += xs[n][i] * w;
      }
#pragma unroll
      for (int n = 0; n < TN; ++n) atomicAdd(&ts[n * R + j], acc[n]);
    }
  } else {
    // Warp per row j of B (R, I): lanes read B along i (coalesced), then a warp reduction.
    const int warp = tid / 32, lane = tid % 32;
    for (int64_t j = warp; j < R; j += kWarps) {
      const scalar_t* Bj = f.B + j * I + i0;
      float acc[TN] = {};
      for (int i = lane; i < ic; i += 32) {
        const float w = static_cast<float>(Bj[i]);
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[n] += xs[n][i] * w;
      }
      warp_sum<TN>(acc);
      if (lane == 0) {
#pragma unroll
        for (int n = 0; n < TN; ++n) ts[n * R + j] += acc[n];
      }
    }
  }
}

template <typename scalar_t, int TN>
__device__ __forceinline__ void store_y(scalar_t* y, const float (&acc)[TN], int nt, int64_t o, int64_t O,
                                        float alpha, const scalar_t* bias) {
  const float b = bias == nullptr ? 0.f : static_cast<float>(bias[o]);
#pragma unroll
  for (int n = 0; n < TN; ++n) {
    if (n < nt) y[n * O + o] = static_cast<scalar_t>(alpha * acc[n] + b);
  }
}

template <typename scalar_t, int TN, bool kSketched>
__global__ void __launch_bounds__(kThreads) fused_linear_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t I,
                                                                int64_t O, int64_t R, Factors<scalar_t> f,
                                                                const scalar_t* __restrict__ bias, float alpha,
                                                                scalar_t* __restrict__ y) {
  __shared__ float xs[TN][kIChunk];
  extern __shared__ float ts[];  // (TN, R): the rank-R intermediate of this block's tokens, kept on chip
  const int tid = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TN;
  const int nt = static_cast<int>(N - n0 < TN ? N - n0 : TN);
  for (int64_t e = tid; e < TN * R; e += kThreads) ts[e] = 0.f;

  for (int64_t i0 = 0; i0 < I; i0 += kIChunk) {
    const int ic = static_cast<int>(I - i0 < kIChunk ? I - i0 : kIChunk);
    __syncthreads();  // previous chunk consumed (and ts zeroed on the first pass)
    for (int e = tid; e < TN * kIChunk; e += kThreads) {
      const int n = e / kIChunk, i = e % kIChunk;
      xs[n][i] = (n < nt && i < ic) ? static_cast<float>(x[(n0 + n) * I + i0 + i]) : 0.f;
    }
    __syncthreads();
    accumulate_t<scalar_t, TN, kSketched>(f, xs, ts, i0, ic, I, R);
  }
  __syncthreads();

  scalar_t* yb = y + n0 * O;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kOTile;
  if constexpr (kSketched) {
    // Thread per output column o: right(j, o) rows are contiguous along o (coalesced), ts reads broadcast.
    const int64_t o = o0 + tid;
    if (o >= O) return;
    float acc[TN] = {};
    for (int64_t term = 0; term * f.k < R; ++term) {
      const scalar_t* G = (term % 2 == 0 ? f.U1 : f.S2) + (term / 2) * f.k * O + o;
      const float* tt = ts + term * f.k;
      for (int64_t c = 0; c < f.k; ++c) {
        const float w = static_cast<float>(G[c * O]);
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[n] += tt[n * R + c] * w;
      }
    }
    store_y<scalar_t, TN>(yb, acc, nt, o, O, alpha, bias);
  } else {
    // Warp per output column o: lanes read the row A[o, :] (coalesced), then a warp reduction.
    const int warp = tid / 32, lane = tid % 32;
    for (int64_t o = o0 + warp; o < o0 + kOTile && o < O; o += kWarps) {
      const scalar_t* Ao = f.A + o * R;
      float acc[TN] = {};
      for (int64_t j = lane; j < R; j += 32) {
        const float w = static_cast<float>(Ao[j]);
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[n] += ts[n * R + j] * w;
      }
      warp_sum<TN>(acc);
      if (lane == 0) store_y<scalar_t, TN>(yb, acc, nt, o, O, alpha, bias);
    }
  }
}

template <typename scalar_t, int TN, bool kSketched>
void launch(const at::Tensor& x2, const Factors<scalar_t>& f, int64_t R, const OptTensor& bias, float alpha,
            at::Tensor& y) {
  const int64_t N = x2.size(0), I = x2.size(1), O = y.size(1);
  const dim3 grid(static_cast<unsigned>((N + TN - 1) / TN), static_cast<unsigned>((O + kOTile - 1) / kOTile));
  const size_t smem = sizeof(float) * TN * R;
  fused_linear_kernel<scalar_t, TN, kSketched><<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      x2.data_ptr<scalar_t>(), N, I, O, R, f, bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, alpha,
      y.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kSketched>
void launch_tn(const at::Tensor& x2, const Factors<scalar_t>& f, int64_t R, const OptTensor& bias, float alpha,
               at::Tensor& y) {
  const int64_t N = x2.size(0);
  if (N <= 1) return launch<scalar_t, 1, kSketched>(x2, f, R, bias, alpha, y);
  if (N <= 2) return launch<scalar_t, 2, kSketched>(x2, f, R, bias, alpha, y);
  if (N <= 4) return launch<scalar_t, 4, kSketched>(x2, f, R, bias, alpha, y);
  launch<scalar_t, 8, kSketched>(x2, f, R, bias, alpha, y);
}

// Empty outputs and rank 0 go to the GEMM form (a launch with no column tiles is invalid; the kernel divides
// by R). So do runs under torch.use_deterministic_algorithms when the kernel would sum with shared-memory
// atomics (the sketched op with R < kThreads: several input-row groups add into one column).
bool use_fused(const at::Tensor& x, int64_t tokens, int64_t I, int64_t R, int64_t O, bool atomics) {
  const auto dtype = x.scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  if (atomics && at::globalContext().deterministicAlgorithms()) return false;
  return supported && O > 0 && R > 0 && tokens > 0 && tokens <= g_fused_max_tokens.load() && R <= kMaxRank &&
         tokens * I * R <= g_fused_max_work.load();
}

int64_t tokens_of(const at::Tensor& x) { return x.numel() / std::max<int64_t>(x.size(-1), 1); }

// Runs the fused kernel on contiguous copies of the operands (no-ops for the usual contiguous inputs).
template <bool kSketched>
at::Tensor fused_forward(const at::Tensor& x, const std::vector<at::Tensor>& factors, const OptTensor& bias,
                         int64_t R, int64_t k, int64_t O, float alpha) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  std::vector<at::Tensor> fs;
  for (const auto& t : factors) fs.push_back(t.contiguous());
  OptTensor b = bias.has_value() ? OptTensor(bias->contiguous()) : std::nullopt;
  auto y = at::empty({x2.size(0), O}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "panther_fused_linear", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      Factors<scalar_t> f{};
      f.k = k;
      if constexpr (kSketched) {
        f.S1 = fs[0].data_ptr<scalar_t>();
        f.S2 = fs[1].data_ptr<scalar_t>();
        f.U1 = fs[2].data_ptr<scalar_t>();
        f.U2 = fs[3].data_ptr<scalar_t>();
      } else {
        f.A = fs[0].data_ptr<scalar_t>();
        f.B = fs[1].data_ptr<scalar_t>();
      }
      launch_tn<scalar_t, kSketched>(x2, f, R, b, alpha, y);
    }
  });
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  return y.view(sizes);
}

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const OptTensor& bias) {
  check_lowrank(x, A, B, bias);
  count_call("lowrank_linear.cuda");
  const int64_t R = A.size(1);
  if (use_fused(x, tokens_of(x), x.size(-1), R, A.size(0), /*atomics=*/false)) {
    return fused_forward<false>(x, {A, B}, bias, R, R, A.size(0), 1.f);
  }
  return lowrank_linear_gemm(x, A, B, bias);
}

at::Tensor sketched_linear_cuda(const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& U1,
                                const at::Tensor& U2, const OptTensor& bias) {
  check_sketched(x, S1, S2, U1, U2, bias);
  count_call("sketched_linear.cuda");
  const int64_t L = S1.size(0), k = S1.size(2), R = 2 * L * k, tokens = tokens_of(x);
  if (use_fused(x, tokens, x.size(-1), R, S2.size(2), /*atomics=*/R < kThreads)) {
    return fused_forward<true>(x, {S1, S2, U1, U2}, bias, R, k, S2.size(2), 1.f / static_cast<float>(2 * L));
  }
  return sketched_linear_gemm(x, S1, S2, U1, U2, bias);
}

// Training forward (A needs a gradient): always the two cuBLAS GEMMs, which produce t; the fused small-token
// kernel keeps t on chip and has nothing to return.
std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_t_cuda(const at::Tensor& x, const at::Tensor& A,
                                                              const at::Tensor& B, const OptTensor& bias) {
  check_lowrank(x, A, B, bias);
  count_call("lowrank_linear_with_t.cuda");
  return lowrank_linear_with_t_gemm(x, A, B, bias);
}

LowrankGrads lowrank_linear_backward_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A,
                                          const at::Tensor& B, std::array<bool, 4> needs) {
  count_call("lowrank_linear_backward.cuda");
  return lowrank_linear_backward_gemm(gy, x, A, B, needs);
}

SketchedGrads sketched_linear_backward_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& S1,
                                            const at::Tensor& S2, const at::Tensor& U1, const at::Tensor& U2,
                                            std::array<bool, 6> needs) {
  count_call("sketched_linear_backward.cuda");
  return sketched_linear_backward_gemm(gy, x, S1, S2, U1, U2, needs);
}

// Reads (and with values >= 0 sets) the fused-path limits: [max_tokens, max_work].
std::vector<int64_t> fused_limits(int64_t max_tokens, int64_t max_work) {
  if (max_tokens >= 0) g_fused_max_tokens.store(std::min<int64_t>(max_tokens, 256));
  if (max_work >= 0) g_fused_max_work.store(max_work);
  return {g_fused_max_tokens.load(), g_fused_max_work.load()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(panther, m) {
  m.def("_cuda_fused_limits(int max_tokens=-1, int max_work=-1) -> int[]", &fused_limits);
}

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("lowrank_linear", &lowrank_linear_cuda);
  m.impl("lowrank_linear_with_t", &lowrank_linear_with_t_cuda);
  m.impl("sketched_linear", &sketched_linear_cuda);
  m.impl("lowrank_linear_backward", &lowrank_linear_backward_cuda);
  m.impl("sketched_linear_backward", &sketched_linear_backward_cuda);
}

}  // namespace panther
