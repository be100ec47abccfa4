// FAVOR+ attention shared by the native kernels of panther::performer_attention(_backward): the op checks, and
// the device-generic composition of batched GEMMs and row kernels that the CUDA registration runs (the CPU
// registration runs its own fused per-head kernels, csrc/cpu/attention_cpu.cpp). The math, stabilisers and
// EPS clamp are those of the reference bodies in panther_fx/ops/attention.py.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "linear.h"  // OptTensor

namespace panther {

using AttentionGrads = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;

constexpr double kAttentionEps = 1e-30;  // the reference's EPS: floor of the denominator

// The checks of attention.py's _check, with the same messages.
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                     const OptTensor& mask, c10::string_view kernel_fn, bool causal, std::optional<double> scale);

// float64 stays float64, everything else is computed in float32 (as the reference does).
at::ScalarType attention_work_dtype(const at::Tensor& q);

// The additive key bias (B, Lk), detached and contiguous: 0 / −inf for a bool mask, the values of a float mask.
at::Tensor key_bias(const OptTensor& mask, at::ScalarType dtype);

// The composition over all (batch, head) pairs at once: out (B, H, Lq, dv) in q's dtype. Every GEMM
// accumulates in the work dtype; bfloat16 inputs keep their dtype as GEMM operands (features and states are
// rounded to it before the GEMMs that consume them, as flash attention rounds its probabilities), every other
// dtype (float16 included: its range could overflow the states) computes in the work dtype throughout.
at::Tensor performer_attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& features, const OptTensor& key_padding_mask,
                                         c10::string_view kernel_fn, bool causal, std::optional<double> scale);

AttentionGrads performer_attention_backward_composite(const at::Tensor& g_out, const at::Tensor& q,
                                                      const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& features, const OptTensor& key_padding_mask,
                                                      c10::string_view kernel_fn, bool causal,
                                                      std::optional<double> scale, std::array<bool, 5> needs);

// Row kernels of the composition, fused on CUDA (csrc/cuda/attention_cuda.cu); all rows are the last dim. A
// projection X is (n, parts·m) in the work dtype and stands for the sum of its `parts` column blocks (the hi
// and lo halves of bfloat16 features), added as it is read.
//   query_softmax_features: φ = exp(X − rowmax X)/√m -> φ (n, m) in `out_dtype`.
//   key_row_max:            keys K (n, d) -> (max_j X[s, j] − hsq[s] + bias[s], hsq) with hsq = half_rs2·|K_s|².
//   key_softmax_features:   φ = exp(X − hsq[s] + bias[s] − c)/√m with c = stab[s / rows_per_stab], or 0 where
//                           that is not finite (all keys padded) -> `out_dtype`.
//   relu_features:          φ = relu(X)·e^{bias[s]}/√m (bias undefined: e^0) -> `out_dtype`.
//   normalise:              numden (n, dv+1) -> num / max(den, EPS) (n, dv) in `out_dtype`.
//   numden_grads:           g (n, dv), numden (n, dv+1) -> [g, −g·out]/max(den, EPS) (n, dv+1) in `out_dtype`
//                           (the last column 0 where den ≤ EPS).
//   feature_grads:          g_phi (n, m) in the work dtype, φ (n, m) -> (pre, g_bias): pre = g_phi ⊙ φ, or for
//                           relu (X defined) g_phi ⊙ 1[X > 0]·e^{bias}/√m, in φ's dtype; g_bias = Σ_j g_phi φ.
namespace cuda_rows {
at::Tensor query_softmax_features(const at::Tensor& X, int64_t parts, double inv_root_m, at::ScalarType out_dtype);
std::tuple<at::Tensor, at::Tensor> key_row_max(const at::Tensor& X, int64_t parts, const at::Tensor& K,
                                               double half_rs2, const at::Tensor& bias);
at::Tensor key_softmax_features(const at::Tensor& X, int64_t parts, const at::Tensor& hsq, const at::Tensor& bias,
                                const at::Tensor& stab, int64_t rows_per_stab, double inv_root_m,
                                at::ScalarType out_dtype);
at::Tensor relu_features(const at::Tensor& X, int64_t parts, const at::Tensor& bias, double inv_root_m,
                         at::ScalarType out_dtype);
at::Tensor normalise(const at::Tensor& numden, at::ScalarType out_dtype);
at::Tensor numden_grads(const at::Tensor& g, const at::Tensor& numden, at::ScalarType out_dtype);
std::tuple<at::Tensor, at::Tensor> feature_grads(const at::Tensor& g_phi, const at::Tensor& phi, const at::Tensor& X,
                                                 int64_t parts, const at::Tensor& bias, double inv_root_m);
}  // namespace cuda_rows

}  // namespace panther
