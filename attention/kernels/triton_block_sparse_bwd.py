"""Triton backward kernels of block-sparse flash attention.

With P = softmax probabilities (recomputed from the saved lse) and delta_i = sum_d dO_i * O_i
(minus the incoming lse gradient), dS = P * (dO V^T - delta). Three kernels, no atomics (the "split" backward):

* dq: per query tile, the same walk over listed key blocks and pooled entries as the forward;
* dk/dv: per key tile, a walk over the query blocks that list its key block (the transposed
  index is built with torch ops by the caller);
* pooled dk/dv: per tile of pooled entries and per slice of the query tiles, partial sums
  written to a float32 buffer that the caller reduces over slices.

The "fused" backward runs the dk/dv kernel with FUSE_DQ, adding each tile's dq term atomically to a float32
buffer; with pooled entries the dq kernel then adds only their terms (LISTED=False).
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)  # kernels may only read constexpr globals


@triton.jit
def _lse2(Lse, offs, N):
    # Base-2 lse; rows outside [0, N) or with lse = -inf get +inf so that their P is exactly 0.
    lse = tl.load(Lse + offs, mask=offs < N, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def bsa_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, PK, PV, PLW, IDX, CNT, DQ, DQACC,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    s_pkb, s_pkh, s_pkn, s_pvb, s_pvh, s_pvn,
    H, N, M, P, NQB, MAXK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, HAS_POOL: tl.constexpr, HAS_TAIL: tl.constexpr,
    LISTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # LISTED=False: only the pooled entries, added to the float32 dq of the listed blocks in DQACC (fused backward).
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qb = (pid_m * BLOCK_M) // BS
    SUBS: tl.constexpr = BS // BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m[:, None] < N
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dn + offs_d[None, :], mask=row_ok, other=0.0)
    lse2 = _lse2(Lse + pid_bh.to(tl.int64) * N, offs_m, N)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    row = pid_bh.to(tl.int64) * NQB + qb
    cnt = tl.load(CNT + row)
    idx_ptr = IDX + row * MAXK
    for t in range(0, cnt * SUBS if LISTED else 0):
        kb = tl.load(idx_ptr + t // SUBS)
        start = kb * BS + (t % SUBS) * BLOCK_N
        cols = start + offs_n
        kt = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :], mask=cols[:, None] < M, other=0.0)
        vt = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :], mask=cols[:, None] < M, other=0.0)
        s = tl.dot(q, tl.trans(kt)) * qk_scale
        if HAS_TAIL:
            if start + BLOCK_N > M:  # only the tile that crosses M
                s = tl.where(cols[None, :] < M, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(vt))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), kt, dq)

    if HAS_POOL:
        pk_base = PK + b * s_pkb + h * s_pkh
        pv_base = PV + b * s_pvb + h * s_pvh
        lw_ptr = PLW + row * P
        for start in range(0, P, BLOCK_N):
            cols = start + offs_n
            pk = tl.load(pk_base + cols[:, None] * s_pkn + offs_d[None, :], mask=cols[:, None] < P, other=0.0)
            pv = tl.load(pv_base + cols[:, None] * s_pvn + offs_d[None, :], mask=cols[:, None] < P, other=0.0)
            lw = tl.load(lw_ptr + cols, mask=cols < P, other=float("-inf"))
            s = tl.dot(q, tl.trans(pk)) * qk_scale + (lw * _LOG2E)[None, :]
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(pv))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(pk.dtype), pk, dq)

    dq_off = pid_bh.to(tl.int64) * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    dq = dq * sm_scale
    if not LISTED:
        dq += tl.load(DQACC + dq_off, mask=row_ok, other=0.0)
    tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=row_ok)


@triton.jit
def _dkdv_update(sT, vt, q, do, lse2, delta, dk, dv):
    """Fold one tile of queries into dk, dv; sT holds base-2 logits with keys as rows. Also returns dS^T."""
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(vt, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv, dsT


@triton.jit
def bsa_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, QIDX, QCNT, DK, DV, DQACC,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    H, N, M, NQB, NKB, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, FUSE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # FUSE_DQ: also add each tile's dq term, dS^T K * sm_scale, atomically to the float32 buffer DQACC (zeroed by
    # the caller): five matrix products per tile instead of the split backward's seven.
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kb = (pid_n * BLOCK_N) // BS
    SUBS: tl.constexpr = BS // BLOCK_M

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    key_ok = offs_n[:, None] < M
    # Keys past M load as zeros: computed but never stored, and their dq terms (dS^T K) vanish, so no masking.
    kt = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :], mask=key_ok, other=0.0)
    vt = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :], mask=key_ok, other=0.0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    lse_base = Lse + pid_bh.to(tl.int64) * N
    delta_base = Delta + pid_bh.to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    row = pid_bh.to(tl.int64) * NKB + kb
    cnt = tl.load(QCNT + row)
    idx_ptr = QIDX + row * NQB
    for t in range(0, cnt * SUBS):
        qb = tl.load(idx_ptr + t // SUBS)
        rows = qb * BS + (t % SUBS) * BLOCK_M + offs_m
        row_ok = rows[:, None] < N
        q = tl.load(q_base + rows[:, None] * s_qn + offs_d[None, :], mask=row_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * s_dn + offs_d[None, :], mask=row_ok, other=0.0)
        lse2 = _lse2(lse_base, rows, N)
        delta = tl.load(delta_base + rows, mask=rows < N, other=0.0)
        sT = tl.dot(kt, tl.trans(q)) * qk_scale
        dk, dv, dsT = _dkdv_update(sT, vt, q, do, lse2, delta, dk, dv)
        if FUSE_DQ:
            dq = tl.dot(tl.trans(dsT.to(kt.dtype)), kt) * sm_scale
            dq_ptr = DQACC + pid_bh.to(tl.int64) * N * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
            tl.atomic_add(dq_ptr, dq, mask=row_ok, sem="relaxed")

    out_off = pid_bh.to(tl.int64) * M * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def bsa_bwd_pooled_kernel(
    Q, PK, PV, DO, Lse, Delta, PLW, DPK, DPV,
    s_qb, s_qh, s_qn, s_pkb, s_pkh, s_pkn, s_pvb, s_pvh, s_pvn, s_db, s_dh, s_dn,
    H, N, P, NQB, TILES_PER_SPLIT, qk_scale,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_p = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    p_ok = offs_p[:, None] < P
    pk = tl.load(PK + b * s_pkb + h * s_pkh + offs_p[:, None] * s_pkn + offs_d[None, :], mask=p_ok, other=0.0)
    pv = tl.load(PV + b * s_pvb + h * s_pvh + offs_p[:, None] * s_pvn + offs_d[None, :], mask=p_ok, other=0.0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    lse_base = Lse + pid_bh.to(tl.int64) * N
    delta_base = Delta + pid_bh.to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    n_tiles = tl.cdiv(N, BLOCK_M)
    first = pid_s * TILES_PER_SPLIT
    last = tl.minimum(first + TILES_PER_SPLIT, n_tiles)
    for mt in range(first, last):
        rows = mt * BLOCK_M + offs_m
        row_ok = rows[:, None] < N
        q = tl.load(q_base + rows[:, None] * s_qn + offs_d[None, :], mask=row_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * s_dn + offs_d[None, :], mask=row_ok, other=0.0)
        lse2 = _lse2(lse_base, rows, N)
        delta = tl.load(delta_base + rows, mask=rows < N, other=0.0)
        qb = (mt * BLOCK_M) // BS
        lw = tl.load(PLW + (pid_bh.to(tl.int64) * NQB + qb) * P + offs_p, mask=offs_p < P, other=float("-inf"))
        sT = tl.dot(pk, tl.trans(q)) * qk_scale + (lw * _LOG2E)[:, None]
        dk, dv, _ = _dkdv_update(sT, pv, q, do, lse2, delta, dk, dv)

    # Partial sums, float32, laid out (SPLIT, B*H, P, D); the caller sums over SPLIT and scales dk.
    out_off = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * P * HEAD_DIM
    out_off += offs_p[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DPK + out_off, dk, mask=p_ok)
    tl.store(DPV + out_off, dv, mask=p_ok)

