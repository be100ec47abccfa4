// Fused CPU kernels for panther::performer_attention and panther::performer_attention_backward (FAVOR+),
// registered over the Python reference bodies in panther_fx/ops/attention.py, whose math and numerics
// (stabilisers, float32 accumulation, EPS clamp, key bias) they reproduce; see that module's docstring.
//
// (batch, head) pairs are split among the threads of one OpenMP team (for_each_pair); with fewer pairs than
// threads, each non-causal pair is instead split over the whole team by key and query blocks (partial key
// states combined, see parallel_key_state), while causal pairs keep one thread each. Inside a pair, keys
// and queries are processed in blocks of rows: the feature map of a block (one GEMM against the feature
// matrix, then the stabilised exp or the relu in one pass over the block while it is in cache) feeds the
// block's GEMMs at once, so no (L, m) feature tensor is ever materialised. Scratch memory per thread is
// O(block·(m + block) + m·dv), plus, in the causal backward, the L·(dv+1) output-side gradients of the pair
// being processed: linear in L.
//
// The softmax key stabiliser is the max over all keys and features, as in the reference: the non-causal
// kernels track a running max and rescale their key state when it grows, the causal ones, which need it
// before their first chunk, find it in a first pass over the keys (one GEMM per block, no exp). The gradient
// of the features is accumulated per thread and summed in thread order (deterministic for a fixed thread
// count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../attention.h"  // check_attention, key_bias, kAttentionEps
#include "../linear.h"     // count_call

namespace panther {
namespace {

constexpr int64_t kBlock = 256;  // rows per block of the non-causal passes
constexpr int64_t kChunk = 64;  // tokens per causal chunk (the reference uses 128; 64 measured faster here)

// ---- row kernels -----------------------------------------------------------------------------------------
// Plain loops over contiguous rows that the compiler vectorises. With GCC on x86-64 Linux each kernel is also
// compiled for x86-64-v3 (AVX2 + FMA), picked at load time; without trapping math GCC may if-convert the
// selects (clamps, relu, masks), which it needs in order to vectorise them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PANTHER_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PANTHER_CLONES
#endif

// exp for float in [-87.3, 88.4] with < 2 ulp error (Cephes' polynomial on a ln2 range reduction); 0 below,
// where the reference would give subnormals (< 1.2e-38: far below the EPS clamp), NaN stays NaN.
inline float exp_(float x) {
  constexpr float lo = -87.33654f, hi = 88.37626f, magic = 12582912.0f;  // 1.5·2^23 rounds to an integer
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const float n = (xc * 1.44269504088896341f + magic) - magic;  // round(x / ln2)
  float r = n * -0.693359375f + xc;  // x − n·ln2 with ln2 split in two for exactness
  r = n * 2.12194440e-4f + r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + (r + 1.0f);
  const float two_n = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < lo ? 0.0f : p * two_n;
}
inline double exp_(double x) { return std::exp(x); }

template <typename T>
inline T row_max(const T* x, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// half_sq[t] = |u_t·rs|²/2 for the rows of u (n, d) with row stride ld.
template <typename T>
PANTHER_CLONES void half_sq_norms(const T* u, int64_t n, int64_t d, int64_t ld, T rs, T* half_sq) {
  for (int64_t t = 0; t < n; ++t) {
    const T* row = u + t * ld;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; ++j) acc += (row[j] * rs) * (row[j] * rs);
    half_sq[t] = T(0.5) * acc;
  }
}

// Softmax features of n rows of logits X (n, m): φ = exp((X − half_sq) + bias − c)/√m, with c the row max
// for queries (key_stab unused) or the global key stabiliser for keys.
template <typename T>
PANTHER_CLONES void softmax_features(const T* X, T* Phi, int64_t n, int64_t m, const T* half_sq, const T* bias,
                                  T key_stab, bool query, T inv_root_m) {
  for (int64_t t = 0; t < n; ++t) {
    const T* x = X + t * m;
    T* phi = Phi + t * m;
    const T off = half_sq[t];
    const T b = bias ? bias[t] : T(0);
    T c = key_stab;
    if (query) {
      c = row_max(x, m) - off;  // = max_j (x_j − off): rounding is monotone
      c = std::isfinite(c) ? c : T(0);
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) phi[j] = exp_(((x[j] - off) + b) - c) * inv_root_m;
  }
}

// ReLU features: φ = relu(X)/√m · e^bias.
template <typename T>
PANTHER_CLONES void relu_features(const T* X, T* Phi, int64_t n, int64_t m, const T* bias, T inv_root_m) {
  for (int64_t t = 0; t < n; ++t) {
    const T* x = X + t * m;
    T* phi = Phi + t * m;
    const T eb = bias ? std::exp(bias[t]) : T(1);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) phi[j] = ((x[j] < T(0) ? T(0) : x[j]) * inv_root_m) * eb;
  }
}

// max over rows of max_j (x_j − half_sq + bias): the key stabiliser of one block.
template <typename T>
PANTHER_CLONES T key_block_max(const T* X, int64_t n, int64_t m, const T* half_sq, const T* bias) {
  T c = -std::numeric_limits<T>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    const T v = (row_max(X + t * m, m) - half_sq[t]) + (bias ? bias[t] : T(0));
    c = v > c ? v : c;
  }
  return c;
}

// s[j] += Σ_t w_t·A[t, j] (w = 1 when null): column sums of A (n, m), weighted.
template <typename T>
PANTHER_CLONES void add_colsums(const T* A, int64_t n, int64_t m, const T* w, T* s) {
  for (int64_t t = 0; t < n; ++t) {
    const T* a = A + t * m;
    const T wt = w ? w[t] : T(1);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) s[j] += wt * a[j];
  }
}

// den[t] (+)= Φ_t · s for the rows of Φ (n, m).
template <typename T>
PANTHER_CLONES void rows_dot(const T* Phi, int64_t n, int64_t m, const T* s, T* den, bool accumulate) {
  for (int64_t t = 0; t < n; ++t) den[t] = (accumulate ? den[t] : T(0)) + dot(Phi + t * m, s, m);
}

// out[t] /= max(den[t], EPS) for out (n, dv) contiguous.
template <typename T>
PANTHER_CLONES void normalise(T* out, int64_t n, int64_t dv, const T* den) {
  for (int64_t t = 0; t < n; ++t) {
    const T dc = std::max(den[t], T(kAttentionEps));
    T* o = out + t * dv;
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) o[j] = o[j] / dc;
  }
}

// From g (n, dv; row stride ldg) and out (n, dv): gnum = g/den_c, gden = −(g·out)/den_c (0 where clamped).
template <typename T>
PANTHER_CLONES void numden_grads(const T* g, int64_t ldg, const T* out, const T* den, int64_t n, int64_t dv,
                              T* gnum, T* gden) {
  for (int64_t t = 0; t < n; ++t) {
    const T dc = std::max(den[t], T(kAttentionEps));
    const T* gt = g + t * ldg;
    T* gn = gnum + t * dv;
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) gn[j] = gt[j] / dc;
    gden[t] = den[t] > T(kAttentionEps) ? -dot(gt, out + t * dv, dv) / dc : T(0);
  }
}

// Backward of the feature map, in place on G = ∂loss/∂φ (n, m): gbias[t] = Σ_j G·Φ (if gbias), then
// softmax: G ← G·Φ; relu: G ← G · 1[X > 0]/√m · e^bias (the gradient w.r.t. the pre-activation).
template <typename T>
PANTHER_CLONES void feature_grads(T* G, const T* Phi, const T* X, int64_t n, int64_t m, bool relu, const T* bias,
                               T inv_root_m, T* gbias) {
  for (int64_t t = 0; t < n; ++t) {
    T* g = G + t * m;
    const T* phi = Phi + t * m;
    if (gbias) gbias[t] = dot(g, phi, m);
    if (relu) {
      const T* x = X + t * m;
      const T f = inv_root_m * (bias ? std::exp(bias[t]) : T(1));
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) g[j] = x[j] > T(0) ? g[j] * f : T(0);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) g[j] *= phi[j];
    }
  }
}

// A (n, ncols) += r ⊗ c, with r or c null meaning ones.
template <typename T>
PANTHER_CLONES void add_outer(T* A, int64_t n, int64_t ncols, const T* r, const T* c) {
  for (int64_t t = 0; t < n; ++t) {
    T* a = A + t * ncols;
    const T rt = r ? r[t] : T(1);
    if (c) {
#pragma omp simd
      for (int64_t j = 0; j < ncols; ++j) a[j] += rt * c[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < ncols; ++j) a[j] += rt;
    }
  }
}

// gu (n, d) −= rs²·gbias ⊗ u for u with row stride ldu: the −|u'|²/2 term of the softmax features.
template <typename T>
PANTHER_CLONES void sub_norm_grad(T* gu, int64_t n, int64_t d, const T* gbias, const T* u, int64_t ldu, T rs2) {
  for (int64_t t = 0; t < n; ++t) {
    const T f = rs2 * gbias[t];
    T* g = gu + t * d;
    const T* row = u + t * ldu;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) g[j] -= f * row[j];
  }
}

// Keep the lower (upper = false: j ≤ t) or upper (j ≥ t) triangle of the square A (n, n), zero the rest;
// den (if given) receives the row sums of what is kept.
template <typename T>
PANTHER_CLONES void triangle(T* A, int64_t n, bool upper, T* den) {
  for (int64_t t = 0; t < n; ++t) {
    T* a = A + t * n;
    if (upper) {
      std::fill(a, a + t, T(0));
    } else {
      std::fill(a + t + 1, a + n, T(0));
    }
    if (den) {
      T acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += a[j];
      den[t] = acc;
    }
  }
}

#undef PANTHER_CLONES
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// ---- one (batch, head) pair ------------------------------------------------------------------------------
template <typename T>
struct Attention {  // constants of one call
  at::Tensor Ws;    // (m, d): the features·√scale (softmax: logits are (√scale·W) u), the features (relu)
  T rs;             // √scale (softmax), 1 (relu)
  T inv_root_m;     // 1/√m
  bool relu;
  int64_t m;
};

template <typename T>
struct Head {           // one (b, h) pair: 2-D views with unit stride along the last dimension
  at::Tensor q, k, v;   // (Lq, d), (Lk, d), (Lk, dv)
  const T* bias;        // (Lk,) additive key bias, or null
};

template <typename T>
struct HeadGrads {      // where one pair's gradients go; undefined / null when not needed
  at::Tensor gq, gk, gv;  // (Lq, d), (Lk, d), (Lk, dv)
  at::Tensor gW;          // (m, d) accumulator of this thread
  T* gbias;               // (Lk,)
};

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

// out = a b into the existing (possibly view) tensor out.
void mm(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
}

// Scratch for the features of one block of up to `rows` rows; compute() leaves the block's pre-activations
// (logits or W u) in x and its features in phi, both (n, m) contiguous views.
template <typename T>
struct Features {
  at::Tensor X, Phi, x, phi;
  std::vector<T> half_sq, gbias;

  Features(int64_t rows, int64_t m, const at::TensorOptions& options)
      : X(at::empty({rows, m}, options)), Phi(at::empty({rows, m}, options)), half_sq(rows), gbias(rows) {}

  int64_t rows() const { return X.size(0); }

  // φ of the rows u (n, d): keys (query = false) with their bias and the global stabiliser key_stab,
  // queries with their own row max.
  void compute(const Attention<T>& a, const at::Tensor& u, const T* bias, T key_stab, bool query) {
    logits(a, u);
    activate(a, bias, key_stab, query);
  }

  // First half of compute(): x = u Wsᵀ and, for softmax, half_sq = |u'|²/2.
  void logits(const Attention<T>& a, const at::Tensor& u) {
    const int64_t n = u.size(0);
    x = X.narrow(0, 0, n);
    phi = Phi.narrow(0, 0, n);
    mm(x, u, a.Ws.t());
    if (!a.relu) half_sq_norms(ptr<T>(u), n, u.size(1), u.stride(0), a.rs, half_sq.data());
  }

  // Second half of compute(): phi from x.
  void activate(const Attention<T>& a, const T* bias, T key_stab, bool query) {
    const int64_t n = x.size(0);
    if (a.relu) {
      relu_features(ptr<T>(x), ptr<T>(phi), n, a.m, bias, a.inv_root_m);
    } else {
      softmax_features(ptr<T>(x), ptr<T>(phi), n, a.m, half_sq.data(), bias, key_stab, query, a.inv_root_m);
    }
  }

  // Backward through compute() for the same rows u, given G = ∂loss/∂φ (n, m; overwritten): gu = ∂loss/∂u
  // (if defined), gW += ∂loss/∂W (if defined), gbias = ∂loss/∂bias = Σ_j G·φ.
  // softmax: ∂φ_j/∂u = φ_j (√scale·w_j − scale·u); relu: ∂φ_j/∂u = 1[w_jᵀu > 0] w_j e^b/√m.
  void backward(const Attention<T>& a, const at::Tensor& u, const T* bias, const at::Tensor& G,
                const at::Tensor& gu, const at::Tensor& gW) {
    const int64_t n = u.size(0);
    feature_grads(ptr<T>(G), ptr<T>(phi), ptr<T>(x), n, a.m, a.relu, bias, a.inv_root_m, gbias.data());
    if (gu.defined()) {
      mm(gu, G, a.Ws);
      if (!a.relu) sub_norm_grad(ptr<T>(gu), n, u.size(1), gbias.data(), ptr<T>(u), u.stride(0), a.rs * a.rs);
    }
    if (gW.defined()) gW.addmm_(G.t(), u, 1, a.rs);
  }
};

// The softmax key stabiliser: max over keys and features of the key logits plus bias (0 if not finite). The
// causal kernels need it before their first chunk: a pass of one GEMM per block, without exp.
template <typename T>
T key_stabiliser(const Attention<T>& a, const Head<T>& h, Features<T>& f) {
  if (a.relu) return T(0);
  const int64_t Lk = h.k.size(0), block = f.rows();
  T c = -std::numeric_limits<T>::infinity();
  for (int64_t t0 = 0; t0 < Lk; t0 += block) {
    const int64_t n = std::min(block, Lk - t0);
    f.logits(a, h.k.narrow(0, t0, n));
    c = std::max(c, key_block_max(ptr<T>(f.x), n, a.m, f.half_sq.data(), h.bias ? h.bias + t0 : nullptr));
  }
  return std::isfinite(c) ? c : T(0);
}

// S = φ(K)ᵀV (m, dv) and s = Σ_s φ(K_s) (m) over all keys in one pass, block by block; returns the key
// stabiliser. Softmax: the stabiliser is the running max of the key logits, and S, s are rescaled by
// exp(c_old − c_new) when it grows, so at the end they are stabilised by the global max, as in the reference
// (up to rounding), without a separate pass to find that max first.
template <typename T>
T key_state(const Attention<T>& a, const Head<T>& h, Features<T>& f, at::Tensor& S, T* s) {
  const int64_t Lk = h.k.size(0), block = f.rows();
  S.zero_();
  std::fill(s, s + a.m, T(0));
  T c = -std::numeric_limits<T>::infinity();
  for (int64_t t0 = 0; t0 < Lk; t0 += block) {
    const int64_t n = std::min(block, Lk - t0);
    const at::Tensor kb = h.k.narrow(0, t0, n);
    const T* bias = h.bias ? h.bias + t0 : nullptr;
    f.logits(a, kb);
    if (!a.relu) {
      const T cb = key_block_max(ptr<T>(f.x), n, a.m, f.half_sq.data(), bias);
      if (cb > c) {
        const T rescale = std::isfinite(c) ? std::exp(c - cb) : T(0);  // S, s are still 0 while c = −inf
        S.mul_(rescale);
        for (int64_t j = 0; j < a.m; ++j) s[j] *= rescale;
        c = cb;
      }
    }
    f.activate(a, bias, std::isfinite(c) ? c : T(0), false);
    S.addmm_(f.phi.t(), h.v.narrow(0, t0, n));
    add_colsums(ptr<T>(f.phi), n, a.m, static_cast<const T*>(nullptr), s);
  }
  return a.relu || !std::isfinite(c) ? T(0) : c;
}

// Rows [t_begin, t_end) of out (Lq, dv) = φ(Q) S / max(φ(Q) s, EPS).
template <typename T>
void query_outputs(const Attention<T>& a, const Head<T>& h, const at::Tensor& S, const T* s, const at::Tensor& out,
                   int64_t t_begin, int64_t t_end) {
  const int64_t dv = h.v.size(1);
  Features<T> f(kBlock, a.m, h.q.options());
  std::vector<T> den(kBlock);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, t_end - t0);
    f.compute(a, h.q.narrow(0, t0, n), nullptr, T(0), true);
    const at::Tensor ob = out.narrow(0, t0, n);
    mm(ob, f.phi, S);
    rows_dot(ptr<T>(f.phi), n, a.m, s, den.data(), false);
    normalise(ptr<T>(ob), n, dv, den.data());
  }
}

template <typename T>
void forward_head(const Attention<T>& a, const Head<T>& h, const at::Tensor& out) {
  Features<T> f(kBlock, a.m, h.q.options());
  at::Tensor S = at::empty({a.m, h.v.size(1)}, h.q.options());
  std::vector<T> s(a.m);
  key_state(a, h, f, S, s.data());
  query_outputs(a, h, S, s.data(), out, 0, h.q.size(0));
}

// A state (M (m, r), v (m,)) summed over the chunks of a sequence: M += aᵀ b, v += Σ_t w_t a_t per chunk. In
// float32, thousands of sequential chunk additions drift (the error grows with the position, 8× the
// reference's at 32k tokens), so the sums are kept in double and M, v (what the chunk GEMMs read) are their
// roundings, refreshed after each chunk: O(m·r) per chunk next to the chunk's O(C·m·r) GEMMs.
template <typename T>
struct RunningState {
  at::Tensor M;
  std::vector<T> v;

  RunningState(int64_t m, int64_t r, const at::TensorOptions& options) : M(at::zeros({m, r}, options)), v(m, T(0)) {
    if constexpr (!std::is_same_v<T, double>) {
      M_sum = at::zeros({m, r}, options.dtype(at::kDouble));
      chunk = at::empty({m, r}, options);
      v_sum.assign(m, 0.0);
      v_chunk.resize(m);
    }
  }

  void add(const at::Tensor& a, const at::Tensor& b, const T* w) {
    const int64_t n = a.size(0), m = a.size(1);
    if constexpr (std::is_same_v<T, double>) {
      M.addmm_(a.t(), b);
      add_colsums(ptr<T>(a), n, m, w, v.data());
    } else {
      mm(chunk, a.t(), b);
      M_sum.add_(chunk);
      M.copy_(M_sum);
      std::fill(v_chunk.begin(), v_chunk.end(), T(0));
      add_colsums(ptr<T>(a), n, m, w, v_chunk.data());
      for (int64_t j = 0; j < m; ++j) v[j] = static_cast<T>(v_sum[j] += v_chunk[j]);
    }
  }

 private:
  at::Tensor M_sum, chunk;  // double sums and a T scratch (T = float only)
  std::vector<double> v_sum;
  std::vector<T> v_chunk;
};

// (n, n) contiguous view of the first n² entries of a flat buffer.
at::Tensor square(const at::Tensor& buffer, int64_t n) {
  return buffer.narrow(0, 0, n * n).view({n, n});
}

// Causal: per chunk, out = (tril(φ(Q_c)φ(K_c)ᵀ) V_c + φ(Q_c) S) / (row sums + φ(Q_c) s), then S, s take in
// the chunk's keys (S, s: the exclusive prefix state).
template <typename T>
void causal_forward_head(const Attention<T>& a, const Head<T>& h, const at::Tensor& out) {
  const int64_t L = h.q.size(0), dv = h.v.size(1);
  const auto options = h.q.options();
  Features<T> fq(kChunk, a.m, options), fk(kChunk, a.m, options);
  const T stab = key_stabiliser(a, h, fk);
  RunningState<T> prefix(a.m, dv, options);
  const at::Tensor& S = prefix.M;
  const std::vector<T>& s = prefix.v;
  at::Tensor A = at::empty({kChunk * kChunk}, options);
  std::vector<T> den(kChunk);
  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int64_t n = std::min(kChunk, L - t0);
    const at::Tensor vc = h.v.narrow(0, t0, n);
    fq.compute(a, h.q.narrow(0, t0, n), nullptr, T(0), true);
    fk.compute(a, h.k.narrow(0, t0, n), h.bias ? h.bias + t0 : nullptr, stab, false);
    const at::Tensor An = square(A, n);
    mm(An, fq.phi, fk.phi.t());
    triangle(ptr<T>(An), n, false, den.data());
    const at::Tensor ob = out.narrow(0, t0, n);
    mm(ob, fq.phi, S);
    ob.addmm_(An, vc);
    rows_dot(ptr<T>(fq.phi), n, a.m, s.data(), den.data(), true);
    normalise(ptr<T>(ob), n, dv, den.data());
    prefix.add(fk.phi, vc, nullptr);
  }
}

// Rows [t0, t0 + n) of t, or an undefined tensor if t is.
at::Tensor maybe_rows(const at::Tensor& t, int64_t t0, int64_t n) {
  return t.defined() ? t.narrow(0, t0, n) : at::Tensor();
}

// Non-causal backward: with the key state [S, s], a query pass gives out, [g_num, g_den], ∂φ(Q) and
// G = φ(Q)ᵀ[g_num, g_den] = [Gv, Gs]; a key pass then gives ∂φ(K) = V Gvᵀ + 1 Gsᵀ and ∂V = φ(K) Gv.

// The query pass over rows [t_begin, t_end): adds their share of G into Gv (m, dv) and Gs (m,), writes their
// rows of gq and adds their share of gW.
template <typename T>
void backward_queries(const Attention<T>& a, const Head<T>& h, const at::Tensor& g, const HeadGrads<T>& gr,
                      const at::Tensor& S, const T* s, int64_t t_begin, int64_t t_end, at::Tensor& Gv, T* Gs) {
  const int64_t dv = h.v.size(1);
  const auto options = h.q.options();
  Features<T> f(kBlock, a.m, options);
  at::Tensor OUT = at::empty({kBlock, dv}, options), GN = at::empty({kBlock, dv}, options);
  at::Tensor GPhi = at::empty({kBlock, a.m}, options);
  std::vector<T> den(kBlock), gden(kBlock);
  const bool query_grads = gr.gq.defined() || gr.gW.defined();
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, t_end - t0);
    const at::Tensor qb = h.q.narrow(0, t0, n), gb = g.narrow(0, t0, n);
    const at::Tensor ob = OUT.narrow(0, 0, n), gn = GN.narrow(0, 0, n);
    f.compute(a, qb, nullptr, T(0), true);
    mm(ob, f.phi, S);
    rows_dot(ptr<T>(f.phi), n, a.m, s, den.data(), false);
    normalise(ptr<T>(ob), n, dv, den.data());
    numden_grads(ptr<T>(gb), gb.stride(0), ptr<T>(ob), den.data(), n, dv, ptr<T>(gn), gden.data());
    Gv.addmm_(f.phi.t(), gn);
    add_colsums(ptr<T>(f.phi), n, a.m, static_cast<const T*>(gden.data()), Gs);
    if (query_grads) {
      const at::Tensor gp = GPhi.narrow(0, 0, n);
      mm(gp, gn, S.t());
      add_outer(ptr<T>(gp), n, a.m, static_cast<const T*>(gden.data()), s);
      f.backward(a, qb, nullptr, gp, maybe_rows(gr.gq, t0, n), gr.gW);
    }
  }
}

template <typename T>
bool needs_key_pass(const HeadGrads<T>& gr) {
  return gr.gk.defined() || gr.gW.defined() || gr.gbias || gr.gv.defined();
}

// The key pass over rows [t_begin, t_end) with the whole G = [Gv, Gs]: their rows of gk, gv, gbias and their
// share of gW; stab is the key stabiliser the key state was built with.
template <typename T>
void backward_keys(const Attention<T>& a, const Head<T>& h, const HeadGrads<T>& gr, T stab, const at::Tensor& Gv,
                   const T* Gs, int64_t t_begin, int64_t t_end) {
  Features<T> f(kBlock, a.m, h.q.options());
  at::Tensor GPhi = at::empty({kBlock, a.m}, h.q.options());
  const bool key_grads = gr.gk.defined() || gr.gW.defined() || gr.gbias;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBlock) {
    const int64_t n = std::min(kBlock, t_end - t0);
    const at::Tensor kb = h.k.narrow(0, t0, n), vb = h.v.narrow(0, t0, n);
    const T* bias = h.bias ? h.bias + t0 : nullptr;
    f.compute(a, kb, bias, stab, false);
    if (gr.gv.defined()) mm(gr.gv.narrow(0, t0, n), f.phi, Gv);
    if (key_grads) {
      const at::Tensor gp = GPhi.narrow(0, 0, n);
      mm(gp, vb, Gv.t());
      add_outer(ptr<T>(gp), n, a.m, static_cast<const T*>(nullptr), Gs);
      f.backward(a, kb, bias, gp, maybe_rows(gr.gk, t0, n), gr.gW);
      if (gr.gbias) std::copy(f.gbias.begin(), f.gbias.begin() + n, gr.gbias + t0);
    }
  }
}

template <typename T>
void backward_head(const Attention<T>& a, const Head<T>& h, const at::Tensor& g, const HeadGrads<T>& gr) {
  const auto options = h.q.options();
  Features<T> f(kBlock, a.m, options);
  at::Tensor S = at::empty({a.m, h.v.size(1)}, options), Gv = at::zeros({a.m, h.v.size(1)}, options);
  std::vector<T> s(a.m), Gs(a.m, T(0));
  const T stab = key_state(a, h, f, S, s.data());
  backward_queries(a, h, g, gr, S, s.data(), 0, h.q.size(0), Gv, Gs.data());
  if (needs_key_pass(gr)) backward_keys(a, h, gr, stab, Gv, Gs.data(), 0, h.k.size(0));
}

// Causal backward. A forward sweep over chunks (prefix state S, s) recomputes out, stores [g_num, g_den] for
// the pair and gives ∂φ(Q_c) = tril([g_num, g_den]_c [V, 1]_cᵀ) φ(K_c) + g_num Sᵀ + g_den sᵀ. A backward sweep
// (suffix state Gv, Gs = Σ over later chunks of φ(Q)ᵀ[g_num, g_den]) gives
// ∂φ(K_c) = triu([V, 1]_c [g_num, g_den]_cᵀ) φ(Q_c) + V_c Gvᵀ + 1 Gsᵀ and
// ∂V_c = triu(φ(K_c) φ(Q_c)ᵀ) g_num_c + φ(K_c) Gv; both sweeps recompute the chunk's features.
template <typename T>
void causal_backward_head(const Attention<T>& a, const Head<T>& h, const at::Tensor& g, const HeadGrads<T>& gr) {
  const int64_t L = h.q.size(0), dv = h.v.size(1);
  const auto options = h.q.options();
  Features<T> fq(kChunk, a.m, options), fk(kChunk, a.m, options);
  const T stab = key_stabiliser(a, h, fk);
  RunningState<T> prefix(a.m, dv, options);
  const at::Tensor& S = prefix.M;
  const std::vector<T>& s = prefix.v;
  at::Tensor A = at::empty({kChunk * kChunk}, options);
  at::Tensor OUT = at::empty({kChunk, dv}, options), GPhi = at::empty({kChunk, a.m}, options);
  at::Tensor GN = at::empty({L, dv}, options);  // g_num of the whole pair: linear in L
  std::vector<T> den(kChunk), gden(L);
  const bool query_grads = gr.gq.defined() || gr.gW.defined();
  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int64_t n = std::min(kChunk, L - t0);
    const at::Tensor qc = h.q.narrow(0, t0, n), vc = h.v.narrow(0, t0, n), gc = g.narrow(0, t0, n);
    const at::Tensor ob = OUT.narrow(0, 0, n), gn = GN.narrow(0, t0, n);
    T* gd = gden.data() + t0;
    fq.compute(a, qc, nullptr, T(0), true);
    fk.compute(a, h.k.narrow(0, t0, n), h.bias ? h.bias + t0 : nullptr, stab, false);
    const at::Tensor An = square(A, n);
    mm(An, fq.phi, fk.phi.t());
    triangle(ptr<T>(An), n, false, den.data());
    mm(ob, fq.phi, S);
    ob.addmm_(An, vc);
    rows_dot(ptr<T>(fq.phi), n, a.m, s.data(), den.data(), true);
    normalise(ptr<T>(ob), n, dv, den.data());
    numden_grads(ptr<T>(gc), gc.stride(0), ptr<T>(ob), den.data(), n, dv, ptr<T>(gn), gd);
    if (query_grads) {
      mm(An, gn, vc.t());
      add_outer(ptr<T>(An), n, n, static_cast<const T*>(gd), static_cast<const T*>(nullptr));
      triangle(ptr<T>(An), n, false, static_cast<T*>(nullptr));
      const at::Tensor gp = GPhi.narrow(0, 0, n);
      mm(gp, An, fk.phi);
      gp.addmm_(gn, S.t());
      add_outer(ptr<T>(gp), n, a.m, static_cast<const T*>(gd), static_cast<const T*>(s.data()));
      fq.backward(a, qc, nullptr, gp, maybe_rows(gr.gq, t0, n), gr.gW);
    }
    prefix.add(fk.phi, vc, nullptr);
  }
  const bool key_grads = gr.gk.defined() || gr.gW.defined() || gr.gbias;
  if (!key_grads && !gr.gv.defined()) return;
  RunningState<T> suffix(a.m, dv, options);
  const at::Tensor& Gv = suffix.M;
  const std::vector<T>& Gs = suffix.v;
  for (int64_t t0 = (L - 1) / kChunk * kChunk; t0 >= 0; t0 -= kChunk) {
    const int64_t n = std::min(kChunk, L - t0);
    const at::Tensor kc = h.k.narrow(0, t0, n), vc = h.v.narrow(0, t0, n), gn = GN.narrow(0, t0, n);
    const T* gd = gden.data() + t0;
    const T* bias = h.bias ? h.bias + t0 : nullptr;
    fq.compute(a, h.q.narrow(0, t0, n), nullptr, T(0), true);
    fk.compute(a, kc, bias, stab, false);
    const at::Tensor An = square(A, n);
    if (gr.gv.defined()) {
      const at::Tensor gvc = gr.gv.narrow(0, t0, n);
      mm(An, fk.phi, fq.phi.t());
      triangle(ptr<T>(An), n, true, static_cast<T*>(nullptr));
      mm(gvc, fk.phi, Gv);
      gvc.addmm_(An, gn);
    }
    if (key_grads) {
      mm(An, vc, gn.t());
      add_outer(ptr<T>(An), n, n, static_cast<const T*>(nullptr), gd);
      triangle(ptr<T>(An), n, true, static_cast<T*>(nullptr));
      const at::Tensor gp = GPhi.narrow(0, 0, n);
      mm(gp, An, fq.phi);
      gp.addmm_(vc, Gv.t());
      add_outer(ptr<T>(gp), n, a.m, static_cast<const T*>(nullptr), static_cast<const T*>(Gs.data()));
      fk.backward(a, kc, bias, gp, maybe_rows(gr.gk, t0, n), gr.gW);
      if (gr.gbias) std::copy(fk.gbias.begin(), fk.gbias.begin() + n, gr.gbias + t0);
    }
    suffix.add(fq.phi, gn, gd);
  }
}

// ---- the ops ---------------------------------------------------------------------------------------------
// t detached, in the work dtype, with unit stride along the last dimension (what the row kernels and GEMMs
// index). Detached because the ATen calls of at::parallel_for's worker threads do not inherit the caller's
// below-autograd dispatch state: on inputs that require grad, their out= GEMMs would refuse to run.
at::Tensor unit_rows(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor w = t.detach().to(dtype);
  return w.size(-1) <= 1 || w.stride(-1) == 1 ? w : w.contiguous();
}

template <typename T>
Attention<T> make_attention(const at::Tensor& features, c10::string_view kernel_fn, int64_t d,
                            std::optional<double> scale) {
  Attention<T> a;
  a.relu = kernel_fn == "relu";
  a.m = features.size(0);
  a.inv_root_m = T(1.0 / std::sqrt(static_cast<double>(a.m)));
  a.rs = a.relu ? T(1) : T(std::sqrt(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d))));
  a.Ws = a.relu ? features.contiguous() : (features * a.rs).contiguous();
  return a;
}

// f(begin, end, slot) over the (batch, head) pairs [0, pairs), split into contiguous ranges among one OpenMP
// team; slot < at::get_num_threads() is the calling thread's index in the team. The team has every allowed
// thread even when there are fewer pairs (the extra ones idle): inside an active parallel region BLAS runs
// the kernels' many small GEMMs on the calling thread, while outside one (at::parallel_for opens no region
// for a single pair) MKL forks and joins its own threads for each of them, measured at ~16 ms a GEMM on this
// loaded 2-core machine.
template <typename F>
void for_each_pair(int64_t pairs, const F& f) {
#ifdef _OPENMP
  const int threads = at::get_num_threads();
  if (pairs > 0 && threads > 1 && !at::in_parallel_region()) {
    std::exception_ptr error;
    // OpenMP workers start with default thread-local state: under torch.inference_mode() the outputs are
    // inference tensors, which their in-place GEMMs could not write without the caller's state.
    const at::ThreadLocalState caller_state;
#pragma omp parallel num_threads(threads)
    {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      const int64_t slot = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t chunk = (pairs + team - 1) / team, begin = slot * chunk, end = std::min(pairs, begin + chunk);
      try {
        if (begin < end) f(begin, end, slot);
      } catch (...) {
#pragma omp critical
        error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  f(0, pairs, 0);
}

// ---- one pair on the whole team (non-causal; used when there are fewer pairs than threads) -----------------
// The blocks [0, ceil(L / kBlock)) split among the team as rows [t_begin, t_end).
template <typename F>
void for_each_row_range(int64_t L, const F& f) {
  for_each_pair((L + kBlock - 1) / kBlock, [&](int64_t b0, int64_t b1, int64_t slot) {
    f(b0 * kBlock, std::min(L, b1 * kBlock), slot);
  });
}

// key_state over all keys from partial states built in parallel over contiguous key ranges: each part is
// stabilised by its own maximum c_t; the total is Σ_t e^(c_t − c)[S_t, s_t] with c = max c_t over the parts
// that have an admissible key (a part whose keys are all padded has s_t = 0 and no maximum). Parts are summed
// in slot order (deterministic for a fixed thread count). Returns c (0 when no key is admissible or relu).
template <typename T>
T parallel_key_state(const Attention<T>& a, const Head<T>& h, at::Tensor& S, T* s) {
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> S_parts(threads);
  std::vector<std::vector<T>> s_parts(threads);
  std::vector<T> c_parts(threads, T(0));
  for_each_row_range(h.k.size(0), [&](int64_t t0, int64_t t1, int64_t slot) {
    Features<T> f(kBlock, a.m, h.q.options());
    const Head<T> part{h.q, h.k.narrow(0, t0, t1 - t0), h.v.narrow(0, t0, t1 - t0), h.bias ? h.bias + t0 : nullptr};
    S_parts[slot] = at::empty({a.m, h.v.size(1)}, h.q.options());
    s_parts[slot].assign(a.m, T(0));
    c_parts[slot] = key_state(a, part, f, S_parts[slot], s_parts[slot].data());
  });
  const auto admissible = [&](int slot) {
    // A part whose keys are all padded has an exactly zero state; any other (NaN included) is summed.
    return S_parts[slot].defined() && std::any_of(s_parts[slot].begin(), s_parts[slot].end(), [](T x) { return x != T(0); });
  };
  T c = -std::numeric_limits<T>::infinity();
  for (int slot = 0; slot < threads; ++slot) {
    if (admissible(slot)) c = std::max(c, c_parts[slot]);
  }
  if (!std::isfinite(c)) c = T(0);
  S.zero_();
  std::fill(s, s + a.m, T(0));
  for (int slot = 0; slot < threads; ++slot) {
    if (!admissible(slot)) continue;
    const T rescale = std::exp(c_parts[slot] - c);
    S.add_(S_parts[slot], rescale);
    for (int64_t j = 0; j < a.m; ++j) s[j] += rescale * s_parts[slot][j];
  }
  return c;
}

template <typename T>
void forward_head_parallel(const Attention<T>& a, const Head<T>& h, const at::Tensor& out) {
  at::Tensor S = at::empty({a.m, h.v.size(1)}, h.q.options());
  std::vector<T> s(a.m);
  parallel_key_state(a, h, S, s.data());
  for_each_row_range(h.q.size(0), [&](int64_t t0, int64_t t1, int64_t /*slot*/) {
    query_outputs(a, h, S, s.data(), out, t0, t1);
  });
}

// gW_of(slot): the gW accumulator of a team slot (undefined when not needed).
template <typename T, typename GW>
void backward_head_parallel(const Attention<T>& a, const Head<T>& h, const at::Tensor& g, const HeadGrads<T>& gr,
                            const GW& gW_of) {
  const auto options = h.q.options();
  const int threads = at::get_num_threads();
  const int64_t dv = h.v.size(1);
  at::Tensor S = at::empty({a.m, dv}, options);
  std::vector<T> s(a.m);
  const T stab = parallel_key_state(a, h, S, s.data());
  std::vector<at::Tensor> Gv_parts(threads);
  std::vector<std::vector<T>> Gs_parts(threads);
  const auto slot_grads = [&](int64_t slot) { return HeadGrads<T>{gr.gq, gr.gk, gr.gv, gW_of(slot), gr.gbias}; };
  for_each_row_range(h.q.size(0), [&](int64_t t0, int64_t t1, int64_t slot) {
    Gv_parts[slot] = at::zeros({a.m, dv}, options);
    Gs_parts[slot].assign(a.m, T(0));
    backward_queries(a, h, g, slot_grads(slot), S, s.data(), t0, t1, Gv_parts[slot], Gs_parts[slot].data());
  });
  if (!needs_key_pass(slot_grads(0))) return;  // gr.gW is undefined here: the W gradient lives in gW_of
  at::Tensor Gv = at::zeros({a.m, dv}, options);
  std::vector<T> Gs(a.m, T(0));
  for (int slot = 0; slot < threads; ++slot) {
    if (!Gv_parts[slot].defined()) continue;
    Gv.add_(Gv_parts[slot]);
    for (int64_t j = 0; j < a.m; ++j) Gs[j] += Gs_parts[slot][j];
  }
  for_each_row_range(h.k.size(0), [&](int64_t t0, int64_t t1, int64_t slot) {
    backward_keys(a, h, slot_grads(slot), stab, Gv, Gs.data(), t0, t1);
  });
}

template <typename T>
Head<T> head_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, int64_t b,
                int64_t h) {
  return {q[b][h], k[b][h], v[b][h], bias.defined() ? bias.data_ptr<T>() + b * k.size(2) : nullptr};
}

// Fewer (batch, head) pairs than threads: non-causal pairs are then processed one at a time by the whole team
// (key and query blocks split among it); causal ones stay one pair per thread (their chunks are sequential).
bool split_pairs(int64_t pairs, bool causal) { return !causal && pairs < at::get_num_threads(); }

at::Tensor performer_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& features, const OptTensor& key_padding_mask,
                                   c10::string_view kernel_fn, bool causal, std::optional<double> scale) {
  check_attention(q, k, v, features, key_padding_mask, kernel_fn, causal, scale);
  count_call("performer_attention.cpu");
  const at::ScalarType dtype = attention_work_dtype(q);
  const at::Tensor qw = unit_rows(q, dtype), kw = unit_rows(k, dtype), vw = unit_rows(v, dtype);
  const at::Tensor bias = key_bias(key_padding_mask, dtype);
  const int64_t B = q.size(0), H = q.size(1);
  at::Tensor out = at::empty({B, H, q.size(2), v.size(3)}, qw.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "performer_attention_cpu", [&] {
    const auto a = make_attention<scalar_t>(unit_rows(features, dtype), kernel_fn, q.size(3), scale);
    if (split_pairs(B * H, causal)) {
      for (int64_t i = 0; i < B * H; ++i)
        forward_head_parallel(a, head_of<scalar_t>(qw, kw, vw, bias, i / H, i % H), out[i / H][i % H]);
      return;
    }
    for_each_pair(B * H, [&](int64_t begin, int64_t end, int64_t /*slot*/) {
      for (int64_t i = begin; i < end; ++i) {
        const auto head = head_of<scalar_t>(qw, kw, vw, bias, i / H, i % H);
        const at::Tensor o = out[i / H][i % H];
        causal ? causal_forward_head(a, head, o) : forward_head(a, head, o);
      }
    });
  });
  return out.to(q.scalar_type());
}

AttentionGrads performer_attention_backward_cpu(const at::Tensor& g_out, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& features,
                                                const OptTensor& key_padding_mask, c10::string_view kernel_fn,
                                                bool causal, std::optional<double> scale, std::array<bool, 5> needs) {
  check_attention(q, k, v, features, key_padding_mask, kernel_fn, causal, scale);
  count_call("performer_attention_backward.cpu");
  const bool need_q = needs[0], need_k = needs[1], need_v = needs[2], need_W = needs[3];
  const bool need_mask = needs[4] && key_padding_mask && key_padding_mask->is_floating_point();
  const at::ScalarType dtype = attention_work_dtype(q);
  const at::Tensor qw = unit_rows(q, dtype), kw = unit_rows(k, dtype), vw = unit_rows(v, dtype);
  const at::Tensor g = unit_rows(g_out, dtype), bias = key_bias(key_padding_mask, dtype);
  const int64_t B = q.size(0), H = q.size(1), Lk = k.size(2), m = features.size(0), d = q.size(3);
  const auto options = qw.options();
  const at::Tensor gq = need_q ? at::empty({B, H, q.size(2), d}, options) : at::Tensor();
  const at::Tensor gk = need_k ? at::empty({B, H, Lk, d}, options) : at::Tensor();
  const at::Tensor gv = need_v ? at::empty({B, H, Lk, v.size(3)}, options) : at::Tensor();
  const at::Tensor gbias = need_mask ? at::empty({B, H, Lk}, options) : at::Tensor();
  std::vector<at::Tensor> gW_parts(at::get_num_threads());  // one accumulator per thread, summed in order
  AT_DISPATCH_FLOATING_TYPES(dtype, "performer_attention_backward_cpu", [&] {
    const auto a = make_attention<scalar_t>(unit_rows(features, dtype), kernel_fn, d, scale);
    // The gW accumulator of a team slot, created on first use (each slot touches only its own).
    const auto gW_of = [&](int64_t slot) {
      if (!need_W) return at::Tensor();
      at::Tensor& part = gW_parts[slot];
      if (!part.defined()) part = at::zeros({m, d}, options);
      return part;
    };
    const auto grads_of = [&](int64_t i, const at::Tensor& gW) {
      const int64_t b = i / H, h = i % H;
      return HeadGrads<scalar_t>{need_q ? gq[b][h] : at::Tensor(), need_k ? gk[b][h] : at::Tensor(),
                                 need_v ? gv[b][h] : at::Tensor(), gW,
                                 need_mask ? gbias.data_ptr<scalar_t>() + i * Lk : nullptr};
    };
    if (split_pairs(B * H, causal)) {
      for (int64_t i = 0; i < B * H; ++i) {
        const auto head = head_of<scalar_t>(qw, kw, vw, bias, i / H, i % H);
        backward_head_parallel(a, head, g[i / H][i % H], grads_of(i, at::Tensor()), gW_of);
      }
      return;
    }
    for_each_pair(B * H, [&](int64_t begin, int64_t end, int64_t slot) {
      const at::Tensor gW = gW_of(slot);
      for (int64_t i = begin; i < end; ++i) {
        const auto head = head_of<scalar_t>(qw, kw, vw, bias, i / H, i % H);
        const HeadGrads<scalar_t> gr = grads_of(i, gW);
        causal ? causal_backward_head(a, head, g[i / H][i % H], gr) : backward_head(a, head, g[i / H][i % H], gr);
      }
    });
  });
  OptTensor gW;
  if (need_W) {
    at::Tensor total = at::zeros({m, d}, options);
    for (const at::Tensor& part : gW_parts) {
      if (part.defined()) total.add_(part);
    }
    gW = total.to(features.scalar_type());
  }
  const auto cast = [](bool need, const at::Tensor& t, at::ScalarType to) -> OptTensor {
    return need ? OptTensor(t.to(to)) : std::nullopt;
  };
  return {cast(need_q, gq, q.scalar_type()), cast(need_k, gk, k.scalar_type()), cast(need_v, gv, v.scalar_type()),
          gW, need_mask ? OptTensor(gbias.sum(1).to(key_padding_mask->scalar_type())) : std::nullopt};
}

}  // namespace

TORCH_LIBRARY_IMPL(panther, CPU, m) {
  m.impl("performer_attention", &performer_attention_cpu);
  m.impl("performer_attention_backward", &performer_attention_backward_cpu);
}

}  // namespace panther
