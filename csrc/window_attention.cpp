// Swin shifted-window attention on the CPU: forward and backward, fused end to end.
//
// Input is the qkv projection of the whole (unshifted, unpadded) image, (B, H, W, 3C) with any
// strides whose last one is 1. One work item is one (window, head). For each item the kernel
//   - finds its N = Wh*Ww tokens by address arithmetic: padded-shifted coordinate
//     (y', x') = (wy*Wh + i, wx*Ww + j) is image token ((y'+sh) % H, (x'+sw) % W) when y' < H and
//     x' < W, else a padded token whose q/k/v row is `pad_qkv` (the qkv Linear's bias); with
//     `pad_on_tokens` the bias is also added to every image token's row here, so the Linear
//     before the op can skip its bias (a broadcast pass over the whole qkv image);
//   - gathers that head's q, k, v rows into small cache-resident tiles (converting bf16/fp16 to
//     fp32; fp32 and fp64 compute in their own precision);
//   - computes S = q k^T * scale (SwinV2: normalised q, k times exp(min(logit_scale, log 100))),
//     adds the relative position bias gathered from the table and the -100 shift-region mask
//     (from region ids of the padded grid), takes a row softmax, multiplies by v;
//   - writes the head's output rows straight to their image positions in (B, H, W, C), and the
//     row log-sum-exp to `lse` (B*nWin, nH, N) for the backward.
// No roll / pad / partition copies of the image are made.
//
// Backward recomputes S from q, k and lse, then dP = dO v^T, dS = P (dP - rowsum(P dP)), and
// writes dq, dk, dv straight into the image layout (every image token belongs to exactly one
// window, so each gradient element is written once). The gradients of the bias table, pad_qkv
// and logit_scale are accumulated in per-chunk partials over a fixed split of the work items and
// reduced in chunk order, so they are bitwise reproducible for any thread count.
//
// The small matmuls use register-blocked micro-kernels written with GCC vector extensions and
// compiled three times (AVX-512, AVX2+FMA, baseline SSE2); the best one the CPU supports is
// picked at run time, so the extension needs no -march flag.
// ATen's headers need C++20. Built as an older standard, this file compiles to nothing: the
// operators are then absent and vitkern runs its native PyTorch CPU path instead.
#if __cplusplus >= 202002L

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(VK_PORTABLE_ONLY)  // VK_PORTABLE_ONLY: build check
#include <immintrin.h>
#define VK_HAS_MXCSR 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr double kMaskValue = -100.0;                 // timm's additive shift mask (not -inf)
constexpr int64_t kMaxChunks = 64;                    // fixed split for deterministic reductions

// ----------------------------------------------------------------------------------------------
// Geometry and addressing
// ----------------------------------------------------------------------------------------------

struct Geometry {
  int64_t B, H, W, C, nH, d;
  int64_t Wh, Ww, sh, sw;
  int64_t Hp, Wp, nWh, nWw, nWin, N;
  int64_t items;  // B * nWin * nH
};

Geometry make_geometry(const at::Tensor& qkv, int64_t nH, int64_t Wh, int64_t Ww, int64_t sh, int64_t sw) {
  Geometry g;
  g.B = qkv.size(0);
  g.H = qkv.size(1);
  g.W = qkv.size(2);
  g.C = qkv.size(3) / 3;
  g.nH = nH;
  g.d = g.C / nH;
  g.Wh = Wh;
  g.Ww = Ww;
  g.sh = sh;
  g.sw = sw;
  g.nWh = (g.H + Wh - 1) / Wh;
  g.nWw = (g.W + Ww - 1) / Ww;
  g.Hp = g.nWh * Wh;
  g.Wp = g.nWw * Ww;
  g.nWin = g.nWh * g.nWw;
  g.N = Wh * Ww;
  g.items = g.B * g.nWin * nH;
  return g;
}

// timm's region label along one axis of the padded grid: slices [0, P-win), [P-win, P-shift),
// [P-shift, P). With shift 0 the last slice is empty; the first boundary falls on a window
// border, so only the last window row/column can mix regions.
inline int axis_region(int64_t pos, int64_t padded, int64_t win, int64_t shift) {
  if (pos < padded - win) return 0;
  if (pos < padded - shift) return 1;
  return 2;
}

// The tokens of one window: image offset (b*H + y)*W + x, or -1 for a padded token, and the
// region id used by the shift mask.
struct WindowTokens {
  int64_t b = 0;
  bool masked = false;
  std::vector<int64_t> pix;
  std::vector<int> region;
  explicit WindowTokens(int64_t N) : pix(N), region(N) {}

  void fill(const Geometry& g, int64_t win) {
    b = win / g.nWin;
    const int64_t w = win % g.nWin, wy = w / g.nWw, wx = w % g.nWw;
    masked = (g.sh > 0 && wy == g.nWh - 1) || (g.sw > 0 && wx == g.nWw - 1);
    for (int64_t i = 0; i < g.Wh; ++i) {
      const int64_t yp = wy * g.Wh + i;
      const int ry = axis_region(yp, g.Hp, g.Wh, g.sh);
      for (int64_t j = 0; j < g.Ww; ++j) {
        const int64_t xp = wx * g.Ww + j, t = i * g.Ww + j;
        if (yp < g.H && xp < g.W) {
          const int64_t y = (yp + g.sh) % g.H, x = (xp + g.sw) % g.W;
          pix[t] = (b * g.H + y) * g.W + x;
        } else {
          pix[t] = -1;
        }
        region[t] = ry * 3 + axis_region(xp, g.Wp, g.Ww, g.sw);
      }
    }
  }
};


// Walks the windows of a range of work items in order and prefetches the rows of the next
// window while the current one is computed: the rows of a window are scattered over the image,
// so the hardware prefetchers cannot guess them, and the gathers were mostly waiting on memory.
struct WindowCursor {
  WindowTokens cur, next;
  int64_t cur_win = -1, next_win = -1;
  explicit WindowCursor(int64_t N) : cur(N), next(N) {}

  // Make `win` current (usually the prefetched next window) and prefetch the one after it.
  template <typename F>
  void move_to(const Geometry& g, int64_t win, F&& prefetch_rows) {
    if (win == cur_win) return;
    if (win == next_win) std::swap(cur, next);
    else cur.fill(g, win);
    cur_win = win;
    if (win + 1 < g.B * g.nWin) {
      next.fill(g, win + 1);
      next_win = win + 1;
      for (int64_t t = 0; t < g.N; ++t)
        if (next.pix[t] >= 0) prefetch_rows(next.pix[t]);
    } else {
      next_win = -1;
    }
  }
};

inline void prefetch_bytes(const void* p, int64_t bytes, bool for_write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (for_write) __builtin_prefetch(c + off, 1, 3);
    else __builtin_prefetch(c + off, 0, 3);
  }
}

// Image coordinates of a token offset (b*H + y)*W + x.
inline const char* qkv_row(const char* base, int64_t pix, const Geometry& g, int64_t sb, int64_t sh_, int64_t sw_,
                           int64_t elem) {
  const int64_t b = pix / (g.H * g.W), rem = pix % (g.H * g.W), y = rem / g.W, x = rem % g.W;
  return base + (b * sb + y * sh_ + x * sw_) * elem;
}

// ----------------------------------------------------------------------------------------------
// Micro-kernels (GCC vector extensions; VB = vector width in bytes of the target)
// ----------------------------------------------------------------------------------------------

template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
};

// (vectors passed by reference: every caller is inlined into one target-specific function)
template <typename V, typename T>
inline void vload(V& v, const T* p) {
  std::memcpy(&v, p, sizeof(V));
}

template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Register blocking per target: AVX-512 has 32 vector registers, AVX2/SSE 16.
template <int VB>
struct Blocking {
  static constexpr int RA = VB == 64 ? 4 : 2;  // rows per tile, C = A * Bt
  static constexpr int RB = VB == 64 ? 8 : 4;  // rows per tile, C = A * B (narrow B)
};

// C[i, jv] = sum_k A[i, k] * Bt[k, jv] for a tile of R rows and J vectors.
template <typename T, int VB, int R, int J>
inline void tile_abt(const T* A, int64_t lda, const T* Bt, int64_t ldb, T* Cm, int64_t ldc, int64_t K) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = VB / sizeof(T);
  V acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[J];
    for (int j = 0; j < J; ++j) vload(bv[j], Bt + k * ldb + j * L);
    for (int r = 0; r < R; ++r) {
      const T a = A[r * lda + k];
      for (int j = 0; j < J; ++j) acc[r][j] += bv[j] * a;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) vstore(Cm + r * ldc + j * L, acc[r][j]);
}

// C (M x n_cols) = A (M x K, row-major) * Bt (K x n_cols); n_cols a multiple of the lanes.
template <typename T, int VB>
inline void matmul_abt(int64_t M, int64_t n_cols, int64_t K, const T* A, int64_t lda, const T* Bt, int64_t ldb,
                       T* Cm, int64_t ldc) {
  constexpr int L = VB / sizeof(T);
  constexpr int R = Blocking<VB>::RA;
  const int64_t nv = n_cols / L;
  int64_t i = 0;
  for (; i + R <= M; i += R) {
    int64_t jv = 0;
    for (; jv + 4 <= nv; jv += 4)
      tile_abt<T, VB, R, 4>(A + i * lda, lda, Bt + jv * L, ldb, Cm + i * ldc + jv * L, ldc, K);
    for (; jv < nv; ++jv)
      tile_abt<T, VB, R, 1>(A + i * lda, lda, Bt + jv * L, ldb, Cm + i * ldc + jv * L, ldc, K);
  }
  for (; i < M; ++i) {
    int64_t jv = 0;
    for (; jv + 4 <= nv; jv += 4)
      tile_abt<T, VB, 1, 4>(A + i * lda, lda, Bt + jv * L, ldb, Cm + i * ldc + jv * L, ldc, K);
    for (; jv < nv; ++jv)
      tile_abt<T, VB, 1, 1>(A + i * lda, lda, Bt + jv * L, ldb, Cm + i * ldc + jv * L, ldc, K);
  }
}

// C[i, :] = sum_k A(i, k) * B[k, :] with A(i, k) = A[i*ars + k*acs] (so A may be read
// transposed), for a tile of R rows and J vectors of B's width.
template <typename T, int VB, int R, int J>
inline void tile_ab(const T* A, int64_t ars, int64_t acs, const T* Bm, int64_t ldb, T* Cm, int64_t ldc, int64_t K) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = VB / sizeof(T);
  V acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[J];
    for (int j = 0; j < J; ++j) vload(bv[j], Bm + k * ldb + j * L);
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ars + k * acs];
      for (int j = 0; j < J; ++j) acc[r][j] += bv[j] * a;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) vstore(Cm + r * ldc + j * L, acc[r][j]);
}

template <typename T, int VB, int R>
inline void rows_ab(int64_t i, int64_t nv, const T* A, int64_t ars, int64_t acs, const T* Bm, int64_t ldb, T* Cm,
                    int64_t ldc, int64_t K) {
  constexpr int L = VB / sizeof(T);
  int64_t jv = 0;
  for (; jv + 2 <= nv; jv += 2)
    tile_ab<T, VB, R, 2>(A + i * ars, ars, acs, Bm + jv * L, ldb, Cm + i * ldc + jv * L, ldc, K);
  for (; jv < nv; ++jv)
    tile_ab<T, VB, R, 1>(A + i * ars, ars, acs, Bm + jv * L, ldb, Cm + i * ldc + jv * L, ldc, K);
}

// C (M x n_cols) = A (M x K, strided) * B (K x n_cols); n_cols a multiple of the lanes.
template <typename T, int VB>
inline void matmul_ab(int64_t M, int64_t n_cols, int64_t K, const T* A, int64_t ars, int64_t acs, const T* Bm,
                      int64_t ldb, T* Cm, int64_t ldc) {
  constexpr int L = VB / sizeof(T);
  constexpr int R = Blocking<VB>::RB;
  const int64_t nv = n_cols / L;
  int64_t i = 0;
  for (; i + R <= M; i += R) rows_ab<T, VB, R>(i, nv, A, ars, acs, Bm, ldb, Cm, ldc, K);
  for (; i + 2 <= M; i += 2) rows_ab<T, VB, 2>(i, nv, A, ars, acs, Bm, ldb, Cm, ldc, K);
  for (; i < M; ++i) rows_ab<T, VB, 1>(i, nv, A, ars, acs, Bm, ldb, Cm, ldc, K);
}

// exp for the softmax. fp32: Cody-Waite range reduction + degree-6 polynomial on whole vectors
// (|rel err| < 2e-7; inputs below -87 give exactly 0, as exp underflows there anyway);
// fp64: std::exp per element.
template <int VB>
inline void vexp(typename Vec<float, VB>::type& x) {
  using V = typename Vec<float, VB>::type;
  using VI = typename Vec<int32_t, VB>::type;
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  const auto underflow = x < lo;
  x = underflow ? lo : x;
  x = x > hi ? hi : x;
  const V t = x * 1.4426950408889634f;
  const V n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = V{} + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  x = underflow ? V{} : p * scale;
}

template <typename T, int VB>
inline T hmax(const typename Vec<T, VB>::type& v) {
  constexpr int L = VB / sizeof(T);
  T m = v[0];
  for (int i = 1; i < L; ++i) m = std::max(m, static_cast<T>(v[i]));
  return m;
}

template <typename T, int VB>
inline T hsum(const typename Vec<T, VB>::type& v) {
  constexpr int L = VB / sizeof(T);
  T s = 0;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}

// Forward softmax of one score row in place (Np columns, those past N hold -1e30); returns lse.
template <typename T, int VB>
inline T softmax_row(T* sr, int64_t Np) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = VB / sizeof(T);
  V vm;
  vload(vm, sr);
  for (int64_t j = L; j < Np; j += L) {
    V x;
    vload(x, sr + j);
    vm = x > vm ? x : vm;
  }
  const T m = hmax<T, VB>(vm);
  V vs = V{};
  for (int64_t j = 0; j < Np; j += L) {
    V x;
    vload(x, sr + j);
    x -= m;
    if constexpr (std::is_same_v<T, float>) {
      vexp<VB>(x);
    } else {
      for (int i = 0; i < L; ++i) x[i] = std::exp(x[i]);
    }
    vs += x;
    vstore(sr + j, x);
  }
  const T l = hsum<T, VB>(vs);
  const T inv = T(1) / l;
  for (int64_t j = 0; j < Np; j += L) {
    V x;
    vload(x, sr + j);
    vstore(sr + j, x * inv);
  }
  return m + std::log(l);
}

// Backward: P = exp(S - lse) for one row.
template <typename T, int VB>
inline void exp_row(T* sr, int64_t Np, T lse) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = VB / sizeof(T);
  for (int64_t j = 0; j < Np; j += L) {
    V x;
    vload(x, sr + j);
    x -= lse;
    if constexpr (std::is_same_v<T, float>) {
      vexp<VB>(x);
    } else {
      for (int i = 0; i < L; ++i) x[i] = std::exp(x[i]);
    }
    vstore(sr + j, x);
  }
}

// Backward: dS = P (dP - rowsum(P dP)) in place of dP, for one row.
template <typename T, int VB>
inline void dscore_row(const T* pr, T* gr, int64_t Np) {
  using V = typename Vec<T, VB>::type;
  constexpr int L = VB / sizeof(T);
  V acc = V{};
  for (int64_t j = 0; j < Np; j += L) {
    V p, g;
    vload(p, pr + j);
    vload(g, gr + j);
    acc += p * g;
  }
  const T D = hsum<T, VB>(acc);
  for (int64_t j = 0; j < Np; j += L) {
    V p, g;
    vload(p, pr + j);
    vload(g, gr + j);
    vstore(gr + j, p * (g - D));
  }
}

// ----------------------------------------------------------------------------------------------
// Per-call arguments
// ----------------------------------------------------------------------------------------------

template <typename S, typename T>
struct Args {
  Geometry g;
  const S* qkv;
  int64_t qs_b, qs_h, qs_w;          // qkv strides (elements) of B, H, W; channel stride 1
  const T* bias;                     // (nH, N, N) dense relative bias, or null
  const int32_t* bias_index;         // (N, N) table row of each pair, or null
  int64_t table_rows;
  const T* pad;                      // (3C) qkv of a padded token, or null (zeros)
  bool pad_on_tokens;                // pad is the qkv Linear's bias, also added to every image token
  const T* logit;                    // (nH) exp(min(logit_scale, log 100)), or null (not V2)
  const double* logit_raw;           // (nH) logit_scale as given, for the clamp's gradient
  T scale;
  // forward
  S* out;                            // (B, H, W, C) contiguous
  // backward
  const S* dout;
  int64_t ds_b, ds_h, ds_w;
  S* dqkv;                           // (B, H, W, 3C) contiguous
  float* lse_f;                      // lse storage: fp32 unless T is double
  double* lse_d;
};

template <typename T>
struct LseAccess;
template <>
struct LseAccess<float> {
  template <typename A>
  static float* ptr(const A& a) { return a.lse_f; }
};
template <>
struct LseAccess<double> {
  template <typename A>
  static double* ptr(const A& a) { return a.lse_d; }
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Per-thread scratch, 64-byte aligned.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> storage;
  T* base = nullptr;
  int64_t used = 0, cap = 0;
  explicit Scratch(int64_t n) : storage(new T[n + 64 / sizeof(T)]), cap(n) {
    auto addr = reinterpret_cast<uintptr_t>(storage.get());
    base = reinterpret_cast<T*>((addr + 63) & ~uintptr_t(63));
  }
  T* take(int64_t n) {
    T* p = base + used;
    used += round_up(n, 64 / sizeof(T));
    TORCH_INTERNAL_ASSERT(used <= cap, "window_attention: scratch overflow");
    return p;
  }
};

template <typename T, int VB>
struct Tiles {
  static constexpr int L = VB / sizeof(T);
  int64_t N, Np, d, dp;
  T *q, *k, *kt, *vt, *v, *dout, *s, *dp_buf, *o, *dq, *dk, *dv, *qnorm, *knorm;
  Scratch<T> mem;
  Tiles(int64_t N_, int64_t d_)
      : N(N_), Np(round_up(N_, L)), d(d_), dp(round_up(d_, L)),
        mem(10 * round_up(N_, L) * round_up(d_, L) + 2 * round_up(N_, L) * round_up(N_, L) +
            2 * round_up(N_, L) + 14 * L) {
    q = mem.take(Np * dp);
    k = mem.take(Np * dp);
    v = mem.take(Np * dp);
    dout = mem.take(Np * dp);
    o = mem.take(Np * dp);
    dq = mem.take(Np * dp);
    dk = mem.take(Np * dp);
    dv = mem.take(Np * dp);
    kt = mem.take(dp * Np);
    vt = mem.take(dp * Np);
    s = mem.take(Np * Np);
    dp_buf = mem.take(Np * Np);
    qnorm = mem.take(Np);
    knorm = mem.take(Np);
    // zero once: padding lanes/rows of every tile stay zero (gathers only write the live part)
    std::fill(mem.base, mem.base + mem.used, T(0));
  }
};

template <typename T, typename S>
inline T load_as(const S& v) {
  if constexpr (std::is_same_v<T, S>) return v;
  else return static_cast<T>(static_cast<float>(v));
}

// Gather one head's q, k, v rows of a window into row-major tiles (zero-padded to dp columns),
// k also transposed (for q k^T) and, when want_vt, v transposed (for dO v^T). Applies the scale
// to q (or, for cosine attention, normalises q and k and multiplies q by the logit multiplier).
template <typename S, typename T, int VB>
inline void gather_head(const Args<S, T>& a, const WindowTokens& tok, int64_t h, Tiles<T, VB>& t, bool want_vt) {
  const Geometry& g = a.g;
  const int64_t N = g.N, d = g.d, C = g.C, Np = t.Np, dp = t.dp;
  const bool cosine = a.logit != nullptr;
  const T eps = T(1e-12);
  for (int64_t n = 0; n < N; ++n) {
    T* qr = t.q + n * dp;
    T* kr = t.k + n * dp;
    T* vr = t.v + n * dp;
    if (tok.pix[n] >= 0) {
      const int64_t p = tok.pix[n];
      const int64_t b = p / (g.H * g.W), rem = p % (g.H * g.W), y = rem / g.W, x = rem % g.W;
      const S* row = a.qkv + b * a.qs_b + y * a.qs_h + x * a.qs_w + h * d;
      if (a.pad_on_tokens) {
        // the qkv Linear's bias, fused here instead of a broadcast pass over the whole image
        const T* bias = a.pad + h * d;
        for (int64_t c = 0; c < d; ++c) qr[c] = load_as<T>(row[c]) + bias[c];
        for (int64_t c = 0; c < d; ++c) kr[c] = load_as<T>(row[C + c]) + bias[C + c];
        for (int64_t c = 0; c < d; ++c) vr[c] = load_as<T>(row[2 * C + c]) + bias[2 * C + c];
      } else {
        for (int64_t c = 0; c < d; ++c) qr[c] = load_as<T>(row[c]);
        for (int64_t c = 0; c < d; ++c) kr[c] = load_as<T>(row[C + c]);
        for (int64_t c = 0; c < d; ++c) vr[c] = load_as<T>(row[2 * C + c]);
      }
    } else if (a.pad != nullptr) {
      const T* row = a.pad + h * d;
      for (int64_t c = 0; c < d; ++c) qr[c] = row[c];
      for (int64_t c = 0; c < d; ++c) kr[c] = row[C + c];
      for (int64_t c = 0; c < d; ++c) vr[c] = row[2 * C + c];
    } else {
      for (int64_t c = 0; c < d; ++c) qr[c] = kr[c] = vr[c] = T(0);
    }
    if (cosine) {
      T sq = 0, sk = 0;
      for (int64_t c = 0; c < d; ++c) sq += qr[c] * qr[c];
      for (int64_t c = 0; c < d; ++c) sk += kr[c] * kr[c];
      const T nq = std::sqrt(sq), nk = std::sqrt(sk);
      t.qnorm[n] = nq;
      t.knorm[n] = nk;
      const T fq = a.logit[h] / std::max(nq, eps), fk = T(1) / std::max(nk, eps);
      for (int64_t c = 0; c < d; ++c) qr[c] *= fq;
      for (int64_t c = 0; c < d; ++c) kr[c] *= fk;
    } else {
      for (int64_t c = 0; c < d; ++c) qr[c] *= a.scale;
    }
    for (int64_t c = 0; c < d; ++c) t.kt[c * Np + n] = kr[c];
    if (want_vt)
      for (int64_t c = 0; c < d; ++c) t.vt[c * Np + n] = vr[c];
  }
}

// S (N x Np) = q k^T + bias + mask for one window and head.
template <typename S, typename T, int VB>
inline void scores(const Args<S, T>& a, const WindowTokens& tok, int64_t h, Tiles<T, VB>& t) {
  const int64_t N = a.g.N, Np = t.Np;
  matmul_abt<T, VB>(N, Np, a.g.d, t.q, t.dp, t.kt, Np, t.s, Np);
  if (a.bias != nullptr) {
    const T* bh = a.bias + h * N * N;
    for (int64_t i = 0; i < N; ++i) {
      T* sr = t.s + i * Np;
      const T* br = bh + i * N;
      for (int64_t j = 0; j < N; ++j) sr[j] += br[j];
    }
  }
  if (tok.masked) {
    const T mv = T(kMaskValue);
    for (int64_t i = 0; i < N; ++i) {
      T* sr = t.s + i * Np;
      const int ri = tok.region[i];
      for (int64_t j = 0; j < N; ++j) sr[j] += tok.region[j] != ri ? mv : T(0);
    }
  }
  if (Np > N) {
    // padding columns (no token): excluded from the row max and given ~0 probability
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = N; j < Np; ++j) t.s[i * Np + j] = T(-1e30);
  }
}

template <typename S, typename T, int VB>
inline void forward_items(const Args<S, T>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t N = g.N, d = g.d, C = g.C;
  Tiles<T, VB> t(N, d);
  const int64_t Np = t.Np, dp = t.dp;
  WindowCursor cursor(N);
  const WindowTokens& tok = cursor.cur;
  T* lse = LseAccess<T>::ptr(a);
  const char* qkv_bytes = reinterpret_cast<const char*>(a.qkv);
  auto prefetch = [&](int64_t pix) {
    prefetch_bytes(qkv_row(qkv_bytes, pix, g, a.qs_b, a.qs_h, a.qs_w, sizeof(S)), 3 * C * sizeof(S), false);
    prefetch_bytes(a.out + pix * C, C * sizeof(S), true);
  };
  for (int64_t item = begin; item < end; ++item) {
    const int64_t win = item / g.nH, h = item % g.nH;
    cursor.move_to(g, win, prefetch);
    gather_head<S, T, VB>(a, tok, h, t, false);
    scores<S, T, VB>(a, tok, h, t);
    T* lrow = lse + item * N;
    for (int64_t i = 0; i < N; ++i) lrow[i] = softmax_row<T, VB>(t.s + i * Np, Np);
    matmul_ab<T, VB>(N, dp, N, t.s, Np, 1, t.v, dp, t.o, dp);
    for (int64_t n = 0; n < N; ++n) {
      if (tok.pix[n] < 0) continue;
      S* orow = a.out + tok.pix[n] * C + h * d;
      const T* src = t.o + n * dp;
      for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<S>(src[c]);
    }
  }
}

// Gradient partials of one chunk of work items.
template <typename T>
struct Partials {
  T* table = nullptr;   // (nH, table_rows)
  T* pad = nullptr;     // (3C)
  T* logit = nullptr;   // (nH): sum of <q_hat, dQ'> per head (the logit multiplier's gradient)
};

template <typename S, typename T, int VB>
inline void backward_items(const Args<S, T>& a, int64_t begin, int64_t end, Partials<T> part) {
  const Geometry& g = a.g;
  const int64_t N = g.N, d = g.d, C = g.C;
  Tiles<T, VB> t(N, d);
  const int64_t Np = t.Np, dp = t.dp;
  WindowCursor cursor(N);
  const WindowTokens& tok = cursor.cur;
  const T* lse = LseAccess<T>::ptr(a);
  const bool cosine = a.logit != nullptr;
  const T eps = T(1e-12);
  const char* qkv_bytes = reinterpret_cast<const char*>(a.qkv);
  const char* dout_bytes = reinterpret_cast<const char*>(a.dout);
  auto prefetch = [&](int64_t pix) {
    prefetch_bytes(qkv_row(qkv_bytes, pix, g, a.qs_b, a.qs_h, a.qs_w, sizeof(S)), 3 * C * sizeof(S), false);
    prefetch_bytes(qkv_row(dout_bytes, pix, g, a.ds_b, a.ds_h, a.ds_w, sizeof(S)), C * sizeof(S), false);
    prefetch_bytes(a.dqkv + pix * 3 * C, 3 * C * sizeof(S), true);
  };
  for (int64_t item = begin; item < end; ++item) {
    const int64_t win = item / g.nH, h = item % g.nH;
    cursor.move_to(g, win, prefetch);
    gather_head<S, T, VB>(a, tok, h, t, true);
    for (int64_t n = 0; n < N; ++n) {
      T* dr = t.dout + n * dp;
      if (tok.pix[n] >= 0) {
        const int64_t p = tok.pix[n];
        const int64_t b = p / (g.H * g.W), rem = p % (g.H * g.W), y = rem / g.W, x = rem % g.W;
        const S* src = a.dout + b * a.ds_b + y * a.ds_h + x * a.ds_w + h * d;
        for (int64_t c = 0; c < d; ++c) dr[c] = load_as<T>(src[c]);
      } else {
        for (int64_t c = 0; c < d; ++c) dr[c] = T(0);
      }
    }
    scores<S, T, VB>(a, tok, h, t);
    // P = exp(S - lse)
    const T* lrow = lse + item * N;
    for (int64_t i = 0; i < N; ++i) exp_row<T, VB>(t.s + i * Np, Np, lrow[i]);
    // dP = dO v^T, then dS = P (dP - rowsum(P dP)) in place of dP
    matmul_abt<T, VB>(N, Np, d, t.dout, dp, t.vt, Np, t.dp_buf, Np);
    for (int64_t i = 0; i < N; ++i) dscore_row<T, VB>(t.s + i * Np, t.dp_buf + i * Np, Np);
    if (part.table != nullptr) {
      T* tab = part.table + h * a.table_rows;
      for (int64_t i = 0; i < N; ++i) {
        const T* gr = t.dp_buf + i * Np;
        const int32_t* ir = a.bias_index + i * N;
        for (int64_t j = 0; j < N; ++j) tab[ir[j]] += gr[j];
      }
    }
    // dQ' = dS k', dK' = dS^T q', dV = P^T dO (q', k' as used in the scores)
    matmul_ab<T, VB>(N, dp, N, t.dp_buf, Np, 1, t.k, dp, t.dq, dp);
    matmul_ab<T, VB>(N, dp, N, t.dp_buf, 1, Np, t.q, dp, t.dk, dp);
    matmul_ab<T, VB>(N, dp, N, t.s, 1, Np, t.dout, dp, t.dv, dp);
    if (cosine) {
      // q' = q_hat * m_h, k' = k_hat: d(q_hat) = m_h dQ', dm_h = <q_hat, dQ'> = <q', dQ'> / m_h,
      // then back through x / max(||x||, eps).
      const T m = a.logit[h];
      T dm = 0;
      for (int64_t n = 0; n < N; ++n) {
        T* qh = t.q + n * dp;   // q' = q_hat * m
        T* gq = t.dq + n * dp;
        T dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += qh[c] * gq[c];
        dm += dot / m;
        const T nq = t.qnorm[n];
        if (nq > eps) {
          // d(q_hat) = m gq; dq = (d(q_hat) - q_hat <q_hat, d(q_hat)>) / ||q||, q_hat = q'/m
          const T proj = dot;  // <q_hat, d(q_hat)> = <q'/m, m gq> = <q', gq>
          for (int64_t c = 0; c < d; ++c) gq[c] = (m * gq[c] - (qh[c] / m) * proj) / nq;
        } else {
          for (int64_t c = 0; c < d; ++c) gq[c] = m * gq[c] / eps;
        }
        T* kh = t.k + n * dp;
        T* gk = t.dk + n * dp;
        const T nk = t.knorm[n];
        if (nk > eps) {
          T kd = 0;
          for (int64_t c = 0; c < d; ++c) kd += kh[c] * gk[c];
          for (int64_t c = 0; c < d; ++c) gk[c] = (gk[c] - kh[c] * kd) / nk;
        } else {
          for (int64_t c = 0; c < d; ++c) gk[c] = gk[c] / eps;
        }
      }
      if (part.logit != nullptr) part.logit[h] += dm;
    } else {
      for (int64_t n = 0; n < N; ++n) {
        T* gq = t.dq + n * dp;
        for (int64_t c = 0; c < d; ++c) gq[c] *= a.scale;
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      const T* gq = t.dq + n * dp;
      const T* gk = t.dk + n * dp;
      const T* gv = t.dv + n * dp;
      if (tok.pix[n] >= 0) {
        S* row = a.dqkv + tok.pix[n] * 3 * C + h * d;
        for (int64_t c = 0; c < d; ++c) row[c] = static_cast<S>(gq[c]);
        for (int64_t c = 0; c < d; ++c) row[C + c] = static_cast<S>(gk[c]);
        for (int64_t c = 0; c < d; ++c) row[2 * C + c] = static_cast<S>(gv[c]);
        if (a.pad_on_tokens && part.pad != nullptr) {
          T* pr = part.pad + h * d;
          for (int64_t c = 0; c < d; ++c) pr[c] += gq[c];
          for (int64_t c = 0; c < d; ++c) pr[C + c] += gk[c];
          for (int64_t c = 0; c < d; ++c) pr[2 * C + c] += gv[c];
        }
      } else if (part.pad != nullptr) {
        // a padded query's output is dropped, so its dq is zero: only k and v reach pad_qkv
        T* pr = part.pad + h * d;
        for (int64_t c = 0; c < d; ++c) pr[C + c] += gk[c];
        for (int64_t c = 0; c < d; ++c) pr[2 * C + c] += gv[c];
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Instruction-set dispatch: the same code compiled per target, chosen at run time
// ----------------------------------------------------------------------------------------------

template <typename S, typename T>
__attribute__((flatten)) void forward_base(const Args<S, T>& a, int64_t b, int64_t e) {
  forward_items<S, T, 16>(a, b, e);
}
template <typename S, typename T>
__attribute__((flatten)) void backward_base(const Args<S, T>& a, int64_t b, int64_t e, Partials<T> p) {
  backward_items<S, T, 16>(a, b, e, p);
}
#ifdef VK_HAS_MXCSR  // x86-64: AVX-512 and AVX2 builds of the same code
#define VK_AVX512 "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2"

template <typename S, typename T>
__attribute__((target(VK_AVX512), flatten)) void forward_avx512(const Args<S, T>& a, int64_t b, int64_t e) {
  forward_items<S, T, 64>(a, b, e);
}
template <typename S, typename T>
__attribute__((target("avx2,fma"), flatten)) void forward_avx2(const Args<S, T>& a, int64_t b, int64_t e) {
  forward_items<S, T, 32>(a, b, e);
}
template <typename S, typename T>
__attribute__((target(VK_AVX512), flatten)) void backward_avx512(const Args<S, T>& a, int64_t b, int64_t e,
                                                                   Partials<T> p) {
  backward_items<S, T, 64>(a, b, e, p);
}
template <typename S, typename T>
__attribute__((target("avx2,fma"), flatten)) void backward_avx2(const Args<S, T>& a, int64_t b, int64_t e,
                                                                Partials<T> p) {
  backward_items<S, T, 32>(a, b, e, p);
}
#else  // other architectures: the portable 16-byte-vector build only
template <typename S, typename T>
void forward_avx512(const Args<S, T>& a, int64_t b, int64_t e) { forward_base<S, T>(a, b, e); }
template <typename S, typename T>
void forward_avx2(const Args<S, T>& a, int64_t b, int64_t e) { forward_base<S, T>(a, b, e); }
template <typename S, typename T>
void backward_avx512(const Args<S, T>& a, int64_t b, int64_t e, Partials<T> p) { backward_base<S, T>(a, b, e, p); }
template <typename S, typename T>
void backward_avx2(const Args<S, T>& a, int64_t b, int64_t e, Partials<T> p) { backward_base<S, T>(a, b, e, p); }
#endif

// Flush denormals to zero inside the kernels (restored on exit). Probabilities of masked pairs
// (score - 100) land in the denormal range, and every FMA touching a denormal costs a microcode
// assist of ~100 cycles, which made the kernel several times slower.
struct DenormalsFlushed {
#ifdef VK_HAS_MXCSR
  unsigned int saved;
  DenormalsFlushed() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
  ~DenormalsFlushed() { _mm_setcsr(saved); }
#endif
};

enum class Isa { kAvx512, kAvx2, kBase };

Isa detect_isa() {
#ifndef VK_HAS_MXCSR
  return Isa::kBase;
#else
  static const Isa isa = [] {
    const char* force = std::getenv("VITKERN_CPU_ISA");  // "avx512" | "avx2" | "base": testing aid
    __builtin_cpu_init();
    const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (force != nullptr) {
      const std::string f(force);
      if (f == "base") return Isa::kBase;
      if (f == "avx2" && has2) return Isa::kAvx2;
    }
    return has512 ? Isa::kAvx512 : (has2 ? Isa::kAvx2 : Isa::kBase);
  }();
  return isa;
#endif
}

// ----------------------------------------------------------------------------------------------
// Operator entry points
// ----------------------------------------------------------------------------------------------

void check_inputs(const at::Tensor& qkv, int64_t nH, int64_t Wh, int64_t Ww, int64_t sh, int64_t sw) {
  TORCH_CHECK(qkv.dim() == 4, "window_attention: qkv must be (B, H, W, 3C), got ", qkv.dim(), "-D");
  TORCH_CHECK(qkv.device().is_cpu(), "window_attention: qkv must be a CPU tensor");
  TORCH_CHECK(qkv.stride(3) == 1, "window_attention: qkv's channel stride must be 1");
  TORCH_CHECK(qkv.size(3) % 3 == 0, "window_attention: qkv width must be 3*C");
  TORCH_CHECK(nH > 0 && (qkv.size(3) / 3) % nH == 0, "window_attention: C not divisible by num_heads");
  TORCH_CHECK(Wh > 0 && Ww > 0, "window_attention: window sides must be positive");
  TORCH_CHECK(sh >= 0 && sh < Wh && sw >= 0 && sw < Ww, "window_attention: need 0 <= shift < window");
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Prepared {
  at::Tensor bias_dense;   // (nH, N, N)
  at::Tensor bias_index;   // (N, N) int32
  at::Tensor pad;          // (3C)
  at::Tensor logit;        // (nH) multiplier exp(min(ls, log 100))
  at::Tensor logit_raw;    // (nH) double
};

Prepared prepare(const Geometry& g, at::ScalarType ct, const c10::optional<at::Tensor>& bias_table,
                 const c10::optional<at::Tensor>& pad_qkv, const c10::optional<at::Tensor>& logit_scale) {
  Prepared p;
  const int64_t N = g.N;
  if (bias_table.has_value() && bias_table->defined()) {
    const auto& tb = *bias_table;
    TORCH_CHECK(tb.dim() == 2 && tb.size(0) == (2 * g.Wh - 1) * (2 * g.Ww - 1) && tb.size(1) == g.nH,
                "window_attention: bias_table must be ((2Wh-1)*(2Ww-1), num_heads)");
    auto idx = at::empty({N, N}, at::kInt);
    int32_t* ip = idx.data_ptr<int32_t>();
    for (int64_t a = 0; a < N; ++a)
      for (int64_t b = 0; b < N; ++b) {
        const int64_t ia = a / g.Ww, ja = a % g.Ww, ib = b / g.Ww, jb = b % g.Ww;
        ip[a * N + b] = static_cast<int32_t>((ia - ib + g.Wh - 1) * (2 * g.Ww - 1) + (ja - jb + g.Ww - 1));
      }
    p.bias_index = idx;
    auto tab = tb.detach().to(ct).contiguous();                          // (T, nH)
    p.bias_dense = tab.index_select(0, idx.view(-1).to(at::kLong)).view({N, N, g.nH}).permute({2, 0, 1}).contiguous();
  }
  if (pad_qkv.has_value() && pad_qkv->defined()) {
    TORCH_CHECK(pad_qkv->numel() == 3 * g.C, "window_attention: pad_qkv must have 3*C elements");
    p.pad = pad_qkv->detach().to(ct).contiguous().view(-1);
  }
  if (logit_scale.has_value() && logit_scale->defined()) {
    TORCH_CHECK(logit_scale->numel() == g.nH, "window_attention: logit_scale must have num_heads elements");
    auto raw = logit_scale->detach().to(at::kDouble).contiguous().view(-1);
    p.logit_raw = raw;
    p.logit = raw.clamp_max(std::log(100.0)).exp().to(ct);
  }
  return p;
}

template <typename S, typename T>
Args<S, T> make_args(const Geometry& g, const at::Tensor& qkv, const Prepared& p, double scale, bool pad_on_tokens) {
  Args<S, T> a{};
  a.g = g;
  a.qkv = qkv.data_ptr<S>();
  a.qs_b = qkv.stride(0);
  a.qs_h = qkv.stride(1);
  a.qs_w = qkv.stride(2);
  a.bias = p.bias_dense.defined() ? p.bias_dense.data_ptr<T>() : nullptr;
  a.bias_index = p.bias_index.defined() ? p.bias_index.data_ptr<int32_t>() : nullptr;
  a.table_rows = (2 * g.Wh - 1) * (2 * g.Ww - 1);
  a.pad = p.pad.defined() ? p.pad.data_ptr<T>() : nullptr;
  a.pad_on_tokens = pad_on_tokens && a.pad != nullptr;
  a.logit = p.logit.defined() ? p.logit.data_ptr<T>() : nullptr;
  a.logit_raw = p.logit_raw.defined() ? p.logit_raw.data_ptr<double>() : nullptr;
  a.scale = static_cast<T>(scale);
  return a;
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& qkv_in,
                                                        const c10::optional<at::Tensor>& bias_table,
                                                        const c10::optional<at::Tensor>& pad_qkv,
                                                        const c10::optional<at::Tensor>& logit_scale,
                                                        int64_t num_heads, int64_t win_h, int64_t win_w,
                                                        int64_t shift_h, int64_t shift_w, double scale,
                                                        bool pad_on_tokens) {
  check_inputs(qkv_in, num_heads, win_h, win_w, shift_h, shift_w);
  const at::Tensor qkv = qkv_in;
  const Geometry g = make_geometry(qkv, num_heads, win_h, win_w, shift_h, shift_w);
  const at::ScalarType ct = compute_type(qkv.scalar_type());
  const Prepared p = prepare(g, ct, bias_table, pad_qkv, logit_scale);
  auto out = at::empty({g.B, g.H, g.W, g.C}, qkv.options());
  auto lse = at::empty({g.B * g.nWin, g.nH, g.N}, qkv.options().dtype(ct));
  if (g.items == 0) return {out, lse};
  const Isa isa = detect_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention_fwd", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    Args<S, T> a = make_args<S, T>(g, qkv, p, scale, pad_on_tokens);
    a.out = out.data_ptr<S>();
    if constexpr (std::is_same_v<T, double>) a.lse_d = lse.data_ptr<double>();
    else a.lse_f = lse.data_ptr<float>();
    at::parallel_for(0, g.items, 1, [&](int64_t b, int64_t e) {
      DenormalsFlushed ftz;
      if (isa == Isa::kAvx512) forward_avx512<S, T>(a, b, e);
      else if (isa == Isa::kAvx2) forward_avx2<S, T>(a, b, e);
      else forward_base<S, T>(a, b, e);
    });
  });
  return {out, lse};
}

// Backward into `dqkv` (contiguous (B, H, W, 3C)). dqkv may be qkv itself: a work item reads
// its (window, head) channels of q, k, v into its tiles before it writes the same channels'
// gradients, and no other item touches them, so the gradient can overwrite the input in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_into(
    at::Tensor dqkv, const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& bias_table, const c10::optional<at::Tensor>& pad_qkv,
    const c10::optional<at::Tensor>& logit_scale, int64_t num_heads, int64_t win_h, int64_t win_w, int64_t shift_h,
    int64_t shift_w, double scale, bool need_table_grad, bool need_pad_grad, bool need_logit_grad,
    bool pad_on_tokens) {
  check_inputs(qkv, num_heads, win_h, win_w, shift_h, shift_w);
  const Geometry g = make_geometry(qkv, num_heads, win_h, win_w, shift_h, shift_w);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.B && grad_out.size(1) == g.H && grad_out.size(2) == g.W &&
                  grad_out.size(3) == g.C,
              "window_attention: grad_out must be (B, H, W, C)");
  const at::ScalarType ct = compute_type(qkv.scalar_type());
  const at::Tensor dout = (grad_out.scalar_type() == qkv.scalar_type() && grad_out.stride(3) == 1)
                              ? grad_out
                              : grad_out.to(qkv.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(ct).contiguous();
  TORCH_CHECK(lse.numel() == g.items * g.N, "window_attention: lse has the wrong size");
  const Prepared p = prepare(g, ct, bias_table, pad_qkv, logit_scale);
  need_table_grad = need_table_grad && p.bias_dense.defined();
  need_pad_grad = need_pad_grad && p.pad.defined();
  need_logit_grad = need_logit_grad && p.logit.defined();

  TORCH_CHECK(dqkv.is_contiguous() && dqkv.sizes() == qkv.sizes() && dqkv.scalar_type() == qkv.scalar_type(),
              "window_attention: the qkv gradient buffer must be a contiguous tensor like qkv");
  const int64_t nchunks = std::max<int64_t>(1, std::min(g.items, kMaxChunks));
  const int64_t table_rows = (2 * g.Wh - 1) * (2 * g.Ww - 1);
  // per-chunk partials: [table (nH * rows) | pad (3C) | logit (nH)]
  const int64_t part_stride = (need_table_grad ? g.nH * table_rows : 0) + (need_pad_grad ? 3 * g.C : 0) +
                              (need_logit_grad ? g.nH : 0);
  auto partials = at::zeros({nchunks, std::max<int64_t>(part_stride, 1)}, qkv.options().dtype(ct));
  const Isa isa = detect_isa();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention_bwd", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    Args<S, T> a = make_args<S, T>(g, qkv, p, scale, pad_on_tokens);
    a.dout = dout.data_ptr<S>();
    a.ds_b = dout.stride(0);
    a.ds_h = dout.stride(1);
    a.ds_w = dout.stride(2);
    a.dqkv = dqkv.data_ptr<S>();
    if constexpr (std::is_same_v<T, double>) a.lse_d = const_cast<double*>(lse.data_ptr<double>());
    else a.lse_f = const_cast<float*>(lse.data_ptr<float>());
    T* part_base = partials.data_ptr<T>();
    const int64_t pstride = partials.size(1);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      DenormalsFlushed ftz;
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t ib = c * g.items / nchunks, ie = (c + 1) * g.items / nchunks;
        T* base = part_base + c * pstride;
        Partials<T> pt;
        if (need_table_grad) { pt.table = base; base += g.nH * table_rows; }
        if (need_pad_grad) { pt.pad = base; base += 3 * g.C; }
        if (need_logit_grad) { pt.logit = base; }
        if (isa == Isa::kAvx512) backward_avx512<S, T>(a, ib, ie, pt);
        else if (isa == Isa::kAvx2) backward_avx2<S, T>(a, ib, ie, pt);
        else backward_base<S, T>(a, ib, ie, pt);
      }
    });
  });

  // Reduce the chunk partials in chunk order (fixed order => reproducible bits).
  at::Tensor total = at::zeros({partials.size(1)}, partials.options());
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "window_attention_reduce", [&] {
    const scalar_t* src = partials.data_ptr<scalar_t>();
    scalar_t* dst = total.data_ptr<scalar_t>();
    const int64_t w = partials.size(1);
    for (int64_t c = 0; c < nchunks; ++c)
      for (int64_t i = 0; i < w; ++i) dst[i] += src[c * w + i];
  });

  at::Tensor dtable, dpad, dlogit;
  int64_t off = 0;
  if (need_table_grad) {
    dtable = total.narrow(0, off, g.nH * table_rows).view({g.nH, table_rows}).t().contiguous()
                 .to(bias_table->scalar_type());
    off += g.nH * table_rows;
  } else {
    dtable = at::empty({0}, qkv.options());
  }
  if (need_pad_grad) {
    dpad = total.narrow(0, off, 3 * g.C).clone().to(pad_qkv->scalar_type()).view(pad_qkv->sizes());
    off += 3 * g.C;
  } else {
    dpad = at::empty({0}, qkv.options());
  }
  if (need_logit_grad) {
    // d logit_scale = dm * m where the clamp passes the gradient (logit_scale <= log 100)
    auto dm = total.narrow(0, off, g.nH).to(at::kDouble);
    auto pass = p.logit_raw.le(std::log(100.0)).to(at::kDouble);
    dlogit = (dm * p.logit.to(at::kDouble) * pass).to(logit_scale->scalar_type()).view(logit_scale->sizes());
  } else {
    dlogit = at::empty({0}, qkv.options());
  }
  return {dtable, dpad, dlogit};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse,
    const c10::optional<at::Tensor>& bias_table, const c10::optional<at::Tensor>& pad_qkv,
    const c10::optional<at::Tensor>& logit_scale, int64_t num_heads, int64_t win_h, int64_t win_w, int64_t shift_h,
    int64_t shift_w, double scale, bool need_table_grad, bool need_pad_grad, bool need_logit_grad,
    bool pad_on_tokens) {
  TORCH_CHECK(qkv.dim() == 4, "window_attention: qkv must be (B, H, W, 3C)");
  auto dqkv = at::empty(qkv.sizes(), qkv.options().memory_format(at::MemoryFormat::Contiguous));
  auto [dtable, dpad, dlogit] = backward_into(dqkv, grad_out, qkv, lse, bias_table, pad_qkv, logit_scale, num_heads,
                                              win_h, win_w, shift_h, shift_w, scale, need_table_grad, need_pad_grad,
                                              need_logit_grad, pad_on_tokens);
  return {dqkv, dtable, dpad, dlogit};
}

// In-place variant: overwrites qkv (contiguous) with its gradient and returns the others.
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_(
    const at::Tensor& grad_out, at::Tensor& qkv, const at::Tensor& lse, const c10::optional<at::Tensor>& bias_table,
    const c10::optional<at::Tensor>& pad_qkv, const c10::optional<at::Tensor>& logit_scale, int64_t num_heads,
    int64_t win_h, int64_t win_w, int64_t shift_h, int64_t shift_w, double scale, bool need_table_grad,
    bool need_pad_grad, bool need_logit_grad, bool pad_on_tokens) {
  TORCH_CHECK(qkv.is_contiguous(), "window_attention: the in-place backward needs a contiguous qkv");
  return backward_into(qkv, grad_out, qkv, lse, bias_table, pad_qkv, logit_scale, num_heads, win_h, win_w, shift_h,
                       shift_w, scale, need_table_grad, need_pad_grad, need_logit_grad, pad_on_tokens);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vitkern_cpu, m) {
  m.def(
      "window_attention_fwd(Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, Tensor? logit_scale, int num_heads, "
      "int win_h, int win_w, int shift_h, int shift_w, float scale, bool pad_on_tokens=False) -> (Tensor out, "
      "Tensor lse)");
  m.def(
      "window_attention_bwd(Tensor grad_out, Tensor qkv, Tensor lse, Tensor? bias_table, Tensor? pad_qkv, "
      "Tensor? logit_scale, int num_heads, int win_h, int win_w, int shift_h, int shift_w, float scale, "
      "bool need_table_grad, bool need_pad_grad, bool need_logit_grad, bool pad_on_tokens=False) -> "
      "(Tensor grad_qkv, Tensor grad_table, Tensor grad_pad, Tensor grad_logit)");
  m.def(
      "window_attention_bwd_(Tensor grad_out, Tensor(a!) qkv, Tensor lse, Tensor? bias_table, Tensor? pad_qkv, "
      "Tensor? logit_scale, int num_heads, int win_h, int win_w, int shift_h, int shift_w, float scale, "
      "bool need_table_grad, bool need_pad_grad, bool need_logit_grad, bool pad_on_tokens=False) -> "
      "(Tensor grad_table, Tensor grad_pad, Tensor grad_logit)");
}

TORCH_LIBRARY_IMPL(vitkern_cpu, CPU, m) {
  m.impl("window_attention_fwd", &window_attention_fwd);
  m.impl("window_attention_bwd", &window_attention_bwd);
  m.impl("window_attention_bwd_", &window_attention_bwd_);
}

#endif  // __cplusplus >= 202002L
