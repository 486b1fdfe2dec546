/* mfdsl's native step loop: SGD / Langevin steps (with momentum and weight decay) of one
 * multilayer network, batch B.
 *
 * Compiled twice by _native.py, with -DREAL=double -DSFX=_f64 and -DREAL=float
 * -DSFX=_f32, into one shared library loaded with ctypes; its interface (the enums and
 * the struct its entry points take) is generated from _native_abi.py, and checked by
 * the fingerprint and layout it exports (at the end of this file) when it is loaded.  It runs a whole chunk of
 * steps of one network in one call, so a step costs no dispatch at all: the ATen path
 * spends ~45 small calls a step, which dominate below width ~400.
 *
 * The network (the torch backend's EnsembleTrainer, one member):
 *   H_i = m_i · (A_i W_i) + b_i,   A_0 = X,   A_{i+1} = φ(H_i),   ŷ = ψ(H_last),
 *   loss: the sum over the minibatch of (ŷ − y)² (mse), softplus(−y ŷ) (logistic) or
 *   log softmax(ŷ)[y] (cross-entropy), which the caller scales by 1/(2B), 1/B, −1/B;
 *   G_last = ∂(batch-mean loss)/∂ŷ ⊙ ψ'(H_last),   G_{i−1} = m_i · (G_i W_iᵀ) ⊙ φ'(H_{i−1}),
 *   W_i ← (1 − η_i wd_i) W_i + A_iᵀ (c_i · G_i)   (c_i = −η_i m_i),
 *   b_i ← b_i − η_b (Σ_batch G_i + wd_b b_i),
 * or with momentum v ← μ v + m_i A_iᵀ G_i + wd_i W_i, W_i ← W_i − η_i v (and likewise
 * for the biases, v_b ← μ v_b + Σ_batch G_i + wd_b b_i); then, with Langevin noise,
 * W_i ← W_i + s_i Z (s_i = √(2 η_i r_i T), Z standard normal, drawn by the caller —
 * by _noise.c or from a torch generator — and passed in), and likewise for the biases that take noise;
 * with W_i stored (fan_in, fan_out) row-major, as the ensemble's member views.
 *
 * Two ways to run a layer, chosen per layer by the caller (gemm[i]):
 *
 * * rows (small minibatches, where a step is memory-bound): each weight row is touched
 *   once in the forward pass (all examples of the minibatch at once, four rows at a
 *   time) and once in the backward pass, where its backward product and its update
 *   share one read–modify–write.  With ReLU a row whose input unit is off for the whole
 *   minibatch is skipped in both passes: its contributions are exact zeros and its
 *   unit's gradient is masked.
 * * gemm (larger minibatches, where a step is bound by its matrix products): the
 *   forward product, the backward product and the rank-B update are three calls of the
 *   BLAS gemm the caller passes (MKL's sgemm_/dgemm_, the one ATen uses), which runs at
 *   the machine's GEMM peak.
 *
 * The activations with an exponential (sigmoid, tanh) use this file's own exp/expm1,
 * vectorisable and accurate to a few ulp, instead of libm's scalar calls.
 *
 * Sums run in an order fixed by this source (and, for gemm layers, by the BLAS, which
 * given the shapes and its thread count does not depend on where the buffers lie), so a
 * network's numbers do not depend on which other networks are trained beside it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#define REAL double
#define SFX _f64
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define NAME(x) CAT(x, SFX)

#ifndef BLOCK_BYTES
/* gemm layers of more than BLOCK_MIN_BYTES go in row blocks of BLOCK_BYTES */
#define BLOCK_BYTES (1 << 19)
#endif
#define BLOCK_MIN_BYTES (1 << 20)

/* independent partial sums of a dot product: two vectors' worth of 64-byte lanes */
#define LANES (128 / (int)sizeof(REAL))

/* the enums (ACT_…, LOSS_…, ACC_…, the coefficients C_… and MF_NCOEF) and struct mf_args,
   the one argument of the entry points: generated from _native_abi.py, their single
   declaration, into the build directory */
#include "_native_abi.h"

/* Fortran BLAS gemm (column-major), as MKL's sgemm_ / dgemm_ */
typedef void (*NAME(gemm_fn))(const char *, const char *, const int *, const int *, const int *, const REAL *,
                              const REAL *, const int *, const REAL *, const int *, const REAL *, REAL *,
                              const int *);

/* row-major C (M × N) ← α · op(A) · op(B) + β · C, op(X) = Xᵀ where t… is set */
static void NAME(rm_gemm)(NAME(gemm_fn) f, int ta, int tb, int64_t M, int64_t N, int64_t K, REAL alpha,
                          const REAL *A, int64_t lda, const REAL *Bm, int64_t ldb, REAL beta, REAL *C,
                          int64_t ldc) {
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    const int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
    /* row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ */
    f(&cb, &ca, &n, &m, &k, &alpha, Bm, &lb, A, &la, &beta, C, &lc);
}

/* ------------------------------------------------------------------ exp and expm1 */

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

#define IS_F64 (sizeof(REAL) == 8)

/* a·b + c: one fused multiply-add where the target has them (the same in vector and
   scalar code, so a sum's value never depends on which of them ran it), else two ops */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MADD(a, b, c) _Generic((REAL)0, float: fmaf, default: fma)((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* e^x − 1 and 2^n of x = n ln2 + r, |r| ≤ ln2/2: q = e^r − 1 by its Taylor series (13
   terms in double, 8 in single: below half an ulp), s = 2^n built from its bits.  x is
   clamped so that s stays normal (e^x then saturates near 0 or near the largest
   finite value; NaN passes). */
INLINE void NAME(exp_parts)(REAL x, REAL *q, REAL *s) {
    REAL lo = IS_F64 ? (REAL)-708.0 : (REAL)-86.0, hi = IS_F64 ? (REAL)709.0 : (REAL)88.0;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    if (IS_F64) {
        const double shift = 6755399441055744.0; /* 1.5 · 2^52: adding it rounds to an integer */
        double t = (double)x * 1.4426950408889634074 + shift;
        double n = t - shift;
        double r = (double)x - n * 0.693147180369123816490; /* ln2 in two parts */
        r = r - n * 1.90821492927058770002e-10;
        double p = 1.0 / 6227020800.0;
        p = MADD(p, r, 1.0 / 479001600.0);
        p = MADD(p, r, 1.0 / 39916800.0);
        p = MADD(p, r, 1.0 / 3628800.0);
        p = MADD(p, r, 1.0 / 362880.0);
        p = MADD(p, r, 1.0 / 40320.0);
        p = MADD(p, r, 1.0 / 5040.0);
        p = MADD(p, r, 1.0 / 720.0);
        p = MADD(p, r, 1.0 / 120.0);
        p = MADD(p, r, 1.0 / 24.0);
        p = MADD(p, r, 1.0 / 6.0);
        p = MADD(p, r, 0.5);
        p = MADD(p, r, 1.0);
        union {
            double d;
            int64_t i;
        } ut = {t}, us;
        us.i = (ut.i - (int64_t)0x4338000000000000LL + 1023) << 52;
        *q = (REAL)(p * r);
        *s = (REAL)us.d;
    } else {
        const float shift = 12582912.0f; /* 1.5 · 2^23 */
        float t = (float)x * 1.44269504088896341f + shift;
        float n = t - shift;
        float r = (float)x - n * 0.693145751953125f; /* ln2 in two parts */
        r = r - n * 1.428606765330187045e-06f;
        float p = 1.0f / 40320.0f;
        p = MADD(p, r, 1.0f / 5040.0f);
        p = MADD(p, r, 1.0f / 720.0f);
        p = MADD(p, r, 1.0f / 120.0f);
        p = MADD(p, r, 1.0f / 24.0f);
        p = MADD(p, r, 1.0f / 6.0f);
        p = MADD(p, r, 0.5f);
        p = MADD(p, r, 1.0f);
        union {
            float f;
            int32_t i;
        } ut = {t}, us;
        us.i = (ut.i - (int32_t)0x4B400000 + 127) << 23;
        *q = (REAL)(p * r);
        *s = (REAL)us.f;
    }
}

/* e^x */
INLINE REAL NAME(fexp)(REAL x) {
    REAL q, s;
    NAME(exp_parts)(x, &q, &s);
    return s * q + s;
}

/* e^x − 1, accurate near 0 */
INLINE REAL NAME(fexpm1)(REAL x) {
    REAL q, s;
    NAME(exp_parts)(x, &q, &s);
    return s * q + (s - (REAL)1);
}

INLINE REAL NAME(fsigmoid)(REAL h) { return (REAL)1 / ((REAL)1 + NAME(fexp)(-h)); }

INLINE REAL NAME(ftanh)(REAL h) {
    REAL m = NAME(fexpm1)((REAL)-2 * (h < 0 ? -h : h)); /* in (−1, 0] */
    REAL t = -m / (m + (REAL)2);
    return h < 0 ? -t : (h > 0 ? t : h); /* keeps h = ±0 and NaN */
}

/* ------------------------------------------------------------------ activations */

static REAL NAME(act1)(int act, REAL h, const double *pl) {
    switch (act) {
    case ACT_RELU:
        return h <= 0 ? (REAL)0 : h; /* NaN passes, as ATen's clamp_min */
    case ACT_PIECEWISE_LINEAR: {
        REAL c = h < (REAL)pl[0] ? (REAL)pl[0] : (h > (REAL)pl[1] ? (REAL)pl[1] : h);
        return (c - (REAL)pl[0]) * (REAL)pl[3] + (REAL)pl[2];
    }
    case ACT_TANH:
        return NAME(ftanh)(h);
    case ACT_SIGMOID:
        return NAME(fsigmoid)(h);
    case ACT_ERF:
        return (REAL)erf((double)h);
    case ACT_GELU:
        return (REAL)(0.5 * (double)h * (1.0 + erf((double)h * 0.70710678118654752440)));
    default:
        return h;
    }
}

/* a[j] = φ(h[j]), j < n (a = h allowed): one simple loop per map, so that the compiler
   vectorises it */
static void NAME(apply_act)(int act, const REAL *h, REAL *a, int64_t n, const double *pl) {
    switch (act) {
    case ACT_RELU:
        for (int64_t j = 0; j < n; j++)
            a[j] = h[j] <= 0 ? (REAL)0 : h[j];
        return;
    case ACT_TANH:
        for (int64_t j = 0; j < n; j++)
            a[j] = NAME(ftanh)(h[j]);
        return;
    case ACT_SIGMOID:
        for (int64_t j = 0; j < n; j++)
            a[j] = NAME(fsigmoid)(h[j]);
        return;
    case ACT_PIECEWISE_LINEAR: {
        const REAL t1 = (REAL)pl[0], t2 = (REAL)pl[1], s1 = (REAL)pl[2], slope = (REAL)pl[3];
        for (int64_t j = 0; j < n; j++) {
            const REAL x = h[j];
            const REAL c = x < t1 ? t1 : (x > t2 ? t2 : x);
            a[j] = (c - t1) * slope + s1;
        }
        return;
    }
    case ACT_IDENTITY:
        if (a != h)
            memcpy(a, h, sizeof(REAL) * (size_t)n);
        return;
    default:
        for (int64_t j = 0; j < n; j++)
            a[j] = NAME(act1)(act, h[j], pl);
    }
}

/* g[j] ← g[j] · φ'(h[j]) given a[j] = φ(h[j]); pl = (t1, t2, s1, slope) of the
   piecewise-linear map */
static void NAME(apply_act_grad)(int act, REAL *restrict g, const REAL *restrict h, const REAL *restrict a,
                                 int64_t n, const double *pl) {
    switch (act) {
    case ACT_RELU:
        for (int64_t j = 0; j < n; j++)
            g[j] = h[j] <= 0 ? (REAL)0 : g[j];
        return;
    case ACT_PIECEWISE_LINEAR: {
        const REAL t1 = (REAL)pl[0], t2 = (REAL)pl[1], slope = (REAL)pl[3];
        for (int64_t j = 0; j < n; j++)
            g[j] = (h[j] <= t1 || h[j] >= t2) ? (REAL)0 : g[j] * slope;
        return;
    }
    case ACT_TANH:
        for (int64_t j = 0; j < n; j++)
            g[j] *= (REAL)1 - a[j] * a[j];
        return;
    case ACT_SIGMOID:
        for (int64_t j = 0; j < n; j++)
            g[j] *= ((REAL)1 - a[j]) * a[j];
        return;
    case ACT_ERF:
        for (int64_t j = 0; j < n; j++)
            g[j] *= (REAL)(1.1283791670955125739 * exp(-(double)h[j] * (double)h[j]));
        return;
    case ACT_GELU:
        for (int64_t j = 0; j < n; j++) {
            double x = (double)h[j];
            g[j] *= (REAL)(0.5 * (1.0 + erf(x * 0.70710678118654752440)) +
                           x * 0.39894228040143267794 * exp(-0.5 * x * x));
        }
        return;
    default:
        return;
    }
}

/* ------------------------------------------------------------------ row kernels */

/* for every example b < B: out[b][o] += Σ_j a[b][j] · rows[idx[j]][o] over the n rows
   listed, four rows at a time (read once for all examples); a is (B × n) */
static void NAME(rows_axpy)(REAL *restrict out, const REAL *restrict W, int64_t fo, const int64_t *idx,
                            const REAL *restrict a, int64_t n, int64_t B) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const REAL *restrict w0 = W + idx[j] * fo, *restrict w1 = W + idx[j + 1] * fo;
        const REAL *restrict w2 = W + idx[j + 2] * fo, *restrict w3 = W + idx[j + 3] * fo;
        for (int64_t bb = 0; bb < B; bb++) {
            const REAL *ab = a + bb * n;
            REAL a0 = ab[j], a1 = ab[j + 1], a2 = ab[j + 2], a3 = ab[j + 3];
            REAL *restrict h = out + bb * fo;
            for (int64_t o = 0; o < fo; o++) {
                REAL x = h[o];
                x = MADD(a0, w0[o], x);
                x = MADD(a1, w1[o], x);
                x = MADD(a2, w2[o], x);
                x = MADD(a3, w3[o], x);
                h[o] = x;
            }
        }
    }
    for (; j < n; j++) {
        const REAL *restrict w0 = W + idx[j] * fo;
        for (int64_t bb = 0; bb < B; bb++) {
            REAL a0 = a[bb * n + j];
            REAL *restrict h = out + bb * fo;
            for (int64_t o = 0; o < fo; o++)
                h[o] = MADD(a0, w0[o], h[o]);
        }
    }
}

/* Σ_o w[o] g[o] in L partial sums (a fixed order), then w[o] += s · u[o]: the body of
   dot_update for L lanes */
#define DOT_UPDATE(L)                                                                                          \
    REAL acc[L];                                                                                               \
    for (int l = 0; l < (L); l++)                                                                              \
        acc[l] = 0;                                                                                            \
    int64_t o = 0;                                                                                             \
    if (update) {                                                                                              \
        for (; o + (L) <= fo; o += (L))                                                                        \
            for (int l = 0; l < (L); l++) {                                                                    \
                REAL x = w[o + l];                                                                             \
                acc[l] += x * g[o + l];                                                                        \
                w[o + l] = x + s * u[o + l];                                                                   \
            }                                                                                                  \
    } else {                                                                                                   \
        for (; o + (L) <= fo; o += (L))                                                                        \
            for (int l = 0; l < (L); l++)                                                                      \
                acc[l] += w[o + l] * g[o + l];                                                                 \
    }                                                                                                          \
    REAL tail = 0;                                                                                             \
    for (; o < fo; o++) {                                                                                      \
        REAL x = w[o];                                                                                         \
        tail += x * g[o];                                                                                      \
        if (update)                                                                                            \
            w[o] = x + s * u[o];                                                                               \
    }                                                                                                          \
    /* the pairwise tree acc[l] += acc[l + v], v = L/2, …, 1, one loop per level so that  \
       the compiler keeps it in registers */                                                                   \
    TREE(L, 16)                                                                                                \
    TREE(L, 8)                                                                                                 \
    TREE(L, 4)                                                                                                 \
    TREE(L, 2)                                                                                                 \
    TREE(L, 1)                                                                                                 \
    return acc[0] + tail;
#define TREE(L, v)                                                                                             \
    if ((L) > (v))                                                                                             \
        for (int l = 0; l < (v); l++)                                                                          \
            acc[l] += acc[l + (v)];

/* short rows (fewer than 4·LANES entries): one vector's worth of partial sums, so that
   the scalar tail and the reduction stay short */
#define SHORT_LANES (32 / (int)sizeof(REAL))

static inline REAL NAME(dot_update_long)(REAL *restrict w, const REAL *restrict g, const REAL *restrict u, REAL s,
                                         int64_t fo, int update) {
    DOT_UPDATE(LANES)
}

static inline REAL NAME(dot_update_short)(REAL *restrict w, const REAL *restrict g, const REAL *restrict u,
                                          REAL s, int64_t fo, int update) {
    DOT_UPDATE(SHORT_LANES)
}

/* dot_update of four rows (w[q] = W + idx[q]·fo, s[q] = a[idx[q]]) at once, sharing the
   loads of g and u: each row's sums run exactly as dot_update runs them */
#define DOT_UPDATE4(L)                                                                                         \
    REAL acc[4][L];                                                                                            \
    REAL *w[4];                                                                                                \
    REAL s[4];                                                                                                 \
    for (int q = 0; q < 4; q++) {                                                                              \
        w[q] = W + idx[q] * fo;                                                                                \
        s[q] = a[idx[q]];                                                                                      \
        for (int l = 0; l < (L); l++)                                                                          \
            acc[q][l] = 0;                                                                                     \
    }                                                                                                          \
    int64_t o = 0;                                                                                             \
    if (update) {                                                                                              \
        for (; o + (L) <= fo; o += (L))                                                                        \
            for (int l = 0; l < (L); l++) {                                                                    \
                const REAL gv = g[o + l], uv = u[o + l];                                                       \
                for (int q = 0; q < 4; q++) {                                                                  \
                    REAL x = w[q][o + l];                                                                      \
                    acc[q][l] += x * gv;                                                                       \
                    w[q][o + l] = x + s[q] * uv;                                                               \
                }                                                                                              \
            }                                                                                                  \
    } else {                                                                                                   \
        for (; o + (L) <= fo; o += (L))                                                                        \
            for (int l = 0; l < (L); l++) {                                                                    \
                const REAL gv = g[o + l];                                                                      \
                for (int q = 0; q < 4; q++)                                                                    \
                    acc[q][l] += w[q][o + l] * gv;                                                             \
            }                                                                                                  \
    }                                                                                                          \
    for (int q = 0; q < 4; q++) {                                                                              \
        REAL tail = 0;                                                                                         \
        for (int64_t t = o; t < fo; t++) {                                                                     \
            REAL x = w[q][t];                                                                                  \
            tail += x * g[t];                                                                                  \
            if (update)                                                                                        \
                w[q][t] = x + s[q] * u[t];                                                                     \
        }                                                                                                      \
        REAL *restrict acq = acc[q];                                                                           \
        TREE4(L, 16)                                                                                           \
        TREE4(L, 8)                                                                                            \
        TREE4(L, 4)                                                                                            \
        TREE4(L, 2)                                                                                            \
        TREE4(L, 1)                                                                                            \
        dots[q] = acq[0] + tail;                                                                               \
    }
#define TREE4(L, v)                                                                                            \
    if ((L) > (v))                                                                                             \
        for (int l = 0; l < (v); l++)                                                                          \
            acq[l] += acq[l + (v)];

static void NAME(dot_update4_long)(REAL *W, int64_t fo, const int64_t *idx, const REAL *restrict g,
                                   const REAL *restrict u, const REAL *a, int update, REAL *dots) {
    DOT_UPDATE4(LANES)
}

/* Σ_o w[o] g[o] in partial sums whose count and order depend on fo alone, then
   w[o] += s · u[o] (where update) */
static inline REAL NAME(dot_update)(REAL *restrict w, const REAL *restrict g, const REAL *restrict u, REAL s,
                                    int64_t fo, int update) {
    if (fo < 4 * LANES)
        return NAME(dot_update_short)(w, g, u, s, fo, update);
    return NAME(dot_update_long)(w, g, u, s, fo, update);
}

/* w[o] += s · z[o] */
static inline void NAME(add_noise)(REAL *restrict w, const REAL *restrict z, REAL s, int64_t n) {
    for (int64_t o = 0; o < n; o++)
        w[o] = MADD(s, z[o], w[o]);
}

/* ------------------------------------------------------------------ the step loop */

/*
 * n SGD (or Langevin) steps of one network; the fields of args (struct mf_args):
 *   nl layers; fin[i], fout[i] their shapes; W[i] (fin × fout), b[i] (fout) or NULL;
 *   mult[i] the forward multipliers; coef[(k·nl + i)·MF_NCOEF + C_…] step k's coefficients
 *   for layer i (unused where frozen); VW[i], VB[i] the momentum buffers (shaped as W[i],
 *   b[i]), VW = VB = NULL without momentum;
 *   trainable[i]; lowest the lowest trainable layer (nl if none);
 *   act the activation φ, out the output map ψ (ACT_IDENTITY, ACT_TANH or ACT_SIGMOID),
 *   loss_kind the loss;
 *   X (n × B × fin[0]) and Y the chunk's data: targets (n × B × fout[nl−1], REAL), or
 *   for cross-entropy labels (n × B, int64);
 *   gemm[i]: layer i runs its products in the BLAS gemm `blas` (which must then be set);
 *   Z (n × zstride) the noise, zoff[2i] and zoff[2i+1] the offsets of layer i's weight
 *   and bias noise in a step's row of Z (−1: none); Z = NULL without noise;
 *   loss[k] ← step k's loss sum (see above), taken before its update.
 * Returns 0, −1 when scratch memory could not be allocated, −2 with gemm layers but no BLAS.
 */
int NAME(mf_sgd)(const struct mf_args *args) {
    const int nl = args->nl, lowest = args->lowest, act = args->act, out = args->out;
    const int loss_kind = args->loss_kind;
    const int64_t *fin = args->fin, *fout = args->fout, *zoff = args->zoff;
    REAL **W = args->W, **b = args->b, **VW = args->VW, **VB = args->VB;
    const double *mult = args->mult, *pl = args->pl;
    const int32_t *trainable = args->trainable, *gemm = args->gemm;
    const int64_t B = args->B, n = args->n, zstride = args->zstride;
    const REAL *X = args->X, *coef = args->coef, *Z = args->Z;
    const void *Y = args->Y;
    void *blas = args->blas;
    double *loss = args->loss;
    NAME(gemm_fn) mm = (NAME(gemm_fn))blas;
    for (int i = 0; i < nl; i++)
        if (gemm[i] && !mm)
            return -2;
    /* scratch: per layer H, G (B × fout), GS (B × fout), A_in (B × fin), idx, coefs; the
       buffers start on 64-byte boundaries */
    int64_t total = 0, maxin = 0;
    const int64_t al = 64 / (int64_t)sizeof(REAL);
#define ROUND(x) (((x) + al - 1) / al * al)
    for (int i = 0; i < nl; i++) {
        total += 3 * ROUND(B * fout[i]) + ROUND(B * fin[i]);
        if (fin[i] > maxin)
            maxin = fin[i];
    }
    total += ROUND(B * maxin) + ROUND(B * fout[nl - 1]);
    REAL *buf = (REAL *)aligned_alloc(64, (size_t)total * sizeof(REAL));
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)(maxin > 0 ? maxin : 1));
    REAL **H = (REAL **)malloc(sizeof(REAL *) * (size_t)nl * 4);
    if (!buf || !idx || !H) {
        free(buf);
        free(idx);
        free(H);
        return -1;
    }
    memset(buf, 0, (size_t)total * sizeof(REAL));
    REAL **G = H + nl, **GS = H + 2 * nl, **A = H + 3 * nl;
    REAL *p = buf;
    for (int i = 0; i < nl; i++) {
        H[i] = p, p += ROUND(B * fout[i]);
        G[i] = p, p += ROUND(B * fout[i]);
        GS[i] = p, p += ROUND(B * fout[i]);
        A[i] = p, p += ROUND(B * fin[i]);
    }
    REAL *gathered = p; /* B × maxin: the active rows' inputs */
    p += ROUND(B * maxin);
    const int last = nl - 1;
    const int64_t d = fin[0], K = fout[last];
    REAL *yhat = p; /* B × K */
#undef ROUND

    for (int64_t k = 0; k < n; k++) {
        const REAL *x = X + k * B * d;
        memcpy(A[0], x, sizeof(REAL) * (size_t)(B * d));
        /* ---- forward */
        for (int i = 0; i < nl; i++) {
            const int64_t fi = fin[i], fo = fout[i];
            REAL *h = H[i];
            const REAL mi = (REAL)mult[i];
            if (gemm[i]) {
                NAME(rm_gemm)(mm, 0, 0, B, fo, fi, mi, A[i], fi, W[i], fo, (REAL)0, h, fo);
                if (b[i])
                    for (int64_t bb = 0; bb < B; bb++)
                        for (int64_t o = 0; o < fo; o++)
                            h[bb * fo + o] += b[i][o];
            } else {
                /* the rows some example uses (all but ReLU's units off for every example) */
                const REAL *a = A[i];
                int64_t m = 0;
                for (int64_t r = 0; r < fi; r++) {
                    int on = 0;
                    for (int64_t bb = 0; bb < B; bb++)
                        on |= a[bb * fi + r] != 0;
                    if (on)
                        idx[m++] = r;
                }
                for (int64_t bb = 0; bb < B; bb++)
                    for (int64_t j = 0; j < m; j++)
                        gathered[bb * m + j] = a[bb * fi + idx[j]];
                memset(h, 0, sizeof(REAL) * (size_t)(B * fo));
                NAME(rows_axpy)(h, W[i], fo, idx, gathered, m, B);
                if (b[i])
                    for (int64_t bb = 0; bb < B; bb++)
                        for (int64_t o = 0; o < fo; o++)
                            h[bb * fo + o] = mi * h[bb * fo + o] + b[i][o];
                else
                    for (int64_t j = 0; j < B * fo; j++)
                        h[j] = mi * h[j];
            }
            if (i < last)
                NAME(apply_act)(act, h, A[i + 1], B * fo, pl);
        }
        /* ---- loss and its gradient */
        const REAL *z = H[last];
        REAL *g = G[last];
        NAME(apply_act)(out, z, yhat, B * K, pl);
        double sum = 0;
        const REAL invb = (REAL)(1.0 / (double)B);
        if (loss_kind == LOSS_CROSS_ENTROPY) {
            const int64_t *labels = (const int64_t *)Y + k * B;
            for (int64_t bb = 0; bb < B; bb++) {
                const REAL *v = yhat + bb * K;
                REAL *gv = g + bb * K;
                REAL top = v[0];
                for (int64_t o = 1; o < K; o++)
                    top = v[o] > top ? v[o] : top;
                double se = 0;
                for (int64_t o = 0; o < K; o++)
                    se += exp((double)(v[o] - top));
                const REAL lse = top + (REAL)log(se);
                sum += (double)(v[labels[bb]] - lse);
                for (int64_t o = 0; o < K; o++)
                    gv[o] = (REAL)exp((double)(v[o] - lse)) - (o == labels[bb] ? (REAL)1 : (REAL)0);
                for (int64_t o = 0; o < K; o++)
                    gv[o] *= invb;
            }
        } else {
            const REAL *y = (const REAL *)Y + k * B * K;
            for (int64_t j = 0; j < B * K; j++) {
                if (loss_kind == LOSS_LOGISTIC) {
                    const double margin = -(double)(y[j] * yhat[j]);
                    sum += margin > 20 ? margin : log1p(exp(margin)); /* softplus, as ATen's */
                    g[j] = (REAL)(1.0 / (1.0 + exp(-margin))) * y[j] * -invb;
                } else {
                    const REAL r = yhat[j] - y[j];
                    sum += (double)(r * r);
                    g[j] = r * invb;
                }
            }
        }
        if (out == ACT_TANH || out == ACT_SIGMOID)
            NAME(apply_act_grad)(out, g, z, yhat, B * K, pl);
        loss[k] = sum;
        const REAL *zk = Z ? Z + k * zstride : NULL;
        /* ---- backward products and updates, top down */
        for (int i = last; i >= lowest; i--) {
            const int64_t fi = fin[i], fo = fout[i];
            const int below = i > lowest, upd = trainable[i];
            const REAL *cf = coef + (k * nl + i) * MF_NCOEF;
            const REAL mi = (REAL)mult[i];
            REAL *vw = VW ? VW[i] : NULL;
            const REAL zs = upd && zk && zoff[2 * i] >= 0 ? cf[C_NOISE] : (REAL)0;
            const REAL *zw = zs != 0 ? zk + zoff[2 * i] : NULL;
            /* plain: no momentum, decay or noise this step: the update is W += aᵀ(c·g) */
            const int plain = !vw && cf[C_FACTOR] == 1 && !zw;
            if (upd && !vw)
                for (int64_t j = 0; j < B * fo; j++)
                    GS[i][j] = cf[C_C] * G[i][j];
            if (upd && b[i]) {
                REAL *vb = VB ? VB[i] : NULL;
                for (int64_t o = 0; o < fo; o++) {
                    REAL s = 0;
                    for (int64_t bb = 0; bb < B; bb++)
                        s += G[i][bb * fo + o];
                    if (vb) {
                        REAL v = vb[o] * cf[C_MU] + s;
                        v += b[i][o] * cf[C_WD_B];
                        vb[o] = v;
                        b[i][o] += v * cf[C_CB];
                    } else {
                        s += b[i][o] * cf[C_WD_B];
                        b[i][o] += cf[C_CB] * s;
                    }
                }
                const REAL zsb = zk && zoff[2 * i + 1] >= 0 ? cf[C_NOISE_B] : (REAL)0;
                if (zsb != 0)
                    NAME(add_noise)(b[i], zk + zoff[2 * i + 1], zsb, fo);
            }
            if (!below && !upd)
                continue;
            REAL *gb = below ? G[i - 1] : NULL;
            if (gemm[i]) {
                /* a large layer goes in row blocks, each block's backward product and
                   update while it is in cache: 3 passes over the weights, not 4 */
                const int64_t item = (int64_t)sizeof(REAL);
                const int64_t rows = fi * fo * item > BLOCK_MIN_BYTES && fo * item < BLOCK_BYTES
                                         ? BLOCK_BYTES / (fo * item)
                                         : fi;
                for (int64_t r0 = 0; r0 < fi; r0 += rows) {
                    const int64_t nr = r0 + rows <= fi ? rows : fi - r0;
                    REAL *w = W[i] + r0 * fo;
                    const int64_t nw = nr * fo;
                    if (below) /* G_{i−1} = m · G_i W_iᵀ, before the update */
                        NAME(rm_gemm)(mm, 0, 1, B, nr, fo, mi, G[i], fo, w, fo, (REAL)0, gb + r0, fi);
                    if (!upd)
                        continue;
                    if (vw) {
                        /* v ← μ v + m·aᵀg + wd·W,  W ← W − η v */
                        REAL *v = vw + r0 * fo;
                        const REAL mu = cf[C_MU], wd = cf[C_WD], neg_eta = cf[C_NEG_ETA];
                        for (int64_t j = 0; j < nw; j++)
                            v[j] *= mu;
                        NAME(rm_gemm)(mm, 1, 0, nr, fo, B, mi, A[i] + r0, fi, G[i], fo, (REAL)1, v, fo);
                        for (int64_t j = 0; j < nw; j++) {
                            REAL x = v[j] + w[j] * wd;
                            v[j] = x;
                            w[j] += x * neg_eta;
                        }
                    } else {
                        const REAL fc = cf[C_FACTOR];
                        if (fc != 1)
                            for (int64_t j = 0; j < nw; j++)
                                w[j] *= fc;
                        NAME(rm_gemm)(mm, 1, 0, nr, fo, B, (REAL)1, A[i] + r0, fi, GS[i], fo, (REAL)1, w, fo);
                    }
                    if (zw)
                        NAME(add_noise)(w, zw + r0 * fo, zs, nw);
                }
            } else if (B == 1 && plain) {
                /* the rows taking part (ReLU: a unit that is off has a zero update and a
                   masked gradient), four at a time, then one by one */
                int64_t cnt = 0;
                for (int64_t r = 0; r < fi; r++) {
                    if (A[i][r] == 0 && (!below || act == ACT_RELU)) {
                        if (below)
                            gb[r] = 0;
                    } else {
                        idx[cnt++] = r;
                    }
                }
                int64_t j = 0;
                REAL dots[4];
                /* (short rows go one by one: measured faster) */
                for (; fo >= 4 * LANES && j + 4 <= cnt; j += 4) {
                    NAME(dot_update4_long)(W[i], fo, idx + j, G[i], GS[i], A[i], upd, dots);
                    if (below)
                        for (int q = 0; q < 4; q++)
                            gb[idx[j + q]] = mi * dots[q];
                }
                for (; j < cnt; j++) {
                    const int64_t r = idx[j];
                    REAL dot = NAME(dot_update)(W[i] + r * fo, G[i], GS[i], A[i][r], fo, upd);
                    if (below)
                        gb[r] = mi * dot;
                }
            } else {
                for (int64_t r = 0; r < fi; r++) {
                    REAL *w = W[i] + r * fo;
                    int on = 0;
                    for (int64_t bb = 0; bb < B; bb++)
                        on |= A[i][bb * fi + r] != 0;
                    /* an off unit (ReLU, every example) has a zero plain update and a masked
                       gradient (momentum, decay and noise still move its row) */
                    if (!on && (!below || act == ACT_RELU) && (plain || !upd)) {
                        if (below)
                            for (int64_t bb = 0; bb < B; bb++)
                                gb[bb * fi + r] = 0;
                        continue;
                    }
                    if (below)
                        for (int64_t bb = 0; bb < B; bb++)
                            gb[bb * fi + r] = mi * NAME(dot_update)(w, G[i] + bb * fo, NULL, 0, fo, 0);
                    if (!upd)
                        continue;
                    if (vw) {
                        /* v ← μ v + m·aᵀg + wd·W,  W ← W − η v */
                        REAL *v = vw + r * fo;
                        const REAL mu = cf[C_MU], wd = cf[C_WD], neg_eta = cf[C_NEG_ETA];
                        for (int64_t o = 0; o < fo; o++) {
                            REAL s = 0;
                            for (int64_t bb = 0; bb < B; bb++)
                                s += A[i][bb * fi + r] * G[i][bb * fo + o];
                            REAL x = v[o] * mu + mi * s;
                            x += w[o] * wd;
                            v[o] = x;
                            w[o] += x * neg_eta;
                        }
                    } else if (B == 1) {
                        const REAL fc = cf[C_FACTOR], a0 = A[i][r];
                        const REAL *gs = GS[i];
                        for (int64_t o = 0; o < fo; o++)
                            w[o] = MADD(a0, gs[o], w[o] * fc);
                    } else {
                        const REAL fc = cf[C_FACTOR];
                        for (int64_t o = 0; o < fo; o++)
                            w[o] *= fc;
                        for (int64_t bb = 0; bb < B; bb++) {
                            const REAL ab = A[i][bb * fi + r];
                            const REAL *gs = GS[i] + bb * fo;
                            for (int64_t o = 0; o < fo; o++)
                                w[o] = MADD(ab, gs[o], w[o]);
                        }
                    }
                    if (zw)
                        NAME(add_noise)(w, zw + r * fo, zs, fo);
                }
            }
            if (below)
                NAME(apply_act_grad)(act, gb, H[i - 1], A[i], B * fi, pl);
        }
    }
    free(buf);
    free(idx);
    free(H);
    return 0;
}

/*
 * The test set's loss sum and correct predictions, as the observer computes them; the
 * fields of args (struct mf_args):
 *   the network as for mf_sgd (every layer's products in the BLAS gemm `blas`);
 *   X (n × fin[0]); Y the targets (n × K, REAL), or for cross-entropy labels (n, int64);
 *   acc_kind 0: no accuracy, 1: binary (labels ±1, REAL: sign(z) = label), 2: multiclass
 *   (labels int64: the first argmax of z = label); labels (n);
 *   examples go in blocks of `rows`;
 *   result[0] ← Σ_examples loss (each example's loss in REAL, summed in double),
 *   result[1] ← the number of correct predictions.
 * Returns 0, −1 when scratch memory could not be allocated, −2 without a BLAS.
 */
int NAME(mf_eval)(const struct mf_args *args) {
    const int nl = args->nl, act = args->act, out = args->out, loss_kind = args->loss_kind;
    const int acc_kind = args->acc_kind;
    const int64_t *fin = args->fin, *fout = args->fout;
    REAL **W = args->W, **b = args->b;
    const double *mult = args->mult, *pl = args->pl;
    const int64_t n = args->n, rows = args->rows;
    const REAL *X = args->X;
    const void *Y = args->Y, *labels = args->labels;
    void *blas = args->blas;
    double *result = args->result;
    NAME(gemm_fn) mm = (NAME(gemm_fn))blas;
    if (!mm)
        return -2;
    int64_t maxout = 0;
    for (int i = 0; i < nl; i++)
        if (fout[i] > maxout)
            maxout = fout[i];
    const int64_t al = 64 / (int64_t)sizeof(REAL);
    const int64_t per = (rows * maxout + al - 1) / al * al;
    REAL *buf = (REAL *)aligned_alloc(64, (size_t)(2 * per) * sizeof(REAL));
    if (!buf)
        return -1;
    const int last = nl - 1;
    const int64_t d = fin[0], K = fout[last];
    double loss_sum = 0, correct = 0;
    for (int64_t s0 = 0; s0 < n; s0 += rows) {
        const int64_t m = s0 + rows <= n ? rows : n - s0;
        const REAL *a = X + s0 * d;
        REAL *h = buf;
        for (int i = 0; i < nl; i++) {
            const int64_t fi = fin[i], fo = fout[i];
            h = buf + (i % 2) * per;
            NAME(rm_gemm)(mm, 0, 0, m, fo, fi, (REAL)mult[i], a, fi, W[i], fo, (REAL)0, h, fo);
            if (b[i])
                for (int64_t r = 0; r < m; r++)
                    for (int64_t o = 0; o < fo; o++)
                        h[r * fo + o] += b[i][o];
            if (i < last) {
                NAME(apply_act)(act, h, h, m * fo, pl); /* in place */
                a = h;
            }
        }
        /* h: the block's outputs z (m × K) */
        for (int64_t r = 0; r < m; r++) {
            const REAL *z = h + r * K;
            const int64_t e = s0 + r;
            if (acc_kind == ACC_BINARY) {
                const REAL label = ((const REAL *)labels)[e];
                const REAL sgn = z[0] > 0 ? (REAL)1 : (z[0] < 0 ? (REAL)-1 : (REAL)0);
                correct += sgn == label;
            } else if (acc_kind == ACC_MULTICLASS) {
                int64_t best = 0;
                for (int64_t o = 1; o < K; o++)
                    if (z[o] > z[best])
                        best = o;
                correct += best == ((const int64_t *)labels)[e];
            }
            REAL ex = 0;
            if (loss_kind == LOSS_CROSS_ENTROPY) {
                /* −log softmax(ψ(z))[label] */
                double top = -INFINITY;
                for (int64_t o = 0; o < K; o++) {
                    double t = (double)(out == ACT_IDENTITY ? z[o] : NAME(act1)(out, z[o], pl));
                    top = t > top ? t : top;
                }
                double se = 0;
                for (int64_t o = 0; o < K; o++)
                    se += exp((double)(out == ACT_IDENTITY ? z[o] : NAME(act1)(out, z[o], pl)) - top);
                const int64_t lab = ((const int64_t *)Y)[e];
                const REAL zl = out == ACT_IDENTITY ? z[lab] : NAME(act1)(out, z[lab], pl);
                ex = -(REAL)((double)zl - (top + log(se)));
            } else {
                const REAL *y = (const REAL *)Y + e * K;
                for (int64_t o = 0; o < K; o++) {
                    const REAL yo = out == ACT_IDENTITY ? z[o] : NAME(act1)(out, z[o], pl);
                    if (loss_kind == LOSS_LOGISTIC) {
                        const double mg = -(double)(y[o] * yo);
                        ex += (REAL)(mg > 20 ? mg : log1p(exp(mg)));
                    } else {
                        const REAL dlt = yo - y[o];
                        ex += dlt * dlt;
                    }
                }
                if (loss_kind == LOSS_MSE)
                    ex = (REAL)0.5 * ex;
            }
            loss_sum += (double)ex;
        }
    }
    free(buf);
    result[0] = loss_sum;
    result[1] = correct;
    return 0;
}

/* ------------------------------------------------------------------ the interface's check */

/* the fingerprint of the declaration this file was compiled with (_native_abi.py) */
uint64_t NAME(mf_abi_fingerprint)(void) { return MF_ABI_FINGERPRINT; }

/* out[0] ← sizeof(struct mf_args), out[1 + f] ← field f's offset, as this compiler lays
   them out (up to cap entries); returns the number of entries (1 + the fields) */
int64_t NAME(mf_abi_layout)(int64_t *out, int64_t cap) {
    static const size_t offsets[MF_ABI_NFIELDS] = MF_ABI_OFFSETS;
    if (cap > 0)
        out[0] = (int64_t)sizeof(struct mf_args);
    for (int64_t f = 0; f < MF_ABI_NFIELDS && f + 1 < cap; f++)
        out[f + 1] = (int64_t)offsets[f];
    return 1 + MF_ABI_NFIELDS;
}
