"""Attention kernels: block-sparse flash attention (Triton on CUDA, PyTorch reference elsewhere).

``block_sparse_attention`` and ``dense_attention`` pick the fastest usable implementation;
``reference`` holds the plain PyTorch versions with the same signatures.
"""

from . import reference
from .dispatch import (
    block_index_from_mask,
    block_sparse_attention,
    dense_attention,
    full_block_index,
    merge_attention,
    triton_usable,
)

__all__ = [
    "block_sparse_attention",
    "dense_attention",
    "merge_attention",
    "full_block_index",
    "block_index_from_mask",
    "triton_usable",
    "reference",
]
