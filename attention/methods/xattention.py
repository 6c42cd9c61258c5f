"""XAttention: block selection scored by strided antidiagonal sums of the attention logits.

The block scores (see ``attention.kernels.antidiagonal``) are the probability each key block gets from the query
block's strided rows, summing to 1 per query block.
Each query block keeps the fewest highest-scoring key blocks whose scores sum to `threshold` (1.0 keeps them all),
or, given `sparsity`, the top (1 - sparsity) of them; as in the official implementation its own (diagonal) key
block is kept whatever its score. Without that, a small object whose tokens fill one block loses to the many
background blocks and dissolves. Token counts not a multiple of the block are zero-padded:
padded key groups are masked, padded query rows dropped, and a group cut by the sequence end counts its zeros.
"""

from __future__ import annotations

import torch

from attention.kernels import antidiagonal_block_scores
from attention.layout import VideoLayout
from attention.methods import SparseOptions
from attention.methods.block_sparse import (BlockSparseMethod, Selection, diagonal_blocks, edited_scores,
                                           keep_cumulative, keep_top_fraction)

DEFAULT_THRESHOLD = 0.9
DEFAULT_STRIDE = 8


class XAttention(BlockSparseMethod):
    """Antidiagonal block scoring with cumulative-threshold selection per query block.

    threshold: share of the antidiagonal score each query block keeps (default 0.9; 1.0 keeps every block);
    sparsity: instead, skip this fraction of key blocks per query block. stride: antidiagonal stride (divides
    block_size).
    """

    name = "xattention"
    default_threshold = DEFAULT_THRESHOLD

    def __init__(self, block_size: int = SparseOptions.block_size, sparsity: float | None = None,
                 threshold: float | None = None, stride: int = DEFAULT_STRIDE, select_every: int = 1):
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        if int(block_size) % int(stride):
            raise ValueError(f"block_size {block_size} must be a multiple of the stride {stride}")
        super().__init__(block_size, sparsity, threshold, select_every)
        self.stride = int(stride)

    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> Selection:
        bs = self.block_size
        if self.threshold is not None and self.threshold >= 1.0:
            # Everything is kept: no need to score.
            shape = (q.shape[0], q.shape[1], -(-q.shape[2] // bs), -(-k.shape[2] // bs))
            return Selection(torch.ones(shape, dtype=torch.bool, device=q.device))
        scores = edited_scores(antidiagonal_block_scores(q, k, bs, self.stride), layout, bs)
        own = diagonal_blocks(scores.shape[2], scores.shape[3], q.device)
        if self.threshold is not None:
            return Selection(keep_cumulative(scores, self.threshold, always=own))
        return Selection(keep_top_fraction(scores, 1.0 - self.sparsity, always=own))
