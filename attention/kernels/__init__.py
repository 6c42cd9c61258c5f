"""Attention kernels: block-sparse flash attention, XAttention's block scoring and block masses from pooled token
groups (Triton on CUDA, PyTorch reference elsewhere).

``block_sparse_attention``, ``dense_attention``, ``antidiagonal_block_scores`` and ``group_block_mass`` pick the
fastest usable implementation; ``reference``, ``antidiagonal`` and ``group_mass`` hold the plain PyTorch versions
with the same signatures.
"""

from . import antidiagonal, group_mass, reference
from .dispatch import (
    antidiagonal_block_scores,
    block_index_from_mask,
    block_sparse_attention,
    dense_attention,
    full_block_index,
    group_block_mass,
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
    "group_block_mass",
    "group_mass",
]
