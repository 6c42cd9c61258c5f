"""Triton forward kernel of block-sparse flash attention (online softmax in base 2).

One program owns BLOCK_M queries of one (batch, head). It walks the key blocks listed for its
query block in tiles of BLOCK_N keys, then the pooled entries, and writes out and the
natural-log lse. Only the last dimension must be contiguous; other strides are passed in.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Kernels may only read globals that are constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _online_update(s, vt, m_i, l_i, acc):
    """Fold one tile of base-2 logits s (BLOCK_M x BLOCK_N) and its values vt into the state."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no finite logit yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(vt.dtype), vt, acc)
    return m_new, l_i, acc


@triton.jit
def bsa_fwd_kernel(
    Q, K, V, PK, PV, PLW, IDX, CNT, Out, Lse,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_pkb, s_pkh, s_pkn, s_pvb, s_pvh, s_pvn,
    H, N, M, P, NQB, MAXK, qk_scale,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, HAS_POOL: tl.constexpr, HAS_TAIL: tl.constexpr,
    USE_TMA: tl.constexpr, TAIL_BRANCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qb = (pid_m * BLOCK_M) // BS
    SUBS: tl.constexpr = BS // BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                mask=offs_m[:, None] < N, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if USE_TMA:
        # Bulk tensor copies: no address math per element, rows >= M arrive as zeros.
        k_desc = tl.make_tensor_descriptor(k_base, [M, HEAD_DIM], [s_kn, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [M, HEAD_DIM], [s_vn, 1], [BLOCK_N, HEAD_DIM])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    row = pid_bh.to(tl.int64) * NQB + qb
    cnt = tl.load(CNT + row)
    idx_ptr = IDX + row * MAXK
    # One flat loop over (listed block, sub-tile) pipelines better than a nested one.
    for t in range(0, cnt * SUBS):
        kb = tl.load(idx_ptr + t // SUBS)
        start = kb * BS + (t % SUBS) * BLOCK_N
        cols = start + offs_n
        if USE_TMA:
            kt = k_desc.load([start, 0])
            vt = v_desc.load([start, 0])
        elif HAS_TAIL:
            kt = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :], mask=cols[:, None] < M, other=0.0)
            vt = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :], mask=cols[:, None] < M, other=0.0)
        else:
            kt = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :])
            vt = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :])
        s = tl.dot(q, tl.trans(kt)) * qk_scale
        if HAS_TAIL:
            if TAIL_BRANCH:  # mask only the tile that crosses M
                if start + BLOCK_N > M:
                    s = tl.where(cols[None, :] < M, s, float("-inf"))
            else:
                s = tl.where(cols[None, :] < M, s, float("-inf"))
        m_i, l_i, acc = _online_update(s, vt, m_i, l_i, acc)

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
            m_i, l_i, acc = _online_update(s, pv, m_i, l_i, acc)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    o_ptr = Out + pid_bh.to(tl.int64) * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N)
    tl.store(Lse + pid_bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)
