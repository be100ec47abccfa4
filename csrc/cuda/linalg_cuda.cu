// CUDA kernels for the structured-sketch ops (schemas and reference bodies in panther_fx/ops/linalg.py):
//   panther::fwht(x)                         orthonormal Walsh–Hadamard transform along the last dim
//   panther::sparse_sketch(A, rows, vals, d) S @ A with S[rows[j, t], j] = vals[j, t]
//   panther::sparse_sketch_t(G, rows, vals)  Sᵀ @ G
// float and double run natively; other floating dtypes are computed in float and rounded once at the end,
// as in csrc/cpu/linalg_cpu.cpp. All launches go to the current CUDA stream.
//
// FWHT: a block loads a tile of 32 KiB into shared memory, runs the butterfly stages there (RADIX stages per
// round, in registers, one __syncthreads per round) and writes the tile back: one global read and write per
// pass. Rows that fit in a tile take one pass; longer rows take a pass over their contiguous blocks, then
// passes along strided axes (column tiles of 32 elements, so loads and stores stay coalesced).
//
// Sparse sketches: both are run as a gather, out[r] = Σ_e vals[e] · src[idx[e]] over the entries e of output
// row r, one warp per output row. The scatter S @ A is first turned into that form by a stable sort of the
// entries by output row, so every sum runs in a fixed order: the results are deterministic (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../linalg.h"  // check_fwht, check_sparse, check_rows_in_range
#include "../linear.h"  // count_call

namespace panther {
namespace {

// ------------------------------------------------------------------------------------------------ FWHT

constexpr int kFwhtThreads = 256;
constexpr int kRadixLog = 3;
constexpr int kRadix = 1 << kRadixLog;   // elements a thread transforms in registers per round
constexpr int kTileBytes = 32 * 1024;    // data per block; with the row layout's pad 36 KiB (< the 48 KiB default)
constexpr int kStridedColumns = 32;      // adjacent columns per block on the strided passes

// The 2^S-point unscaled Hadamard transform of v[0, 2^S): every index is a compile-time constant, so v
// stays in registers.
template <int S, typename T>
__device__ __forceinline__ void wht_registers(T (&v)[kRadix]) {
#pragma unroll
  for (int h = 1; h < (1 << S); h *= 2) {
#pragma unroll
    for (int j = 0; j < (1 << S); ++j) {
      if ((j & h) == 0) {
        const T a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
    }
  }
}

// All stages of `items` unscaled transforms of length L (a power of two) held in shared memory, element p of
// item i at sh[i·item_stride + p·pos_stride]. A round with base stride h gives each thread the group
// {base + j·h : j < radix} (base = (r / h)·radix·h + r % h) and runs the stages of stride h .. (radix/2)·h on it.
// Two layouts, each chosen so that the 32 threads of a warp hit distinct shared-memory banks:
// - rows (kItemFast = false: consecutive threads take consecutive groups of one row) stores element i at
//   padded(i) = i + i/8: without the pad, the first rounds' groups (8 apart, then 64 apart in blocks of 8)
//   would put 8 and 4 threads of a warp on one bank;
// - column tiles (kItemFast = true: consecutive threads take consecutive columns, which are adjacent).
__device__ __forceinline__ int padded(int i) { return i + (i >> 3); }

template <bool kItemFast, typename T>
__device__ void wht_shared(T* sh, int L, int items, int item_stride, int pos_stride) {
  for (int h = 1; h < L; h *= kRadix) {
    int radix_log = 0;
    while (radix_log < kRadixLog && (h << (radix_log + 1)) <= L) ++radix_log;
    const int radix = 1 << radix_log, groups = L >> radix_log;
    for (int g = threadIdx.x; g < items * groups; g += blockDim.x) {
      const int item = kItemFast ? g % items : g / groups, r = kItemFast ? g / items : g % groups;
      const int base = item * item_stride + ((r / h) * radix * h + r % h) * pos_stride;
      const auto at = [&](int j) -> T& {
        const int i = base + j * h * pos_stride;
        return sh[kItemFast ? i : padded(i)];
      };
      T v[kRadix];
#pragma unroll
      for (int j = 0; j < kRadix; ++j)
        if (j < radix) v[j] = at(j);
      switch (radix_log) {
        case 1: wht_registers<1>(v); break;
        case 2: wht_registers<2>(v); break;
        case 3: wht_registers<3>(v); break;
      }
#pragma unroll
      for (int j = 0; j < kRadix; ++j)
        if (j < radix) at(j) = v[j];
    }
    __syncthreads();
  }
}

// One block transforms `rows_per_block` contiguous rows of length L (rows·L ≤ the tile) and scales by `scale`.
template <typename T>
__global__ void fwht_rows_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int L, int rows_per_block,
                                 T scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sh = reinterpret_cast<T*>(smem);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int count = static_cast<int>(std::min<int64_t>(rows_per_block, rows - row0));
  const int64_t offset = row0 * L;
  for (int i = threadIdx.x; i < count * L; i += blockDim.x) sh[padded(i)] = x[offset + i];
  __syncthreads();
  wht_shared<false>(sh, L, count, L, 1);
  for (int i = threadIdx.x; i < count * L; i += blockDim.x) y[offset + i] = sh[padded(i)] * scale;
}

// In place on y viewed as (outer, L, s), s a power of two > 1: the transform along the middle axis for a tile
// of C = min(s, kStridedColumns) adjacent columns per block, held as sh[p·C + c].
template <typename T>
__global__ void fwht_strided_kernel(T* __restrict__ y, int L, int64_t s, T scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sh = reinterpret_cast<T*>(smem);
  const int C = static_cast<int>(std::min<int64_t>(s, kStridedColumns));
  const int64_t tiles = s / C, o = blockIdx.x / tiles, c0 = (blockIdx.x % tiles) * C;
  T* base = y + o * L * s + c0;
  for (int i = threadIdx.x; i < L * C; i += blockDim.x) sh[i] = base[(i / C) * s + i % C];
  __syncthreads();
  wht_shared<true>(sh, L, C, 1, C);
  for (int i = threadIdx.x; i < L * C; i += blockDim.x) base[(i / C) * s + i % C] = sh[i] * scale;
}

// y = x H / √n over rows of length n: a first pass over contiguous blocks of up to a tile, then passes along
// axes of stride `done` until every stage has run. Each pass launches one block per tile.
template <typename T>
void fwht_launch(const T* x, T* y, int64_t rows, int64_t n, cudaStream_t stream) {
  const int64_t capacity = kTileBytes / sizeof(T);
  const int64_t block = std::min(n, capacity);
  const T scale = T(1) / std::sqrt(T(n));
  const int64_t block_rows = rows * (n / block);
  const int rows_per_block = static_cast<int>(capacity / block);
  const int64_t grid = (block_rows + rows_per_block - 1) / rows_per_block;
  const int64_t tile = rows_per_block * block;
  fwht_rows_kernel<T><<<grid, kFwhtThreads, (tile + tile / 8) * sizeof(T), stream>>>(
      x, y, block_rows, static_cast<int>(block), rows_per_block, block == n ? scale : T(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t max_axis = capacity / kStridedColumns;
  for (int64_t done = block; done < n;) {
    const int64_t L = std::min(max_axis, n / done);
    const int64_t outer = rows * (n / (done * L));
    const bool last = done * L == n;
    fwht_strided_kernel<T><<<outer * (done / std::min<int64_t>(done, kStridedColumns)), kFwhtThreads,
                             L * std::min<int64_t>(done, kStridedColumns) * sizeof(T), stream>>>(
        y, static_cast<int>(L), done, last ? scale : T(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    done *= L;
  }
}

// The float/double tensor a kernel runs on: other floating dtypes go through float.
at::Tensor compute_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return (s == at::kFloat || s == at::kDouble ? t : t.to(at::kFloat)).contiguous();
}

at::Tensor fwht_cuda(const at::Tensor& x) {
  check_fwht(x);
  const int64_t n = x.size(-1);
  const c10::cuda::CUDAGuard guard(x.device());
  count_call("fwht.cuda");
  const at::Tensor src = compute_dtype(x);
  at::Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  const int64_t rows = src.numel() / n;
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "fwht_cuda", [&] {
      fwht_launch(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, n,
                  c10::cuda::getCurrentCUDAStream());
    });
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// ------------------------------------------------------------------------------------------------ sparse sketch

constexpr int kGatherWarps = 8;                       // output rows per block
constexpr int kLaneColumns = 4;                       // columns per lane and step
constexpr int kWarpColumns = 32 * kLaneColumns;       // columns per warp and step
constexpr int64_t kMaxColumnBlocks = 65535;           // gridDim.y limit

// out[r, :] = Σ_{e ∈ [offsets[r], offsets[r+1])} vals[e] · src[idx[e], :] for src (·, c), out (rows, c)
// row-major: one warp per output row, lanes along the columns (coalesced), sums in entry order.
template <typename T>
__global__ void csr_gather_kernel(const T* __restrict__ src, const int64_t* __restrict__ offsets,
                                  const int64_t* __restrict__ idx, const T* __restrict__ vals, T* __restrict__ out,
                                  int64_t rows, int64_t c) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGatherWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t begin = offsets[r], end = offsets[r + 1];
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kWarpColumns; c0 < c;
       c0 += static_cast<int64_t>(gridDim.y) * kWarpColumns) {
    T acc[kLaneColumns] = {};
    for (int64_t e = begin; e < end; ++e) {
      const T w = vals[e];
      const T* s = src + idx[e] * c;
#pragma unroll
      for (int q = 0; q < kLaneColumns; ++q) {
        const int64_t k = c0 + q * 32 + lane;
        if (k < c) acc[q] += w * s[k];
      }
    }
#pragma unroll
    for (int q = 0; q < kLaneColumns; ++q) {
      const int64_t k = c0 + q * 32 + lane;
      if (k < c) out[r * c + k] = acc[q];
    }
  }
}

// out (rows, c) from src (·, c) in the compute dtype, entries given in CSR form by output row.
at::Tensor csr_gather(const at::Tensor& src, const at::Tensor& offsets, const at::Tensor& idx, const at::Tensor& vals,
                      int64_t rows) {
  const int64_t c = src.size(1);
  at::Tensor out = at::empty({rows, c}, src.options());
  if (rows == 0 || c == 0) return out;
  const dim3 grid((rows + kGatherWarps - 1) / kGatherWarps,
                  std::min<int64_t>(kMaxColumnBlocks, (c + kWarpColumns - 1) / kWarpColumns));
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "csr_gather_cuda", [&] {
    csr_gather_kernel<scalar_t><<<grid, kGatherWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(),
        vals.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, c);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sparse_sketch_cuda(const at::Tensor& A, const at::Tensor& rows, const at::Tensor& vals,
                              int64_t sketch_size) {
  check_sparse(A, rows, vals, "sparse_sketch");
  TORCH_CHECK(A.size(0) == rows.size(0), "sparse_sketch: A has ", A.size(0), " rows, S has ", rows.size(0),
              " columns");
  const c10::cuda::CUDAGuard guard(A.device());
  check_rows_in_range(rows, sketch_size, "sparse_sketch");
  count_call("sparse_sketch.cuda");
  // Entries sorted (stably) by output row: CSR of S, whose column indices are the rows j of A.
  const at::Tensor flat = rows.reshape({-1});
  const auto [sorted, order] = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(sorted, at::arange(sketch_size + 1, flat.options()));
  const at::Tensor src_rows = at::floor_divide(order, rows.size(1));
  const at::Tensor a = compute_dtype(A);
  const at::Tensor entry_vals = compute_dtype(vals).reshape({-1}).index_select(0, order);
  const at::Tensor out = csr_gather(a, offsets, src_rows, entry_vals, sketch_size);
  return out.scalar_type() == A.scalar_type() ? out : out.to(A.scalar_type());
}

at::Tensor sparse_sketch_t_cuda(const at::Tensor& G, const at::Tensor& rows, const at::Tensor& vals) {
  check_sparse(G, rows, vals, "sparse_sketch_t");
  const c10::cuda::CUDAGuard guard(G.device());
  check_rows_in_range(rows, G.size(0), "sparse_sketch_t");
  count_call("sparse_sketch_t.cuda");
  const int64_t n = rows.size(0), nnz = rows.size(1);
  // Row j of Sᵀ holds the nnz entries of column j of S, already contiguous: offsets j·nnz.
  const at::Tensor offsets = at::arange(n + 1, rows.options()) * nnz;
  const at::Tensor out = csr_gather(compute_dtype(G), offsets, rows.contiguous().reshape({-1}),
                                    compute_dtype(vals).reshape({-1}), n);
  return out.scalar_type() == G.scalar_type() ? out : out.to(G.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("fwht", &fwht_cuda);
  m.impl("sparse_sketch", &sparse_sketch_cuda);
  m.impl("sparse_sketch_t", &sparse_sketch_t_cuda);
}

}  // namespace panther
