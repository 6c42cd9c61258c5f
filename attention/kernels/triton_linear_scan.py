"""Forward of the gated linear scan (``linear_scan.chunked_linear_scan``) in Triton (its backward:
``triton_linear_scan_bwd``).

Three launches over chunks of T tokens of each (batch, head):
1. per chunk: its state contribution U_c = sum_j exp(g_{j+1} + ... + g_last) k_j^T v_j and its total log decay;
2. per (batch, head) and tile of state entries: S_c = exp(decay_c) S_{c-1} + U_c, a loop over chunks that overwrites
   each U_c with the state entering chunk c (the recurrence is elementwise in the state, so tiles are independent);
3. per chunk: the in-chunk outputs sum_{j<=i} (q_i . k_j) exp(g_{j+1} + ... + g_i) v_j plus exp(g_1 + ... + g_i)
   q_i S_{c-1}.
Decays are exps of sums of g over spans (summed directly, never a difference of prefix sums), all <= 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

LAUNCH_ERRORS = (OutOfResources, CompilationError)
MAX_BLOCK_P = 64  # wider value tiles would not fit the state tile in registers next to q and k
STATE_TILE = 1024


@triton.jit
def _chunk_update_kernel(K, V, G, Updates, Decay, H, L, NUM_CHUNKS, P,
                         sk_b, sk_h, sk_l, sk_n, sv_b, sv_h, sv_l, sv_p, sg_b, sg_h, sg_l,
                         T: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    chunk, bh, p_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    steps = tl.arange(0, T)
    tokens = (chunk * T + steps).to(tl.int64)
    valid = tokens < L
    dims, cols = tl.arange(0, N), p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    g_base = G + b * sg_b + h * sg_h
    g = tl.load(g_base + tokens * sg_l, mask=valid, other=0.0).to(tl.float32)
    # Decay from token j to the chunk's end: g summed over j+1..T-1, a reverse cumulative sum of g shifted by one.
    g_next = tl.load(g_base + (tokens + 1) * sg_l, mask=(steps + 1 < T) & (tokens + 1 < L), other=0.0).to(tl.float32)
    to_end = tl.cumsum(g_next, 0, reverse=True)
    k = tl.load(K + b * sk_b + h * sk_h + tokens[:, None] * sk_l + dims[None, :] * sk_n,
                mask=valid[:, None], other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + tokens[:, None] * sv_l + cols[None, :] * sv_p,
                mask=valid[:, None] & (cols[None, :] < P), other=0.0)
    k = (k.to(tl.float32) * tl.exp(to_end)[:, None]).to(v.dtype)
    update = tl.dot(tl.trans(k), v, input_precision=PRECISION)
    slot = bh.to(tl.int64) * NUM_CHUNKS + chunk
    tl.store(Updates + (slot * N + dims[:, None]) * P + cols[None, :], update, mask=cols[None, :] < P)
    tl.store(Decay + slot, tl.sum(g, 0))


@triton.jit
def _state_pass_kernel(Updates, Decay, Initial, Final, NUM_CHUNKS, SIZE,
                       HAS_INITIAL: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    # REVERSE: the same recurrence from the last chunk to the first (the backward's pass over state gradients).
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    entries = tile * BLOCK + tl.arange(0, BLOCK)
    mask = entries < SIZE
    if HAS_INITIAL:
        state = tl.load(Initial + bh * SIZE + entries, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK], tl.float32)
    for step in range(NUM_CHUNKS):
        chunk = NUM_CHUNKS - 1 - step if REVERSE else step
        slot = bh * NUM_CHUNKS + chunk
        update = tl.load(Updates + slot * SIZE + entries, mask=mask, other=0.0)
        tl.store(Updates + slot * SIZE + entries, state, mask=mask)  # now the state entering this chunk
        state = tl.exp(tl.load(Decay + slot)) * state + update
    tl.store(Final + bh * SIZE + entries, state, mask=mask)


@triton.jit
def _chunk_output_kernel(Q, K, V, G, States, Out, H, L, NUM_CHUNKS, P,
                         sq_b, sq_h, sq_l, sq_n, sk_b, sk_h, sk_l, sk_n, sv_b, sv_h, sv_l, sv_p, sg_b, sg_h, sg_l,
                         T: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    chunk, bh, p_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    steps = tl.arange(0, T)
    tokens = (chunk * T + steps).to(tl.int64)
    valid = tokens < L
    dims, cols = tl.arange(0, N), p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    g = tl.load(G + b * sg_b + h * sg_h + tokens * sg_l, mask=valid, other=0.0).to(tl.float32)
    q = tl.load(Q + b * sq_b + h * sq_h + tokens[:, None] * sq_l + dims[None, :] * sq_n,
                mask=valid[:, None], other=0.0)
    k = tl.load(K + b * sk_b + h * sk_h + tokens[:, None] * sk_l + dims[None, :] * sk_n,
                mask=valid[:, None], other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + tokens[:, None] * sv_l + cols[None, :] * sv_p,
                mask=valid[:, None] & (cols[None, :] < P), other=0.0)
    # spans[i, j] = g_{j+1} + ... + g_i: a cumulative sum down the columns of g masked to rows below the diagonal.
    below = steps[:, None] > steps[None, :]
    spans = tl.cumsum(tl.where(below, g[:, None], 0.0), 0)
    causal = below | (steps[:, None] == steps[None, :])
    weights = tl.dot(q, tl.trans(k), input_precision=PRECISION) * tl.exp(tl.where(causal, spans, float("-inf")))
    out = tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
    slot = bh.to(tl.int64) * NUM_CHUNKS + chunk
    state = tl.load(States + (slot * N + dims[:, None]) * P + cols[None, :], mask=cols[None, :] < P, other=0.0)
    from_start = tl.exp(tl.cumsum(g, 0))  # decay from the chunk's start to token i, inclusive
    out += from_start[:, None] * tl.dot(q, state.to(q.dtype), input_precision=PRECISION)
    tl.store(Out + ((bh.to(tl.int64) * L + tokens[:, None]) * P + cols[None, :]), out.to(Out.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < P))


def _pow2_between(x: int, low: int, high: int) -> bool:
    return low <= x <= high and x & (x - 1) == 0


def linear_scan_usable(q: torch.Tensor, v: torch.Tensor, chunk_size: int = 64) -> bool:
    """Whether the kernels take these inputs: CUDA, fp16/bf16/fp32, N, P and the chunk size powers of two in 16..128."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return (q.is_cuda and v.is_cuda and q.dtype in dtypes and v.dtype in dtypes
            and _pow2_between(q.shape[-1], 16, 128) and _pow2_between(v.shape[-1], 16, 128)
            and _pow2_between(chunk_size, 16, 128))


def state_pass(updates, decay, initial, final, reverse=False):
    """Overwrite each chunk's update in `updates` (B*H, C, N, P) with the state entering it (leaving it, reversed),
    starting from `initial` (float32 (B, H, N, P) or None for zeros); the state after the last chunk goes to `final`."""
    size = updates.shape[-2] * updates.shape[-1]
    _state_pass_kernel[(triton.cdiv(size, STATE_TILE), updates.shape[0])](
        updates, decay, final if initial is None else initial, final, updates.shape[1], size,
        HAS_INITIAL=initial is not None, REVERSE=reverse, BLOCK=STATE_TILE)


@torch.no_grad()
def linear_scan(q, k, v, log_decay, chunk_size=64, initial_state=None):
    """(out, final_state): out (B, H, L, P) in v's dtype, final_state (B, H, N, P) float32; any input strides.

    q, k, v are cast to q's dtype for the matmuls (float32 inputs multiply in full float32, not TF32).
    """
    out, final, _, _ = forward_with_states(q, k.to(q.dtype), v.to(q.dtype), log_decay, chunk_size, initial_state,
                                           out_dtype=v.dtype)
    return out, final


def forward_with_states(q, k, v, log_decay, chunk_size=64, initial_state=None, out_dtype=None):
    """linear_scan's (out, final), out in `out_dtype` (default v's), plus what the backward reuses: the state
    entering each chunk (B*H, C, N, P) and each chunk's total log decay (B*H, C), float32. k and v must be in q's
    dtype already."""
    if not _pow2_between(chunk_size, 16, 128):
        raise ValueError(f"chunk_size must be a power of two in 16..128, not {chunk_size}")
    B, H, L, N = q.shape
    P = v.shape[-1]
    num_chunks = triton.cdiv(L, chunk_size)
    updates = torch.empty(B * H, num_chunks, N, P, device=q.device, dtype=torch.float32)
    decay = torch.empty(B * H, num_chunks, device=q.device, dtype=torch.float32)
    final = torch.empty(B, H, N, P, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, L, P, device=q.device, dtype=out_dtype or v.dtype)
    block_p = min(P, MAX_BLOCK_P)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # the latter unused: 16-bit inputs
    strides = (*k.stride(), *v.stride(), *log_decay.stride())
    grid = (num_chunks, B * H, triton.cdiv(P, block_p))
    if num_chunks:
        _chunk_update_kernel[grid](k, v, log_decay, updates, decay, H, L, num_chunks, P, *strides,
                                   T=chunk_size, N=N, BLOCK_P=block_p, PRECISION=precision)
    state_pass(updates, decay, None if initial_state is None else initial_state.float().contiguous(), final)
    if num_chunks:
        _chunk_output_kernel[grid](q, k, v, log_decay, updates, out, H, L, num_chunks, P, *q.stride(), *strides,
                                   T=chunk_size, N=N, BLOCK_P=block_p, PRECISION=precision)
    return out, final, updates, decay
