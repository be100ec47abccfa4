// FAVOR+ as a composition over all (batch, head) pairs at once: batched GEMMs through ATen (cuBLAS on CUDA)
// and the row kernels of attention.h, fused on CUDA. The formulas are those of panther_fx/ops/attention.py:
//   φ(Q) = exp(Q'Wᵀ − rowmax)/√m, φ(K) = exp(K'Wᵀ − |K'|²/2 + b − c)/√m (c: max over a head's keys and
//   features), [num, den] = φ(Q)(φ(K)ᵀ[V, 1]), out = num / max(den, EPS); relu: φ = relu(UWᵀ)·e^b/√m.
// For queries the reference's −|Q'|²/2 cancels against its row stabiliser, so it is not computed. Causal
// products run in chunks of kCausalChunk tokens (masked C×C blocks plus an exclusive prefix sum of the
// per-chunk states), so memory stays linear in L: the (BH, L, m) features and O(L/C·m·dv) states.
#include "attention.h"

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <utility>

namespace panther {

namespace {

const char* const kName = "performer_attention";
constexpr int64_t kCausalChunk = 128;  // attention.py's CAUSAL_CHUNK

// a @ b for 2-D or batched 3-D operands of one dtype, accumulated and returned in `work`. On CUDA the out_dtype
// overloads keep bfloat16 operands on tensor cores with a float32 result; the CPU has no such overload, and
// the same numbers come from widening the operands (products of bfloat16 values are exact in float32).
at::Tensor matmul_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType work) {
  if (a.scalar_type() == work) return a.dim() == 2 ? at::mm(a, b) : at::bmm(a, b);
  if (!a.is_cuda()) return matmul_acc(a.to(work), b.to(work), work);
  return a.dim() == 2 ? at::mm(a, b, work) : at::bmm(a, b, work);
}

// One call's constants and operands; token-major tensors are (BH, L, ·).
struct Favor {
  bool relu = false;
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, d = 0, dv = 0, m = 0;
  double rs = 1.0, inv_root_m = 1.0;
  at::ScalarType work = at::kFloat, gemm = at::kFloat;
  at::Tensor Ws;         // (m, d) features·√scale in the GEMM dtype (= the features for relu); bfloat16: (2m, d)
  at::Tensor qg, kg;     // q, k in the GEMM dtype
  // Backward only (with_work): the unscaled features in the GEMM dtype, q and k in the work dtype (the same
  // tensors as qg, kg when the dtypes agree).
  at::Tensor W, qw, kw;
  at::Tensor v1;         // [V, 1] (BH, Lk, dv+1) in the GEMM dtype
  at::Tensor bias_rows;  // (BH·Lk,) additive key bias per key row, or undefined
};

// bfloat16 keeps float32's exponent range, so features and states (sums over up to L keys) cannot overflow in
// it; float16 could (its max is 65504), so float16 inputs compute in float32 like every other dtype.
at::ScalarType gemm_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 ? at::kBFloat16 : attention_work_dtype(q);
}

// The features as GEMM operands. A bfloat16 copy of W would move the exponents W·u' by |W·u'|·2⁻⁹ (about 1 at
// the logit sizes of peaked attention), so in bfloat16 W is stored as two rows per feature, hi = bf16(W) and
// lo = bf16(W − hi): (2m, d), and U·hiᵀ + U·loᵀ recovers U·Wᵀ to about 2⁻¹⁷ relative (U itself is exact).
at::Tensor split_features(const at::Tensor& Ws, at::ScalarType gemm) {
  if (Ws.scalar_type() == gemm) return Ws;
  const at::Tensor hi = Ws.to(gemm);
  return at::cat({hi, (Ws - hi.to(Ws.scalar_type())).to(gemm)}, 0);
}

Favor make_favor(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                 const OptTensor& mask, c10::string_view kernel_fn, std::optional<double> scale, bool with_work) {
  Favor f;
  f.relu = kernel_fn == "relu";
  f.B = q.size(0), f.H = q.size(1), f.Lq = q.size(2), f.Lk = k.size(2), f.d = q.size(3), f.dv = v.size(3);
  f.m = features.size(0);
  f.work = attention_work_dtype(q);
  f.gemm = gemm_dtype(q);
  f.inv_root_m = 1.0 / std::sqrt(static_cast<double>(f.m));
  f.rs = f.relu ? 1.0 : std::sqrt(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(f.d)));
  const at::Tensor Ww = features.detach().to(f.work);
  f.Ws = split_features(f.relu ? Ww : Ww * f.rs, f.gemm);
  const int64_t BH = f.B * f.H;
  const auto tokens = [&](const at::Tensor& t, at::ScalarType dtype) {
    return t.detach().to(dtype).reshape({BH, t.size(2), t.size(3)}).contiguous();
  };
  f.qg = tokens(q, f.gemm), f.kg = tokens(k, f.gemm);
  if (with_work) {
    f.W = Ww.to(f.gemm);
    f.qw = f.gemm == f.work ? f.qg : tokens(q, f.work);
    f.kw = f.gemm == f.work ? f.kg : tokens(k, f.work);
  }
  f.v1 = at::constant_pad_nd(tokens(v, f.gemm), {0, 1}, 1.0);  // [V, 1]
  const at::Tensor bias = key_bias(mask, f.work);
  if (bias.defined()) f.bias_rows = bias.unsqueeze(1).expand({f.B, f.H, f.Lk}).reshape({BH * f.Lk}).contiguous();
  return f;
}

// The projections U Wsᵀ of tokens U (rows, d) in the GEMM dtype, in the work dtype: (rows, parts·m) with
// parts = 2 when the features are split into hi and lo halves (the projection is then the sum of the two
// column halves, which the CUDA row kernels add as they read them), 1 otherwise.
at::Tensor project(const Favor& f, const at::Tensor& U) { return matmul_acc(U, f.Ws.t(), f.work); }

int64_t parts(const Favor& f) { return f.Ws.size(0) / f.m; }

// The (rows, m) projection from `project`'s output (the generic row kernels' input).
at::Tensor summed(const Favor& f, const at::Tensor& X) {
  return parts(f) == 1 ? X : at::add(X.narrow(1, 0, f.m), X.narrow(1, f.m, f.m));
}

// ---- feature maps (generic ATen forms; the CUDA build fuses each into one pass) ------------------------------
at::Tensor relu_features(const Favor& f, const at::Tensor& X, const at::Tensor& bias_rows) {
#ifdef PANTHER_WITH_CUDA
  if (X.is_cuda()) return cuda_rows::relu_features(X, parts(f), bias_rows, f.inv_root_m, f.gemm);
#endif
  at::Tensor phi = at::relu(summed(f, X)).mul_(f.inv_root_m);
  if (bias_rows.defined()) phi.mul_(bias_rows.exp().unsqueeze(1));
  return phi.to(f.gemm);
}

// X = project(Q') -> φ(Q) (BH, Lq, m) in the GEMM dtype.
at::Tensor query_features(const Favor& f, const at::Tensor& X) {
  const int64_t BH = f.B * f.H;
  if (f.relu) return relu_features(f, X, at::Tensor()).view({BH, f.Lq, f.m});
#ifdef PANTHER_WITH_CUDA
  if (X.is_cuda())
    return cuda_rows::query_softmax_features(X, parts(f), f.inv_root_m, f.gemm).view({BH, f.Lq, f.m});
#endif
  const at::Tensor Xs = summed(f, X);
  return (Xs - Xs.amax(-1, true)).exp_().mul_(f.inv_root_m).to(f.gemm).view({BH, f.Lq, f.m});
}

// X = project(K') -> φ(K) (BH, Lk, m) in the GEMM dtype, stabilised per head.
at::Tensor key_features(const Favor& f, const at::Tensor& X) {
  const int64_t BH = f.B * f.H;
  if (f.relu) return relu_features(f, X, f.bias_rows).view({BH, f.Lk, f.m});
  const double half_rs2 = 0.5 * f.rs * f.rs;
  const at::Tensor keys = f.kg.view({BH * f.Lk, f.d});
#ifdef PANTHER_WITH_CUDA
  if (X.is_cuda()) {
    const auto [row_max, hsq] = cuda_rows::key_row_max(X, parts(f), keys, half_rs2, f.bias_rows);
    const at::Tensor stab = row_max.view({BH, f.Lk}).amax(-1);  // the kernel below reads −inf as 0
    return cuda_rows::key_softmax_features(X, parts(f), hsq, f.bias_rows, stab, f.Lk, f.inv_root_m, f.gemm)
        .view({BH, f.Lk, f.m});
  }
#endif
  const at::Tensor hsq = keys.to(f.work).square().sum(-1).mul_(half_rs2);
  at::Tensor shift = f.bias_rows.defined() ? f.bias_rows - hsq : -hsq;  // per key row: b − |k'|²/2
  const at::Tensor Xs = summed(f, X);
  at::Tensor stab = (Xs.amax(-1) + shift).view({BH, f.Lk}).amax(-1);
  // All keys of a head padded: the max is −inf; any finite stabiliser leaves φ = 0 there.
  stab = at::where(at::isfinite(stab), stab, at::zeros_like(stab));
  shift = shift.view({BH, f.Lk}).sub_(stab.unsqueeze(1)).view({BH * f.Lk, 1});
  return (Xs + shift).exp_().mul_(f.inv_root_m).to(f.gemm).view({BH, f.Lk, f.m});
}

// ---- products ------------------------------------------------------------------------------------------------
// out_t = Σ_{s ≤ t} (a_t · b_s) c_s for a, b (BH, L, p) and c (BH, L, r) in the GEMM dtype -> (BH, L, r) in
// `work`: masked C×C blocks inside each chunk plus an exclusive prefix sum of the chunk states b_chunkᵀ c_chunk.
at::Tensor causal_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::ScalarType work) {
  const int64_t BH = a.size(0), L = a.size(1), p = a.size(2), r = c.size(2);
  const int64_t C = std::min(kCausalChunk, L), n = (L + C - 1) / C, pad = n * C - L;
  // Zero tokens at the end contribute nothing to later sums and their outputs are cut off.
  const auto chunks = [&](const at::Tensor& t) {
    const at::Tensor padded = pad ? at::constant_pad_nd(t, {0, 0, 0, pad}) : t;
    return padded.reshape({BH * n, C, t.size(2)});
  };
  const at::Tensor ac = chunks(a), bc = chunks(b), cc = chunks(c);
  const at::Tensor scores = matmul_acc(ac, bc.transpose(1, 2), work).tril_();
  at::Tensor out = matmul_acc(scores.to(a.scalar_type()), cc, work);
  const at::Tensor state = matmul_acc(bc.transpose(1, 2), cc, work).view({BH, n, p, r});
  // Exclusive prefix as a shifted inclusive one: cumsum − state would cancel catastrophically when one chunk's
  // state dwarfs the earlier ones (a key with a large feature value), leaving the earlier sum as rounding noise.
  at::Tensor prefix = at::zeros({BH, n, p, r}, state.options().dtype(a.scalar_type()));
  if (n > 1) prefix.narrow(1, 1, n - 1).copy_(state.narrow(1, 0, n - 1).cumsum(1));
  prefix = prefix.view({BH * n, p, r});
  out.add_(matmul_acc(ac, prefix, work));
  return out.view({BH, n * C, r}).narrow(1, 0, L).contiguous();
}

// out_s = Σ_{t ≥ s} (a_s · b_t) c_t: the causal product of the time-reversed sequences.
at::Tensor anticausal_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::ScalarType work) {
  return causal_product(a.flip(1), b.flip(1), c.flip(1), work).flip(1);
}

struct Forward {
  at::Tensor Xq, Xk;      // projections (`project`), kept only for the relu backward, which needs their signs
  at::Tensor phi_q, phi_k;  // (BH, L, m) in the GEMM dtype
  at::Tensor numden;      // (BH, Lq, dv+1) in the work dtype
};

// keep_projections: keep Xq, Xk (float32, twice the size of the features in bfloat16) past the feature maps.
Forward forward(const Favor& f, bool causal, bool keep_projections) {
  const int64_t BH = f.B * f.H;
  Forward r;
  at::Tensor Xq = project(f, f.qg.view({BH * f.Lq, f.d}));
  r.phi_q = query_features(f, Xq);
  if (keep_projections) r.Xq = Xq;
  Xq.reset();
  at::Tensor Xk = project(f, f.kg.view({BH * f.Lk, f.d}));
  r.phi_k = key_features(f, Xk);
  if (keep_projections) r.Xk = Xk;
  Xk.reset();
  r.numden = causal ? causal_product(r.phi_q, r.phi_k, f.v1, f.work)
                    : matmul_acc(r.phi_q, matmul_acc(r.phi_k.transpose(1, 2), f.v1, f.work).to(f.gemm), f.work);
  return r;
}

// Per row of g_phi (rows, m) in the work dtype and φ (rows, m) in the GEMM dtype: ∂loss/∂b = Σ_j g_phi_j φ_j
// (rows,), and ∂loss/∂(UWᵀ) in the GEMM dtype: g_phi ⊙ φ (softmax) or g_phi ⊙ 1[X > 0] e^b/√m (relu).
std::tuple<at::Tensor, at::Tensor> feature_grad_rows(const Favor& f, const at::Tensor& g_phi, const at::Tensor& phi,
                                                     const at::Tensor& X, const at::Tensor& bias_rows) {
#ifdef PANTHER_WITH_CUDA
  if (g_phi.is_cuda())
    return cuda_rows::feature_grads(g_phi, phi, f.relu ? X : at::Tensor(), parts(f), bias_rows, f.inv_root_m);
#endif
  const at::Tensor gp = g_phi * phi.to(f.work);
  if (!f.relu) return {gp.to(f.gemm), gp.sum(-1)};
  at::Tensor factor = (summed(f, X) > 0).to(f.work).mul_(f.inv_root_m);
  if (bias_rows.defined()) factor.mul_(bias_rows.exp().unsqueeze(1));
  return {(g_phi * factor).to(f.gemm), gp.sum(-1)};
}

// Gradients of φ w.r.t. u (BH, L, d), W (m, d) and the additive bias (BH·L,), given g_phi (BH, L, m):
// softmax: ∂φ_j/∂u' = φ_j (w_j − u'), relu: ∂φ_j/∂u = 1[w_jᵀu > 0] w_j e^b/√m; both: ∂φ_j/∂b = φ_j.
// ∂loss/∂[num, den] (rows, dv+1) in the GEMM dtype from g = ∂loss/∂out (rows, dv) and numden (rows, dv+1), both
// in the work dtype: out = num / den_c gives g / den_c and −(g · out) / den_c (0 where the EPS clamp is active).
at::Tensor numden_grads(const Favor& f, const at::Tensor& g, const at::Tensor& numden) {
#ifdef PANTHER_WITH_CUDA
  if (g.is_cuda()) return cuda_rows::numden_grads(g, numden, f.gemm);
#endif
  const at::Tensor num = numden.narrow(1, 0, f.dv), den = numden.narrow(1, f.dv, 1);
  const at::Tensor den_c = den.clamp_min(kAttentionEps);
  const at::Tensor g_den = at::where(den > kAttentionEps, -(g * (num / den_c)).sum(-1, true) / den_c, at::zeros_like(den));
  return at::cat({g / den_c, g_den}, 1).to(f.gemm);
}

struct FeatureGrads {
  at::Tensor u, W, bias;
};

FeatureGrads feature_backward(const Favor& f, const at::Tensor& g_phi, const at::Tensor& phi, const at::Tensor& X,
                              const at::Tensor& ug, const at::Tensor& uw, const at::Tensor& bias_rows, bool need_u,
                              bool need_W) {
  const int64_t rows = g_phi.size(0) * g_phi.size(1);
  FeatureGrads g;
  at::Tensor pre;  // ∂loss/∂(U Wᵀ) in the GEMM dtype, before the softmax's −|u'|²/2 term
  std::tie(pre, g.bias) = feature_grad_rows(f, g_phi.view({rows, f.m}), phi.view({rows, f.m}), X, bias_rows);
  const double to_u = f.relu ? 1.0 : f.rs, to_W = to_u;  // softmax: u' = u·√scale
  if (need_u) {
    g.u = matmul_acc(pre, f.W, f.work).mul_(to_u);
    if (!f.relu) g.u.sub_(g.bias.unsqueeze(1) * uw.view({rows, f.d}), f.rs * f.rs);
    g.u = g.u.view({g_phi.size(0), g_phi.size(1), f.d});
  }
  if (need_W) g.W = matmul_acc(pre.t(), ug.view({rows, f.d}), f.work).mul_(to_W);
  return g;
}

}  // namespace

namespace {

bool is_attention_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

}  // namespace

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& features,
                     const OptTensor& mask, c10::string_view kernel_fn, bool causal, std::optional<double> scale) {
  TORCH_CHECK(!scale || *scale >= 0, kName, ": scale must be >= 0 (the logits are scale·q·k), got ", *scale);
  TORCH_CHECK(kernel_fn == "softmax" || kernel_fn == "relu", kName,
              ": kernel must be one of ('softmax', 'relu'), got '", std::string(kernel_fn), "'");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kName, ": q, k, v must be (B, H, L, d), got ", q.dim(),
              "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  TORCH_CHECK(q.sizes().slice(0, 2) == k.sizes().slice(0, 2) && q.sizes().slice(0, 2) == v.sizes().slice(0, 2),
              kName, ": q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " disagree on (B, H)");
  TORCH_CHECK(k.size(2) == v.size(2), kName, ": k has ", k.size(2), " tokens but v has ", v.size(2));
  TORCH_CHECK(q.size(3) == k.size(3), kName, ": q head dim ", q.size(3), " differs from k head dim ", k.size(3));
  TORCH_CHECK(features.dim() == 2 && features.size(1) == q.size(3) && features.size(0) > 0, kName,
              ": features must be (m, ", q.size(3), ") with m >= 1, got ", features.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), kName,
              ": dtypes differ: q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ", v.scalar_type());
  TORCH_CHECK(is_attention_dtype(q.scalar_type()) && is_attention_dtype(features.scalar_type()), kName,
              ": q and features must be float16, bfloat16, float32 or float64, got ", q.scalar_type(), ", ",
              features.scalar_type());
  // The row kernels read every operand through raw pointers on q's device: a tensor elsewhere must be refused
  // here (ATen would not see it before the kernels do).
  const std::pair<const char*, const at::Tensor*> operands[] = {{"k", &k}, {"v", &v}, {"features", &features}};
  for (const auto& [name, t] : operands) {
    TORCH_CHECK(t->device() == q.device(), kName, ": ", name, " is on ", t->device(), " but q is on ", q.device());
  }
  if (causal) {
    TORCH_CHECK(q.size(2) == k.size(2), kName, ": causal attention needs as many queries as keys, got ", q.size(2),
                " and ", k.size(2));
  }
  if (mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == k.size(0) && mask->size(1) == k.size(2), kName,
                ": key_padding_mask must be (B, Lk) = (", k.size(0), ", ", k.size(2), "), got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool || is_attention_dtype(mask->scalar_type()), kName,
                ": key_padding_mask must be bool (True = ignore the key) or floating (added to the logits), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->device() == q.device(), kName, ": key_padding_mask is on ", mask->device(), " but q is on ",
                q.device());
  }
}

at::ScalarType attention_work_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor key_bias(const OptTensor& mask, at::ScalarType dtype) {
  if (!mask) return at::Tensor();
  if (mask->scalar_type() == at::kBool) {
    return at::zeros(mask->sizes(), mask->options().dtype(dtype))
        .masked_fill_(*mask, -std::numeric_limits<double>::infinity());
  }
  return mask->detach().to(dtype).contiguous();
}

at::Tensor performer_attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& features, const OptTensor& key_padding_mask,
                                         c10::string_view kernel_fn, bool causal, std::optional<double> scale) {
  check_attention(q, k, v, features, key_padding_mask, kernel_fn, causal, scale);
  const c10::OptionalDeviceGuard guard(q.device());  // the row kernels launch on the current device's stream
  const Favor f = make_favor(q, k, v, features, key_padding_mask, kernel_fn, scale, /*with_work=*/false);
  if (f.Lq == 0 || f.Lk == 0 || f.B * f.H == 0)  // no admissible key: 0, as for fully padded rows
    return at::zeros({f.B, f.H, f.Lq, f.dv}, q.options());
  const Forward r = forward(f, causal, /*keep_projections=*/false);
#ifdef PANTHER_WITH_CUDA
  if (q.is_cuda())
    return cuda_rows::normalise(r.numden.view({-1, f.dv + 1}), q.scalar_type()).view({f.B, f.H, f.Lq, f.dv});
#endif
  const at::Tensor den = r.numden.narrow(2, f.dv, 1).clamp_min(kAttentionEps);
  return (r.numden.narrow(2, 0, f.dv) / den).to(q.scalar_type()).view({f.B, f.H, f.Lq, f.dv});
}

AttentionGrads performer_attention_backward_composite(const at::Tensor& g_out, const at::Tensor& q,
                                                      const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& features, const OptTensor& key_padding_mask,
                                                      c10::string_view kernel_fn, bool causal,
                                                      std::optional<double> scale, std::array<bool, 5> needs) {
  check_attention(q, k, v, features, key_padding_mask, kernel_fn, causal, scale);
  const c10::OptionalDeviceGuard guard(q.device());
  const bool need_q = needs[0], need_k = needs[1], need_v = needs[2], need_W = needs[3];
  const bool need_mask = needs[4] && key_padding_mask && key_padding_mask->is_floating_point();
  const Favor f = make_favor(q, k, v, features, key_padding_mask, kernel_fn, scale, /*with_work=*/true);
  const int64_t BH = f.B * f.H;
  if (f.Lq == 0 || f.Lk == 0 || BH == 0) {
    const auto zero = [](bool need, const at::Tensor& t) {
      return need ? OptTensor(at::zeros(t.sizes(), t.options())) : std::nullopt;  // contiguous, as the fake says
    };
    return {zero(need_q, q), zero(need_k, k), zero(need_v, v), zero(need_W, features),
            zero(need_mask, need_mask ? *key_padding_mask : q)};
  }
  const Forward r = forward(f, causal, /*keep_projections=*/f.relu);
  const at::Tensor g = g_out.detach().to(f.work).reshape({BH * f.Lq, f.dv}).contiguous();
  const at::Tensor g_numden = numden_grads(f, g, r.numden.view({BH * f.Lq, f.dv + 1})).view({BH, f.Lq, f.dv + 1});
  at::Tensor g_phi_q, g_phi_k, g_v1;
  if (causal) {
    g_phi_q = causal_product(g_numden, f.v1, r.phi_k, f.work);
    g_phi_k = anticausal_product(f.v1, g_numden, r.phi_q, f.work);
    if (need_v) g_v1 = anticausal_product(r.phi_k, r.phi_q, g_numden, f.work);
  } else {
    const at::Tensor kv = matmul_acc(r.phi_k.transpose(1, 2), f.v1, f.work).to(f.gemm);      // (BH, m, dv+1)
    const at::Tensor g_kv = matmul_acc(r.phi_q.transpose(1, 2), g_numden, f.work).to(f.gemm);  // (BH, m, dv+1)
    g_phi_q = matmul_acc(g_numden, kv.transpose(1, 2), f.work);
    g_phi_k = matmul_acc(f.v1, g_kv.transpose(1, 2), f.work);
    if (need_v) g_v1 = matmul_acc(r.phi_k, g_kv, f.work);
  }
  const FeatureGrads gq = feature_backward(f, g_phi_q, r.phi_q, r.Xq, f.qg, f.qw, at::Tensor(), need_q, need_W);
  const FeatureGrads gk = feature_backward(f, g_phi_k, r.phi_k, r.Xk, f.kg, f.kw, f.bias_rows, need_k, need_W);
  const auto cast = [&](bool need, const at::Tensor& t, const at::Tensor& like) -> OptTensor {
    // contiguous: ∂v is a view of the (dv + 1)-wide ∂[v 1], and the fake promises dense gradients
    return need ? OptTensor(t.reshape(like.sizes()).to(like.scalar_type()).contiguous()) : std::nullopt;
  };
  return {cast(need_q, gq.u, q), cast(need_k, gk.u, k), need_v ? cast(true, g_v1.narrow(2, 0, f.dv), v) : std::nullopt,
          need_W ? OptTensor((gq.W + gk.W).to(features.scalar_type())) : std::nullopt,
          need_mask ? OptTensor(gk.bias.view({f.B, f.H, f.Lk}).sum(1).to(key_padding_mask->scalar_type()))
                    : std::nullopt};
}

// The composition the CUDA kernels run, callable on every device so that CI tests it on the CPU (where the
// registered kernels are the fused per-head ones).
TORCH_LIBRARY_FRAGMENT(panther, m) {
  m.def("_performer_attention_composite(Tensor q, Tensor k, Tensor v, Tensor features, Tensor? key_padding_mask, "
        "str kernel_fn, bool causal, float? scale) -> Tensor",
        &performer_attention_composite);
  m.def("_performer_attention_backward_composite(Tensor g_out, Tensor q, Tensor k, Tensor v, Tensor features, "
        "Tensor? key_padding_mask, str kernel_fn, bool causal, float? scale, bool[5] needs) "
        "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
        &performer_attention_backward_composite);
}

}  // namespace panther
