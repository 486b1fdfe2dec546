/* mfdsl's native step loop: SGD steps (with momentum and weight decay) of one multilayer
 * network, batch B.
 *
 * Compiled twice by _native.py, with -DREAL=double -DSFX=_f64 and -DREAL=float
 * -DSFX=_f32, into one shared library loaded with ctypes.  It runs a whole chunk of
 * steps of one network in one call, so a batch-1 step costs no dispatch at all: the
 * ATen path spends ~45 small calls a step, which dominate below width ~400.
 *
 * The network (the torch backend's EnsembleTrainer, one member):
 *   H_i = m_i · (A_i W_i) + b_i,   A_0 = X,   A_{i+1} = φ(H_i),   ŷ = ψ(H_last),
 *   loss: the sum over the minibatch of (ŷ − y)² (mse), softplus(−y ŷ) (logistic) or
 *   log softmax(ŷ)[y] (cross-entropy), which the caller scales by 1/(2B), 1/B, −1/B;
 *   G_last = ∂(batch-mean loss)/∂ŷ ⊙ ψ'(H_last),   G_{i−1} = m_i · (G_i W_iᵀ) ⊙ φ'(H_{i−1}),
 *   W_i ← (1 − η_i wd_i) W_i + A_iᵀ (c_i · G_i)   (c_i = −η_i m_i),
 *   b_i ← b_i − η_b (Σ_batch G_i + wd_b b_i),
 * or with momentum v ← μ v + m_i A_iᵀ G_i + wd_i W_i, W_i ← W_i − η_i v (and likewise
 * for the biases, v_b ← μ v_b + Σ_batch G_i + wd_b b_i),
 * with W_i stored (fan_in, fan_out) row-major, as the ensemble's member views.
 *
 * Each weight row is touched once in the forward pass and once in the backward pass,
 * where its backward product and its update share one read–modify–write.  With ReLU a
 * row whose input unit is off for the whole minibatch is skipped in both passes: its
 * contributions are exact zeros and its unit's gradient is masked.
 *
 * Sums run in a fixed order fixed by this source alone, so a network's numbers do not
 * depend on where its buffers lie or on which other networks are trained beside it.
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

/* independent partial sums of a dot product: two vectors' worth of 64-byte lanes */
#define LANES (128 / (int)sizeof(REAL))

enum { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_PL = 2, ACT_TANH = 3, ACT_SIGMOID = 4, ACT_ERF = 5, ACT_GELU = 6 };
enum { LOSS_MSE = 0, LOSS_LOGISTIC = 1, LOSS_CROSS_ENTROPY = 2 };
/* a step's coefficients for one layer: c = −η m and the decay factor 1 − η wd (without
   momentum), the bias's −η_b and decay wd_b, and with momentum −η, wd and μ */
enum { C_W = 0, C_FACTOR = 1, C_B = 2, C_WDB = 3, C_NEG_ETA = 4, C_WD = 5, C_MU = 6, NCOEF = 8 };

static inline REAL NAME(act)(int act, REAL h, const double *pl) {
    switch (act) {
    case ACT_RELU:
        return h <= 0 ? (REAL)0 : h; /* NaN passes, as ATen's clamp_min */
    case ACT_PL: {
        REAL c = h < (REAL)pl[0] ? (REAL)pl[0] : (h > (REAL)pl[1] ? (REAL)pl[1] : h);
        return (c - (REAL)pl[0]) * (REAL)pl[3] + (REAL)pl[2];
    }
    case ACT_TANH:
        return (REAL)tanh((double)h);
    case ACT_SIGMOID:
        return (REAL)(1.0 / (1.0 + exp(-(double)h)));
    case ACT_ERF:
        return (REAL)erf((double)h);
    case ACT_GELU:
        return (REAL)(0.5 * (double)h * (1.0 + erf((double)h * 0.70710678118654752440)));
    default:
        return h;
    }
}

/* φ'(h), given h and a = φ(h); pl = (t1, t2, s1, slope) of the piecewise-linear map */
static inline REAL NAME(act_grad)(int act, REAL h, REAL a, const double *pl) {
    switch (act) {
    case ACT_RELU:
        return h <= 0 ? (REAL)0 : (REAL)1;
    case ACT_PL:
        return (h <= (REAL)pl[0] || h >= (REAL)pl[1]) ? (REAL)0 : (REAL)pl[3];
    case ACT_TANH:
        return (REAL)1 - a * a;
    case ACT_SIGMOID:
        return ((REAL)1 - a) * a;
    case ACT_ERF:
        return (REAL)(1.1283791670955125739 * exp(-(double)h * (double)h));
    case ACT_GELU: {
        double x = (double)h;
        return (REAL)(0.5 * (1.0 + erf(x * 0.70710678118654752440)) +
                      x * 0.39894228040143267794 * exp(-0.5 * x * x));
    }
    default:
        return (REAL)1;
    }
}

/* out[o] += Σ_j a[j] · rows[j][o] over the rows listed in idx (count n), four at a time */
static void NAME(rows_axpy)(REAL *restrict out, const REAL *restrict W, int64_t fo, const int64_t *idx,
                            const REAL *restrict a, int64_t n) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const REAL *restrict w0 = W + idx[j] * fo, *restrict w1 = W + idx[j + 1] * fo;
        const REAL *restrict w2 = W + idx[j + 2] * fo, *restrict w3 = W + idx[j + 3] * fo;
        REAL a0 = a[j], a1 = a[j + 1], a2 = a[j + 2], a3 = a[j + 3];
        for (int64_t o = 0; o < fo; o++) {
            REAL h = out[o];
            h += a0 * w0[o];
            h += a1 * w1[o];
            h += a2 * w2[o];
            h += a3 * w3[o];
            out[o] = h;
        }
    }
    for (; j < n; j++) {
        const REAL *restrict w0 = W + idx[j] * fo;
        REAL a0 = a[j];
        for (int64_t o = 0; o < fo; o++)
            out[o] += a0 * w0[o];
    }
}

/* Σ_o w[o] g[o] in LANES partial sums (a fixed order), then w[o] += s · u[o] */
static inline REAL NAME(dot_update)(REAL *restrict w, const REAL *restrict g, const REAL *restrict u, REAL s,
                                    int64_t fo, int update) {
    REAL acc[LANES];
    for (int l = 0; l < LANES; l++)
        acc[l] = 0;
    int64_t o = 0;
    if (update) {
        for (; o + LANES <= fo; o += LANES)
            for (int l = 0; l < LANES; l++) {
                REAL x = w[o + l];
                acc[l] += x * g[o + l];
                w[o + l] = x + s * u[o + l];
            }
    } else {
        for (; o + LANES <= fo; o += LANES)
            for (int l = 0; l < LANES; l++)
                acc[l] += w[o + l] * g[o + l];
    }
    REAL tail = 0;
    for (; o < fo; o++) {
        REAL x = w[o];
        tail += x * g[o];
        if (update)
            w[o] = x + s * u[o];
    }
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++)
            acc[l] += acc[l + width];
    return acc[0] + tail;
}

/*
 * n plain-SGD steps of one network.
 *   nl layers; fin[i], fout[i] their shapes; W[i] (fin × fout), b[i] (fout) or NULL;
 *   mult[i] the forward multipliers; coef[(k·nl + i)·NCOEF + C_…] step k's coefficients
 *   for layer i (unused where frozen); VW[i], VB[i] the momentum buffers (shaped as W[i],
 *   b[i]), VW = VB = NULL without momentum;
 *   trainable[i]; lowest the lowest trainable layer (nl if none);
 *   act the activation φ, out the output map ψ (ACT_IDENTITY, ACT_TANH or ACT_SIGMOID),
 *   loss_kind the loss;
 *   X (n × B × fin[0]) and Y the chunk's data: targets (n × B × fout[nl−1], REAL), or
 *   for cross-entropy labels (n × B, int64);
 *   loss[k] ← step k's loss sum (see above), taken before its update.
 * Returns 0, or −1 when scratch memory could not be allocated.
 */
int NAME(mf_sgd)(int nl, const int64_t *fin, const int64_t *fout, REAL **W, REAL **b, const double *mult,
                 const int32_t *trainable, int lowest, int act, int out, int loss_kind, const double *pl,
                 int64_t B, int64_t n, const REAL *X, const void *Y, const REAL *coef, REAL **VW, REAL **VB,
                 double *loss) {
    /* scratch: per layer H, G (B × fout), GS (B × fout), A_in (B × fin), idx, coefs */
    int64_t total = 0, maxin = 0;
    for (int i = 0; i < nl; i++) {
        total += 3 * B * fout[i] + B * fin[i];
        if (fin[i] > maxin)
            maxin = fin[i];
    }
    REAL *buf = (REAL *)calloc((size_t)(total + B * maxin + B * fout[nl - 1]), sizeof(REAL));
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)(maxin > 0 ? maxin : 1));
    REAL **H = (REAL **)malloc(sizeof(REAL *) * (size_t)nl * 4);
    if (!buf || !idx || !H) {
        free(buf);
        free(idx);
        free(H);
        return -1;
    }
    REAL **G = H + nl, **GS = H + 2 * nl, **A = H + 3 * nl;
    REAL *p = buf;
    for (int i = 0; i < nl; i++) {
        H[i] = p, p += B * fout[i];
        G[i] = p, p += B * fout[i];
        GS[i] = p, p += B * fout[i];
        A[i] = p, p += B * fin[i];
    }
    REAL *gathered = p; /* B × maxin: the active rows' inputs */
    const int last = nl - 1;
    const int64_t d = fin[0], K = fout[last];
    REAL *yhat = gathered + B * maxin; /* B × K */

    for (int64_t k = 0; k < n; k++) {
        const REAL *x = X + k * B * d;
        memcpy(A[0], x, sizeof(REAL) * (size_t)(B * d));
        /* ---- forward */
        for (int i = 0; i < nl; i++) {
            const int64_t fi = fin[i], fo = fout[i];
            for (int64_t bb = 0; bb < B; bb++) {
                REAL *h = H[i] + bb * fo;
                const REAL *a = A[i] + bb * fi;
                int64_t m = 0;
                for (int64_t r = 0; r < fi; r++)
                    if (a[r] != 0) {
                        idx[m] = r;
                        gathered[m] = a[r];
                        m++;
                    }
                memset(h, 0, sizeof(REAL) * (size_t)fo);
                NAME(rows_axpy)(h, W[i], fo, idx, gathered, m);
                const REAL mi = (REAL)mult[i];
                if (b[i])
                    for (int64_t o = 0; o < fo; o++)
                        h[o] = mi * h[o] + b[i][o];
                else
                    for (int64_t o = 0; o < fo; o++)
                        h[o] = mi * h[o];
                if (i < last) {
                    REAL *an = A[i + 1] + bb * fo;
                    for (int64_t o = 0; o < fo; o++)
                        an[o] = NAME(act)(act, h[o], pl);
                }
            }
        }
        /* ---- loss and its gradient */
        const REAL *z = H[last];
        REAL *g = G[last];
        for (int64_t j = 0; j < B * K; j++)
            yhat[j] = NAME(act)(out, z[j], pl);
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
        if (out != ACT_IDENTITY)
            for (int64_t j = 0; j < B * K; j++)
                g[j] *= NAME(act_grad)(out, z[j], yhat[j], pl);
        loss[k] = sum;
        /* ---- backward products and updates, top down */
        for (int i = last; i >= lowest; i--) {
            const int64_t fi = fin[i], fo = fout[i];
            const int below = i > lowest, upd = trainable[i];
            const REAL *cf = coef + (k * nl + i) * NCOEF;
            const REAL mi = (REAL)mult[i];
            REAL *vw = VW ? VW[i] : NULL;
            /* plain: no momentum and no decay this step, the update is W += aᵀ(c·g) */
            const int plain = !vw && cf[C_FACTOR] == 1;
            if (upd && !vw)
                for (int64_t j = 0; j < B * fo; j++)
                    GS[i][j] = cf[C_W] * G[i][j];
            if (upd && b[i]) {
                REAL *vb = VB ? VB[i] : NULL;
                for (int64_t o = 0; o < fo; o++) {
                    REAL s = 0;
                    for (int64_t bb = 0; bb < B; bb++)
                        s += G[i][bb * fo + o];
                    if (vb) {
                        REAL v = vb[o] * cf[C_MU] + s;
                        v += b[i][o] * cf[C_WDB];
                        vb[o] = v;
                        b[i][o] += v * cf[C_B];
                    } else {
                        s += b[i][o] * cf[C_WDB];
                        b[i][o] += cf[C_B] * s;
                    }
                }
            }
            if (!below && !upd)
                continue;
            REAL *gb = below ? G[i - 1] : NULL;
            for (int64_t r = 0; r < fi; r++) {
                REAL *w = W[i] + r * fo;
                int on = 0;
                for (int64_t bb = 0; bb < B; bb++)
                    on |= A[i][bb * fi + r] != 0;
                /* an off unit (ReLU, every example) has a zero plain update and a masked
                   gradient (momentum and decay still move its row) */
                if (!on && (!below || act == ACT_RELU) && (plain || !upd)) {
                    if (below)
                        for (int64_t bb = 0; bb < B; bb++)
                            gb[bb * fi + r] = 0;
                    continue;
                }
                if (B == 1 && plain) {
                    REAL dot = NAME(dot_update)(w, G[i], GS[i], A[i][r], fo, upd);
                    if (below)
                        gb[r] = mi * dot;
                    continue;
                }
                for (int64_t bb = 0; bb < B; bb++) {
                    REAL dot = NAME(dot_update)(w, G[i] + bb * fo, NULL, 0, fo, 0);
                    if (below)
                        gb[bb * fi + r] = mi * dot;
                }
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
                } else {
                    const REAL fc = cf[C_FACTOR];
                    for (int64_t o = 0; o < fo; o++) {
                        REAL x = w[o] * fc;
                        for (int64_t bb = 0; bb < B; bb++)
                            x += A[i][bb * fi + r] * GS[i][bb * fo + o];
                        w[o] = x;
                    }
                }
            }
            if (below)
                for (int64_t j = 0; j < B * fi; j++)
                    gb[j] *= NAME(act_grad)(act, H[i - 1][j], A[i][j], pl);
        }
    }
    free(buf);
    free(idx);
    free(H);
    return 0;
}
