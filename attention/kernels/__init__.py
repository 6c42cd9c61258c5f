"""Attention kernels: block-sparse flash attention and XAttention's block scoring (Triton on CUDA, PyTorch
reference elsewhere).

``block_sparse_attention``, ``dense_attention`` and ``antidiagonal_block_scores`` pick the fastest usable
implementation; ``reference`` and ``antidiagonal`` hold the plain PyTorch versions with the same signatures.
"""

from . import antidiagonal, reference
from .dispatch import (
    antidiagonal_block_scores,
    block_index_from_mask,
    block_sparse_attention,
    dense_attention,
    full_block_index,
    merge_attention,
    triton_usable,
)

__all__ = [
    "antidiagonal_block_scores",
    "block_sparse_attention",
    "dense_attention",
    "merge_attention",
    "full_block_index",
    "block_index_from_mask",
    "triton_usable",
    "reference",
    "antidiagonal",
]
