"""The Mamba branch's two memory-bound steps around its scan, in plain PyTorch (the reference and the path that
trains), and the dispatch to their fused Triton versions (``triton_mamba_ops``) on CUDA without gradients.

- ``causal_conv_silu``: SiLU of a causal depthwise convolution along the sequence of (B, L, C) inputs; with
  ``reverse`` the convolution runs over the sequence reversed and the output stays in that reversed order (what
  the backward scan reads), so the reversal costs no copy.
- ``gated_rms_norm``: RMSNorm((forward + backward reversed) * SiLU(z)) * weight, the two scan directions combined,
  gated and normalised in one pass.
At 131,072 tokens of width 1536 each step is a dozen passes over 400 MB tensors in eager PyTorch and one in Triton.
Set T2V_MAMBA_OPS=torch to run the reference everywhere.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .scan_dispatch import attempt


def causal_conv_silu_reference(x, weight, bias, reverse: bool = False):
    """(B, L, C) x, (C, K) weight, (C,) bias or None -> (B, L, C): out[t] = SiLU(bias + sum_j weight[:, j] *
    x[t - K + 1 + j]) over x (reversed first if ``reverse``), zeros before the start."""
    if reverse:
        x = x.flip(1)
    size = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (size - 1, 0)), weight[:, None].to(x.dtype),
                   None if bias is None else bias.to(x.dtype), groups=x.shape[-1])
    return F.silu(out.transpose(1, 2))


def gated_rms_norm_reference(forward, backward_reversed, z, weight, eps: float):
    """(B, L, C) forward, (B, L, C) backward in reversed order, (B, L, C) z, (C,) weight -> (B, L, C) in forward's
    dtype: RMSNorm over C of (forward + backward_reversed.flip(1)) * SiLU(z). Under autocast (float32 weight, half
    activations) the norm runs in float32; a half-precision model's norm upcasts inside its fused kernel."""
    gated = (forward + backward_reversed.flip(1)) * F.silu(z)
    if gated.dtype != weight.dtype:
        gated = gated.float()
    return F.rms_norm(gated, (gated.shape[-1],), weight, eps).to(forward.dtype)


def _import_triton_ops():
    if not torch.cuda.is_available():
        return None
    try:
        from . import triton_mamba_ops
        return triton_mamba_ops
    except Exception as error:  # a broken Triton must leave the PyTorch path working
        warnings.warn(f"Triton Mamba ops unavailable ({error}); using PyTorch", RuntimeWarning)
        return None


_TRITON = _import_triton_ops()  # imported here: a compiled graph cannot trace an import


def _use_triton(*tensors) -> bool:
    return (_TRITON is not None and tensors[0].is_cuda and os.environ.get("T2V_MAMBA_OPS", "").lower() != "torch"
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors if t is not None))
            and not torch.compiler.is_compiling() and tensors[0].stride(-1) == 1)


def causal_conv_silu(x, weight, bias=None, reverse: bool = False):
    """``causal_conv_silu_reference``'s result, fused in Triton where it runs (CUDA, no gradients)."""
    if _use_triton(x, weight, bias):
        out = attempt("causal_conv_silu: Triton", (x.dtype, weight.shape[-1]),
                      lambda: _TRITON.causal_conv_silu(x, weight, bias, reverse))
        if out is not None:
            return out
    return causal_conv_silu_reference(x, weight, bias, reverse)


def gated_rms_norm(forward, backward_reversed, z, weight, eps: float):
    """``gated_rms_norm_reference``'s result, fused in Triton where it runs (CUDA, no gradients)."""
    if _use_triton(forward, backward_reversed, z, weight) and backward_reversed.stride(-1) == z.stride(-1) == 1:
        out = attempt("gated_rms_norm: Triton", (forward.dtype, forward.shape[-1]),
                      lambda: _TRITON.gated_rms_norm(forward, backward_reversed, z, weight, eps))
        if out is not None:
            return out
    return gated_rms_norm_reference(forward, backward_reversed, z, weight, eps)
