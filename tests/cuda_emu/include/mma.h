// cuda_emu: nvcuda::wmma on the host. A fragment holds its whole tile in float in every lane (the GPU spreads
// it over the lanes; the kernels here only load, multiply, fill and store, which do not depend on how). Stores
// are spread over the lanes as on the GPU (lane l writes elements l, l + 32, ...), so reading another lane's
// part of a stored tile needs the __syncwarp the hardware needs. Pointers must be 32-byte aligned and leading
// dimensions a multiple of 16 bytes, as the CUDA documentation requires.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows][cols];
};

namespace detail {
template <typename T>
void check(const void* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    cuda_emu::fail(std::string("wmma::") + what + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    cuda_emu::fail(std::string("wmma::") + what + ": leading dimension " + std::to_string(ldm) +
                   " is not a multiple of 16 bytes");
}
template <typename Frag, typename T>
void load(Frag& f, const T* p, unsigned ldm, bool row_major) {
  check<T>(p, ldm, "load_matrix_sync");
  for (int i = 0; i < Frag::rows; ++i)
    for (int j = 0; j < Frag::cols; ++j) f.x[i][j] = static_cast<float>(row_major ? p[i * ldm + j] : p[i + j * ldm]);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T>
void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, true);
}
template <typename Use, int M, int N, int K, typename T>
void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, false);
}
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  detail::load(f, p, ldm, layout == mem_row_major);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check<float>(p, ldm, "store_matrix_sync");
  for (int e = cuda_emu::lane(); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    p[layout == mem_row_major ? i * ldm + j : i + j * ldm] = f.x[i][j];
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (auto& row : f.x)
    for (float& e : row) e = value;
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M][N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i][j];
      for (int k = 0; k < K; ++k) sum += a.x[i][k] * b.x[k][j];
      out[i][j] = sum;
    }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) d.x[i][j] = out[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
