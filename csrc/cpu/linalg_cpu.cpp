// CPU kernels for the structured-sketch ops (schemas and reference bodies in panther_fx/ops/linalg.py):
//   panther::fwht(x)                         orthonormal Walsh–Hadamard transform along the last dim
//   panther::sparse_sketch(A, rows, vals, d) S @ A with S[rows[j, t], j] = vals[j, t]
//   panther::sparse_sketch_t(G, rows, vals)  Sᵀ @ G
// float and double run natively; other floating dtypes are computed in float and rounded once at the end
// (the reference rounds after every butterfly stage / product, so it is less accurate there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../linalg.h"  // check_fwht, check_sparse, check_rows_in_range
#include "../linear.h"  // count_call

// The hot loops get an AVX2 clone next to the baseline (SSE2) one, chosen once at load time: the
// extension is built without -march so that it runs on any x86-64 machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PANTHER_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PANTHER_SIMD_CLONES
#endif
// Helpers are forced inline so that each clone above gets its own (vectorized) copy.
#define PANTHER_INLINE inline __attribute__((always_inline))

namespace panther {
namespace {

// ------------------------------------------------------------------------------------------------ FWHT

// Rows of this many bytes or fewer are transformed entirely in L1 (all log₂ n stages on one block); longer
// rows run those stages on each block, then the remaining (stride >= block) stages on column tiles.
constexpr int64_t kBlockBytes = 16 * 1024;
// Column-tile width (bytes) of the large-stride stages: several cache lines per strided access.
constexpr int64_t kTileBytes = 256;

// Stages of stride h and 2h fused (radix 4): one read and one write of x per two stages.
// x has 4h·(count) elements; the k-loop is unit stride, so it vectorizes for h >= the vector width.
template <typename T>
PANTHER_INLINE void radix4_stage(T* __restrict x, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 4 * h) {
    T* a = x + i;
    for (int64_t k = 0; k < h; ++k) {
      const T x0 = a[k], x1 = a[k + h], x2 = a[k + 2 * h], x3 = a[k + 3 * h];
      const T s01 = x0 + x1, d01 = x0 - x1, s23 = x2 + x3, d23 = x2 - x3;
      a[k] = s01 + s23;
      a[k + h] = d01 + d23;
      a[k + 2 * h] = s01 - s23;
      a[k + 3 * h] = d01 - d23;
    }
  }
}

template <typename T>
PANTHER_INLINE void radix2_stage(T* __restrict x, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 2 * h) {
    T* a = x + i;
    for (int64_t k = 0; k < h; ++k) {
      const T u = a[k], v = a[k + h];
      a[k] = u + v;
      a[k + h] = u - v;
    }
  }
}

// All stages h = 1, 2, ..., n/2 of an in-cache block of n = 2^p elements (unscaled Hadamard).
template <typename T>
PANTHER_INLINE void fwht_block(T* __restrict x, int64_t n) {
  // Strides 1 and 2 as one 4-point transform per quad: the radix-4 k-loop would be too short to vectorize.
  int64_t h = 1;
  if (n >= 4) {
    for (int64_t i = 0; i < n; i += 4) {
      const T x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      const T s01 = x0 + x1, d01 = x0 - x1, s23 = x2 + x3, d23 = x2 - x3;
      x[i] = s01 + s23;
      x[i + 1] = d01 + d23;
      x[i + 2] = s01 - s23;
      x[i + 3] = d01 - d23;
    }
    h = 4;
  }
  for (; 4 * h <= n; h *= 4) radix4_stage(x, n, h);
  if (h < n) radix2_stage(x, n, h);
}

// Stages of stride block, 2·block, ..., n/2 on the columns [c0, c0 + w) of x viewed as (n/block, block):
// a Hadamard transform of size n/block along that view's first dim, done on one cache-resident tile.
template <typename T>
PANTHER_INLINE void fwht_tile(T* __restrict x, int64_t n, int64_t block, int64_t c0, int64_t w) {
  for (int64_t h = block; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t r = 0; r < h; r += block) {
        T* a = x + i + r + c0;
        T* b = a + h;
        for (int64_t k = 0; k < w; ++k) {
          const T u = a[k], v = b[k];
          a[k] = u + v;
          b[k] = u - v;
        }
      }
    }
  }
}

// y = x H / √n for one row: x may alias nothing in y.
template <typename T>
PANTHER_SIMD_CLONES void fwht_row(const T* __restrict x, T* __restrict y, int64_t n) {
  const T scale = T(1) / std::sqrt(T(n));
  const int64_t block = std::min<int64_t>(n, kBlockBytes / int64_t(sizeof(T)));
  for (int64_t b = 0; b < n; b += block) {
    std::memcpy(y + b, x + b, block * sizeof(T));
    fwht_block(y + b, block);
    if (block == n)
      for (int64_t k = 0; k < n; ++k) y[k] *= scale;  // still in L1
  }
  if (block == n) return;
  const int64_t w = std::min<int64_t>(block, kTileBytes / int64_t(sizeof(T)));
  for (int64_t c0 = 0; c0 < block; c0 += w) {
    fwht_tile(y, n, block, c0, w);
    for (int64_t i = 0; i < n; i += block)
      for (int64_t k = c0; k < c0 + w; ++k) y[i + k] *= scale;
  }
}

template <typename T>
void fwht_rows(const T* x, T* y, int64_t rows, int64_t n) {
  // About 64 KiB of work per task: enough to hide the scheduling cost, small enough to split a batch.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (n * int64_t(sizeof(T))));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fwht_row(x + r * n, y + r * n, n);
  });
}

at::Tensor fwht_cpu(const at::Tensor& x) {
  check_fwht(x);
  const int64_t n = x.size(-1);
  count_call("fwht.cpu");
  const bool native = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const at::Tensor src = (native ? x : x.to(at::kFloat)).contiguous();
  at::Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  const int64_t rows = n == 0 ? 0 : src.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "fwht_cpu", [&] {
    fwht_rows(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, n);
  });
  return native ? out : out.to(x.scalar_type());
}

// ------------------------------------------------------------------------------------------------ sparse sketch

// Output columns per task: at least a few cache lines, so tasks never write the same line.
constexpr int64_t kColumnGrain = 32;

// out[rows[j, t], c0:c1] += vals[j, t] · A[j, c0:c1] for every j, t, A row-major: each task owns a range of
// output columns, so the scatter needs no atomics; A streams through once, the out slice stays in cache.
template <typename T>
PANTHER_SIMD_CLONES void scatter_columns(const T* __restrict A, const int64_t* __restrict rows,
                                         const T* __restrict vals, T* __restrict out, int64_t n, int64_t nnz,
                                         int64_t c, int64_t c0, int64_t c1) {
  for (int64_t j = 0; j < n; ++j) {
    const T* a = A + j * c;
    for (int64_t t = 0; t < nnz; ++t) {
      const T v = vals[j * nnz + t];
      T* o = out + rows[j * nnz + t] * c;
      for (int64_t k = c0; k < c1; ++k) o[k] += v * a[k];
    }
  }
}

// The same product for a column-major A (A = Bᵀ for a row-major B (c, n), as when a sketch is applied along
// the last dim): kPanel columns of A at a time, each read contiguously, scattered into a (d, kPanel) panel
// that stays in L1; the panel's rows are short vectors. Saves the transposing copy of A.
constexpr int64_t kPanel = 8;

template <typename T>
PANTHER_SIMD_CLONES void scatter_panels(const T* __restrict B, int64_t ld, const int64_t* __restrict rows,
                                        const T* __restrict vals, T* __restrict out, int64_t n, int64_t nnz,
                                        int64_t d, int64_t c, int64_t p0, int64_t p1) {
  std::vector<T> panel(d * kPanel);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t i0 = p * kPanel, w = std::min(kPanel, c - i0);
    std::fill(panel.begin(), panel.end(), T(0));
    T* __restrict acc = panel.data();
    for (int64_t j = 0; j < n; ++j) {
      T a[kPanel] = {};
      for (int64_t q = 0; q < w; ++q) a[q] = B[(i0 + q) * ld + j];
      for (int64_t t = 0; t < nnz; ++t) {
        const T v = vals[j * nnz + t];
        T* o = acc + rows[j * nnz + t] * kPanel;
        for (int64_t q = 0; q < kPanel; ++q) o[q] += v * a[q];
      }
    }
    for (int64_t r = 0; r < d; ++r)
      for (int64_t q = 0; q < w; ++q) out[r * c + i0 + q] = acc[r * kPanel + q];
  }
}

// out[j, :] = Σ_t vals[j, t] · G[rows[j, t], :]: a gather, so output rows are independent.
template <typename T>
PANTHER_SIMD_CLONES void gather_rows(const T* __restrict G, const int64_t* __restrict rows,
                                     const T* __restrict vals, T* __restrict out, int64_t nnz, int64_t c,
                                     int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    T* o = out + j * c;
    std::fill(o, o + c, T(0));
    for (int64_t t = 0; t < nnz; ++t) {
      const T v = vals[j * nnz + t];
      const T* g = G + rows[j * nnz + t] * c;
      for (int64_t k = 0; k < c; ++k) o[k] += v * g[k];
    }
  }
}

// The float/double operand a kernel runs on, strides kept: other floating dtypes go through float.
at::Tensor compute_dtype_strided(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble ? t : t.to(at::kFloat);
}

at::Tensor compute_dtype(const at::Tensor& t) { return compute_dtype_strided(t).contiguous(); }

at::Tensor sparse_sketch_cpu(const at::Tensor& A, const at::Tensor& rows, const at::Tensor& vals,
                             int64_t sketch_size) {
  check_sparse(A, rows, vals, "sparse_sketch");
  TORCH_CHECK(A.size(0) == rows.size(0), "sparse_sketch: A has ", A.size(0), " rows, S has ", rows.size(0),
              " columns");
  const at::Tensor r = rows.contiguous();
  check_rows_in_range(r, sketch_size, "sparse_sketch");
  count_call("sparse_sketch.cpu");
  const at::Tensor v = compute_dtype(vals);
  at::Tensor a = compute_dtype_strided(A);
  // The panel path holds a (sketch_size, kPanel) scratch per thread: with fewer than kPanel columns that is
  // more than the output itself, and the transposing copy it saves is small.
  const bool col_major = a.stride(0) == 1 && a.size(1) >= kPanel && a.stride(1) >= a.size(0);
  if (!col_major) a = a.contiguous();
  const int64_t n = a.size(0), c = a.size(1), nnz = r.size(1);
  at::Tensor out = at::zeros({sketch_size, c}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparse_sketch_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t* pr = r.const_data_ptr<int64_t>();
    if (col_major) {
      const int64_t ld = a.stride(1);
      at::parallel_for(0, (c + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
        scatter_panels(pa, ld, pr, pv, po, n, nnz, sketch_size, c, p0, p1);
      });
    } else {
      at::parallel_for(0, c, kColumnGrain, [&](int64_t c0, int64_t c1) {
        scatter_columns(pa, pr, pv, po, n, nnz, c, c0, c1);
      });
    }
  });
  return out.scalar_type() == A.scalar_type() ? out : out.to(A.scalar_type());
}

at::Tensor sparse_sketch_t_cpu(const at::Tensor& G, const at::Tensor& rows, const at::Tensor& vals) {
  check_sparse(G, rows, vals, "sparse_sketch_t");
  const at::Tensor r = rows.contiguous();
  check_rows_in_range(r, G.size(0), "sparse_sketch_t");
  count_call("sparse_sketch_t.cpu");
  const at::Tensor g = compute_dtype(G), v = compute_dtype(vals);
  const int64_t n = r.size(0), nnz = r.size(1), c = g.size(1);
  at::Tensor out = at::empty({n, c}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_sketch_t_cpu", [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t* pr = r.const_data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(c * nnz, 1));
    at::parallel_for(0, n, grain, [&](int64_t j0, int64_t j1) { gather_rows(pg, pr, pv, po, nnz, c, j0, j1); });
  });
  return out.scalar_type() == G.scalar_type() ? out : out.to(G.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(panther, CPU, m) {
  m.impl("fwht", &fwht_cpu);
  m.impl("sparse_sketch", &sparse_sketch_cpu);
  m.impl("sparse_sketch_t", &sparse_sketch_t_cpu);
}

}  // namespace panther
