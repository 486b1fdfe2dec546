/* The counter-based Langevin noise (torch { noise = philox }): Philox4x32-10 and the
 * Box–Muller transform of mfdsl/core/noise.py, which defines them and generates this
 * file's constants (_noise_consts.h).  Entry e of parameter slot j at step s comes from
 * the counter (e / L, j, s mod 2^32, s div 2^32), L = 4 normals per counter in float32,
 * L = 2 in float64.
 *
 * Compiled by _native.py into the native library with -ffp-contract=off: every
 * operation rounds as IEEE 754 says, in the order written, as numpy and torch's ops
 * do, so this loop, the numpy reference and the torch-op version produce the same bits
 * (a fused multiply-add would round once where they round twice).  No libm call: ln,
 * cos and sin are polynomials of + − × ÷ √.
 */
#include <stdint.h>
#include <string.h>

#include "_noise_consts.h"

#define BLK 64 /* counters per pass: the vector loops' length */

static const float LOG_F32[] = NZ_LOG_F32, SIN_F32[] = NZ_SIN_F32, COS_F32[] = NZ_COS_F32;
static const double LOG_F64[] = NZ_LOG_F64, SIN_F64[] = NZ_SIN_F64, COS_F64[] = NZ_COS_F64;

/* the four words of BLK consecutive counters (b0 + i, c1, c2, c3): a round at a time over
   all BLK counters, so that each round is one vector loop */
static void philox_block(uint32_t k0, uint32_t k1, uint32_t b0, uint32_t c1, uint32_t c2, uint32_t c3,
                         uint32_t *restrict x0, uint32_t *restrict x1, uint32_t *restrict x2,
                         uint32_t *restrict x3) {
    for (int i = 0; i < BLK; i++) {
        x0[i] = b0 + (uint32_t)i;
        x1[i] = c1;
        x2[i] = c2;
        x3[i] = c3;
    }
    for (int r = 0; r < PHILOX_ROUNDS; r++) {
        uint32_t q0 = k0 + (uint32_t)r * PHILOX_W0, q1 = k1 + (uint32_t)r * PHILOX_W1;
        for (int i = 0; i < BLK; i++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * x0[i], p1 = (uint64_t)PHILOX_M1 * x2[i];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ x1[i] ^ q0, n2 = (uint32_t)(p0 >> 32) ^ x3[i] ^ q1;
            x0[i] = n0;
            x1[i] = (uint32_t)p1;
            x2[i] = n2;
            x3[i] = (uint32_t)p0;
        }
    }
}

/* Box–Muller for BLK pairs, (j1 + 1) 2^-BITS and j2 2^-BITS; see noise.py's _box_muller */
#define BOX_MULLER(REAL, UINT, SINT, BITS, MANT, EMASK, BIAS, SQRT, SFX)                                                  \
    static void box_muller_##SFX(const SINT *restrict j1, const SINT *restrict j2, REAL *restrict za,        \
                                 REAL *restrict zb) {                                                        \
        _Pragma("GCC ivdep") for (int i = 0; i < BLK; i++) {                                                 \
            REAL u1 = (REAL)(j1[i] + 1) * (REAL)(1.0 / (double)((SINT)1 << BITS));                           \
            UINT bits;                                                                                       \
            memcpy(&bits, &u1, sizeof bits);                                                                 \
            /* frexp: u1 = m 2^e, m in [1/2, 1) (u1 is normal) */                                            \
            SINT e = (SINT)((bits >> MANT) & EMASK) - (BIAS - 1);                                      \
            UINT mb = (bits & ~((UINT)EMASK << MANT)) | ((UINT)(BIAS - 1) << MANT);                     \
            REAL m;                                                                                          \
            memcpy(&m, &mb, sizeof m);                                                                       \
            int low = m < NZ_SQRT_HALF_##SFX;                                                                \
            m = low ? m + m : m;                                                                             \
            REAL ef = (REAL)(e - low);                                                                       \
            REAL f = m - (REAL)1;                                                                            \
            REAL s = f / ((REAL)2 + f);                                                                      \
            REAL w = s * s;                                                                                  \
            REAL p = LOG_##SFX[0];                                                                           \
            for (int k = 1; k < NZ_NLOG_##SFX; k++) p = p * w + LOG_##SFX[k];                                \
            REAL sp = s * p;                                                                                 \
            REAL ln_u1 = ef * NZ_LN2_HI_##SFX + (ef * NZ_LN2_LO_##SFX + (sp + sp));                         \
            REAL r = SQRT(-(ln_u1 + ln_u1));                                                                    \
            SINT quarter = (SINT)1 << (BITS - 2);                                                            \
            SINT q = (j2[i] + (quarter >> 1)) >> (BITS - 2);                                                 \
            REAL t = (REAL)(j2[i] - q * quarter) * (REAL)(1.0 / (double)quarter);                            \
            REAL th = t * NZ_HALF_PI_##SFX;                                                                  \
            REAL th2 = th * th;                                                                              \
            REAL ps = SIN_##SFX[0];                                                                          \
            for (int k = 1; k < NZ_NSIN_##SFX; k++) ps = ps * th2 + SIN_##SFX[k];                            \
            REAL pc = COS_##SFX[0];                                                                          \
            for (int k = 1; k < NZ_NCOS_##SFX; k++) pc = pc * th2 + COS_##SFX[k];                            \
            REAL sn = th + th * (th2 * ps);                                                                  \
            REAL cs = (REAL)1 + th2 * pc;                                                                    \
            q &= 3;                                                                                          \
            REAL c = q == 0 ? cs : q == 1 ? -sn : q == 2 ? -cs : sn;                                         \
            REAL d = q == 0 ? sn : q == 1 ? cs : q == 2 ? -sn : -cs;                                         \
            za[i] = r * c;                                                                                   \
            zb[i] = r * d;                                                                                   \
        }                                                                                                    \
    }


BOX_MULLER(float, uint32_t, int32_t, 24, 23, 0xFF, 127, __builtin_sqrtf, F32)
BOX_MULLER(double, uint64_t, int64_t, 53, 52, 0x7FF, 1023, __builtin_sqrt, F64)

/* out[k·ld + e] ← the noise of slot `slot`, step step0 + k, entry e (k < m, e < n) */
void mf_normal_f32(uint32_t k0, uint32_t k1, uint32_t slot, uint64_t step0, int64_t m, int64_t n, float *out,
                   int64_t ld) {
    uint32_t x0[BLK], x1[BLK], x2[BLK], x3[BLK];
    int32_t j0[BLK], j1[BLK], j2[BLK], j3[BLK];
    float za[BLK], zb[BLK], zc[BLK], zd[BLK];
    int64_t blocks = (n + 3) / 4;
    for (int64_t k = 0; k < m; k++) {
        uint64_t s = step0 + (uint64_t)k;
        float *row = out + k * ld;
        for (int64_t b0 = 0; b0 < blocks; b0 += BLK) {
            philox_block(k0, k1, (uint32_t)b0, slot, (uint32_t)s, (uint32_t)(s >> 32), x0, x1, x2, x3);
            for (int i = 0; i < BLK; i++) {
                j0[i] = (int32_t)(x0[i] >> 8);
                j1[i] = (int32_t)(x1[i] >> 8);
                j2[i] = (int32_t)(x2[i] >> 8);
                j3[i] = (int32_t)(x3[i] >> 8);
            }
            box_muller_F32(j0, j1, za, zb);
            box_muller_F32(j2, j3, zc, zd);
            int64_t e0 = 4 * b0, cnt = n - e0 < 4 * BLK ? n - e0 : 4 * BLK;
            float *o = row + e0;
            if (cnt == 4 * BLK) {
                for (int i = 0; i < BLK; i++) {
                    o[4 * i] = za[i];
                    o[4 * i + 1] = zb[i];
                    o[4 * i + 2] = zc[i];
                    o[4 * i + 3] = zd[i];
                }
            } else {
                for (int64_t e = 0; e < cnt; e++) {
                    int i = (int)(e / 4), l = (int)(e % 4);
                    o[e] = l == 0 ? za[i] : l == 1 ? zb[i] : l == 2 ? zc[i] : zd[i];
                }
            }
        }
    }
}

void mf_normal_f64(uint32_t k0, uint32_t k1, uint32_t slot, uint64_t step0, int64_t m, int64_t n, double *out,
                   int64_t ld) {
    uint32_t x0[BLK], x1[BLK], x2[BLK], x3[BLK];
    int64_t j1[BLK], j2[BLK];
    double za[BLK], zb[BLK];
    int64_t blocks = (n + 1) / 2;
    for (int64_t k = 0; k < m; k++) {
        uint64_t s = step0 + (uint64_t)k;
        double *row = out + k * ld;
        for (int64_t b0 = 0; b0 < blocks; b0 += BLK) {
            philox_block(k0, k1, (uint32_t)b0, slot, (uint32_t)s, (uint32_t)(s >> 32), x0, x1, x2, x3);
            for (int i = 0; i < BLK; i++) {
                j1[i] = ((int64_t)(x0[i] >> 5) << 26) | (int64_t)(x1[i] >> 6);
                j2[i] = ((int64_t)(x2[i] >> 5) << 26) | (int64_t)(x3[i] >> 6);
            }
            box_muller_F64(j1, j2, za, zb);
            int64_t e0 = 2 * b0, cnt = n - e0 < 2 * BLK ? n - e0 : 2 * BLK;
            double *o = row + e0;
            if (cnt == 2 * BLK) {
                for (int i = 0; i < BLK; i++) {
                    o[2 * i] = za[i];
                    o[2 * i + 1] = zb[i];
                }
            } else {
                for (int64_t e = 0; e < cnt; e++) o[e] = (e % 2) ? zb[e / 2] : za[e / 2];
            }
        }
    }
}

/* Philox4x32-10 of one counter (the known-answer tests) */
void mf_philox4x32(uint32_t k0, uint32_t k1, const uint32_t *ctr, uint32_t *out) {
    uint32_t x0[BLK], x1[BLK], x2[BLK], x3[BLK];
    philox_block(k0, k1, ctr[0], ctr[1], ctr[2], ctr[3], x0, x1, x2, x3);
    out[0] = x0[0];
    out[1] = x1[0];
    out[2] = x2[0];
    out[3] = x3[0];
}
