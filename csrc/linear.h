// Device-generic (ATen) implementations of the panther linear ops, shared by the CPU and CUDA registrations.
// The schemas live in panther_fx/ops/linear.py; the Python bodies there are the reference these must match.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace panther {

using OptTensor = std::optional<at::Tensor>;
using LowrankGrads = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor>;
using SketchedGrads = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;

// Which native kernel ran, for tests and `panther-fx info` (counts calls per op name).
void count_call(const char* op);
int64_t native_calls(const std::string& op);

void check_lowrank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const OptTensor& bias);
void check_sketched(const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& U1,
                    const at::Tensor& U2, const OptTensor& bias);

// y = (x Bᵀ) Aᵀ + bias as two GEMMs, the bias added in the second GEMM's epilogue.
at::Tensor lowrank_linear_gemm(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const OptTensor& bias);

// y = 1/(2L) Σ_i (x S1_i U1_i + x U2_i S2_i) + bias as GEMMs over the 2L rank-k terms, scale and bias in the
// epilogue: one GEMM per side over copied concatenated factors, or 2L GEMMs on views of the factors where
// that pays and keeps the accuracy (see sketch_concat in linear.cpp).
at::Tensor sketched_linear_gemm(const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2,
                                const at::Tensor& U1, const at::Tensor& U2, const OptTensor& bias);

// (y, t) with t = x Bᵀ (..., r), the rank-r intermediate kept for the backward's gA = gyᵀ t, so that the backward
// does not read x a second time to recompute it (the op lowrank_linear_with_t, used when A needs a gradient).
std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_t_gemm(const at::Tensor& x, const at::Tensor& A,
                                                              const at::Tensor& B, const OptTensor& bias);

LowrankGrads lowrank_linear_backward_gemm(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A,
                                          const at::Tensor& B, std::array<bool, 4> needs);
SketchedGrads sketched_linear_backward_gemm(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& S1,
                                            const at::Tensor& S2, const at::Tensor& U1, const at::Tensor& U2,
                                            std::array<bool, 6> needs);

}  // namespace panther
