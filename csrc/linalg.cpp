#include "linalg.h"

namespace panther {

void check_fwht(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "fwht: x must have at least one dimension");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 1 && (n & (n - 1)) == 0, "fwht: the last dim must be a power of two, got ", n, " (zero-pad it)");
  TORCH_CHECK(x.is_floating_point(), "fwht: x must be a floating-point tensor, got ", x.scalar_type());
}

void check_sparse(const at::Tensor& A, const at::Tensor& rows, const at::Tensor& vals, const char* name) {
  TORCH_CHECK(A.dim() == 2, name, ": the dense operand must be 2-D, got shape ", A.sizes());
  TORCH_CHECK(rows.dim() == 2 && rows.sizes() == vals.sizes(), name, ": rows ", rows.sizes(), " and vals ",
              vals.sizes(), " must both be (n, nnz)");
  TORCH_CHECK(rows.scalar_type() == at::kLong, name, ": rows must be int64, got ", rows.scalar_type());
  TORCH_CHECK(vals.scalar_type() == A.scalar_type(), name, ": vals dtype ", vals.scalar_type(), " differs from ",
              A.scalar_type());
  TORCH_CHECK(rows.device() == A.device() && vals.device() == A.device(), name, ": all operands must be on ",
              A.device(), ", got rows on ", rows.device(), " and vals on ", vals.device());
}

void check_rows_in_range(const at::Tensor& rows, int64_t size, const char* name) {
  if (rows.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(rows);
  const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < size, name, ": rows must lie in [0, ", size, "), got [", lo, ", ", hi, "]");
}

}  // namespace panther
