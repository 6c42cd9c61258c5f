"""XAttention: block selection scored by strided antidiagonal sums of the attention logits.

Cut the logit matrix into stride x stride tiles (S = stride). The antidiagonal of tile (r, c) pairs every query of
query group r with one key of key group c: Σ_{j<S} q_{rS+S-1-j}·k_{cS+j}. Stacking each group's S queries in reverse
order into one vector of S*D channels (and each key group's S keys in order) turns all these sums into one matmul of
(N/S) x (N/S): S^2 times smaller than the logit matrix, and no N x N tensor is ever built.

As in the official implementation, the antidiagonal mean (the sum / S) times D^-1/2 is the logit of a strided row;
each strided row is softmax-normalised over all key groups, and a block's score is the probability its key groups
get from the query block's strided rows, normalised per query block:
    A[r, c] = D^-1/2 / S · Σ_{j<S} q_{rS+S-1-j}·k_{cS+j},   P[r] = softmax_c(A[r]),
    score[b, J] = Σ_{r in b} Σ_{c in J} P[r, c] / (number of rows r in b).
Each query block keeps the fewest highest-scoring key blocks whose scores sum to `threshold` (1.0 keeps them all),
or, given `sparsity`, the top (1 - sparsity) of them; as in the official implementation its own (diagonal) key
block is kept whatever its score. Without that, a small object whose tokens fill one block loses to the many
background blocks and dissolves. Token counts not a multiple of the block are zero-padded:
padded key groups are masked, padded query rows dropped, and a group cut by the sequence end counts its zeros.

Cost at the Wan2.1-1.3B shape (N = 32760, 12 heads, stride 8): a (4095 x 1024) @ (1024 x 4095) matmul per head,
then a softmax and a block sum over 4095^2 elements per head, kept in the input dtype (bfloat16 on GPU) with
float32 accumulation: about 8 bytes of memory traffic per element, 1.6 GB per call. Stride 16 quarters it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.layout import VideoLayout
from attention.methods import SparseOptions
from attention.methods.block_sparse import (BlockSparseMethod, Selection, diagonal_blocks, keep_cumulative,
                                           keep_top_fraction)

DEFAULT_THRESHOLD = 0.9
DEFAULT_STRIDE = 8
# Strided logits per chunk of query blocks (all batches and heads): bounds the scoring memory on long videos.
_CHUNK_ELEMS = 1 << 28


def antidiagonal_logits(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, N/S, M/S): Σ_{j<S} q[rS+S-1-j]·k[cS+j] for every pair of groups; N and M must be multiples of S."""
    b, h, n, d = q.shape
    m = k.shape[2]
    if n % stride or m % stride:
        raise ValueError(f"token counts {n}, {m} must be multiples of the stride {stride}")
    q_groups = q.reshape(b, h, n // stride, stride, d).flip(3).reshape(b, h, n // stride, stride * d)
    return q_groups @ k.reshape(b, h, m // stride, stride * d).transpose(-1, -2)


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int,
                              scale: float | None = None) -> torch.Tensor:
    """(B, H, NQB, NKB) block scores, each row summing to 1 (see the module docstring)."""
    if block_size % stride:
        raise ValueError(f"block_size {block_size} must be a multiple of the stride {stride}")
    b, h, n, d = q.shape
    m = k.shape[2]
    nqb, nkb = -(-n // block_size), -(-m // block_size)
    scale = d ** -0.5 if scale is None else scale
    group = block_size // stride  # strided rows (and key groups) per block
    if n % block_size:
        q = F.pad(q, (0, 0, 0, nqb * block_size - n))
    if m % block_size:
        k = F.pad(k, (0, 0, 0, nkb * block_size - m))
    # The scale goes on q before the matmul: no extra pass over the strided logits.
    q = q * (scale / stride)
    valid_groups = -(-m // stride)  # key groups past this one are all padding (they sit at the end)
    row_ok = torch.arange(nqb * group, device=q.device) * stride < n

    blocks_per_chunk = max(1, _CHUNK_ELEMS // max(1, b * h * group * nkb * group))
    scores = []
    for start in range(0, nqb, blocks_per_chunk):
        stop = min(nqb, start + blocks_per_chunk)
        logits = antidiagonal_logits(q[:, :, start * block_size:stop * block_size], k, stride)
        logits[..., valid_groups:] = float("-inf")  # in place, on the padded columns only
        # One pass over the strided logits for the softmax, one for the sum over each key block's groups;
        # the padded query rows are dropped on the (N/S x NKB) row sums, not on the big matrix.
        row_sums = logits.softmax(-1).view(b, h, -1, nkb, group).sum(-1, dtype=torch.float32)
        row_sums = row_sums * row_ok[start * group:stop * group, None]
        scores.append(row_sums.view(b, h, stop - start, group, nkb).sum(3))
    scores = torch.cat(scores, 2)
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)


class XAttention(BlockSparseMethod):
    """Antidiagonal block scoring with cumulative-threshold selection per query block.

    threshold: share of the antidiagonal score each query block keeps (default 0.9; 1.0 keeps every block);
    sparsity: instead, skip this fraction of key blocks per query block. stride: antidiagonal stride (divides
    block_size).
    """

    name = "xattention"
    default_threshold = DEFAULT_THRESHOLD

    def __init__(self, block_size: int = SparseOptions.block_size, sparsity: float | None = None,
                 threshold: float | None = None, stride: int = DEFAULT_STRIDE):
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        if int(block_size) % int(stride):
            raise ValueError(f"block_size {block_size} must be a multiple of the stride {stride}")
        super().__init__(block_size, sparsity, threshold)
        self.stride = int(stride)

    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> Selection:
        bs = self.block_size
        if self.threshold is not None and self.threshold >= 1.0:
            # Everything is kept: no need to score.
            shape = (q.shape[0], q.shape[1], -(-q.shape[2] // bs), -(-k.shape[2] // bs))
            return Selection(torch.ones(shape, dtype=torch.bool, device=q.device))
        scores = antidiagonal_block_scores(q, k, bs, self.stride)
        own = diagonal_blocks(scores.shape[2], scores.shape[3], q.device)
        if self.threshold is not None:
            return Selection(keep_cumulative(scores, self.threshold, always=own))
        return Selection(keep_top_fraction(scores, 1.0 - self.sparsity, always=own))
