/* The fused EM routing kernels for the CPU: the same three kernels as fused_kernels.py (Triton), in C.

A vote is V_noi = M_ni W_io (+ C_i). Each kernel rebuilds the votes of one (problem n, child i) for every parent
in a small buffer and reduces them at once, so the only large tensor read is M (N', I, 16): the votes never
reach memory, and every pass stays in the core's caches.

Layouts (float32, contiguous; "t" marks a transposed (16, O) pose layout, parents last, so the loops over
parents vectorise):
    M (N, I, 16)   Wt (I, 16, O)   C (I, 16) or NULL
    mut, invt, shiftt, S1t, S2t, gS1t, gS2t, gmut, ginvt (N, 16, O)    b, S0, gS0, gb (N, O)
    c, a, L, X, gL, gc, ga, gM (N, I, 16 for gM)    gWt (I, 16, O)
The exported functions split the problems into chunks over threads (below). Every output row of a problem is
written by the chunk that owns the problem, except gWt, which each chunk adds into its own buffer.
Index letters and formulas: fused_kernels.py. */

#include <math.h>
#include <stddef.h>
#include <string.h>

#define P 16
#define INLINE static inline __attribute__((always_inline)) /* so that each specialisation sees O */

/* exp(x) within 2 ulp of expf for x in [-87, 88] (Cephes' polynomial after the range reduction x = k ln 2 + r),
written so that the compiler vectorises the loops that call it (expf would be a call per element). Below -87 it
gives 0, where expf gives a denormal: denormal arithmetic is a hundred times slower on x86, and an assignment
below 1e-38 weighs nothing beside the others. */
INLINE float vexp(float x) {
    const float zero_below = x < -87.0f ? 0.0f : 1.0f;
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x; /* fminf and fmaxf would not vectorise (NaN rules) */
    const float k = rintf(x * 1.44269504088896341f);
    const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int bits = ((int)k + 127) << 23; /* 2^k, built in the exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale * zero_below;
}

/* V (16, O): the votes of child i for every parent; m = M[n, i] (16), wt = Wt[i] (16, O), off = C[i] or NULL. */
INLINE void votes(const float *restrict m, const float *restrict wt, const float *restrict off, int O,
                  float *restrict V) {
    for (int d = 0; d < 4; d++) { /* W's four rows of column d, read once for the four rows of V */
        const float *restrict w0 = wt + d * O, *restrict w1 = wt + (4 + d) * O;
        const float *restrict w2 = wt + (8 + d) * O, *restrict w3 = wt + (12 + d) * O;
        for (int r = 0; r < 4; r++) {
            const float m0 = m[4 * r], m1 = m[4 * r + 1], m2 = m[4 * r + 2], m3 = m[4 * r + 3];
            const float k = off ? off[4 * r + d] : 0.0f;
            float *restrict v = V + (4 * r + d) * O;
            for (int o = 0; o < O; o++) v[o] = k + m0 * w0[o] + m1 * w1[o] + m2 * w2[o] + m3 * w3[o];
        }
    }
}

/* x (O): the E-step logits b - 1/2 sum_h (V - mu)^2 inv; mut, invt (16, O) and b (O) of one problem. */
INLINE void logits(const float *restrict V, const float *restrict mut, const float *restrict invt,
                   const float *restrict b, int O, float *restrict x) {
    for (int o = 0; o < O; o++) x[o] = 0.0f;
    for (int h = 0; h < P; h++) {
        const float *restrict v = V + h * O, *restrict mu = mut + h * O, *restrict inv = invt + h * O;
        for (int o = 0; o < O; o++) {
            const float d = v[o] - mu[o];
            x[o] += d * d * inv[o];
        }
    }
    for (int o = 0; o < O; o++) x[o] = b[o] - 0.5f * x[o];
}

INLINE void moments(int n0, int n1, int I, int O, const float *M, const float *Wt, const float *C, const float *mut,
                    const float *invt, const float *b, const float *c, const float *a, const float *shiftt, float *S0,
                    float *S1t, float *S2t) {
    /* the buffers through restrict pointers: gcc does not vectorise loops that index a variable-length array */
    float V_[P * O], x_[O], ra_[O];
    float *restrict V = V_, *restrict x = x_, *restrict ra = ra_;
    const size_t PO = (size_t)P * O;
    for (int n = n0; n < n1; n++) {
        float *restrict s0 = S0 + (size_t)n * O, *restrict s1 = S1t + n * PO, *restrict s2 = S2t + n * PO;
        const float *restrict shift = shiftt + n * PO;
        memset(s0, 0, O * sizeof(float));
        memset(s1, 0, PO * sizeof(float));
        memset(s2, 0, PO * sizeof(float));
        for (int i = 0; i < I; i++) {
            const size_t ni = (size_t)n * I + i;
            votes(M + ni * P, Wt + (size_t)i * PO, C ? C + (size_t)i * P : NULL, O, V);
            if (mut) {
                logits(V, mut + n * PO, invt + n * PO, b + (size_t)n * O, O, x);
                for (int o = 0; o < O; o++) ra[o] = vexp(c[ni] + x[o]) * a[ni];
            } else {
                const float r = expf(c[ni]) * a[ni];
                for (int o = 0; o < O; o++) ra[o] = r;
            }
            for (int o = 0; o < O; o++) s0[o] += ra[o];
            for (int h = 0; h < P; h++) {
                const float *restrict v = V + h * O, *restrict sh = shift + h * O;
                float *restrict t1 = s1 + h * O, *restrict t2 = s2 + h * O;
                for (int o = 0; o < O; o++) {
                    const float D = v[o] - sh[o], t = ra[o] * D;
                    t1[o] += t;
                    t2[o] += t * D;
                }
            }
        }
    }
}

INLINE void lse(int n0, int n1, int I, int O, const float *M, const float *Wt, const float *C, const float *mut,
                const float *invt, const float *b, float *L, float *X) {
    float V_[P * O], x_[O];
    float *restrict V = V_, *restrict x = x_;
    const size_t PO = (size_t)P * O;
    for (int n = n0; n < n1; n++) {
        for (int i = 0; i < I; i++) {
            const size_t ni = (size_t)n * I + i;
            votes(M + ni * P, Wt + (size_t)i * PO, C ? C + (size_t)i * P : NULL, O, V);
            logits(V, mut + n * PO, invt + n * PO, b + (size_t)n * O, O, x);
            float top = x[0];
            for (int o = 1; o < O; o++) top = x[o] > top ? x[o] : top;
            float total = 0.0f, weighted = 0.0f;
            for (int o = 0; o < O; o++) {
                const float e = vexp(x[o] - top);
                total += e;
                weighted += e * x[o];
            }
            L[ni] = top + logf(total);
            X[ni] = weighted / total;
        }
    }
}

/* The gradients of moments (lse 0; with E-step terms when has_e) or of lse's L (lse 1, has_e 1), as
fused_kernels.backward_kernel: gM, gmut, ginvt, gb, gc, ga of the problems [n0, n1) are written (gmut, ginvt, gb,
gc, ga zeroed by the caller); gWt is added to. Unused inputs may be NULL. */
INLINE void backward(int n0, int n1, int I, int O, int lse, int has_e, const float *M, const float *Wt, const float *C,
                     const float *mut, const float *invt, const float *b, const float *c, const float *a,
                     const float *shiftt, const float *L, const float *gS0, const float *gS1t, const float *gS2t,
                     const float *gL, float *gM, float *gWt, float *gmut, float *ginvt, float *gb, float *gc,
                     float *ga) {
    float V_[P * O], dV_[P * O], x_[O], gl_[O], r_[O], gra_[O], prod_[O];
    float *restrict V = V_, *restrict dV = dV_, *restrict x = x_, *restrict gl = gl_, *restrict r = r_;
    float *restrict gra = gra_, *restrict prod = prod_;
    const size_t PO = (size_t)P * O;
    for (int n = n0; n < n1; n++) {
        const float *restrict mu = has_e ? mut + n * PO : NULL, *restrict inv = has_e ? invt + n * PO : NULL;
        float *restrict gmu = has_e ? gmut + n * PO : NULL, *restrict ginv = has_e ? ginvt + n * PO : NULL;
        for (int i = 0; i < I; i++) {
            const size_t ni = (size_t)n * I + i;
            const float *restrict m = M + ni * P, *restrict wt = Wt + (size_t)i * PO;
            votes(m, wt, C ? C + (size_t)i * P : NULL, O, V);
            if (has_e) logits(V, mu, inv, b + (size_t)n * O, O, x);
            const float *restrict gs0 = NULL, *restrict gs1 = NULL, *restrict gs2 = NULL, *restrict shift = NULL;
            if (lse) {
                for (int o = 0; o < O; o++) gl[o] = gL[ni] * vexp(x[o] - L[ni]);
            } else {
                gs0 = gS0 + (size_t)n * O, gs1 = gS1t + n * PO, gs2 = gS2t + n * PO, shift = shiftt + n * PO;
                for (int o = 0; o < O; o++) {
                    r[o] = vexp(c[ni] + (has_e ? x[o] : 0.0f));
                    gra[o] = gs0[o];
                }
                for (int h = 0; h < P; h++) { /* row pointers: gcc does not vectorise V[h * O + o] here */
                    const float *restrict v = V + h * O, *restrict sh = shift + h * O;
                    const float *restrict g1 = gs1 + h * O, *restrict g2 = gs2 + h * O;
                    for (int o = 0; o < O; o++) {
                        const float D = v[o] - sh[o];
                        gra[o] += (g1[o] + g2[o] * D) * D;
                    }
                }
                float sum_gl = 0.0f, sum_gr = 0.0f;
                for (int o = 0; o < O; o++) {
                    sum_gr += gra[o] * r[o];
                    r[o] *= a[ni]; /* Ra from here on */
                    gl[o] = gra[o] * r[o];
                    sum_gl += gl[o];
                }
                gc[ni] = sum_gl;
                ga[ni] = sum_gr;
            }
            if (has_e) {
                float *restrict gbn = gb + (size_t)n * O;
                for (int o = 0; o < O; o++) gbn[o] += gl[o];
            }
            if (lse) {
                for (int k = 0; k < P * O; k++) dV[k] = 0.0f;
            } else {
                for (int h = 0; h < P; h++) {
                    const float *restrict v = V + h * O, *restrict sh = shift + h * O;
                    const float *restrict g1 = gs1 + h * O, *restrict g2 = gs2 + h * O;
                    float *restrict dv = dV + h * O;
                    for (int o = 0; o < O; o++) dv[o] = r[o] * (g1[o] + 2.0f * g2[o] * (v[o] - sh[o]));
                }
            }
            if (has_e) {
                for (int h = 0; h < P; h++) {
                    const float *restrict v = V + h * O, *restrict m_ = mu + h * O, *restrict iv = inv + h * O;
                    float *restrict gm_ = gmu + h * O, *restrict gi = ginv + h * O, *restrict dv = dV + h * O;
                    for (int o = 0; o < O; o++) {
                        const float dm = v[o] - m_[o], t = gl[o] * dm * iv[o];
                        gm_[o] += t;
                        gi[o] -= 0.5f * gl[o] * dm * dm;
                        dv[o] -= t;
                    }
                }
            }
            /* V = M W: gM[r][c] = sum_{o,d} dV[4r+d][o] W[c][d][o], gW[c][d][o] += sum_r M[r][c] dV[4r+d][o] */
            float *restrict gm = gM + ni * P, *restrict gw = gWt + (size_t)i * PO;
            for (int r4 = 0; r4 < 4; r4++)
                for (int cc = 0; cc < 4; cc++) { /* products over the parents first, then one sum: vectorises */
                    const float *restrict d0 = dV + (4 * r4) * O, *restrict d1 = dV + (4 * r4 + 1) * O;
                    const float *restrict d2 = dV + (4 * r4 + 2) * O, *restrict d3 = dV + (4 * r4 + 3) * O;
                    const float *restrict w0 = wt + (4 * cc) * O, *restrict w1 = wt + (4 * cc + 1) * O;
                    const float *restrict w2 = wt + (4 * cc + 2) * O, *restrict w3 = wt + (4 * cc + 3) * O;
                    for (int o = 0; o < O; o++) prod[o] = d0[o] * w0[o] + d1[o] * w1[o] + d2[o] * w2[o] + d3[o] * w3[o];
                    float s = 0.0f;
                    for (int o = 0; o < O; o++) s += prod[o];
                    gm[4 * r4 + cc] = s;
                }
            for (int cc = 0; cc < 4; cc++)
                for (int d = 0; d < 4; d++) {
                    const float m0 = m[cc], m1 = m[4 + cc], m2 = m[8 + cc], m3 = m[12 + cc];
                    const float *restrict d0 = dV + d * O, *restrict d1 = dV + (4 + d) * O;
                    const float *restrict d2 = dV + (8 + d) * O, *restrict d3 = dV + (12 + d) * O;
                    float *restrict g = gw + (4 * cc + d) * O;
                    for (int o = 0; o < O; o++) g[o] += m0 * d0[o] + m1 * d1[o] + m2 * d2[o] + m3 * d3[o];
                }
        }
    }
}

/* The exported kernels: the problems [0, N) in `chunks` fixed chunks, spread over OpenMP's threads (torch's own
pool: the library links libgomp.so.1, which the loader resolves to the one torch has loaded, so its thread count
is torch's and no second pool spins beside it). Fixed chunks keep every sum the same whatever the thread count.
The common parent counts (16: the small preset's capsule layers, 32: the full one's) get code compiled for that
count, which the compiler unrolls and keeps in registers; others the general code. */
#define SPECIALISE(call) (O == 16 ? (void)(call(16)) : O == 32 ? (void)(call(32)) : (void)(call(O)))
#define N0 ((int)((long long)N * j / chunks))
#define N1 ((int)((long long)N * (j + 1) / chunks))

void capsdist_moments(int N, int chunks, int I, int O, const float *M, const float *Wt, const float *C,
                      const float *mut, const float *invt, const float *b, const float *c, const float *a,
                      const float *shiftt, float *S0, float *S1t, float *S2t) {
#define CALL(o) moments(N0, N1, I, o, M, Wt, C, mut, invt, b, c, a, shiftt, S0, S1t, S2t)
#pragma omp parallel for schedule(static)
    for (int j = 0; j < chunks; j++) SPECIALISE(CALL);
#undef CALL
}

void capsdist_lse(int N, int chunks, int I, int O, const float *M, const float *Wt, const float *C, const float *mut,
                  const float *invt, const float *b, float *L, float *X) {
#define CALL(o) lse(N0, N1, I, o, M, Wt, C, mut, invt, b, L, X)
#pragma omp parallel for schedule(static)
    for (int j = 0; j < chunks; j++) SPECIALISE(CALL);
#undef CALL
}

/* gWt: one (I, 16, O) buffer per chunk, which the caller sums in order. */
void capsdist_backward(int N, int chunks, int I, int O, int lse, const float *M, const float *Wt, const float *C,
                       const float *mut, const float *invt, const float *b, const float *c, const float *a,
                       const float *shiftt, const float *L, const float *gS0, const float *gS1t, const float *gS2t,
                       const float *gL, float *gM, float *gWt, float *gmut, float *ginvt, float *gb, float *gc,
                       float *ga) {
    /* lse and has_e as constants too, so that no branch is left inside the loops over parents */
#define ARGS(j) M, Wt, C, mut, invt, b, c, a, shiftt, L, gS0, gS1t, gS2t, gL, gM, gWt + (size_t)(j) * I * P * O, \
                gmut, ginvt, gb, gc, ga
#define CALL_LSE(o) backward(N0, N1, I, o, 1, 1, ARGS(j))
#define CALL_E(o) backward(N0, N1, I, o, 0, 1, ARGS(j))
#define CALL_PLAIN(o) backward(N0, N1, I, o, 0, 0, ARGS(j))
#pragma omp parallel for schedule(static)
    for (int j = 0; j < chunks; j++) {
        if (lse)
            SPECIALISE(CALL_LSE);
        else if (mut)
            SPECIALISE(CALL_E);
        else
            SPECIALISE(CALL_PLAIN);
    }
#undef ARGS
#undef CALL_LSE
#undef CALL_E
#undef CALL_PLAIN
}
