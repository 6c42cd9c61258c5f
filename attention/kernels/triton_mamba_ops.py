"""Triton versions of ``mamba_ops``' reference functions (same signatures): each reads its inputs once, through
their strides (slices of the input projection need no copy), and writes one contiguous output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _causal_conv_silu_kernel(X, W, Bias, Out, L, C, sx_b, sx_l, so_b, so_l,
                             SIZE: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    l_tile, c_tile, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    steps = (l_tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)  # output positions, in the output's order
    cols = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(SIZE):
        # Tap j reads position s - (SIZE - 1) + j of the (possibly reversed) sequence.
        if REVERSE:
            source = L - 1 - steps + (SIZE - 1) - j
        else:
            source = steps - (SIZE - 1) + j
        ok = (source >= 0) & (source < L) & (steps < L)
        x = tl.load(X + b * sx_b + source[:, None] * sx_l + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(W + cols * SIZE + j, mask=col_ok, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.sigmoid(acc)
    tl.store(Out + b * so_b + steps[:, None] * so_l + cols[None, :], acc.to(Out.dtype.element_ty),
             mask=(steps < L)[:, None] & col_ok[None, :])


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     reverse: bool = False) -> torch.Tensor:
    batch, length, channels = x.shape
    weight = weight.reshape(channels, -1).contiguous()
    out = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
    block_l, block_c = 32, 128
    grid = (triton.cdiv(length, block_l), triton.cdiv(channels, block_c), batch)
    _causal_conv_silu_kernel[grid](x, weight, bias if bias is not None else weight, out, length, channels,
                                   x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                                   SIZE=weight.shape[1], REVERSE=reverse, HAS_BIAS=bias is not None,
                                   BLOCK_L=block_l, BLOCK_C=block_c)
    return out


@triton.jit
def _gated_rms_norm_kernel(F_, Bk, Z, W, Out, L, C, eps, sf_b, sf_l, sb_b, sb_l, sz_b, sz_l, so_b, so_l,
                           BLOCK_C: tl.constexpr):
    row, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    fwd = tl.load(F_ + b * sf_b + row * sf_l + cols, mask=ok, other=0.0).to(tl.float32)
    bwd = tl.load(Bk + b * sb_b + (L - 1 - row) * sb_l + cols, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(Z + b * sz_b + row * sz_l + cols, mask=ok, other=0.0).to(tl.float32)
    gated = (fwd + bwd) * (z * tl.sigmoid(z))
    scale = 1.0 / tl.sqrt(tl.sum(gated * gated, 0) / C + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + b * so_b + row * so_l + cols, (gated * scale * w).to(Out.dtype.element_ty), mask=ok)


def gated_rms_norm(forward: torch.Tensor, backward_reversed: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    batch, length, channels = forward.shape
    out = torch.empty(batch, length, channels, device=forward.device, dtype=forward.dtype)
    block_c = triton.next_power_of_2(channels)
    _gated_rms_norm_kernel[(length, batch)](
        forward, backward_reversed, z, weight, out, length, channels, eps,
        forward.stride(0), forward.stride(1), backward_reversed.stride(0), backward_reversed.stride(1),
        z.stride(0), z.stride(1), out.stride(0), out.stride(1), BLOCK_C=block_c, num_warps=4 if block_c <= 1024 else 8)
    return out
