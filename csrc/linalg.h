// Input checks of the structured-sketch ops shared by their CPU and CUDA kernels (schemas and reference bodies
// in panther_fx/ops/linalg.py, whose messages these repeat).
#pragma once

#include <ATen/ATen.h>

namespace panther {

// x has a last dim that is a power of two and a floating dtype.
void check_fwht(const at::Tensor& x);

// A (·, c) 2-D; rows (int64) and vals (A's dtype) both (n, nnz); all three on A's device.
void check_sparse(const at::Tensor& A, const at::Tensor& rows, const at::Tensor& vals, const char* name);

// Every entry of rows in [0, size): out-of-range rows would index out of bounds (one device-to-host copy on CUDA).
void check_rows_in_range(const at::Tensor& rows, int64_t size, const char* name);

}  // namespace panther
