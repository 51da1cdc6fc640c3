// The core of a position-sensitive axial-attention layer on the CPU, as one autograd function
// with a hand-written backward (model/attention.rs, "fused core"): from the layer's normalized
// q, k, v and its gathered relative embeddings to the two outputs per channel, through
//
//   qk[i,j] = sum_c q[c,i] k[c,j]      qr[i,j] = sum_c q[c,i] e_q[c,i,j]
//   kr[i,j] = sum_c k[c,j] e_k[c,j,i]
//   s = sum_t bn_similarity_t(x_t)     (x_0, x_1, x_2 = qk, qr, kr; batch statistics in training)
//   p = softmax_j(s, out-of-window pairs masked)
//   sv[c,i] = sum_j p[i,j] v[c,j]      sve[c,i] = sum_j p[i,j] e_v[c,i,j]
//
// per (batch row, head) block, every intermediate of a block in cache. The separate ATen
// operations it replaces run the same arithmetic over the whole batch in about 25 passes
// (three einsums with their permuting copies, a cat, a batch norm, a sum, a softmax, two more
// einsums and a cat, and as many again backwards); on the attention layers of small inputs
// (an axis of 4 to 16, 4 to 32 channels per head) those passes, not the multiply-adds, were the
// time.
//
// Batch statistics need the whole batch before any block can be normalized, so the forward
// makes two passes over the blocks (logits and their sums; then normalize, softmax, outputs)
// and the backward two (softmax and value gradients and the batch-norm sums; then the logits'
// gradients). Every sum over blocks is taken in a fixed order: per block (or per fixed chunk
// of blocks) partial sums, added up serially, so results do not depend on the thread count.
// Errors come back as text, never as exceptions across the C ABI.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include "group.hpp"
#include "shim_error.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Blocks are summed into the embeddings' gradients in this many chunks (fixed, so that the
// order of the additions does not depend on the number of threads).
constexpr int64_t kChunks = 16;

// Every inner loop runs along a contiguous axis of length L; the per-block kernels are
// compiled for AVX-512, AVX2 + FMA and plain x86-64, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AXIAL_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AXIAL_KERNEL
#endif
// What the kernels call is inlined into them, so that it is compiled for the clone's ISA.
#define AXIAL_INLINE inline __attribute__((always_inline))

struct Geometry {
  int64_t batch;  // B: batch rows (images x the other axis)
  int64_t heads;  // G
  int64_t gp;     // channels per head of v (q and k have gp / 2)
  int64_t len;    // L: the attended axis
  int64_t qoff;   // first channel of q in a head's 2 gp channels of qkv
  int64_t koff;   // first channel of k; v starts at gp

  int64_t c() const { return gp / 2; }
  int64_t ll() const { return len * len; }
  int64_t blocks() const { return batch * heads; }
  int64_t chunk_begin(int64_t chunk) const { return blocks() * chunk / kChunks; }
};

// The statistics and coefficients a block's kernels need from the whole batch, per head.
struct Norm {
  float a[3];   // the three terms' scales: gamma invstd
  float shift;  // sum over the terms of beta - a mean
  float kx[3];  // backward in training: d x_t = a ds + kx x_t + k0
  float k0[3];
};

// Pointers of one block's tensors, and the geometry, for the kernels.
struct Block {
  const float* q;  // [c, L]
  const float* k;  // [c, L]
  const float* v;  // [gp, L]
  int64_t c, gp, L;
};

Block block(const Geometry& g, const float* qkv, int64_t n) {
  const float* blk = qkv + n * 2 * g.gp * g.len;
  return {blk + g.qoff * g.len, blk + g.koff * g.len, blk + g.gp * g.len, g.c(), g.gp, g.len};
}

AXIAL_INLINE void transpose(const float* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) dst[j * n + i] = src[i * n + j];
}

// ---------------------------------------------------------------------------------------------
// The kernels of one block. Row r of an [L, L] matrix M is M[r]; a transposed matrix (suffix
// t) holds M[j][i] at [i][j], so that adding up its rows gives one value per row of M, in
// lanes. Stored per block: the logits x ([3, L, L], row-major) and the softmax weights,
// transposed (pt).
// ---------------------------------------------------------------------------------------------

// exp(x) for x <= 0 (a softmax's shifted logits), exactly 0 below -87.3 (and for -inf):
// Cephes' expf (range reduction by ln 2, degree-5 polynomial), within 2 ulp of libm's.
template <typename F, typename I>
AXIAL_INLINE F exp_nonpositive(F x) {
  const I under = x < -87.3f;
  x = under ? F{} : x;
  const F t = x * 1.44269504088896341f + 0.5f;
  F n = __builtin_convertvector(__builtin_convertvector(t, I), F);  // truncated
  n = n > t ? n - 1.0f : n;                                          // floor
  const F r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const F scale = (F)((__builtin_convertvector(n, I) + 127) << 23);
  return under ? F{} : p * scale;
}

// Rows as vectors of L lanes (GCC vector extensions; each clone lowers them to its own
// registers: one zmm for 16 floats with AVX-512, two ymm with AVX2, four xmm without).
template <int L>
struct Lanes;
#define AXIAL_LANES(N)                                                 \
  template <>                                                          \
  struct Lanes<N> {                                                    \
    typedef float F __attribute__((vector_size(4 * N), aligned(4)));   \
    typedef int32_t I __attribute__((vector_size(4 * N), aligned(4))); \
    typedef double D __attribute__((vector_size(8 * N), aligned(8)));  \
  };
AXIAL_LANES(4)
AXIAL_LANES(8)
AXIAL_LANES(16)
AXIAL_LANES(32)
#undef AXIAL_LANES

template <int L>
struct Vec {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  using D = typename Lanes<L>::D;
  static constexpr int64_t LL = int64_t{L} * L;

  static AXIAL_INLINE F ld(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static AXIAL_INLINE void st(float* p, F v) { std::memcpy(p, &v, sizeof v); }
  static AXIAL_INLINE D wide(F v) { return __builtin_convertvector(v, D); }
  static AXIAL_INLINE double hsum(D v) {
    double s = 0.0;
    for (int k = 0; k < L; ++k) s += v[k];
    return s;
  }

  // Logits x ([3, L, L]); part[t] = sum x_t, part[3 + t] = sum x_t^2.
  static AXIAL_INLINE void logits(Block b, const float* __restrict eq, const float* __restrict ekt,
                     float* __restrict x, double* __restrict part) {
    D s[3] = {}, ss[3] = {};
    for (int64_t i = 0; i < L; ++i) {
      F qk = {}, qr = {}, kr = {};
      for (int64_t ch = 0; ch < b.c; ++ch) {
        const float qi = b.q[ch * L + i];
        const F kc = ld(b.k + ch * L);
        qk += qi * kc;
        qr += qi * ld(eq + ch * LL + i * L);
        kr += kc * ld(ekt + ch * LL + i * L);  // kr[i, j] = sum_c k[c, j] e_k[c, j, i]
      }
      st(x + i * L, qk);
      st(x + LL + i * L, qr);
      st(x + 2 * LL + i * L, kr);
      const F rows[3] = {qk, qr, kr};
      for (int t = 0; t < 3; ++t) {
        const D w = wide(rows[t]);
        s[t] += w;
        ss[t] += w * w;
      }
    }
    for (int t = 0; t < 3; ++t) {
      part[t] = hsum(s[t]);
      part[3 + t] = hsum(ss[t]);
    }
  }

  // Softmax weights (transposed, into pt) and outputs o ([gp, 2, L]: sv, sve). maskt: the
  // additive mask (0 or -inf), transposed, or null. scratch: L * L.
  static AXIAL_INLINE void outputs(Block b, const float* __restrict x, const Norm& nm,
                      const float* __restrict maskt, const float* __restrict evt,
                      float* __restrict pt, float* __restrict o, float* __restrict scratch) {
    for (int64_t i = 0; i < L; ++i) {
      const F sim = nm.a[0] * ld(x + i * L) + nm.a[1] * ld(x + LL + i * L) +
                    nm.a[2] * ld(x + 2 * LL + i * L) + nm.shift;
      st(scratch + i * L, sim);
    }
    transpose(scratch, pt, L);  // pt[j]: the logits of key j, for every query i
    if (maskt != nullptr) {
      for (int64_t j = 0; j < L; ++j) st(pt + j * L, ld(pt + j * L) + ld(maskt + j * L));
    }
    F mx = ld(pt);
    for (int64_t j = 1; j < L; ++j) {
      const F r = ld(pt + j * L);
      mx = r > mx ? r : mx;
    }
    F sum = {};
    for (int64_t j = 0; j < L; ++j) {
      const F e = exp_nonpositive<F, I>(ld(pt + j * L) - mx);
      st(pt + j * L, e);
      sum += e;
    }
    const F inv = 1.0f / sum;
    for (int64_t j = 0; j < L; ++j) st(pt + j * L, ld(pt + j * L) * inv);
    for (int64_t ch = 0; ch < b.gp; ++ch) {
      F sv = {}, sve = {};
      const float* vc = b.v + ch * L;
      const float* evc = evt + ch * LL;
      for (int64_t j = 0; j < L; ++j) {
        const F pj = ld(pt + j * L);
        sv += vc[j] * pj;            // sv[i] += v[j] p[i, j]
        sve += ld(evc + j * L) * pj;  // sve[i] += e_v[i, j] p[i, j]
      }
      st(o + ch * 2 * L, sv);
      st(o + ch * 2 * L + L, sve);
    }
  }

  // Backward, pass 1: dv ([gp, L]), d e_v (into dev, [gp, L, L]) and the softmax's backward
  // into ds ([L, L], row-major); part: sum ds, and sum ds x_t. scratch: 3 L * L.
  static AXIAL_INLINE void softmax_backward(Block b, const float* __restrict pt, const float* __restrict o,
                               const float* __restrict evt,
                               const float* __restrict x, float* __restrict dv,
                               float* __restrict dev, float* __restrict ds,
                               double* __restrict part, float* __restrict scratch) {
    float* p = scratch;
    float* dpt = scratch + LL;
    float* dst = scratch + 2 * LL;
    transpose(pt, p, L);
    for (int64_t j = 0; j < L; ++j) st(dpt + j * L, F{});
    for (int64_t ch = 0; ch < b.gp; ++ch) {
      const float* dsv = o + ch * 2 * L;
      const float* dsve = dsv + L;
      const F dsvv = ld(dsv), dsvev = ld(dsve);
      F dvc = {};
      const float* vc = b.v + ch * L;
      const float* evtc = evt + ch * LL;
      float* devc = dev + ch * LL;
      for (int64_t i = 0; i < L; ++i) {
        const F pi = ld(p + i * L);
        dvc += dsv[i] * pi;                                 // dv[j] += d sv[i] p[i, j]
        st(devc + i * L, ld(devc + i * L) + dsve[i] * pi);  // d e_v[i, j] += d sve[i] p[i, j]
      }
      st(dv + ch * L, dvc);
      for (int64_t j = 0; j < L; ++j) {
        // dp[i, j] += d sv[i] v[j] + d sve[i] e_v[i, j], held transposed (lanes: i)
        st(dpt + j * L, ld(dpt + j * L) + dsvv * vc[j] + dsvev * ld(evtc + j * L));
      }
    }
    F rs = {};
    for (int64_t j = 0; j < L; ++j) rs += ld(pt + j * L) * ld(dpt + j * L);
    for (int64_t j = 0; j < L; ++j) st(dst + j * L, ld(pt + j * L) * (ld(dpt + j * L) - rs));
    transpose(dst, ds, L);
    D s = {}, sx[3] = {};
    for (int64_t i = 0; i < L; ++i) {
      const D d = wide(ld(ds + i * L));
      s += d;
      for (int t = 0; t < 3; ++t) sx[t] += d * wide(ld(x + t * LL + i * L));
    }
    part[0] = hsum(s);
    for (int t = 0; t < 3; ++t) part[1 + t] = hsum(sx[t]);
  }

  // Backward, pass 2: the logits' gradients from ds (the batch norm's backward), then dq, dk
  // ([c, L]), d e_q (into deq) and d e_k (into dekt, transposed). scratch: 5 L * L.
  static AXIAL_INLINE void logits_backward(Block b, const float* __restrict ds, const float* __restrict x,
                              const Norm& nm, bool train, const float* __restrict eqt,
                              const float* __restrict ekt, float* __restrict dq,
                              float* __restrict dk, float* __restrict deq,
                              float* __restrict dekt, float* __restrict scratch) {
    float* dqk = scratch;
    float* dqr = scratch + LL;
    float* dkr = scratch + 2 * LL;
    float* dqkt = scratch + 3 * LL;
    float* dqrt = scratch + 4 * LL;
    float* dx[3] = {dqk, dqr, dkr};
    for (int t = 0; t < 3; ++t) {
      for (int64_t i = 0; i < L; ++i) {
        F d = nm.a[t] * ld(ds + i * L);
        if (train) d += nm.kx[t] * ld(x + t * LL + i * L) + nm.k0[t];
        st(dx[t] + i * L, d);
      }
    }
    transpose(dqk, dqkt, L);
    transpose(dqr, dqrt, L);
    for (int64_t ch = 0; ch < b.c; ++ch) {
      const float* qc = b.q + ch * L;
      const float* kc = b.k + ch * L;
      const F kv = ld(kc);
      F dqc = {}, dkc = {};
      const float* eqc = eqt + ch * LL;
      const float* ekc = ekt + ch * LL;
      float* deqc = deq + ch * LL;
      float* dektc = dekt + ch * LL;
      for (int64_t r = 0; r < L; ++r) {
        // (r is j) dq[i] += d qk[i, j] k[j] + d qr[i, j] e_q[i, j]
        dqc += kc[r] * ld(dqkt + r * L) + ld(dqrt + r * L) * ld(eqc + r * L);
        // (r is i) dk[j] += d qk[i, j] q[i] + d kr[i, j] e_k[j, i]
        const F dkrr = ld(dkr + r * L);
        dkc += qc[r] * ld(dqk + r * L) + dkrr * ld(ekc + r * L);
        // d e_q[i, j] += d qr[i, j] q[i];  d e_k[j, i] += d kr[i, j] k[j] (transposed)
        st(deqc + r * L, ld(deqc + r * L) + qc[r] * ld(dqr + r * L));
        st(dektc + r * L, ld(dektc + r * L) + dkrr * kv);
      }
      st(dq + ch * L, dqc);
      st(dk + ch * L, dkc);
    }
  }
};

// The same kernels for any L, on scalars (axes of other lengths: 1, 2, 7, 14, 28, 56, ...).
struct Scalar {
  static AXIAL_INLINE void logits(Block b, const float* __restrict eq, const float* __restrict ekt,
                     float* __restrict x, double* __restrict part) {
    const int64_t L = b.L, LL = L * L;
    std::fill(x, x + 3 * LL, 0.0f);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t ch = 0; ch < b.c; ++ch) {
        const float qi = b.q[ch * L + i];
        const float* kc = b.k + ch * L;
        const float* eqr = eq + ch * LL + i * L;
        const float* ekr = ekt + ch * LL + i * L;
        for (int64_t j = 0; j < L; ++j) {
          x[i * L + j] += qi * kc[j];
          x[LL + i * L + j] += qi * eqr[j];
          x[2 * LL + i * L + j] += kc[j] * ekr[j];
        }
      }
    }
    for (int t = 0; t < 3; ++t) {
      double s = 0.0, ss = 0.0;
      for (int64_t e = 0; e < LL; ++e) {
        const double v = x[t * LL + e];
        s += v;
        ss += v * v;
      }
      part[t] = s;
      part[3 + t] = ss;
    }
  }

  static AXIAL_INLINE void outputs(Block b, const float* __restrict x, const Norm& nm,
                      const float* __restrict maskt, const float* __restrict evt,
                      float* __restrict pt, float* __restrict o, float* __restrict scratch) {
    const int64_t L = b.L, LL = L * L;
    for (int64_t e = 0; e < LL; ++e)
      scratch[e] = nm.a[0] * x[e] + nm.a[1] * x[LL + e] + nm.a[2] * x[2 * LL + e] + nm.shift;
    transpose(scratch, pt, L);
    if (maskt != nullptr) {
      for (int64_t e = 0; e < LL; ++e) pt[e] += maskt[e];
    }
    for (int64_t i = 0; i < L; ++i) {
      float mx = pt[i];
      for (int64_t j = 1; j < L; ++j) mx = std::max(mx, pt[j * L + i]);
      float sum = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        const float d = pt[j * L + i] - mx;
        const float e = d < -87.3f ? 0.0f : std::exp(d);
        pt[j * L + i] = e;
        sum += e;
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < L; ++j) pt[j * L + i] *= inv;
    }
    for (int64_t ch = 0; ch < b.gp; ++ch) {
      float* sv = o + ch * 2 * L;
      float* sve = sv + L;
      std::fill(sv, sv + 2 * L, 0.0f);
      for (int64_t j = 0; j < L; ++j) {
        for (int64_t i = 0; i < L; ++i) {
          sv[i] += b.v[ch * L + j] * pt[j * L + i];
          sve[i] += evt[ch * LL + j * L + i] * pt[j * L + i];
        }
      }
    }
  }

  static AXIAL_INLINE void softmax_backward(Block b, const float* __restrict pt, const float* __restrict o,
                               const float* __restrict evt,
                               const float* __restrict x, float* __restrict dv,
                               float* __restrict dev, float* __restrict ds,
                               double* __restrict part, float* __restrict scratch) {
    const int64_t L = b.L, LL = L * L;
    float* p = scratch;
    float* dp = scratch + LL;
    transpose(pt, p, L);
    std::fill(dp, dp + LL, 0.0f);
    for (int64_t ch = 0; ch < b.gp; ++ch) {
      const float* dsv = o + ch * 2 * L;
      const float* dsve = dsv + L;
      float* dvc = dv + ch * L;
      std::fill(dvc, dvc + L, 0.0f);
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t j = 0; j < L; ++j) {
          const float pij = p[i * L + j];
          dvc[j] += dsv[i] * pij;
          dev[ch * LL + i * L + j] += dsve[i] * pij;
          dp[i * L + j] += dsv[i] * b.v[ch * L + j] + dsve[i] * evt[ch * LL + j * L + i];
        }
      }
    }
    double s = 0.0, sx[3] = {0.0, 0.0, 0.0};
    for (int64_t i = 0; i < L; ++i) {
      float rs = 0.0f;
      for (int64_t j = 0; j < L; ++j) rs += p[i * L + j] * dp[i * L + j];
      for (int64_t j = 0; j < L; ++j) {
        const int64_t e = i * L + j;
        ds[e] = p[e] * (dp[e] - rs);
        s += ds[e];
        for (int t = 0; t < 3; ++t) sx[t] += static_cast<double>(ds[e]) * x[t * LL + e];
      }
    }
    part[0] = s;
    for (int t = 0; t < 3; ++t) part[1 + t] = sx[t];
  }

  static AXIAL_INLINE void logits_backward(Block b, const float* __restrict ds, const float* __restrict x,
                              const Norm& nm, bool train, const float* __restrict eqt,
                              const float* __restrict ekt, float* __restrict dq,
                              float* __restrict dk, float* __restrict deq,
                              float* __restrict dekt, float* __restrict scratch) {
    const int64_t L = b.L, LL = L * L;
    float* dx = scratch;  // [3, L, L]
    for (int t = 0; t < 3; ++t) {
      for (int64_t e = 0; e < LL; ++e) {
        float d = nm.a[t] * ds[e];
        if (train) d += nm.kx[t] * x[t * LL + e] + nm.k0[t];
        dx[t * LL + e] = d;
      }
    }
    for (int64_t ch = 0; ch < b.c; ++ch) {
      const float* qc = b.q + ch * L;
      const float* kc = b.k + ch * L;
      float* dqc = dq + ch * L;
      float* dkc = dk + ch * L;
      std::fill(dqc, dqc + L, 0.0f);
      std::fill(dkc, dkc + L, 0.0f);
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t j = 0; j < L; ++j) {
          const int64_t e = i * L + j;
          dqc[i] += dx[e] * kc[j] + dx[LL + e] * eqt[ch * LL + j * L + i];
          dkc[j] += dx[e] * qc[i] + dx[2 * LL + e] * ekt[ch * LL + i * L + j];
          deq[ch * LL + e] += dx[LL + e] * qc[i];
          dekt[ch * LL + e] += dx[2 * LL + e] * kc[j];
        }
      }
    }
  }
};

// The four passes of the layer, each over blocks [begin, end) with a kernel set K, compiled
// per instruction set.
template <typename K>
AXIAL_KERNEL void logits_pass(const Geometry& g, const float* qkv, const float* eq,
                              const float* ekt, float* xs, double* parts, int64_t begin,
                              int64_t end) {
  const int64_t LL = g.ll();
  for (int64_t n = begin; n < end; ++n)
    K::logits(block(g, qkv, n), eq, ekt, xs + n * 3 * LL, parts + n * 6);
}

template <typename K>
AXIAL_KERNEL void outputs_pass(const Geometry& g, const float* qkv, const float* xs,
                               const Norm* norms, const float* maskt, const float* evt,
                               float* pts, float* outs, float* scratch, int64_t begin,
                               int64_t end) {
  const int64_t LL = g.ll();
  for (int64_t n = begin; n < end; ++n)
    K::outputs(block(g, qkv, n), xs + n * 3 * LL, norms[n % g.heads], maskt, evt, pts + n * LL,
               outs + n * g.gp * 2 * g.len, scratch);
}

template <typename K>
AXIAL_KERNEL void softmax_backward_pass(const Geometry& g, const float* qkv, const float* pts,
                                        const float* dout, const float* evt,
                                        const float* xs, float* gq, float* dev, float* dss,
                                        double* parts, float* scratch, int64_t begin,
                                        int64_t end) {
  const int64_t LL = g.ll(), L = g.len, gp = g.gp;
  for (int64_t n = begin; n < end; ++n)
    K::softmax_backward(block(g, qkv, n), pts + n * LL, dout + n * gp * 2 * L, evt,
                        xs + n * 3 * LL, gq + n * 2 * gp * L + gp * L, dev, dss + n * LL,
                        parts + n * 4, scratch);
}

template <typename K>
AXIAL_KERNEL void logits_backward_pass(const Geometry& g, const float* qkv, const float* dss,
                                       const float* xs, const Norm* norms, bool train,
                                       const float* eqt, const float* ekt, float* gq,
                                       float* deq, float* dekt, float* scratch, int64_t begin,
                                       int64_t end) {
  const int64_t LL = g.ll(), L = g.len;
  for (int64_t n = begin; n < end; ++n) {
    float* gblk = gq + n * 2 * g.gp * L;
    K::logits_backward(block(g, qkv, n), dss + n * LL, xs + n * 3 * LL, norms[n % g.heads],
                       train, eqt, ekt, gblk + g.qoff * L, gblk + g.koff * L, deq, dekt,
                       scratch);
  }
}

// Calls f with the kernel set for the axis length: rows as vectors for 4, 8, 16 and 32,
// scalars for the others.
template <typename F>
void with_kernels(int64_t len, F&& f) {
  switch (len) {
    case 4: return f(Vec<4>{});
    case 8: return f(Vec<8>{});
    case 16: return f(Vec<16>{});
    case 32: return f(Vec<32>{});
    default: return f(Scalar{});
  }
}

struct Forward {
  at::Tensor out;           // [B, G, gp, 2, L]
  at::Tensor x;             // [B * G, 3, L, L] logits
  at::Tensor pt;            // [B * G, L, L] softmax weights, transposed per block
  at::Tensor mean, invstd;  // [3 G] the statistics used
  double count = 0.0;       // logits per channel behind the statistics (all ranks')
};

// Sums a few per-channel values over the ranks of `group` in place (float64, one all-reduce);
// nothing without a group.
void sum_over_ranks(const axial::Group* group, std::vector<double>& values) {
  if (group == nullptr) return;
  at::Tensor t = at::tensor(values, at::TensorOptions().dtype(at::kDouble));
  axial::sum_over_ranks(*group, t);
  const double* summed = t.data_ptr<double>();
  std::copy(summed, summed + values.size(), values.begin());
}

// Per-channel transposes of the embeddings: embt[c, i, j] = emb[c, j, i].
at::Tensor transposed(const at::Tensor& emb) { return emb.transpose(1, 2).contiguous(); }

// group: in training, the statistics are those of every rank's batch (synchronized batch
// norm): the per-channel sums and the count are summed over the ranks, one all-reduce.
Forward forward_impl(const Geometry& g, const at::Tensor& qkv_t, const at::Tensor& emb_t,
                     const at::Tensor& gamma_t, const at::Tensor& beta_t,
                     const at::Tensor& running_mean, const at::Tensor& running_var,
                     const at::Tensor& mask_t, bool train, double momentum, double eps,
                     const axial::Group* group) {
  const int64_t L = g.len, LL = g.ll(), c = g.c(), G = g.heads, nb = g.blocks();
  auto opts = qkv_t.options();
  Forward f;
  f.out = at::empty({g.batch, G, g.gp, 2, L}, opts);
  f.x = at::empty({nb, 3, L, L}, opts);
  f.pt = at::empty({nb, L, L}, opts);
  const at::Tensor embt_t = transposed(emb_t);
  const float* qkv = qkv_t.data_ptr<float>();
  const float* eq = emb_t.data_ptr<float>();
  const float* embt = embt_t.data_ptr<float>();
  float* xs = f.x.data_ptr<float>();

  std::vector<double> parts(static_cast<size_t>(nb) * 6);
  with_kernels(L, [&](auto k) {
    using K = decltype(k);
    at::parallel_for(0, nb, 16, [&](int64_t begin, int64_t end) {
      logits_pass<K>(g, qkv, eq, embt + c * LL, xs, parts.data(), begin, end);
    });
  });
  std::vector<double> mean(3 * G), invstd(3 * G);
  auto rm = running_mean.accessor<float, 1>();
  auto rv = running_var.accessor<float, 1>();
  if (train) {
    // Per channel t G + h: sum x (at ch), sum x^2 (at 3 G + ch); the count last.
    std::vector<double> sums(6 * G + 1, 0.0);
    for (int t = 0; t < 3; ++t) {
      for (int64_t h = 0; h < G; ++h) {
        double s = 0.0, ss = 0.0;
        for (int64_t b = 0; b < g.batch; ++b) {
          s += parts[(b * G + h) * 6 + t];
          ss += parts[(b * G + h) * 6 + 3 + t];
        }
        sums[t * G + h] = s;
        sums[3 * G + t * G + h] = ss;
      }
    }
    sums[6 * G] = static_cast<double>(g.batch) * LL;
    sum_over_ranks(group, sums);
    const double count = sums[6 * G];
    f.count = count;
    for (int64_t ch = 0; ch < 3 * G; ++ch) {
      const double mu = sums[ch] / count;
      const double var = std::max(sums[3 * G + ch] / count - mu * mu, 0.0);
      mean[ch] = mu;
      invstd[ch] = 1.0 / std::sqrt(var + eps);
      const double unbiased = count > 1.0 ? var * count / (count - 1.0) : var;
      rm[ch] = static_cast<float>((1.0 - momentum) * rm[ch] + momentum * mu);
      rv[ch] = static_cast<float>((1.0 - momentum) * rv[ch] + momentum * unbiased);
    }
  } else {
    for (int64_t ch = 0; ch < 3 * G; ++ch) {
      mean[ch] = rm[ch];
      invstd[ch] = 1.0 / std::sqrt(static_cast<double>(rv[ch]) + eps);
    }
  }
  f.mean = at::tensor(std::vector<float>(mean.begin(), mean.end()), opts);
  f.invstd = at::tensor(std::vector<float>(invstd.begin(), invstd.end()), opts);

  const float* gamma = gamma_t.data_ptr<float>();
  const float* beta = beta_t.data_ptr<float>();
  const float* mf = f.mean.data_ptr<float>();
  const float* sf = f.invstd.data_ptr<float>();
  std::vector<Norm> norms(G);
  for (int64_t h = 0; h < G; ++h) {
    Norm& nm = norms[h];
    nm.shift = 0.0f;
    for (int t = 0; t < 3; ++t) {
      const int64_t ch = t * G + h;
      nm.a[t] = gamma[ch] * sf[ch];
      nm.shift += beta[ch] - nm.a[t] * mf[ch];
      nm.kx[t] = nm.k0[t] = 0.0f;
    }
  }
  // The window as an additive mask (0 inside, -inf outside), transposed like the weights.
  std::vector<float> maskt;
  if (mask_t.numel() > 0) {
    const bool* mask = mask_t.data_ptr<bool>();
    maskt.resize(LL);
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < L; ++j)
        maskt[j * L + i] = mask[i * L + j] ? -std::numeric_limits<float>::infinity() : 0.0f;
  }
  float* pts = f.pt.data_ptr<float>();
  float* outs = f.out.data_ptr<float>();
  with_kernels(L, [&](auto k) {
    using K = decltype(k);
    at::parallel_for(0, nb, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(LL);
      outputs_pass<K>(g, qkv, xs, norms.data(), maskt.empty() ? nullptr : maskt.data(),
                      embt + 2 * c * LL, pts, outs, scratch.data(), begin, end);
    });
  });
  return f;
}

struct Backward {
  at::Tensor qkv, emb, gamma, beta;
};

// group: the batch norm's two sums (sum dy, sum dy x) are summed over the ranks, one
// all-reduce, for the logits' gradients (synchronized batch norm); the scale's and shift's own
// gradients stay this rank's (the gradient all-reduce sums them). count: every rank's.
Backward backward_impl(const Geometry& g, const at::Tensor& qkv_t, const at::Tensor& emb_t,
                       const at::Tensor& gamma_t, const at::Tensor& x_t, const at::Tensor& pt_t,
                       const at::Tensor& mean_t, const at::Tensor& invstd_t,
                       const at::Tensor& dout_t, bool train, double count,
                       const axial::Group* group) {
  const int64_t L = g.len, LL = g.ll(), c = g.c(), G = g.heads, nb = g.blocks();
  const int64_t gp = g.gp;
  auto opts = qkv_t.options();
  Backward r;
  r.qkv = at::empty_like(qkv_t);
  const at::Tensor embt_t = transposed(emb_t);
  const float* qkv = qkv_t.data_ptr<float>();
  const float* embt = embt_t.data_ptr<float>();
  const float* xs = x_t.data_ptr<float>();
  const float* pts = pt_t.data_ptr<float>();
  const float* dout = dout_t.data_ptr<float>();
  float* gq = r.qkv.data_ptr<float>();
  // Per chunk of blocks: d e_q, d e_k (transposed per channel), d e_v.
  const int64_t emb_size = 2 * gp * LL;
  std::vector<float> acc(static_cast<size_t>(kChunks) * emb_size, 0.0f);
  std::vector<float> dss(static_cast<size_t>(nb) * LL);
  std::vector<double> parts(static_cast<size_t>(nb) * 4);
  const float* mf = mean_t.data_ptr<float>();
  const float* sf = invstd_t.data_ptr<float>();

  // Pass 1: the values' gradients, the softmax's backward, and the batch norm's sums.
  with_kernels(L, [&](auto k) {
    using K = decltype(k);
    at::parallel_for(0, kChunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<float> scratch(3 * LL);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        float* dev = acc.data() + chunk * emb_size + 2 * c * LL;
        softmax_backward_pass<K>(g, qkv, pts, dout, embt + 2 * c * LL, xs, gq,
                                 dev, dss.data(), parts.data(), scratch.data(),
                                 g.chunk_begin(chunk), g.chunk_begin(chunk + 1));
      }
    });
  });

  // The batch norm's per-channel sums: d beta = sum dy, d gamma = sum dy xhat (dy, the
  // gradient of each term's normalized logits, is the same for the three terms). local: sum dy
  // per head (at h), sum dy x_t per channel (at G + t G + h).
  const float* gamma = gamma_t.data_ptr<float>();
  std::vector<double> local(4 * G, 0.0);
  for (int64_t h = 0; h < G; ++h) {
    for (int64_t b = 0; b < g.batch; ++b) {
      const double* part = parts.data() + (b * G + h) * 4;
      local[h] += part[0];
      for (int t = 0; t < 3; ++t) local[G + t * G + h] += part[1 + t];
    }
  }
  std::vector<double> global = local;
  if (train) sum_over_ranks(group, global);
  r.gamma = at::empty({3 * G}, opts);
  r.beta = at::empty({3 * G}, opts);
  float* dg = r.gamma.data_ptr<float>();
  float* db = r.beta.data_ptr<float>();
  std::vector<Norm> norms(G);
  for (int64_t h = 0; h < G; ++h) {
    Norm& nm = norms[h];
    nm.shift = 0.0f;
    for (int t = 0; t < 3; ++t) {
      const int64_t ch = t * G + h;
      // xhat = (x - mean) invstd
      dg[ch] = static_cast<float>(sf[ch] * (local[G + ch] - mf[ch] * local[h]));
      db[ch] = static_cast<float>(local[h]);
      const double a = static_cast<double>(gamma[ch]) * sf[ch];
      nm.a[t] = static_cast<float>(a);
      // Training: a (dy - mean(dy) - xhat mean(dy xhat)) = a dy + kx x + k0, the means over
      // the whole (global) batch. (Eval: the statistics are constants.)
      nm.kx[t] = nm.k0[t] = 0.0f;
      if (train) {
        const double mdy = global[h] / count;
        const double mdyx = sf[ch] * (global[G + ch] - mf[ch] * global[h]) / count;
        nm.kx[t] = static_cast<float>(-a * sf[ch] * mdyx);
        nm.k0[t] = static_cast<float>(-a * mdy + a * sf[ch] * mdyx * mf[ch]);
      }
    }
  }

  // Pass 2: the logits' gradients, then q's, k's and their embeddings'.
  with_kernels(L, [&](auto k) {
    using K = decltype(k);
    at::parallel_for(0, kChunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<float> scratch(5 * LL);
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        float* deq = acc.data() + chunk * emb_size;
        logits_backward_pass<K>(g, qkv, dss.data(), xs, norms.data(), train, embt, embt + c * LL,
                                gq, deq, deq + c * LL, scratch.data(), g.chunk_begin(chunk),
                                g.chunk_begin(chunk + 1));
      }
    });
  });

  // The chunks' sums, in chunk order; d e_k back from its transposed layout.
  std::vector<float> total(emb_size, 0.0f);
  for (int64_t chunk = 0; chunk < kChunks; ++chunk) {
    const float* a = acc.data() + chunk * emb_size;
    for (int64_t e = 0; e < emb_size; ++e) total[e] += a[e];
  }
  r.emb = at::empty({2 * gp, L, L}, opts);
  float* ge = r.emb.data_ptr<float>();
  std::copy(total.begin(), total.end(), ge);
  for (int64_t ch = 0; ch < c; ++ch)
    transpose(total.data() + (c + ch) * LL, ge + (c + ch) * LL, L);
  return r;
}

struct AttentionCoreFn : public torch::autograd::Function<AttentionCoreFn> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor qkv, at::Tensor emb, at::Tensor gamma,
                            at::Tensor beta, at::Tensor running_mean, at::Tensor running_var,
                            at::Tensor mask, int64_t heads, int64_t qoff, int64_t koff,
                            bool train, double momentum, double eps, int64_t group) {
    const Geometry g{qkv.size(0), heads, qkv.size(2) / 2, qkv.size(3), qoff, koff};
    Forward f = forward_impl(g, qkv, emb, gamma, beta, running_mean, running_var, mask, train,
                             momentum, eps, reinterpret_cast<const axial::Group*>(group));
    ctx->save_for_backward({qkv, emb, gamma, f.x, f.pt, f.mean, f.invstd});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["qoff"] = qoff;
    ctx->saved_data["koff"] = koff;
    ctx->saved_data["train"] = train;
    ctx->saved_data["count"] = f.count;
    ctx->saved_data["group"] = group;
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& qkv = saved[0];
    const Geometry g{qkv.size(0), ctx->saved_data["heads"].toInt(), qkv.size(2) / 2,
                     qkv.size(3), ctx->saved_data["qoff"].toInt(),
                     ctx->saved_data["koff"].toInt()};
    at::Tensor dout = grads[0].contiguous();
    Backward b = backward_impl(
        g, qkv, saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], dout,
        ctx->saved_data["train"].toBool(), ctx->saved_data["count"].toDouble(),
        reinterpret_cast<const axial::Group*>(ctx->saved_data["group"].toInt()));
    at::Tensor none;
    return {b.qkv, b.emb, b.gamma, b.beta, none, none, none, none, none, none, none, none, none, none};
  }
};

void check(const at::Tensor& t, const char* what, std::vector<int64_t> shape) {
  if (!t.defined() || t.device().type() != at::kCPU || t.scalar_type() != at::kFloat ||
      !t.is_contiguous() || t.sizes() != at::IntArrayRef(shape)) {
    throw std::invalid_argument(std::string("fused attention: ") + what +
                                " must be a contiguous CPU float32 tensor of size " +
                                c10::str(at::IntArrayRef(shape)) + ", got " +
                                (t.defined() ? c10::str(t.sizes(), " ", t.scalar_type(), " on ",
                                                        t.device())
                                             : std::string("none")));
  }
}

}  // namespace

// qkv: [B, G, 2 gp, L] (q at channel qoff, k at koff, v at gp of each head); emb: [2 gp, L, L]
// (e_q, e_k, e_v); gamma, beta, running_mean, running_var: bn_similarity's [3 G] (channel
// t G + g for term t of head g); mask: [L, L] bool (true: out of the window) or null; group:
// an axial::Group (c10d_shim.cpp) whose ranks' batches the training statistics span
// (synchronized batch norm: one all-reduce in the forward, one in the backward), or null.
// *out receives a new [B, G, gp, 2, L] tensor (sv and sve per channel), owned by the caller.
extern "C" int axial_attention_core(at::Tensor* qkv, at::Tensor* emb, at::Tensor* gamma,
                                    at::Tensor* beta, at::Tensor* running_mean,
                                    at::Tensor* running_var, at::Tensor* mask, int64_t heads,
                                    int64_t qoff, int64_t koff, int train, double momentum,
                                    double eps, void* group, at::Tensor** out, char* err,
                                    size_t err_len) {
  try {
    if (qkv->dim() != 4 || qkv->size(1) != heads || qkv->size(2) % 4 != 0 || heads < 1) {
      throw std::invalid_argument("fused attention: qkv must be [B, heads, 2 gp, L] with gp even, got " +
                                  c10::str(qkv->sizes()) + " for " + std::to_string(heads) +
                                  " heads");
    }
    const int64_t B = qkv->size(0), gp = qkv->size(2) / 2, L = qkv->size(3), c = gp / 2;
    if (!((qoff == 0 && koff == c) || (qoff == c && koff == 0))) {
      throw std::invalid_argument("fused attention: q and k must be the first two quarters of a head");
    }
    check(*qkv, "qkv", {B, heads, 2 * gp, L});
    check(*emb, "the embeddings", {2 * gp, L, L});
    for (auto* t : {gamma, beta, running_mean, running_var}) check(*t, "a bn_similarity tensor", {3 * heads});
    // No mask: an empty tensor (autograd's apply wants defined tensors).
    at::Tensor m = at::empty({0}, qkv->options().dtype(at::kBool));
    if (mask != nullptr) {
      m = *mask;
      if (m.device().type() != at::kCPU || m.scalar_type() != at::kBool || !m.is_contiguous() ||
          m.sizes() != at::IntArrayRef({L, L})) {
        throw std::invalid_argument("fused attention: the mask must be a contiguous CPU bool [L, L] tensor");
      }
    }
    // The running statistics are buffers: written in place, outside autograd.
    *out = new at::Tensor(AttentionCoreFn::apply(*qkv, *emb, *gamma, *beta, *running_mean,
                                                 *running_var, m, heads, qoff, koff, train != 0,
                                                 momentum, eps, reinterpret_cast<int64_t>(group)));
    return 0;
  } catch (const std::exception& e) {
    return axial_report(e, err, err_len);
  }
}
