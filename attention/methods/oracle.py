"""Oracle block selection: each query block keeps the key blocks that hold most of its exact attention mass.

A yardstick for selectors, not a speed-up: choosing computes full attention first, so it is never faster than
dense. With `sparsity`, among selections that keep the same number of key blocks per query block and put nothing
in place of the skipped ones, it keeps the most attention mass; its quality against dense (`scripts/sweep_quality.py
--method oracle`) shows what skipping blocks costs on a model apart from how well a method guesses. (Keeping the most
mass is not the same as the best clip, and a budget spread unevenly, as `threshold` does, can keep more in all.)
"""

from __future__ import annotations

import torch

from attention.layout import VideoLayout
from attention.kernels import group_mass
from attention.methods.block_sparse import BlockSparseMethod, Selection, keep_cumulative, keep_top_fraction

DEFAULT_THRESHOLD = 0.9


def exact_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """(B, H, NQB, NKB) float32: the softmax attention mass each query block's tokens put on each key block, averaged
    over the block's tokens (rows sum to 1). Partial last blocks count the tokens they have. Always the float32
    PyTorch version: the Triton one multiplies in TF32, and this mass is the yardstick."""
    return group_mass.group_block_mass(q, k, block_size, 1, scale)


class OracleBlocks(BlockSparseMethod):
    """Keeps, per query block, the top (1 - sparsity) key blocks by exact attention mass, or the fewest whose mass
    reaches `threshold` (default 0.9; 1.0 keeps every block, so it is dense attention)."""

    name = "oracle"
    default_threshold = DEFAULT_THRESHOLD

    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> Selection:
        mass = exact_block_mass(q, k, self.block_size)
        if self.threshold is not None:
            return Selection(keep_cumulative(mass, self.threshold))
        return Selection(keep_top_fraction(mass, 1.0 - self.sparsity))
