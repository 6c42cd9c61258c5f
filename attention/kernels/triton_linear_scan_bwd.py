"""Backward of the gated linear scan in Triton, and the autograd function that pairs it with the Triton forward.

With A_i = g_1 + ... + g_i inside a chunk (so the decay from token j to i is exp(A_i - A_j)), E_c the state entering
chunk c and dE_c its gradient, the backward takes three launches besides the forward's recomputed states:
1. per chunk: its share of the state gradient, sum_i exp(A_i) q_i^T do_i;
2. the forward's state pass run backwards over the chunks: dE_c = that share + exp(A_T) dE_{c+1} (dE after the last
   chunk is the final state's gradient, dE before the first the initial state's);
3. per chunk, the products of flash attention's backward with the decay mask M_ij = exp(A_i - A_j) (j <= i):
   dq = (do v^T . M) k + exp(A_i) do E_c^T, dk = (do v^T . M)^T q + exp(A_T - A_j) v dE_{c+1}^T,
   dv = (q k^T . M)^T do + exp(A_T - A_j) k dE_{c+1}.
The log decays' gradient needs no more products: with q~_t = q_t exp(G_t) and k~_t = k_t exp(-G_t) (G the prefix sum
of g over the sequence) the scan depends on G only through q~, k~ and the final state's factor exp(G_L), so
dL/dG_t = q_t . dq_t - k_t . dk_t, plus <dFinal, S_L> at t = L, and dg is the reverse cumulative sum of that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_linear_scan as forward_kernels


@triton.jit
def _state_gradient_kernel(Q, DO, G, Shares, H, L, NUM_CHUNKS, P,
                           sq_b, sq_h, sq_l, sq_n, sd_b, sd_h, sd_l, sd_p, sg_b, sg_h, sg_l,
                           T: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    chunk, bh, p_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    tokens = (chunk * T + tl.arange(0, T)).to(tl.int64)
    valid = tokens < L
    dims, cols = tl.arange(0, N), p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    g = tl.load(G + b * sg_b + h * sg_h + tokens * sg_l, mask=valid, other=0.0).to(tl.float32)
    q = tl.load(Q + b * sq_b + h * sq_h + tokens[:, None] * sq_l + dims[None, :] * sq_n, mask=valid[:, None], other=0.0)
    do = tl.load(DO + b * sd_b + h * sd_h + tokens[:, None] * sd_l + cols[None, :] * sd_p,
                 mask=valid[:, None] & (cols[None, :] < P), other=0.0)
    q = (q.to(tl.float32) * tl.exp(tl.cumsum(g, 0))[:, None]).to(do.dtype)
    share = tl.dot(tl.trans(q), do, input_precision=PRECISION)
    slot = bh.to(tl.int64) * NUM_CHUNKS + chunk
    tl.store(Shares + (slot * N + dims[:, None]) * P + cols[None, :], share, mask=cols[None, :] < P)


@triton.jit
def _chunk_gradient_kernel(Q, K, V, G, DO, States, DStates, DQ, DK, DV, DG, H, L, NUM_CHUNKS, P,
                           sq_b, sq_h, sq_l, sq_n, sk_b, sk_h, sk_l, sk_n, sv_b, sv_h, sv_l, sv_p,
                           sg_b, sg_h, sg_l, sd_b, sd_h, sd_l, sd_p,
                           T: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    chunk, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    steps = tl.arange(0, T)
    tokens = (chunk * T + steps).to(tl.int64)
    valid = tokens < L
    dims = tl.arange(0, N)
    g_base = G + b * sg_b + h * sg_h
    g = tl.load(g_base + tokens * sg_l, mask=valid, other=0.0).to(tl.float32)
    g_next = tl.load(g_base + (tokens + 1) * sg_l, mask=(steps + 1 < T) & (tokens + 1 < L), other=0.0).to(tl.float32)
    to_end = tl.exp(tl.cumsum(g_next, 0, reverse=True))  # exp(A_T - A_j), summed over the span itself
    from_start = tl.exp(tl.cumsum(g, 0))                  # exp(A_i)
    below = steps[:, None] > steps[None, :]
    spans = tl.cumsum(tl.where(below, g[:, None], 0.0), 0)
    mask = tl.exp(tl.where(below | (steps[:, None] == steps[None, :]), spans, float("-inf")))
    q = tl.load(Q + b * sq_b + h * sq_h + tokens[:, None] * sq_l + dims[None, :] * sq_n, mask=valid[:, None], other=0.0)
    k = tl.load(K + b * sk_b + h * sk_h + tokens[:, None] * sk_l + dims[None, :] * sk_n, mask=valid[:, None], other=0.0)
    slot = bh.to(tl.int64) * NUM_CHUNKS + chunk
    d_weights = tl.zeros([T, T], tl.float32)
    dq_state = tl.zeros([T, N], tl.float32)
    dk_state = tl.zeros([T, N], tl.float32)
    for p_start in range(0, P, BLOCK_P):  # first pass over the values: everything contracted over them
        cols = p_start + tl.arange(0, BLOCK_P)
        col_ok = cols[None, :] < P
        v = tl.load(V + b * sv_b + h * sv_h + tokens[:, None] * sv_l + cols[None, :] * sv_p,
                    mask=valid[:, None] & col_ok, other=0.0)
        do = tl.load(DO + b * sd_b + h * sd_h + tokens[:, None] * sd_l + cols[None, :] * sd_p,
                     mask=valid[:, None] & col_ok, other=0.0)
        entering = tl.load(States + (slot * N + dims[:, None]) * P + cols[None, :], mask=col_ok, other=0.0)
        d_leaving = tl.load(DStates + (slot * N + dims[:, None]) * P + cols[None, :], mask=col_ok, other=0.0)
        d_weights = tl.dot(do, tl.trans(v), d_weights, input_precision=PRECISION)
        dq_state = tl.dot(do, tl.trans(entering.to(do.dtype)), dq_state, input_precision=PRECISION)
        dk_state = tl.dot(v, tl.trans(d_leaving.to(v.dtype)), dk_state, input_precision=PRECISION)
    d_weights = (d_weights * mask).to(q.dtype)
    dq = tl.dot(d_weights, k, input_precision=PRECISION) + from_start[:, None] * dq_state
    dk = tl.dot(tl.trans(d_weights), q, input_precision=PRECISION) + to_end[:, None] * dk_state
    weights_t = tl.trans((tl.dot(q, tl.trans(k), input_precision=PRECISION) * mask).to(q.dtype))
    k_decayed = (k.to(tl.float32) * to_end[:, None]).to(k.dtype)
    for p_start in range(0, P, BLOCK_P):  # second pass: dv, tile by tile
        cols = p_start + tl.arange(0, BLOCK_P)
        col_ok = cols[None, :] < P
        do = tl.load(DO + b * sd_b + h * sd_h + tokens[:, None] * sd_l + cols[None, :] * sd_p,
                     mask=valid[:, None] & col_ok, other=0.0)
        d_leaving = tl.load(DStates + (slot * N + dims[:, None]) * P + cols[None, :], mask=col_ok, other=0.0)
        dv = tl.dot(weights_t, do.to(q.dtype), input_precision=PRECISION)
        dv = tl.dot(k_decayed, d_leaving.to(k.dtype), dv, input_precision=PRECISION)
        tl.store(DV + ((bh.to(tl.int64) * L + tokens[:, None]) * P + cols[None, :]), dv.to(DV.dtype.element_ty),
                 mask=valid[:, None] & col_ok)
    out = (bh.to(tl.int64) * L + tokens[:, None]) * N + dims[None, :]
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=valid[:, None])
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=valid[:, None])
    d_log = tl.sum(q.to(tl.float32) * dq, 1) - tl.sum(k.to(tl.float32) * dk, 1)
    tl.store(DG + bh.to(tl.int64) * L + tokens, d_log, mask=valid)


def linear_scan_backward(q, k, v, log_decay, states, decay, final, d_out, d_final, chunk_size, has_initial):
    """(dq, dk, dv, d_log_decay, d_initial) from the forward's entering states and chunk decays (float32)."""
    B, H, L, N = q.shape
    P = v.shape[-1]
    num_chunks = states.shape[1]
    block_p = min(P, forward_kernels.MAX_BLOCK_P)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    d_out = d_out.to(q.dtype)
    d_states = torch.empty_like(states)
    grid = (num_chunks, B * H, triton.cdiv(P, block_p))
    _state_gradient_kernel[grid](q, d_out, log_decay, d_states, H, L, num_chunks, P, *q.stride(), *d_out.stride(),
                                 *log_decay.stride(), T=chunk_size, N=N, BLOCK_P=block_p, PRECISION=precision)
    d_initial = torch.empty(B, H, N, P, device=q.device, dtype=torch.float32)
    d_end = None if d_final is None else d_final.float().contiguous()
    # The state pass run over the chunks backwards: slot c then holds dE_{c+1}, and d_initial ends as dE_0.
    forward_kernels.state_pass(d_states, decay, d_end, d_initial, reverse=True)
    dq, dk = (torch.empty(B, H, L, N, device=q.device, dtype=q.dtype) for _ in range(2))
    dv = torch.empty(B, H, L, P, device=q.device, dtype=q.dtype)
    d_log = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    _chunk_gradient_kernel[(num_chunks, B * H)](
        q, k, v, log_decay, d_out, states, d_states, dq, dk, dv, d_log, H, L, num_chunks, P, *q.stride(),
        *k.stride(), *v.stride(), *log_decay.stride(), *d_out.stride(), T=chunk_size, N=N, BLOCK_P=block_p,
        PRECISION=precision)
    d_log = d_log.flip(-1).cumsum(-1).flip(-1)
    if d_final is not None:  # the final state carries exp(G_L), and G_L sums every g
        d_log = d_log + (d_final.float() * final).sum((-2, -1))[..., None]
    return dq, dk, dv, d_log, d_initial if has_initial else None


class TritonLinearScan(torch.autograd.Function):
    """The Triton forward and backward as one differentiable op (CUDA; inputs as ``linear_scan_usable`` takes)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, chunk_size, initial_state):
        k_in, v_in = k.to(q.dtype), v.to(q.dtype)
        out, final, states, decay = forward_kernels.forward_with_states(q, k_in, v_in, log_decay, chunk_size,
                                                                         initial_state, out_dtype=v.dtype)
        ctx.save_for_backward(q, k_in, v_in, log_decay, states, decay, final)
        ctx.set_materialize_grads(False)  # the final state is mostly unused: no zero gradient made for it
        ctx.chunk_size, ctx.has_initial = chunk_size, initial_state is not None
        ctx.dtypes = (k.dtype, v.dtype, log_decay.dtype, None if initial_state is None else initial_state.dtype)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, log_decay, states, decay, final = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
        dq, dk, dv, d_log, d_initial = linear_scan_backward(
            q, k, v, log_decay, states, decay, final, d_out, d_final, ctx.chunk_size, ctx.has_initial)
        k_dtype, v_dtype, g_dtype, s_dtype = ctx.dtypes
        return (dq, dk.to(k_dtype), dv.to(v_dtype), d_log.to(g_dtype), None,
                None if d_initial is None else d_initial.to(s_dtype))
