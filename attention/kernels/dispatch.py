"""Pick the Triton kernels on CUDA when they can run, else the PyTorch reference.

Falling back warns once per kind of input (device, dtype, head size, block size): the reference is correct but
slow on real sizes. (Once per process would let a small CPU check hide a later fallback on the GPU.) No warning is
raised inside a compiled graph; training with a sparse method checks the path once before compiling.
"""

import importlib
import os
import warnings

import torch
import torch.nn.functional as F

from . import antidiagonal, group_mass, reference
from .reference import block_index_from_mask, full_block_index  # noqa: F401

_warned: set = set()


def _import_triton_kernel(name: str):
    """The Triton implementation module `name` of this package, or None when Triton or CUDA is missing."""
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module(f".{name}", __package__)
    except Exception as error:  # a broken Triton install must leave the PyTorch path working, not break the import
        warnings.warn(f"Triton kernel {name} unavailable ({error}); using the PyTorch reference", RuntimeWarning)
        return None


# Imported here, not on first use: a compiled graph (training with --compile) cannot trace an import.
_TRITON_MODULES = {name: _import_triton_kernel(name) for name in ("triton_block_sparse", "triton_antidiagonal",
                                                                   "triton_group_mass", "triton_merge")}


def _triton_kernel(name: str):
    return _TRITON_MODULES[name]


def _triton():
    return _triton_kernel("triton_block_sparse")


def triton_usable(q, block_size=64):
    """Whether the Triton path accepts these inputs."""
    D = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and 16 <= D <= 128 and D & (D - 1) == 0  # larger heads: untested tiles
            and 16 <= block_size <= 256 and block_size & (block_size - 1) == 0
            and _triton() is not None)


def _warn_fallback(q, block_size):
    key = (q.device.type, q.dtype, q.shape[-1], block_size)
    if key not in _warned and not torch.compiler.is_compiling():  # a warning would break a compiled graph
        _warned.add(key)
        warnings.warn(
            f"block-sparse attention: no Triton kernel for device={q.device.type}, "
            f"dtype={q.dtype}, head_dim={q.shape[-1]}, block_size={block_size}; using the slow PyTorch reference",
            RuntimeWarning, stacklevel=3)


def block_sparse_attention(q, k, v, kv_block_index, kv_block_count, *, block_size=64,
                           pooled_k=None, pooled_v=None, pooled_log_weight=None, scale=None):
    """Block-sparse attention -> (out, lse); see ``reference.block_sparse_attention``."""
    kwargs = dict(block_size=block_size, pooled_k=pooled_k, pooled_v=pooled_v,
                  pooled_log_weight=pooled_log_weight, scale=scale)
    if triton_usable(q, block_size):
        return _triton().block_sparse_attention(q, k, v, kv_block_index, kv_block_count, **kwargs)
    _warn_fallback(q, block_size)
    return reference.block_sparse_attention(q, k, v, kv_block_index, kv_block_count, **kwargs)


def dense_attention(q, k, v, scale=None, *, return_lse=True):
    """Full attention -> (out, lse). Without ``return_lse`` this is SDPA and lse is None.

    With lse on CUDA in half precision: PyTorch's cuDNN attention op, else its FlashAttention-2 op (both return the
    log-sum-exp they compute anyway; T2V_DENSE_LSE=flash picks FlashAttention-2, =triton the Triton kernel), else the
    Triton kernel with every block selected. Where block diffusion merges its parts this is the hot call.
    """
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    for backend in _lse_backends(q, k):
        try:
            if backend == "cudnn":
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
            else:
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                              scale=scale)[:2]
            return out, lse.reshape(q.shape[:3]).float()
        except RuntimeError as error:  # this GPU or build lacks the backend for these shapes: try the next
            _unusable_lse_backends.add(backend)
            warnings.warn(f"dense attention with log-sum-exp: {backend} unavailable ({error})", RuntimeWarning)
    if triton_usable(q, 128):
        bs = 128
        B, H, N, _ = q.shape
        index, count = full_block_index(-(-N // bs), -(-k.shape[2] // bs), B, H, q.device)
        return _triton().block_sparse_attention(q, k, v, index, count, block_size=bs, scale=scale)
    return reference.dense_attention(q, k, v, scale=scale)


_unusable_lse_backends: set = set()


def _lse_backends(q, k) -> list:
    """PyTorch's attention ops that return the log-sum-exp and can take these inputs, fastest first."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0) or torch.is_grad_enabled() and q.requires_grad:
        return []
    choice = os.environ.get("T2V_DENSE_LSE", "cudnn").lower()
    order = {"cudnn": ["cudnn", "flash"], "flash": ["flash"]}.get(choice, [])
    ops = {"cudnn": "_scaled_dot_product_cudnn_attention", "flash": "_scaled_dot_product_flash_attention"}
    return [b for b in order if b not in _unusable_lse_backends and hasattr(torch.ops.aten, ops[b])]


def merge_attention(out_a, lse_a, out_b, lse_b):
    """(out, lse) over the union of two disjoint key sets; see ``reference.merge_attention``.

    On CUDA, without gradients, one fused Triton pass (T2V_MERGE_TRITON=0 keeps PyTorch's elementwise ops).
    """
    needs_grad = torch.is_grad_enabled() and (out_a.requires_grad or out_b.requires_grad)
    if out_a.is_cuda and not needs_grad and not torch.compiler.is_compiling():
        merged = _scores_in_triton("triton_merge", "T2V_MERGE_TRITON", "attention merge",
                                   lambda t: t.merge_usable(out_a, out_b),
                                   lambda t: t.merge_attention(out_a, lse_a, out_b, lse_b))
        if merged is not None:
            return merged
    return reference.merge_attention(out_a, lse_a, out_b, lse_b)


def _scores_in_triton(module_name: str, env_variable: str, what: str, usable, run):
    """`run(module)` with Triton kernel module `module_name` when CUDA has it, `usable(module)` holds and
    `env_variable` does not turn it off; None (use the PyTorch reference) otherwise or when the launch fails."""
    if os.environ.get(env_variable, "1").lower() in ("0", "false", "off", "no"):
        return None
    module = _triton_kernel(module_name)
    if module is None or not usable(module):
        return None
    try:
        return run(module)
    except module.LAUNCH_ERRORS as error:  # a GPU the tiles do not fit: same result, slower
        warnings.warn(f"{what}: the Triton kernel cannot run here ({error}); using PyTorch", RuntimeWarning,
                      stacklevel=3)
        return None


def antidiagonal_block_scores(q, k, block_size, stride, scale=None):
    """XAttention's (B, H, NQB, NKB) block scores; see ``antidiagonal.antidiagonal_block_scores``.

    On CUDA a Triton kernel fuses the softmax and block sums (checked and timed by `scripts/check_kernels.py --only
    antidiagonal`); T2V_ANTIDIAGONAL_TRITON=0 keeps the PyTorch reduction, for comparisons.
    """
    scores = None if not q.is_cuda else _scores_in_triton(
        "triton_antidiagonal", "T2V_ANTIDIAGONAL_TRITON", "XAttention scoring",
        lambda t: t.antidiagonal_usable(q, k, block_size, stride),
        lambda t: t.antidiagonal_block_scores(q, k, block_size, stride, scale))
    return antidiagonal.antidiagonal_block_scores(q, k, block_size, stride, scale) if scores is None else scores


def group_block_mass(q, k, block_size, group, scale=None):
    """(B, H, NQB, NKB) attention mass per block pair from pooled groups; see ``group_mass.group_block_mass``.

    On CUDA a Triton kernel fuses the matmuls, softmax and block sums (checked and timed by
    `scripts/check_kernels.py --only group_mass`); T2V_GROUP_MASS_TRITON=0 keeps PyTorch, for comparisons.
    """
    mass = None if not q.is_cuda else _scores_in_triton(
        "triton_group_mass", "T2V_GROUP_MASS_TRITON", "group scoring",
        lambda t: t.group_mass_usable(q, block_size, group),
        lambda t: t.group_block_mass(q, k, block_size, group, scale))
    return group_mass.group_block_mass(q, k, block_size, group, scale) if mass is None else mass
