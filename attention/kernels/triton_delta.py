"""The backward's per-row term delta_i = dO_i . O_i (minus the lse gradient) as a Triton pre-pass.

``attention_delta_reference`` is the PyTorch version: it makes float32 copies of dO and O (0.6 ms at 32,760 tokens
x 12 heads x 128 in bf16 on an H100). The kernel reads both in their own dtype once and sums in float32. The
result is float32 (B, H, N), contiguous: the backward kernels read it at row (b * H + h) * N + n.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

# Under the interpreter (CPU tests) the kernel runs on CPU tensors too; read once, as Triton does.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TILE = 8192  # elements of dO (and of O) per program: 32 float32 registers a thread each with 8 warps


@triton.jit
def _delta_kernel(DO, O, DLSE, Delta, H, N, HEAD_DIM,
                  s_db, s_dh, s_dn, s_ob, s_oh, s_on, s_lb, s_lh, s_ln,
                  HAS_DLSE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tile * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)  # ragged tail and head dims padded to a power of two
    rows64 = rows.to(tl.int64)
    do = tl.load(DO + b * s_db + h * s_dh + rows64[:, None] * s_dn + dims[None, :], mask=mask, other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + rows64[:, None] * s_on + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if HAS_DLSE:  # any strides: an lse gradient may be an expanded scalar
        delta -= tl.load(DLSE + b * s_lb + h * s_lh + rows64 * s_ln, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * N + rows, delta, mask=row_ok)


@triton_op("t2v::attention_delta", mutates_args=())
def _attention_delta_op(dout: Tensor, out: Tensor, dlse: Optional[Tensor]) -> Tensor:
    B, H, N, D = out.shape
    delta = torch.empty((B, H, N), dtype=torch.float32, device=out.device)
    block_d = triton.next_power_of_2(D)
    rows = max(16, TILE // block_d)
    lse_strides = (0, 0, 0) if dlse is None else (dlse.stride(0), dlse.stride(1), dlse.stride(2))
    if delta.numel():
        wrap_triton(_delta_kernel)[(triton.cdiv(N, rows), B * H)](
            dout, out, delta if dlse is None else dlse, delta, H, N, D,
            dout.stride(0), dout.stride(1), dout.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *lse_strides, HAS_DLSE=dlse is not None, ROWS=rows, BLOCK_D=block_d, num_warps=8)
    return delta


def attention_delta_reference(dout, out, dlse=None):
    """delta_i = dO_i . O_i, minus the lse gradient (d lse_i / d s_ij = P_ij): float32 (B, H, N), contiguous."""
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    return delta.contiguous()


def delta_usable(dout, out, dlse=None):
    """Whether the kernel takes these: (B, H, N, D) with unit last stride, on CUDA or under the interpreter."""
    return ((out.is_cuda or _INTERPRET) and out.ndim == 4 and dout.shape == out.shape
            and dout.stride(-1) == 1 and out.stride(-1) == 1 and dout.device == out.device
            and (dlse is None or dlse.shape == out.shape[:-1]))


def attention_delta(dout, out, dlse=None):
    """Same as ``attention_delta_reference``, in Triton where usable (sums in another order, so not bit-equal)."""
    if delta_usable(dout, out, dlse):
        return torch.ops.t2v.attention_delta(dout, out, dlse)
    return attention_delta_reference(dout, out, dlse)
