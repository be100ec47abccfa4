// CUDA registration of panther::performer_attention(_backward): the batched composition of csrc/attention.cpp
// (cuBLAS GEMMs over all (batch, head) pairs) with its row kernels fused here, one pass over the (rows, m)
// projections each instead of the four to six elementwise passes of their ATen forms. One warp per row, lanes
// along the row (coalesced); work dtype float (double for double inputs); all launches on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../attention.h"

namespace panther {
namespace {

constexpr int kRowWarps = 8;  // rows per block

__device__ __forceinline__ float exp_w(float x) { return expf(x); }
__device__ __forceinline__ double exp_w(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// The row this warp owns, or -1 for the warps past the last row.
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  return r < rows ? r : -1;
}

// A projection (rows, parts·m): entry (r, j) is the sum of its `parts` column blocks (bfloat16 features are
// split into hi and lo halves, see csrc/attention.cpp).
template <typename W>
struct Projection {
  const W* X;
  int64_t m;
  int parts;

  __device__ __forceinline__ W operator()(int64_t r, int64_t j) const {
    const W* row = X + r * m * parts;
    return parts == 2 ? row[j] + row[m + j] : row[j];
  }
};

template <typename W>
Projection<W> projection(const at::Tensor& X, int64_t parts) {
  return {X.const_data_ptr<W>(), X.size(1) / parts, static_cast<int>(parts)};
}

// The additive term of row r: −hsq[r] + bias[r] (bias may be null).
template <typename W>
__device__ __forceinline__ W key_shift(const W* hsq, const W* bias, int64_t r) {
  return -hsq[r] + (bias ? bias[r] : W(0));
}

template <typename W, typename O>
__global__ void query_softmax_kernel(Projection<W> X, O* __restrict__ phi, int64_t rows, W inv_root_m) {
  const int64_t r = warp_row(rows);
  if (r < 0) return;
  const int lane = threadIdx.x % 32;
  const int64_t m = X.m;
  W mx = -INFINITY;
  for (int64_t j = lane; j < m; j += 32) mx = fmax(mx, X(r, j));
  mx = warp_max(mx);
  for (int64_t j = lane; j < m; j += 32) phi[r * m + j] = static_cast<O>(exp_w(X(r, j) - mx) * inv_root_m);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// hsq[r] = half_rs2·|K_r|² and out[r] = max_j X[r, j] − hsq[r] + bias[r], for keys K (rows, d) in the GEMM dtype.
template <typename W, typename G>
__global__ void key_row_max_kernel(Projection<W> X, const G* __restrict__ K, W half_rs2, const W* __restrict__ bias,
                                   W* __restrict__ out, W* __restrict__ hsq, int64_t rows, int64_t d) {
  const int64_t r = warp_row(rows);
  if (r < 0) return;
  const int lane = threadIdx.x % 32;
  W mx = -INFINITY, sq = 0;
  for (int64_t j = lane; j < X.m; j += 32) mx = fmax(mx, X(r, j));
  for (int64_t j = lane; j < d; j += 32) {
    const W kj = static_cast<W>(K[r * d + j]);
    sq += kj * kj;
  }
  mx = warp_max(mx);
  sq = warp_sum(sq);
  if (lane == 0) {
    hsq[r] = half_rs2 * sq;
    out[r] = mx + key_shift(hsq, bias, r);
  }
}

template <typename W, typename O>
__global__ void key_softmax_kernel(Projection<W> X, const W* __restrict__ hsq, const W* __restrict__ bias,
                                   const W* __restrict__ stab, int64_t rows_per_stab, O* __restrict__ phi,
                                   int64_t rows, W inv_root_m) {
  const int64_t r = warp_row(rows);
  if (r < 0) return;
  const int lane = threadIdx.x % 32;
  const int64_t m = X.m;
  const W c = stab[r / rows_per_stab];
  const W shift = key_shift(hsq, bias, r) - (isfinite(c) ? c : W(0));
  for (int64_t j = lane; j < m; j += 32) phi[r * m + j] = static_cast<O>(exp_w(X(r, j) + shift) * inv_root_m);
}

template <typename W, typename O>
__global__ void relu_features_kernel(Projection<W> X, const W* __restrict__ bias, O* __restrict__ phi, int64_t rows,
                                     W inv_root_m) {
  const int64_t r = warp_row(rows);
  if (r < 0) return;
  const int lane = threadIdx.x % 32;
  const int64_t m = X.m;
  const W factor = bias ? exp_w(bias[r]) * inv_root_m : inv_root_m;
  for (int64_t j = lane; j < m; j += 32) phi[r * m + j] = static_cast<O>(fmax(X(r, j), W(0)) * factor);
}

template <typename W, typename O>
__global__ void normalise_kernel(const W* __restrict__ numden, O* __restrict__ out, int64_t rows, int64_t dv) {
  const int64_t r = warp_row(rows);
  if (r < 0) return;
  const int lane = threadIdx.x % 32;
  const W* row = numden + r * (dv + 1);
  const W den = fmax(row[dv], W(kAttentionEps));
  for (int64_t j = lane; j < dv; j += 32) out[r * dv + j] = static_cast<O>(row[j] / den);
}

// [g / den_c, −(g · num / den_c) / den_c] per row, the last entry 0 where den ≤ EPS.
template <typename W, typename O>
__global__ void numden_grads_kernel(const W* __restrict__ g, const W* __restrict__ numden, O* __restrict__ out,
                                    int64_t rows, int64_t dv) {
  const int64_t r = warp_row(rows);
  if (r < 0) return;
  const int lane = threadIdx.x % 32;
  const W* nd = numden + r * (dv + 1);
  const W den = nd[dv], den_c = fmax(den, W(kAttentionEps));
  W dot = 0;
  for (int64_t j = lane; j < dv; j += 32) {
    const W gj = g[r * dv + j];
    dot += gj * (nd[j] / den_c);
    out[r * (dv + 1) + j] = static_cast<O>(gj / den_c);
  }
  dot = warp_sum(dot);
  if (lane == 0) out[r * (dv + 1) + dv] = static_cast<O>(den > W(kAttentionEps) ? -dot / den_c : W(0));
}

// pre = g_phi ⊙ φ (softmax, X.X null) or g_phi ⊙ 1[X > 0]·e^{bias}/√m (relu); g_bias = Σ_j g_phi φ per row.
template <typename W, typename O>
__global__ void feature_grads_kernel(const W* __restrict__ g_phi, const O* __restrict__ phi, Projection<W> X,
                                     const W* __restrict__ bias, O* __restrict__ pre, W* __restrict__ g_bias,
                                     int64_t rows, int64_t m, W inv_root_m) {
  const int64_t r = warp_row(rows);
  if (r < 0) return;
  const int lane = threadIdx.x % 32;
  const W factor = bias ? exp_w(bias[r]) * inv_root_m : inv_root_m;
  W sum = 0;
  for (int64_t j = lane; j < m; j += 32) {
    const int64_t i = r * m + j;
    const W gp = g_phi[i] * static_cast<W>(phi[i]);
    sum += gp;
    pre[i] = static_cast<O>(X.X ? (X(r, j) > W(0) ? g_phi[i] * factor : W(0)) : gp);
  }
  sum = warp_sum(sum);
  if (lane == 0) g_bias[r] = sum;
}

// f(W{}, O{}) for the work dtype of X (float or double) and the output dtype: double work writes double,
// float work writes float, bfloat16 or float16.
template <typename F>
void dispatch_work_out(const at::Tensor& X, at::ScalarType out, const F& f) {
  if (X.scalar_type() == at::kDouble) {
    TORCH_CHECK(out == at::kDouble, "performer_attention: double work dtype with output dtype ", out);
    return f(double{}, double{});
  }
  TORCH_CHECK(X.scalar_type() == at::kFloat, "performer_attention: work dtype must be float or double, got ",
              X.scalar_type());
  switch (out) {
    case at::kFloat: return f(float{}, float{});
    case at::kBFloat16: return f(float{}, at::BFloat16{});
    case at::kHalf: return f(float{}, at::Half{});
    default: TORCH_CHECK(false, "performer_attention: unsupported output dtype ", out);
  }
}

// kernel<<<one warp per row>>>(args...) on the current stream; nothing for 0 rows (a grid cannot be empty).
template <typename... KernelArgs, typename... Args>
void launch_rows(void (*kernel)(KernelArgs...), int64_t rows, Args... args) {
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps));
  kernel<<<grid, kRowWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename W>
const W* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<W>() : nullptr;
}

}  // namespace

namespace cuda_rows {

at::Tensor query_softmax_features(const at::Tensor& X, int64_t parts, double inv_root_m, at::ScalarType out_dtype) {
  const int64_t rows = X.size(0), m = X.size(1) / parts;
  at::Tensor phi = at::empty({rows, m}, X.options().dtype(out_dtype));
  dispatch_work_out(X, out_dtype, [&](auto w, auto o) {
    using W = decltype(w);
    using O = decltype(o);
    launch_rows(query_softmax_kernel<W, O>, rows, projection<W>(X, parts), phi.mutable_data_ptr<O>(), rows,
                static_cast<W>(inv_root_m));
  });
  return phi;
}

std::tuple<at::Tensor, at::Tensor> key_row_max(const at::Tensor& X, int64_t parts, const at::Tensor& K,
                                               double half_rs2, const at::Tensor& bias) {
  const int64_t rows = X.size(0), d = K.size(1);
  at::Tensor out = at::empty({rows}, X.options()), hsq = at::empty({rows}, X.options());
  dispatch_work_out(X, K.scalar_type(), [&](auto w, auto g) {
    using W = decltype(w);
    using G = decltype(g);
    launch_rows(key_row_max_kernel<W, G>, rows, projection<W>(X, parts), K.const_data_ptr<G>(),
                static_cast<W>(half_rs2), opt_ptr<W>(bias), out.mutable_data_ptr<W>(), hsq.mutable_data_ptr<W>(), rows,
                d);
  });
  return {out, hsq};
}

at::Tensor key_softmax_features(const at::Tensor& X, int64_t parts, const at::Tensor& hsq, const at::Tensor& bias,
                                const at::Tensor& stab, int64_t rows_per_stab, double inv_root_m,
                                at::ScalarType out_dtype) {
  const int64_t rows = X.size(0), m = X.size(1) / parts;
  at::Tensor phi = at::empty({rows, m}, X.options().dtype(out_dtype));
  const at::Tensor stab_c = stab.contiguous();
  dispatch_work_out(X, out_dtype, [&](auto w, auto o) {
    using W = decltype(w);
    using O = decltype(o);
    launch_rows(key_softmax_kernel<W, O>, rows, projection<W>(X, parts), hsq.const_data_ptr<W>(), opt_ptr<W>(bias),
                stab_c.const_data_ptr<W>(), rows_per_stab, phi.mutable_data_ptr<O>(), rows,
                static_cast<W>(inv_root_m));
  });
  return phi;
}

at::Tensor relu_features(const at::Tensor& X, int64_t parts, const at::Tensor& bias, double inv_root_m,
                         at::ScalarType out_dtype) {
  const int64_t rows = X.size(0), m = X.size(1) / parts;
  at::Tensor phi = at::empty({rows, m}, X.options().dtype(out_dtype));
  dispatch_work_out(X, out_dtype, [&](auto w, auto o) {
    using W = decltype(w);
    using O = decltype(o);
    launch_rows(relu_features_kernel<W, O>, rows, projection<W>(X, parts), opt_ptr<W>(bias),
                phi.mutable_data_ptr<O>(), rows, static_cast<W>(inv_root_m));
  });
  return phi;
}

at::Tensor normalise(const at::Tensor& numden, at::ScalarType out_dtype) {
  const int64_t rows = numden.size(0), dv = numden.size(1) - 1;
  at::Tensor out = at::empty({rows, dv}, numden.options().dtype(out_dtype));
  dispatch_work_out(numden, out_dtype, [&](auto w, auto o) {
    using W = decltype(w);
    using O = decltype(o);
    launch_rows(normalise_kernel<W, O>, rows, numden.const_data_ptr<W>(), out.mutable_data_ptr<O>(), rows, dv);
  });
  return out;
}

at::Tensor numden_grads(const at::Tensor& g, const at::Tensor& numden, at::ScalarType out_dtype) {
  const int64_t rows = numden.size(0), dv = numden.size(1) - 1;
  at::Tensor out = at::empty({rows, dv + 1}, numden.options().dtype(out_dtype));
  dispatch_work_out(numden, out_dtype, [&](auto w, auto o) {
    using W = decltype(w);
    using O = decltype(o);
    launch_rows(numden_grads_kernel<W, O>, rows, g.const_data_ptr<W>(), numden.const_data_ptr<W>(),
                out.mutable_data_ptr<O>(), rows, dv);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> feature_grads(const at::Tensor& g_phi, const at::Tensor& phi, const at::Tensor& X,
                                                 int64_t parts, const at::Tensor& bias, double inv_root_m) {
  const int64_t rows = g_phi.size(0), m = g_phi.size(1);
  at::Tensor pre = at::empty({rows, m}, phi.options());
  at::Tensor g_bias = at::empty({rows}, g_phi.options());
  dispatch_work_out(g_phi, phi.scalar_type(), [&](auto w, auto o) {
    using W = decltype(w);
    using O = decltype(o);
    const Projection<W> signs = X.defined() ? projection<W>(X, parts) : Projection<W>{nullptr, m, 1};
    launch_rows(feature_grads_kernel<W, O>, rows, g_phi.const_data_ptr<W>(), phi.const_data_ptr<O>(), signs,
                opt_ptr<W>(bias), pre.mutable_data_ptr<O>(), g_bias.mutable_data_ptr<W>(), rows, m,
                static_cast<W>(inv_root_m));
  });
  return {pre, g_bias};
}

}  // namespace cuda_rows

namespace {

at::Tensor performer_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& features, const OptTensor& key_padding_mask,
                                    c10::string_view kernel_fn, bool causal, std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  count_call("performer_attention.cuda");
  return performer_attention_composite(q, k, v, features, key_padding_mask, kernel_fn, causal, scale);
}

AttentionGrads performer_attention_backward_cuda(const at::Tensor& g_out, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& features,
                                                 const OptTensor& key_padding_mask, c10::string_view kernel_fn,
                                                 bool causal, std::optional<double> scale, std::array<bool, 5> needs) {
  const c10::cuda::CUDAGuard guard(q.device());
  count_call("performer_attention_backward.cuda");
  return performer_attention_backward_composite(g_out, q, k, v, features, key_padding_mask, kernel_fn, causal, scale,
                                                needs);
}

}  // namespace

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("performer_attention", &performer_attention_cuda);
  m.impl("performer_attention_backward", &performer_attention_backward_cuda);
}

}  // namespace panther
