"""XAttention's antidiagonal block scores with the softmax and block sums fused in Triton.

Same signature and result as ``antidiagonal.antidiagonal_block_scores`` (see there for the formulas). The strided
logits still come from one matmul (cuBLAS does that well); what the PyTorch version then spends most of its time on,
a softmax pass and a block-sum pass over all (rows x key groups) logits, is one read here: a program takes one query
block of one (batch, head), and for each of its strided rows loads the whole row, normalises it, sums each key
block's groups and adds the row in; it writes the query block's normalised scores (B, H, NQB, NKB) and nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from .antidiagonal import strided_logit_chunks

MAX_ROW = 16384  # key groups a row may have (the whole row is held at once)
LAUNCH_ERRORS = (OutOfResources, CompilationError)


@triton.jit
def _softmax_block_sums_kernel(
    Logits, Scores, ROWS, COLS, NKB, FIRST_ROW, N,
    STRIDE: tl.constexpr, GROUP: tl.constexpr, COLS_PAD: tl.constexpr,
):
    query_block, bh = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, COLS_PAD)
    acc = tl.zeros([COLS_PAD // GROUP], tl.float32)
    for r in range(GROUP):
        row = query_block * GROUP + r
        x = tl.load(Logits + (bh * ROWS + row).to(tl.int64) * COLS + cols, mask=cols < COLS,
                    other=float("-inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, 0))
        p = p / tl.sum(p, 0)
        real = ((FIRST_ROW + row) * STRIDE < N).to(tl.float32)  # padded query rows count for nothing
        acc += tl.sum(tl.reshape(p, (COLS_PAD // GROUP, GROUP)), 1) * real
    blocks = tl.arange(0, COLS_PAD // GROUP)
    tl.store(Scores + (bh * (ROWS // GROUP) + query_block) * NKB + blocks, acc / tl.sum(acc, 0), mask=blocks < NKB)


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int,
                              scale: float | None = None) -> torch.Tensor:
    """(B, H, NQB, NKB) block scores, each row summing to 1; q, k (B, H, tokens, D) on CUDA."""
    b, h, n, _ = q.shape
    nkb = -(-k.shape[2] // block_size)
    group = block_size // stride
    chunks = []
    for start, logits in strided_logit_chunks(q, k, block_size, stride, scale):
        logits = logits.contiguous()
        rows, cols = logits.shape[2], logits.shape[3]
        scores = torch.empty(b, h, rows // group, nkb, device=q.device, dtype=torch.float32)
        _softmax_block_sums_kernel[(rows // group, b * h)](
            logits, scores, rows, cols, nkb, start * group, n,
            STRIDE=stride, GROUP=group, COLS_PAD=max(triton.next_power_of_2(cols), group),
            num_warps=8 if cols > 2048 else 4,
        )
        chunks.append(scores)
    return torch.cat(chunks, 2)


def antidiagonal_usable(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int) -> bool:
    """Whether this version takes these inputs: CUDA, whole groups of a power-of-two size, rows that fit."""
    group = block_size // stride if stride > 0 and block_size % stride == 0 else 0
    cols = -(-k.shape[2] // block_size) * group
    return q.is_cuda and group >= 1 and group & (group - 1) == 0 and triton.next_power_of_2(cols) <= MAX_ROW
