"""Triton kernels of the fused EM routing: votes rebuilt in registers, never written to memory.

A vote is V_noi = M_ni W_io (+ C_i): the child pose M_ni (4x4) of routing problem n times the transform of
child i and parent type o (4x4), plus an optional per-child offset C_i (coordinate addition).
Each kernel rebuilds the votes it needs from M and W (64 multiply-adds each) and reduces them at once, so the
only large tensor any kernel reads is M (N', I, 16), O times smaller than the votes.

Index letters as in routing.py: n routing problem (N'), o parent (O), i child (I), h pose entry (16, h = 4r + d).
The E-step term of parent o for child i, given its mean mu, inverse variance inv and a per-parent constant b:
    x_noi = b_no - 1/2 sum_h (V_noih - mu_noh)^2 inv_noh
Kernels (every tensor float32, contiguous):
    moments   log R_noi = c_ni (+ x_noi with HAS_E); Ra = exp(log R) a_ni; D = V - shift_no
              S0_no = sum_i Ra, S1_noh = sum_i Ra D_h, S2_noh = sum_i Ra D_h^2               grid (N'/BN, O/BO)
    lse       L_ni = logsumexp_o x_noi, X_ni = softmax_o(x) . x (for the assignment entropy)  grid (N'/BN, I/BI)
    backward  one kernel for both: the gradients of M, W, mu, inv, b (and c, a for moments)  grid (N'/BN, O/BO)
The backward rebuilds the votes again; per-(n, o) gradients are summed over i in registers, per-(n, i) ones
(M, c, a) are added atomically across the O/BO programs of a row block, W's across the N'/BN row blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

# no specialisation on the sizes' divisibility by 16: one compiled kernel per constexpr set, whatever the batch
SIZES = ("N", "I", "O")


@triton.jit
def _tile(n_idx, o_idx, N, I, O):
    """Offsets and masks of a program's rows n_idx (BN,) and parents o_idx (BO,):
    m_base (BN, 1, 16) of M[n, 0, r, 0] and w_base (1, BO, 16) of W[0, o, 0, d] at pose entry h = 4r + d, with
    their masks; ni (BN,) of [n, 0] in (N', I) tensors; no (BN, BO) and no_h (BN, BO, 16) of [n, o] and
    [n, o, h] in (N', O) and (N', O, 16) tensors, with their masks."""
    h = tl.arange(0, 16)
    n_mask, o_mask = n_idx < N, o_idx < O
    m_base = n_idx[:, None, None] * (I * 16) + ((h // 4) * 4)[None, None, :]
    w_base = o_idx[None, :, None] * 16 + (h % 4)[None, None, :]
    no = n_idx[:, None] * O + o_idx[None, :]
    no_mask = n_mask[:, None] & o_mask[None, :]
    no_h = no[:, :, None] * 16 + h[None, None, :]
    return (
        n_mask,
        o_mask,
        m_base,
        n_mask[:, None, None],
        w_base,
        o_mask[None, :, None],
        n_idx * I,
        no,
        no_mask,
        no_h,
        no_mask[:, :, None],
    )


@triton.jit
def _load_e(mu_ptr, inv_ptr, b_ptr, no, no_mask, no_h, mask3):
    """The E-step parameters of a tile: mu, inv (BN, BO, 16) and b (BN, BO)."""
    return (
        tl.load(mu_ptr + no_h, mask=mask3, other=0.0),
        tl.load(inv_ptr + no_h, mask=mask3, other=0.0),
        tl.load(b_ptr + no, mask=no_mask, other=0.0),
    )


@triton.jit
def _votes(M_ptr, W_ptr, C_ptr, m_base, m_mask, w_base, w_mask, i, O, HAS_C: tl.constexpr):
    """V (BN, BO, 16) of child i: V[n, o, 4r + d] = sum over c of M[n, i, r, c] W[i, o, c, d]."""
    m_row, w_row = M_ptr + i * 16, W_ptr + i * (O * 16)
    V = tl.load(m_row + m_base, mask=m_mask, other=0.0) * tl.load(w_row + w_base, mask=w_mask, other=0.0)
    for c in tl.static_range(1, 4):
        V += tl.load(m_row + m_base + c, mask=m_mask, other=0.0) * tl.load(
            w_row + w_base + c * 4, mask=w_mask, other=0.0
        )
    if HAS_C:
        V += tl.load(C_ptr + i * 16 + tl.arange(0, 16))[None, None, :]
    return V


@triton.jit(do_not_specialize=SIZES)
def moments_kernel(
    M_ptr,
    W_ptr,
    C_ptr,
    mu_ptr,
    inv_ptr,
    b_ptr,
    c_ptr,
    a_ptr,
    shift_ptr,
    S0_ptr,
    S1_ptr,
    S2_ptr,
    N,
    I,
    O,
    HAS_C: tl.constexpr,
    HAS_E: tl.constexpr,
    BN: tl.constexpr,
    BO: tl.constexpr,
):
    n_idx = tl.program_id(0) * BN + tl.arange(0, BN)
    o_idx = tl.program_id(1) * BO + tl.arange(0, BO)
    n_mask, o_mask, m_base, m_mask, w_base, w_mask, ni, no, no_mask, no_h, mask3 = _tile(n_idx, o_idx, N, I, O)
    shift = tl.load(shift_ptr + no_h, mask=mask3, other=0.0)
    if HAS_E:
        mu, inv, b = _load_e(mu_ptr, inv_ptr, b_ptr, no, no_mask, no_h, mask3)
    s0 = tl.zeros((BN, BO), dtype=tl.float32)
    s1 = tl.zeros((BN, BO, 16), dtype=tl.float32)
    s2 = tl.zeros((BN, BO, 16), dtype=tl.float32)
    for i in range(I):
        V = _votes(M_ptr, W_ptr, C_ptr, m_base, m_mask, w_base, w_mask, i, O, HAS_C)
        log_r = tl.load(c_ptr + ni + i, mask=n_mask, other=0.0)[:, None]  # (BN, 1)
        if HAS_E:
            dm = V - mu
            log_r = log_r + b - 0.5 * tl.sum(dm * dm * inv, axis=2)
        a = tl.load(a_ptr + ni + i, mask=n_mask, other=0.0)[:, None]
        ra = tl.exp(tl.where(no_mask, log_r, float("-inf"))) * a  # (BN, BO), 0 off the tile's edge
        D = V - shift
        t = ra[:, :, None] * D
        s0 += ra
        s1 += t
        s2 += t * D
    tl.store(S0_ptr + no, s0, mask=no_mask)
    tl.store(S1_ptr + no_h, s1, mask=mask3)
    tl.store(S2_ptr + no_h, s2, mask=mask3)


@triton.jit(do_not_specialize=SIZES)
def lse_kernel(
    M_ptr,
    W_ptr,
    C_ptr,
    mu_ptr,
    inv_ptr,
    b_ptr,
    L_ptr,
    X_ptr,
    N,
    I,
    O,
    HAS_C: tl.constexpr,
    BN: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
):
    n_idx = tl.program_id(0) * BN + tl.arange(0, BN)
    o_idx = tl.arange(0, BO)  # every parent in one block: BO >= O
    n_mask, o_mask, m_base, m_mask, w_base, w_mask, ni, no, no_mask, no_h, mask3 = _tile(n_idx, o_idx, N, I, O)
    mu, inv, b = _load_e(mu_ptr, inv_ptr, b_ptr, no, no_mask, no_h, mask3)
    for k in range(BI):
        i_raw = tl.program_id(1) * BI + k
        i = tl.minimum(i_raw, I - 1)  # the last block's spare iterations recompute child I - 1, store nothing
        V = _votes(M_ptr, W_ptr, C_ptr, m_base, m_mask, w_base, w_mask, i, O, HAS_C)
        dm = V - mu
        x = tl.where(o_mask[None, :], b - 0.5 * tl.sum(dm * dm * inv, axis=2), float("-inf"))  # (BN, BO)
        top = tl.max(x, axis=1)
        e = tl.exp(x - top[:, None])
        total = tl.sum(e, axis=1)
        L = top + tl.log(total)
        X = tl.sum(e * tl.where(o_mask[None, :], x, 0.0), axis=1) / total
        out_mask = n_mask & (i_raw < I)
        tl.store(L_ptr + ni + i, L, mask=out_mask)
        tl.store(X_ptr + ni + i, X, mask=out_mask)


@triton.jit(do_not_specialize=SIZES)
def backward_kernel(
    M_ptr,
    W_ptr,
    C_ptr,
    mu_ptr,
    inv_ptr,
    b_ptr,
    c_ptr,
    a_ptr,
    shift_ptr,
    L_ptr,
    gS0_ptr,
    gS1_ptr,
    gS2_ptr,
    gL_ptr,
    gM_ptr,
    gW_ptr,
    gmu_ptr,
    ginv_ptr,
    gb_ptr,
    gc_ptr,
    ga_ptr,
    N,
    I,
    O,
    HAS_C: tl.constexpr,
    HAS_E: tl.constexpr,
    LSE: tl.constexpr,
    BN: tl.constexpr,
    BO: tl.constexpr,
):
    """Gradients of moments_kernel (LSE false) or lse_kernel's L (LSE true, HAS_E must be true).

    With gl_noi the gradient of the loss by the E-step logit x_noi (moments: of log R_noi):
        moments  gRa = gS0 + sum_h (gS1_h D_h + gS2_h D_h^2), gl = gRa Ra, direct dV = Ra (gS1 + 2 gS2 D)
        lse      gl = gL_ni softmax_o(x)_noi
        both     gb += gl, gmu += gl (V - mu) inv, ginv += -1/2 gl (V - mu)^2, dV -= gl (V - mu) inv
                 gM_ni += sum_o dV_noi W_io^T,  gW_io += sum_n M_ni^T dV_noi
        moments  gc_ni += sum_o gl, ga_ni += sum_o gRa R
    """
    n_idx = tl.program_id(0) * BN + tl.arange(0, BN)
    o_idx = tl.program_id(1) * BO + tl.arange(0, BO)
    n_mask, o_mask, m_base, m_mask, w_base, w_mask, ni, no, no_mask, no_h, mask3 = _tile(n_idx, o_idx, N, I, O)
    q = tl.arange(0, 4)
    gm_base = n_idx[:, None] * (I * 16) + q[None, :] * 4  # (BN, 4): offsets of gM[n, 0, r, 0]
    gw_base = o_idx[:, None] * 16 + q[None, :]  # (BO, 4): offsets of gW[0, o, 0, d]
    # the atomics' masks in full shape: Triton's interpreter applies a broadcast (1, 1) mask to one element only
    gm_mask = gm_base < N * (I * 16)  # n < N
    gw_mask = gw_base < O * 16  # o < O
    if HAS_E:
        mu, inv, b = _load_e(mu_ptr, inv_ptr, b_ptr, no, no_mask, no_h, mask3)
        gmu = tl.zeros((BN, BO, 16), dtype=tl.float32)
        ginv = tl.zeros((BN, BO, 16), dtype=tl.float32)
        gb = tl.zeros((BN, BO), dtype=tl.float32)
    if not LSE:
        shift = tl.load(shift_ptr + no_h, mask=mask3, other=0.0)
        gs0 = tl.load(gS0_ptr + no, mask=no_mask, other=0.0)
        gs1 = tl.load(gS1_ptr + no_h, mask=mask3, other=0.0)
        gs2 = tl.load(gS2_ptr + no_h, mask=mask3, other=0.0)
    for i in range(I):
        V = _votes(M_ptr, W_ptr, C_ptr, m_base, m_mask, w_base, w_mask, i, O, HAS_C)
        if HAS_E:
            dm = V - mu
            x = b - 0.5 * tl.sum(dm * dm * inv, axis=2)  # (BN, BO)
        if LSE:
            L = tl.load(L_ptr + ni + i, mask=n_mask, other=0.0)
            gL = tl.load(gL_ptr + ni + i, mask=n_mask, other=0.0)
            gl = gL[:, None] * tl.exp(tl.where(no_mask, x - L[:, None], float("-inf")))  # softmax_o(x) gL
            dV = tl.zeros((BN, BO, 16), dtype=tl.float32)
        else:
            log_r = tl.load(c_ptr + ni + i, mask=n_mask, other=0.0)[:, None]
            if HAS_E:
                log_r = log_r + x
            r = tl.exp(tl.where(no_mask, log_r, float("-inf")))
            a = tl.load(a_ptr + ni + i, mask=n_mask, other=0.0)
            ra = r * a[:, None]
            D = V - shift
            g_ra = gs0 + tl.sum(gs1 * D + gs2 * D * D, axis=2)  # (BN, BO)
            gl = g_ra * ra
            dV = ra[:, :, None] * (gs1 + 2.0 * gs2 * D)
            tl.atomic_add(gc_ptr + ni + i, tl.sum(gl, axis=1), mask=n_mask)
            tl.atomic_add(ga_ptr + ni + i, tl.sum(g_ra * r, axis=1), mask=n_mask)
        if HAS_E:
            t = gl[:, :, None] * dm * inv
            gb += gl
            gmu += t
            ginv += -0.5 * gl[:, :, None] * dm * dm
            dV -= t
        m_row, w_row = i * 16, i * (O * 16)
        for c in tl.static_range(4):
            w = tl.load(W_ptr + w_row + w_base + c * 4, mask=w_mask, other=0.0)  # (1, BO, 16): W[i, o, c, d]
            m = tl.load(M_ptr + m_row + m_base + c, mask=m_mask, other=0.0)  # (BN, 1, 16): M[n, i, r, c]
            gm = tl.sum(tl.reshape(tl.sum(dV * w, axis=1), (BN, 4, 4)), axis=2)  # (BN, 4 r): sum over o, d
            tl.atomic_add(gM_ptr + m_row + gm_base + c, gm, mask=gm_mask)
            gw = tl.sum(tl.reshape(tl.sum(dV * m, axis=0), (BO, 4, 4)), axis=1)  # (BO, 4 d): sum over n, r
            tl.atomic_add(gW_ptr + w_row + gw_base + c * 4, gw, mask=gw_mask)
    if HAS_E:
        tl.store(gmu_ptr + no_h, gmu, mask=mask3)
        tl.store(ginv_ptr + no_h, ginv, mask=mask3)
        tl.store(gb_ptr + no, gb, mask=no_mask)
