"""Dense attention: the reference every sparse method is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.kernels import dense_attention


def dense_attention_method(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout=None,
                           return_lse: bool = False):
    """Full softmax attention over all tokens. PyTorch's SDPA picks the fastest backend (cuDNN / flash / memory-
    efficient on GPU). With `return_lse` (to merge it with another part, as block diffusion does) it returns
    (out, log-sum-exp) from the shared kernel, which yields both."""
    if return_lse:
        return dense_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
