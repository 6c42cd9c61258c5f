"""Merge of two attentions over disjoint key sets by log-sum-exp, fused in Triton.

Same signature and result as ``reference.merge_attention``. The PyTorch version runs a dozen elementwise kernels in
float32 over the (B, H, N, D) outputs; block diffusion merges the in-chunk part with the cached block-external part
at every step of every layer, where those passes cost as much as the in-chunk attention itself. Here one program
reads a tile of rows of both outputs (any strides: SDPA's outputs are transposed views) and both log-sum-exps once,
and writes the merged rows and their log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

LAUNCH_ERRORS = (OutOfResources, CompilationError)
ROWS = 32


@triton.jit
def _merge_kernel(OutA, LseA, OutB, LseB, Out, Lse, H, N, HEAD_DIM,
                  sa_b, sa_h, sa_n, sb_b, sb_h, sb_n,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tile * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    lse_a = tl.load(LseA + bh * N + rows, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(LseB + bh * N + rows, mask=row_ok, other=float("-inf"))
    top = tl.maximum(lse_a, lse_b)
    top = tl.where(top == float("-inf"), 0.0, top)  # both empty: weights 0, not NaN
    w_a, w_b = tl.exp(lse_a - top), tl.exp(lse_b - top)
    total = w_a + w_b
    nonempty = total > 0
    total = tl.where(nonempty, total, 1.0)
    mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)[:, None]
    a = tl.load(OutA + b * sa_b + h * sa_h + rows64 * sa_n + dims[None, :], mask=mask, other=0.0)
    o_b = tl.load(OutB + b * sb_b + h * sb_h + rows64 * sb_n + dims[None, :], mask=mask, other=0.0)
    out = (a.to(tl.float32) * (w_a / total)[:, None] + o_b.to(tl.float32) * (w_b / total)[:, None])
    tl.store(Out + (bh * N + rows64) * HEAD_DIM + dims[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + bh * N + rows, tl.where(nonempty, tl.log(total) + top, float("-inf")), mask=row_ok)


def merge_usable(out_a: torch.Tensor, out_b: torch.Tensor) -> bool:
    return (out_a.shape == out_b.shape and out_a.ndim == 4 and out_a.dtype == out_b.dtype
            and out_a.stride(-1) == 1 and out_b.stride(-1) == 1 and out_a.shape[-1] <= 256)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """(out, lse) of attention over the union of the two key sets; out in out_a's dtype, lse float32, contiguous."""
    B, H, N, D = out_a.shape
    lse_a, lse_b = lse_a.float().contiguous(), lse_b.float().contiguous()
    out = torch.empty((B, H, N, D), dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=out_a.device)
    if out.numel():
        grid = (triton.cdiv(N, ROWS), B * H)
        _merge_kernel[grid](out_a, lse_a, out_b, lse_b, out, lse, H, N, D,
                            out_a.stride(0), out_a.stride(1), out_a.stride(2),
                            out_b.stride(0), out_b.stride(1), out_b.stride(2),
                            ROWS=ROWS, BLOCK_D=triton.next_power_of_2(D))
    return out, lse
