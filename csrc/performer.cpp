// Performer (FAVOR+) attention on the CPU: forward and hand-derived backward.
//
// Semantics: vitkern/reference/performer.py (stabilized T2T prm_exp attention); the algorithm and
// the saved state are described in vitkern/cpu/performer.py, which also holds the native PyTorch
// composition with the same numerics.
//
// Work items are (batch-head, chunk of at most kChunk tokens). Each item keeps its chunk's feature
// maps (chunk x m) in a cache-resident scratch tile and never writes an N x m tensor:
//   forward   keys    : Lk = K W^T - |k|^2/2, chunk max, exp, partial [Pk^T V, sum Pk] (m x e+1)
//             combine : c_k = max of chunk maxima, KV1 = sum_c exp(max_c - c_k) partial_c
//                       (+ feature_eps * [sum V, N]); fixed order, so bitwise reproducible
//             queries : Pq = exp(Q W^T - rowmax) + fe, [num, den] = Pq KV1, eps term, y = num / den
//   backward  queries : recompute Pq; A = G KV^T; delta = r rowsum(Pq A); dLq; dq;
//                       partial dKV1 = (r Pq)^T [G, -delta]; partial dW
//             combine : dKV1 per batch-head
//             keys    : recompute Pk; dv = Pk dKV; dLk = (V dKV^T + dks) * (Pk - fe); dk; dW
// Optional output Linear (single head): y W_out^T = r Pq (KV W_out^T), so it folds into the key
// summary, M = KV W_out^T (m x e_out), and the N x e x e_out GEMM of the Linear disappears; bias
// and a residual are added in the epilogue. Backward: A = G M^T, dM = (r Pq)^T G,
// dKV = dM W_out, dW_out = sum dM^T KV.
// GEMMs go through at::mm (MKL, single-threaded inside the parallel region); the elementwise work
// is loops over the tile. fp16/bf16 inputs compute in fp32; fp32 and fp64 in their own precision.
// One parallel region per pass: four in all, whatever the layer size.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kChunk = 512;  // most tokens per work item: a 512 x 64 fp32 tile is 128 KiB

// Geometry of one call: q/k/v are (B, H, N, d) or (B, N, d); "bh" indexes batch-heads.
struct Shape {
  int64_t BH, N, d, e, m, chunks, items;
};

Shape shape_of(const Tensor& q, const Tensor& v, const Tensor& w) {
  Shape s;
  s.N = q.size(-2);
  s.d = q.size(-1);
  s.e = v.size(-1);
  s.m = w.size(0);
  s.BH = q.dim() == 4 ? q.size(0) * q.size(1) : q.size(0);
  s.chunks = (s.N + kChunk - 1) / kChunk;
  s.items = s.BH * s.chunks;
  return s;
}

// (N, cols) views of one batch-head of a 3-D or 4-D tensor, made once before the parallel region.
std::vector<Tensor> per_head(const Tensor& x) {
  std::vector<Tensor> out;
  if (x.dim() == 3) {
    for (int64_t b = 0; b < x.size(0); ++b) out.push_back(x.select(0, b));
  } else {
    for (int64_t b = 0; b < x.size(0); ++b)
      for (int64_t h = 0; h < x.size(1); ++h) out.push_back(x.select(0, b).select(0, h));
  }
  return out;
}

// Rows [r0, r0 + rows) of a per-head view in the compute dtype with unit column stride.
Tensor rows_of(const Tensor& head, int64_t r0, int64_t rows, at::ScalarType ct) {
  Tensor t = head.narrow(0, r0, rows);
  if (t.scalar_type() != ct) t = t.to(ct);
  if (t.stride(1) != 1) t = t.contiguous();
  return t;
}

double eps_limit(at::ScalarType ct) { return ct == at::kDouble ? 700.0 : 80.0; }

// ----------------------------------------------------------------------------------------------
// Tile loops. Compiled for AVX-512, AVX2 and baseline x86-64 (target_clones: the loader picks the
// best the CPU has), with `omp simd` so the row reductions vectorize without -ffast-math.
// Tiles are row-major and contiguous unless a row stride is passed.
// ----------------------------------------------------------------------------------------------
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VK_CLONES
#endif

template <typename T>
inline T half_sq_norm(const T* x, int64_t d) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) s += x[j] * x[j];
  return s * T(0.5);
}

template <typename T>
inline T row_max(const T* x, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

// Key logits K W^T (in L) -> Lk - c_k with Lk = K W^T - |k|^2/2. With `c` = NaN the chunk's own
// maximum of Lk is used and returned (forward); else `c` is subtracted and returned (backward).
template <typename T>
VK_CLONES T key_shift(T* L, const T* k, int64_t ks, int64_t rows, int64_t d, int64_t m, T c,
                      T* h) {
  for (int64_t i = 0; i < rows; ++i) h[i] = half_sq_norm(k + i * ks, d);
  if (std::isnan(c)) {
    c = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < rows; ++i) c = std::max(c, row_max(L + i * m, m) - h[i]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T off = h[i] + c;
    T* row = L + i * m;
#pragma omp simd
    for (int64_t f = 0; f < m; ++f) row[f] -= off;
  }
  return c;
}

// Query logits Q W^T (in S) -> S - rowmax(S); c_q = rowmax - |q|^2/2 per row.
template <typename T>
VK_CLONES void query_shift(T* S, const T* q, int64_t qs, int64_t rows, int64_t d, int64_t m,
                           T* cq) {
  for (int64_t i = 0; i < rows; ++i) {
    T* row = S + i * m;
    const T mx = row_max(row, m);
#pragma omp simd
    for (int64_t f = 0; f < m; ++f) row[f] -= mx;
    if (cq) cq[i] = mx - half_sq_norm(q + i * qs, d);
  }
}

// out[j] = sum_i x[i * xs + j] * (w ? w[i] : 1), j < n.
template <typename T>
VK_CLONES void col_sum(const T* x, int64_t xs, int64_t rows, int64_t n, const T* w, T* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const T wi = w ? w[i] : T(1);
    const T* row = x + i * xs;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += row[j] * wi;
  }
}

// Forward epilogue: r = 1 / (den + m exp(min(log eps - c_q - c_k, limit))), y = num * r
// (+ bias + residual row when given). nd: rows x (e+1); y: rows x e, row stride y_stride;
// r: rows.
template <typename T>
VK_CLONES void finish_rows(const T* nd, int64_t rows, int64_t e, const T* cq, T c_k, double eps,
                           double limit, int64_t m, T* r, T* y, int64_t y_stride, const T* bias,
                           const T* res, int64_t res_stride) {
  const double log_eps = eps > 0.0 ? std::log(eps) : 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = nd + i * (e + 1);
    T den = row[e];
    if (eps > 0.0) den += T(double(m) * std::exp(std::min(log_eps - double(cq[i]) - double(c_k), limit)));
    const T ri = T(1) / den;
    r[i] = ri;
    T* yo = y + i * y_stride;
#pragma omp simd
    for (int64_t j = 0; j < e; ++j) yo[j] = row[j] * ri;
    if (bias) {
#pragma omp simd
      for (int64_t j = 0; j < e; ++j) yo[j] += bias[j];
    }
    if (res) {
      const T* rr = res + i * res_stride;
#pragma omp simd
      for (int64_t j = 0; j < e; ++j) yo[j] += rr[j];
    }
  }
}

// Backward, queries. In: P = exp part of Pq, A = G KV^T, r, ks (stride e+1). Out: A = dLq,
// P = r * Pq, neg_delta = -G.y.
template <typename T>
VK_CLONES void query_grad_rows(T* P, T* A, const T* r, const T* ks, int64_t ks_stride, T fe,
                               int64_t rows, int64_t m, T* neg_delta) {
  for (int64_t i = 0; i < rows; ++i) {
    T* p = P + i * m;
    T* a = A + i * m;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t f = 0; f < m; ++f) dot += (p[f] + fe) * a[f];
    const T ri = r[i], delta = ri * dot;
    neg_delta[i] = -delta;
#pragma omp simd
    for (int64_t f = 0; f < m; ++f) {
      const T ex = p[f];
      a[f] = ri * (a[f] - delta * ks[f * ks_stride]) * ex;
      p[f] = (ex + fe) * ri;
    }
  }
}

// Backward, keys: D = (V dKV^T + dks) * exp part of Pk.
template <typename T>
VK_CLONES void key_grad_rows(T* D, const T* P, const T* dks, int64_t dks_stride, int64_t rows,
                             int64_t m) {
  for (int64_t i = 0; i < rows; ++i) {
    T* dr = D + i * m;
    const T* p = P + i * m;
#pragma omp simd
    for (int64_t f = 0; f < m; ++f) dr[f] = (dr[f] + dks[f * dks_stride]) * p[f];
  }
}

// dX (holding dL W) -= x * rowsum(dL).
template <typename T>
VK_CLONES void input_grad_rows(T* dx, const T* dl, const T* x, int64_t xs, int64_t rows,
                               int64_t d, int64_t m) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* l = dl + i * m;
    T rs = 0;
#pragma omp simd reduction(+ : rs)
    for (int64_t f = 0; f < m; ++f) rs += l[f];
    T* o = dx + i * d;
    const T* xi = x + i * xs;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) o[j] -= xi[j] * rs;
  }
}

// Per-thread scratch tile of kRows x cols, reused across the work items of a parallel range:
// fresh allocations of tile size cost page faults on every item.
struct Scratch {
  Tensor buf;
  Scratch(int64_t rows, int64_t cols, const at::TensorOptions& opt) : buf(at::empty({rows, cols}, opt)) {}
  Tensor operator()(int64_t rows) const { return buf.narrow(0, 0, rows); }
};

// Rows [r0, r0 + rows) of a per-head output view receive a compute-dtype tile (converting).
void store(const Tensor& head, int64_t r0, const Tensor& tile) {
  head.narrow(0, r0, tile.size(0)).copy_(tile);
}

// [KV W_out^T, ks] from kv1 = [KV, ks]: (BH, m, e_out + 1).
Tensor fold_out_weight(const Tensor& kv1, const Tensor& w_out, int64_t e) {
  return at::cat({at::matmul(kv1.narrow(2, 0, e), w_out.t()), kv1.narrow(2, e, 1)}, 2).contiguous();
}

int64_t chunk_rows(int64_t BH, int64_t N) {
  // Enough items to feed every thread (>= 4 per thread) without going below 128 rows or
  // above kChunk rows per tile.
  const int64_t want_items = 4 * at::get_num_threads();
  const int64_t per_head = std::max<int64_t>(1, (want_items + BH - 1) / BH);
  return std::min(kChunk, std::max<int64_t>(128, (N + per_head - 1) / per_head));
}

template <typename scalar_t, typename acc_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> fwd_impl(const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& w,
                                                    const c10::optional<Tensor>& out_weight,
                                                    const c10::optional<Tensor>& out_bias,
                                                    const c10::optional<Tensor>& residual,
                                                    double eps, double feature_eps) {
  Shape s = shape_of(q, v, w);
  const at::ScalarType ct = c10::CppTypeToScalarType<acc_t>::value;
  const auto copt = q.options().dtype(ct);
  const Tensor W = w.to(ct).contiguous();
  const Tensor Wt = W.t();
  const acc_t fe = static_cast<acc_t>(feature_eps);

  // With out_weight (e_out, e) the output Linear is folded into the key summary (see top).
  const bool fold = out_weight.has_value() && out_weight->defined();
  const int64_t e_out = fold ? out_weight->size(0) : s.e;
  // Output stored as (B, N, H, e) for 4-D inputs: the next Linear reads it as (B, N, H*e).
  Tensor out = q.dim() == 4 ? at::empty({q.size(0), s.N, q.size(1), s.e}, q.options()).transpose(1, 2)
                            : at::empty({q.size(0), s.N, e_out}, q.options());
  Tensor rden = at::empty({s.BH, s.N}, copt);
  Tensor ck = at::empty({s.BH}, copt);
  Tensor kv1 = at::zeros({s.BH, s.m, s.e + 1}, copt);
  if (s.BH == 0 || s.N == 0) return {out, rden, ck, kv1};
  const int64_t CH = chunk_rows(s.BH, s.N);
  s.chunks = (s.N + CH - 1) / CH;
  s.items = s.BH * s.chunks;

  const auto qh = per_head(q), kh = per_head(k), vh = per_head(v), oh = per_head(out);
  const bool has_res = residual.has_value() && residual->defined();
  const auto rh = has_res ? per_head(*residual) : std::vector<Tensor>();
  const Tensor bias = out_bias.has_value() && out_bias->defined() ? out_bias->to(ct).contiguous() : Tensor();
  Tensor part_kv = at::empty({s.items, s.m, s.e}, copt);  // sum_j exp(Lk_j - max_c) v_j
  Tensor part_ks = at::empty({s.items, s.m}, copt);        // sum_j exp(Lk_j - max_c)
  Tensor part_max = at::empty({s.items}, copt);
  Tensor vsum = at::empty({s.items, s.e}, copt);

  // Keys: per-chunk partial context with the chunk's own maximum.
  at::parallel_for(0, s.items, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<acc_t> h(CH);
    const Scratch L_(CH, s.m, copt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / s.chunks, r0 = (t % s.chunks) * CH;
      const int64_t rows = std::min(CH, s.N - r0);
      Tensor kc = rows_of(kh[bh], r0, rows, ct), vc = rows_of(vh[bh], r0, rows, ct);
      Tensor L = L_(rows);
      at::mm_out(L, kc, Wt);
      acc_t* pl = L.data_ptr<acc_t>();
      part_max.data_ptr<acc_t>()[t] = key_shift<acc_t>(
          pl, kc.data_ptr<acc_t>(), kc.stride(0), rows, s.d, s.m,
          std::numeric_limits<acc_t>::quiet_NaN(), h.data());
      L.exp_();
      Tensor pt = part_kv[t];
      at::mm_out(pt, L.t(), vc);
      col_sum<acc_t>(pl, s.m, rows, s.m, nullptr, part_ks.data_ptr<acc_t>() + t * s.m);
      if (feature_eps != 0.0)
        col_sum<acc_t>(vc.data_ptr<acc_t>(), vc.stride(0), rows, s.e, nullptr,
                       vsum.data_ptr<acc_t>() + t * s.e);
    }
  });

  // Combine the chunks of each batch-head in chunk order.
  {
    acc_t* pkv = kv1.data_ptr<acc_t>();
    acc_t* pck = ck.data_ptr<acc_t>();
    const acc_t* pp = part_kv.data_ptr<acc_t>();
    const acc_t* ps = part_ks.data_ptr<acc_t>();
    const acc_t* pm = part_max.data_ptr<acc_t>();
    const acc_t* pv = vsum.data_ptr<acc_t>();
    const int64_t tile = s.m * (s.e + 1);
    for (int64_t bh = 0; bh < s.BH; ++bh) {
      acc_t c = -std::numeric_limits<acc_t>::infinity();
      for (int64_t ch = 0; ch < s.chunks; ++ch) c = std::max(c, pm[bh * s.chunks + ch]);
      pck[bh] = c;
      acc_t* dst = pkv + bh * tile;
      for (int64_t ch = 0; ch < s.chunks; ++ch) {
        const int64_t t = bh * s.chunks + ch;
        const acc_t scale = std::exp(pm[t] - c);
        for (int64_t f = 0; f < s.m; ++f) {
          for (int64_t j = 0; j < s.e; ++j) dst[f * (s.e + 1) + j] += scale * pp[(t * s.m + f) * s.e + j];
          dst[f * (s.e + 1) + s.e] += scale * ps[t * s.m + f];
        }
        if (feature_eps != 0.0)
          for (int64_t f = 0; f < s.m; ++f)
            for (int64_t j = 0; j < s.e; ++j) dst[f * (s.e + 1) + j] += fe * pv[t * s.e + j];
      }
      if (feature_eps != 0.0)
        for (int64_t f = 0; f < s.m; ++f) dst[f * (s.e + 1) + s.e] += fe * static_cast<acc_t>(s.N);
    }
  }

  // What the queries multiply: [KV, ks], or [KV W_out^T, ks] with the output Linear folded in.
  const Tensor kvq = fold ? fold_out_weight(kv1, out_weight->to(ct), s.e) : kv1;

  // Queries.
  const double limit = eps_limit(ct);
  at::parallel_for(0, s.items, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<acc_t> cq(CH);
    const Scratch S_(CH, s.m, copt), nd_(CH, e_out + 1, copt), y_(CH, e_out, copt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / s.chunks, r0 = (t % s.chunks) * CH;
      const int64_t rows = std::min(CH, s.N - r0);
      Tensor qc = rows_of(qh[bh], r0, rows, ct);
      Tensor S = S_(rows);
      at::mm_out(S, qc, Wt);
      query_shift<acc_t>(S.data_ptr<acc_t>(), qc.data_ptr<acc_t>(), qc.stride(0), rows, s.d, s.m,
                         eps > 0.0 ? cq.data() : nullptr);
      S.exp_();
      if (feature_eps != 0.0) S.add_(feature_eps);
      Tensor nd = nd_(rows), y = y_(rows);
      at::mm_out(nd, S, kvq[bh]);
      const Tensor res = has_res ? rows_of(rh[bh], r0, rows, ct) : Tensor();
      // Output rows are written in place when they are in the compute dtype with unit column
      // stride; otherwise through the tile and a converting copy.
      const Tensor& o = oh[bh];
      const bool direct = std::is_same_v<scalar_t, acc_t> && o.stride(1) == 1;
      acc_t* dst = direct ? reinterpret_cast<acc_t*>(o.data_ptr<scalar_t>()) + r0 * o.stride(0)
                          : y.data_ptr<acc_t>();
      finish_rows<acc_t>(nd.data_ptr<acc_t>(), rows, e_out, cq.data(), ck.data_ptr<acc_t>()[bh], eps,
                         limit, s.m, rden.data_ptr<acc_t>() + bh * s.N + r0, dst,
                         direct ? o.stride(0) : e_out,
                         bias.defined() ? bias.data_ptr<acc_t>() : nullptr,
                         has_res ? res.data_ptr<acc_t>() : nullptr, has_res ? res.stride(0) : 0);
      if (!direct) store(o, r0, y);
    }
  });
  return {out, rden, ck, kv1};
}

template <typename scalar_t, typename acc_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_impl(
    const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
    const c10::optional<Tensor>& out_weight, const Tensor& rden, const Tensor& ck,
    const Tensor& kv1, double feature_eps, bool need_dw, bool need_dweight) {
  Shape s = shape_of(q, v, w);
  const at::ScalarType ct = c10::CppTypeToScalarType<acc_t>::value;
  const auto copt = q.options().dtype(ct);
  const Tensor W = w.to(ct).contiguous();
  const Tensor Wt = W.t();
  const acc_t fe = static_cast<acc_t>(feature_eps);

  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  const bool fold = out_weight.has_value() && out_weight->defined();
  const int64_t e_out = fold ? out_weight->size(0) : s.e;
  const Tensor Wout = fold ? out_weight->to(ct) : Tensor();
  if (s.BH == 0 || s.N == 0) {
    return {dq.zero_(), dk.zero_(), dv.zero_(),
            need_dw ? at::zeros(w.sizes(), w.options()) : at::empty({0}, w.options()),
            need_dweight && fold ? at::zeros(out_weight->sizes(), out_weight->options())
                                 : at::empty({0}, w.options())};
  }
  const Tensor kvq = fold ? fold_out_weight(kv1, Wout, s.e) : kv1;
  const int64_t CH = chunk_rows(s.BH, s.N);
  s.chunks = (s.N + CH - 1) / CH;
  s.items = s.BH * s.chunks;
  Tensor dw_part = need_dw ? at::zeros({s.items, s.m, s.d}, copt) : Tensor();
  const auto qh = per_head(q), kh = per_head(k), vh = per_head(v), gh = per_head(grad);
  const auto dqh = per_head(dq), dkh = per_head(dk), dvh = per_head(dv);
  Tensor part_kv = at::empty({s.items, s.m, e_out}, copt);  // (r Pq)^T G
  Tensor part_ks = at::empty({s.items, s.m}, copt);        // -(r Pq)^T delta

  // Queries: dq and the partial gradients of the key summary.
  at::parallel_for(0, s.items, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<acc_t> neg_delta(CH);
    const Scratch P_(CH, s.m, copt), A_(CH, s.m, copt), dx_(CH, s.d, copt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / s.chunks, r0 = (t % s.chunks) * CH;
      const int64_t rows = std::min(CH, s.N - r0);
      Tensor qc = rows_of(qh[bh], r0, rows, ct), gc = rows_of(gh[bh], r0, rows, ct);
      Tensor P = P_(rows), A = A_(rows), dqc = dx_(rows);
      at::mm_out(P, qc, Wt);
      query_shift<acc_t>(P.data_ptr<acc_t>(), nullptr, 0, rows, s.d, s.m, nullptr);
      P.exp_();  // exp part only; the feature is P + fe
      const Tensor kvb = kvq[bh];
      at::mm_out(A, gc, kvb.narrow(1, 0, e_out).t());  // G KV^T (G M^T when folded)
      query_grad_rows<acc_t>(P.data_ptr<acc_t>(), A.data_ptr<acc_t>(),
                             rden.data_ptr<acc_t>() + bh * s.N + r0, kvb.data_ptr<acc_t>() + e_out,
                             e_out + 1, fe, rows, s.m, neg_delta.data());
      at::mm_out(dqc, A, W);
      input_grad_rows<acc_t>(dqc.data_ptr<acc_t>(), A.data_ptr<acc_t>(), qc.data_ptr<acc_t>(),
                             qc.stride(0), rows, s.d, s.m);
      store(dqh[bh], r0, dqc);
      Tensor pt = part_kv[t];
      at::mm_out(pt, P.t(), gc);
      col_sum<acc_t>(P.data_ptr<acc_t>(), s.m, rows, s.m, neg_delta.data(),
                     part_ks.data_ptr<acc_t>() + t * s.m);
      if (need_dw) {
        Tensor dwt = dw_part[t];
        at::mm_out(dwt, A.t(), qc);
      }
    }
  });

  // dM = (r Pq)^T G; unfolded, dKV = dM; folded (M = KV W_out^T), dKV = dM W_out and
  // dW_out = sum over batch-heads of dM^T KV.
  Tensor dm = part_kv.view({s.BH, s.chunks, s.m, e_out}).sum(1);
  Tensor dweight = at::empty({0}, w.options());
  if (fold && need_dweight)
    dweight = at::einsum("bmo,bme->oe", {dm, kv1.narrow(2, 0, s.e)}).to(out_weight->scalar_type());
  Tensor dkv1 = at::cat({fold ? at::matmul(dm, Wout) : dm,
                         part_ks.view({s.BH, s.chunks, s.m, 1}).sum(1)}, 2);

  // Keys: dv, dk.
  at::parallel_for(0, s.items, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<acc_t> h(CH);
    const Scratch P_(CH, s.m, copt), Pfe_(CH, s.m, copt), D_(CH, s.m, copt), dv_(CH, s.e, copt),
        dx_(CH, s.d, copt);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / s.chunks, r0 = (t % s.chunks) * CH;
      const int64_t rows = std::min(CH, s.N - r0);
      Tensor kc = rows_of(kh[bh], r0, rows, ct), vc = rows_of(vh[bh], r0, rows, ct);
      Tensor P = P_(rows), D = D_(rows), dvc = dv_(rows), dkc = dx_(rows);
      at::mm_out(P, kc, Wt);
      key_shift<acc_t>(P.data_ptr<acc_t>(), kc.data_ptr<acc_t>(), kc.stride(0), rows, s.d, s.m,
                       ck.data_ptr<acc_t>()[bh], h.data());
      P.exp_();
      const Tensor g = dkv1[bh];
      const Tensor gkv = g.narrow(1, 0, s.e);
      if (feature_eps != 0.0) {
        Tensor Pfe = Pfe_(rows);
        at::add_out(Pfe, P, at::scalar_tensor(feature_eps, copt));
        at::mm_out(dvc, Pfe, gkv);
      } else {
        at::mm_out(dvc, P, gkv);
      }
      store(dvh[bh], r0, dvc);
      at::mm_out(D, vc, gkv.t());  // V dKV^T
      key_grad_rows<acc_t>(D.data_ptr<acc_t>(), P.data_ptr<acc_t>(), g.data_ptr<acc_t>() + s.e,
                           s.e + 1, rows, s.m);
      at::mm_out(dkc, D, W);
      input_grad_rows<acc_t>(dkc.data_ptr<acc_t>(), D.data_ptr<acc_t>(), kc.data_ptr<acc_t>(),
                             kc.stride(0), rows, s.d, s.m);
      store(dkh[bh], r0, dkc);
      if (need_dw) dw_part[t].addmm_(D.t(), kc);
    }
  });
  Tensor dw = need_dw ? dw_part.sum(0).to(w.scalar_type()) : at::empty({0}, w.options());
  return {dq, dk, dv, dw, dweight};
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                  const c10::optional<Tensor>& out_weight) {
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "performer: q must be 3-D or 4-D");
  TORCH_CHECK(k.sizes() == q.sizes(), "performer: k must have q's shape");
  TORCH_CHECK(v.dim() == q.dim() && v.sizes().slice(0, q.dim() - 1) == q.sizes().slice(0, q.dim() - 1),
              "performer: v must match q in all but the last dim");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == q.size(-1), "performer: projection must be (m, d)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "performer: q, k, v must share a dtype");
  if (out_weight.has_value() && out_weight->defined()) {
    TORCH_CHECK(q.dim() == 3, "performer: the folded output Linear needs single-head (B, N, d) inputs");
    TORCH_CHECK(out_weight->dim() == 2 && out_weight->size(1) == v.size(-1),
                "performer: out_weight must be (e_out, d_v)");
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> performer_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
    const c10::optional<Tensor>& out_weight, const c10::optional<Tensor>& out_bias,
    const c10::optional<Tensor>& residual, double eps, double feature_eps) {
  check_inputs(q, k, v, w, out_weight);
  std::tuple<Tensor, Tensor, Tensor, Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "performer_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    res = fwd_impl<scalar_t, acc_t>(q, k, v, w, out_weight, out_bias, residual, eps, feature_eps);
  });
  return res;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> performer_bwd(
    const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
    const c10::optional<Tensor>& out_weight, const Tensor& rden, const Tensor& ck,
    const Tensor& kv1, double feature_eps, bool need_dw, bool need_dweight) {
  check_inputs(q, k, v, w, out_weight);
  const Tensor g = grad.scalar_type() == q.scalar_type() ? grad : grad.to(q.scalar_type());
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "performer_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    res = bwd_impl<scalar_t, acc_t>(g, q, k, v, w, out_weight, rden.contiguous(), ck.contiguous(),
                                    kv1.contiguous(), feature_eps, need_dw, need_dweight);
  });
  return res;
}

// ----------------------------------------------------------------------------------------------
// Dropout for TokenPerformer: one pass writes the output (plus an optional residual: both of the
// layer's dropouts feed a residual add) and the keep mask. The tensor is cut in
// blocks of kDropBlock elements; block b gets a 64-bit key splitmix64(seed + b), and element j of
// the block keeps when the top 24 bits of fmix32(fmix32(j * phi ^ key_lo) + key_hi) (two rounds
// of MurmurHash3's finalizer) are >= p * 2^24: probability 1 - p to within 2^-24, like a float
// uniform. Counter-based, so the mask does not depend on the thread count, and the 32-bit hash
// vectorizes. The seed comes from torch's generator (reproducible under torch.manual_seed).
// ----------------------------------------------------------------------------------------------
constexpr int64_t kDropBlock = 1 << 14;

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

template <typename scalar_t, typename acc_t>
VK_CLONES void dropout_block(const scalar_t* x, const scalar_t* res, scalar_t* out, bool* keep,
                             int64_t n, uint64_t key, uint32_t threshold, acc_t scale) {
  const uint32_t lo = uint32_t(key), hi = uint32_t(key >> 32);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t h = fmix32(fmix32(uint32_t(j) * 0x9E3779B9u ^ lo) + hi);
    const bool k = (h >> 8) >= threshold;
    keep[j] = k;
    const acc_t r = res ? static_cast<acc_t>(res[j]) : acc_t(0);
    out[j] = static_cast<scalar_t>(r + static_cast<acc_t>(x[j]) * (k ? scale : acc_t(0)));
  }
}

template <typename scalar_t, typename acc_t>
VK_CLONES void dropout_grad_block(const scalar_t* g, const bool* keep, scalar_t* out, int64_t n,
                                  acc_t scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) * (keep[j] ? scale : acc_t(0)));
}

// Backward of performer_dropout: grad * keep / (1 - p) in one pass.
Tensor performer_dropout_bwd(const Tensor& grad, const Tensor& keep, double p) {
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.sizes() == grad.sizes(),
              "performer_dropout_bwd: keep must be a bool mask of grad's shape");
  const Tensor gc = grad.contiguous(), kc = keep.contiguous();
  Tensor out = at::empty_like(gc);
  const int64_t n = gc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "performer_dropout_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pg = gc.data_ptr<scalar_t>();
    const bool* pk = kc.data_ptr<bool>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const acc_t scale = acc_t(1.0 / (1.0 - p));
    at::parallel_for(0, (n + kDropBlock - 1) / kDropBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kDropBlock, len = std::min(n - begin, kDropBlock);
        dropout_grad_block<scalar_t, acc_t>(pg + begin, pk + begin, po + begin, len, scale);
      }
    });
  });
  return out;
}

// residual + dropout(x) and the keep mask (the residual is optional).
std::tuple<Tensor, Tensor> performer_dropout(const Tensor& x, double p, int64_t seed,
                                             const c10::optional<Tensor>& residual) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "performer_dropout: p must be in [0, 1)");
  const bool has_res = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_res || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type()),
              "performer_dropout: residual must match x in shape and dtype");
  const Tensor xc = x.contiguous();
  const Tensor rc = has_res ? residual->contiguous() : Tensor();
  Tensor out = at::empty_like(xc);
  Tensor keep = at::empty(xc.sizes(), xc.options().dtype(at::kBool));
  const int64_t n = xc.numel();
  const uint32_t threshold = static_cast<uint32_t>(std::llround(p * double(1u << 24)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "performer_dropout", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* px = xc.data_ptr<scalar_t>();
    const scalar_t* pr = has_res ? rc.data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.data_ptr<scalar_t>();
    bool* pk = keep.data_ptr<bool>();
    const acc_t scale = acc_t(1.0 / (1.0 - p));
    at::parallel_for(0, (n + kDropBlock - 1) / kDropBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kDropBlock, len = std::min(n - begin, kDropBlock);
        dropout_block<scalar_t, acc_t>(px + begin, pr ? pr + begin : nullptr, po + begin,
                                       pk + begin, len, splitmix64(uint64_t(seed) + uint64_t(b)),
                                       threshold, scale);
      }
    });
  });
  return {out, keep};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vitkern_cpu, m) {
  m.def("performer_fwd(Tensor q, Tensor k, Tensor v, Tensor projection, Tensor? out_weight, "
        "Tensor? out_bias, Tensor? residual, float eps, float feature_eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("performer_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor projection, "
        "Tensor? out_weight, Tensor rden, Tensor c_k, Tensor kv1, float feature_eps, "
        "bool need_dw, bool need_dout_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("performer_dropout(Tensor x, float p, int seed, Tensor? residual) -> (Tensor, Tensor)");
  m.def("performer_dropout_bwd(Tensor grad, Tensor keep, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitkern_cpu, CPU, m) {
  m.impl("performer_fwd", &performer_fwd);
  m.impl("performer_bwd", &performer_bwd);
  m.impl("performer_dropout", &performer_dropout);
  m.impl("performer_dropout_bwd", &performer_dropout_bwd);
}
