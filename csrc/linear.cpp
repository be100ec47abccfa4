// Device-generic GEMM forms of the panther linear ops (ATen mm/addmm: MKL/oneDNN on CPU, cuBLAS on CUDA, in the
// op's dtype). Scales and biases go into the GEMM epilogue (addmm alpha/beta) instead of extra passes.
#include "linear.h"

#include <string>
#include <utility>
#include <vector>

namespace panther {

namespace {

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t out_features) {
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return sizes;
}

// Shapes and dtypes printed the way Python prints them, so that errors read the same with or without the
// extension (the reference checks live in panther_fx/ops/linear.py).
std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

std::string dtype_str(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t.scalar_type());
  }
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", dtype_str(t), " differs from x dtype ",
              dtype_str(x));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// The 2L rank-k terms as views: left_j (I, k) is S1_i (j = 2i) or U2_i (j = 2i + 1), right_j (k, O) is U1_i or
// S2_i, so that x left right = Σ_j (x left_j) right_j (the order of panther_fx.ops.linear.sketch_concat).
at::Tensor left_term(const at::Tensor& S1, const at::Tensor& U2, int64_t j) {
  return (j % 2 == 0 ? S1 : U2).select(0, j / 2);
}
at::Tensor right_term(const at::Tensor& S2, const at::Tensor& U1, int64_t j) {
  return (j % 2 == 0 ? U1 : S2).select(0, j / 2);
}

// left (I, 2Lk) and right (2Lk, O), materialised (copies of the factors).
std::pair<at::Tensor, at::Tensor> concat_factors(const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& U1,
                                                 const at::Tensor& U2) {
  const int64_t L = S1.size(0), I = S1.size(1), k = S1.size(2), O = S2.size(2);
  auto left = at::cat({S1, U2}, 2).transpose(0, 1).reshape({I, 2 * L * k});
  auto right = at::cat({U1, S2}, 1).reshape({2 * L * k, O});
  return {left, right};
}

// out = alpha * a b (+ bias); beta = 0 makes addmm ignore out's (uninitialised) values.
void gemm_epilogue(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const OptTensor& bias, double alpha) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, b, 1.0, alpha);
  } else {
    at::addmm_out(out, out, a, b, 0.0, alpha);
  }
}

}  // namespace

void check_lowrank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const OptTensor& bias) {
  const char* op = "lowrank_linear";
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2, op, ": A and B must be 2-D, got ", A.dim(), "-D and ", B.dim(), "-D");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(x.size(-1) == B.size(1), op, ": x has ", x.size(-1), " features but B is ", shape_str(B.sizes()),
              " (r, in)");
  TORCH_CHECK(A.size(1) == B.size(0), op, ": A ", shape_str(A.sizes()), " (out, r) and B ", shape_str(B.sizes()),
              " (r, in) disagree on r");
  TORCH_CHECK(x.scalar_type() == A.scalar_type() && A.scalar_type() == B.scalar_type(), op, ": dtypes differ: x ",
              dtype_str(x), ", A ", dtype_str(A), ", B ", dtype_str(B));
  check_same(op, "A", A, x);
  check_same(op, "B", B, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == A.size(0), op, ": bias must have shape (", A.size(0),
                ",), got ", shape_str(bias->sizes()));
    check_same(op, "bias", *bias, x);
  }
}

void check_sketched(const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& U1,
                    const at::Tensor& U2, const OptTensor& bias) {
  const char* op = "sketched_linear";
  TORCH_CHECK(S1.dim() == 3 && S2.dim() == 3 && U1.dim() == 3 && U2.dim() == 3, op,
              ": S1, S2, U1, U2 must be 3-D (L, ., .)");
  const int64_t L = S1.size(0), I = S1.size(1), k = S1.size(2), O = S2.size(2);
  TORCH_CHECK(L >= 1, op, ": S1 ", shape_str(S1.sizes()), " has no terms (L = 0); the output is scaled by 1/(2L)");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(x.size(-1) == I, op, ": x has ", x.size(-1), " features but S1 is ", shape_str(S1.sizes()),
              " (L, in, k)");
  const std::pair<const char*, const at::Tensor*> others[] = {{"S2", &S2}, {"U1", &U1}, {"U2", &U2}};
  for (const auto& [name, t] : others) {
    const std::vector<int64_t> want = t == &U2 ? std::vector<int64_t>{L, I, k} : std::vector<int64_t>{L, k, O};
    TORCH_CHECK(t->sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ", shape_str(want), ", got ",
                shape_str(t->sizes()));
    check_same(op, name, *t, x);
  }
  check_same(op, "S1", S1, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O, op, ": bias must have shape (", O, ",), got ",
                shape_str(bias->sizes()));
    check_same(op, "bias", *bias, x);
  }
}

at::Tensor lowrank_linear_gemm(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                               const OptTensor& bias) {
  return std::get<0>(lowrank_linear_with_t_gemm(x, A, B, bias));
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_t_gemm(const at::Tensor& x, const at::Tensor& A,
                                                              const at::Tensor& B, const OptTensor& bias) {
  auto x2 = x.reshape({-1, x.size(-1)});
  auto t = at::mm(x2, B.t());
  auto y = at::empty({x2.size(0), A.size(0)}, x.options());
  gemm_epilogue(y, t, A.t(), bias, 1.0);
  return {y.view(out_sizes(x, A.size(0))), t.view(out_sizes(x, B.size(0)))};
}

// Whether the sketched GEMMs run once per side over concatenated factors rather than once per rank-k term on
// views of them. Per-term GEMMs win below 2k tokens (copying the factors costs about as much as reading them
// again), but they add each term into the output in its own dtype: in bf16/fp16 that rounds it 2L times where
// one GEMM accumulates in fp32 (3x the error at L = 16), so reduced precision always concatenates.
bool sketch_concat(const at::Tensor& x, int64_t k) {
  const int64_t tokens = x.numel() / std::max<int64_t>(x.size(-1), 1);
  return tokens > 2 * k || at::isReducedFloatingType(x.scalar_type());
}

at::Tensor sketched_linear_gemm(const at::Tensor& x, const at::Tensor& S1, const at::Tensor& S2,
                                const at::Tensor& U1, const at::Tensor& U2, const OptTensor& bias) {
  const int64_t L = S1.size(0), I = S1.size(1), O = S2.size(2);
  const double alpha = 1.0 / static_cast<double>(2 * L);
  auto x2 = x.reshape({-1, I});
  auto y = at::empty({x2.size(0), O}, x.options());
  if (sketch_concat(x, S1.size(2))) {
    auto [left, right] = concat_factors(S1, S2, U1, U2);
    gemm_epilogue(y, at::mm(x2, left), right, bias, alpha);
  } else {
    for (int64_t j = 0; j < 2 * L; ++j) {
      auto t = at::mm(x2, left_term(S1, U2, j));
      if (j == 0) {
        gemm_epilogue(y, t, right_term(S2, U1, j), bias, alpha);
      } else {
        y.addmm_(t, right_term(S2, U1, j), 1.0, alpha);
      }
    }
  }
  return y.view(out_sizes(x, O));
}

LowrankGrads lowrank_linear_backward_gemm(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A,
                                          const at::Tensor& B, std::array<bool, 4> needs) {
  auto gy2 = gy.reshape({-1, A.size(0)});
  auto x2 = x.reshape({-1, x.size(-1)});
  OptTensor gx, gA, gB, gbias;
  if (needs[0] || needs[2]) {
    auto gt = at::mm(gy2, A);  // (N, r): gradient of the rank-r intermediate t = x Bᵀ
    if (needs[0]) gx = at::mm(gt, B).view(x.sizes());
    if (needs[2]) gB = at::mm(gt.t(), x2);
  }
  if (needs[1]) gA = at::mm(gy2.t(), at::mm(x2, B.t()));
  if (needs[3]) gbias = gy2.sum(0);
  return {gx, gA, gB, gbias};
}

SketchedGrads sketched_linear_backward_gemm(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& S1,
                                            const at::Tensor& S2, const at::Tensor& U1, const at::Tensor& U2,
                                            std::array<bool, 6> needs) {
  const int64_t L = S1.size(0), I = S1.size(1), k = S1.size(2), O = S2.size(2);
  const double scale = 1.0 / static_cast<double>(2 * L);
  auto gy2 = gy.reshape({-1, O});
  auto x2 = x.reshape({-1, I});
  const int64_t N = x2.size(0);
  const bool need_left = needs[1] || needs[4], need_right = needs[2] || needs[3];
  OptTensor gx, gS1, gS2, gU1, gU2, gbias;
  if (sketch_concat(x, k)) {
    auto [left, right] = concat_factors(S1, S2, U1, U2);
    if (needs[0] || need_left) {
      auto gt = at::empty({N, 2 * L * k}, x.options());
      at::addmm_out(gt, gt, gy2, right.t(), 0.0, scale);  // gradient of t = x left
      if (needs[0]) gx = at::mm(gt, left.t()).view(x.sizes());
      if (need_left) {
        auto gleft = at::mm(x2.t(), gt).view({I, L, 2, k});
        if (needs[1]) gS1 = gleft.select(2, 0).permute({1, 0, 2}).contiguous();
        if (needs[4]) gU2 = gleft.select(2, 1).permute({1, 0, 2}).contiguous();
      }
    }
    if (need_right) {
      auto gright = at::empty({2 * L * k, O}, x.options());
      at::addmm_out(gright, gright, at::mm(x2, left).t(), gy2, 0.0, scale);
      auto terms = gright.view({L, 2, k, O});
      if (needs[3]) gU1 = terms.select(1, 0).contiguous();
      if (needs[2]) gS2 = terms.select(1, 1).contiguous();
    }
  } else {
    // One GEMM per rank-k term on views of the factors; gradients are written straight into their outputs.
    if (needs[1]) gS1 = at::empty_like(S1, at::MemoryFormat::Contiguous);
    if (needs[4]) gU2 = at::empty_like(U2, at::MemoryFormat::Contiguous);
    if (needs[3]) gU1 = at::empty_like(U1, at::MemoryFormat::Contiguous);
    if (needs[2]) gS2 = at::empty_like(S2, at::MemoryFormat::Contiguous);
    at::Tensor gx2;
    if (needs[0]) gx2 = at::empty({N, I}, x.options());
    for (int64_t j = 0; j < 2 * L; ++j) {
      const int64_t i = j / 2;
      auto left_j = left_term(S1, U2, j);
      auto right_j = right_term(S2, U1, j);
      if (needs[0] || (j % 2 == 0 ? needs[1] : needs[4])) {
        auto gt = at::empty({N, k}, x.options());
        at::addmm_out(gt, gt, gy2, right_j.t(), 0.0, scale);
        if (needs[0]) {
          if (j == 0) {
            at::mm_out(gx2, gt, left_j.t());
          } else {
            gx2.addmm_(gt, left_j.t());
          }
        }
        auto& gleft = j % 2 == 0 ? gS1 : gU2;
        if (gleft.has_value()) {
          auto out = gleft->select(0, i);
          at::mm_out(out, x2.t(), gt);
        }
      }
      auto& gright = j % 2 == 0 ? gU1 : gS2;
      if (gright.has_value()) {
        auto out = gright->select(0, i);
        at::addmm_out(out, out, at::mm(x2, left_j).t(), gy2, 0.0, scale);
      }
    }
    if (needs[0]) gx = gx2.view(x.sizes());
  }
  if (needs[5]) gbias = gy2.sum(0);
  return {gx, gS1, gS2, gU1, gU2, gbias};
}

}  // namespace panther
