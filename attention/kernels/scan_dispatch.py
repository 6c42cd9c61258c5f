"""Pick an implementation of the gated linear scan (see ``linear_scan``) for the inputs at hand.

Without gradients on CUDA (and outside a compiled graph): flash-linear-attention's ``chunk_simple_gla`` when it is
installed, else our Triton forward when it takes the shape, else the PyTorch chunked scan. T2V_SCAN=triton skips fla,
T2V_SCAN=torch skips both. With gradients it is the PyTorch chunked scan (fla's gated backward does not run on the
Triton 3.6 of our GPU machines), or with T2V_SCAN_GRAD=triton our Triton forward and backward
(``triton_linear_scan_bwd``), opt-in until its speed is measured on a GPU.
A backend that fails falls back to PyTorch with one warning and is not tried again for that kind of input.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch

from .linear_scan import chunked_linear_scan


def _import_triton_scan():
    """Our Triton modules (forward, backward), or Nones without CUDA or with a broken Triton (the PyTorch path must
    keep working)."""
    if not torch.cuda.is_available():
        return None, None
    try:
        from . import triton_linear_scan, triton_linear_scan_bwd
        return triton_linear_scan, triton_linear_scan_bwd
    except Exception as error:
        warnings.warn(f"Triton linear scan unavailable ({error}); using PyTorch", RuntimeWarning)
        return None, None


# Imported here, not on first use, as dispatch.py does: a compiled graph cannot trace an import.
_TRITON, _TRITON_BWD = _import_triton_scan()
_fla = []  # [chunk_simple_gla or None] after the first look-up: importing fla is slow and CPU runs never need it
_failed: set = set()


def _fla_chunk_simple_gla():
    if not _fla:
        try:
            from fla.ops.simple_gla import chunk_simple_gla
            _fla.append(chunk_simple_gla)
        except Exception:  # not installed, or built for another torch / Triton
            _fla.append(None)
    return _fla[0]


def _run_fla(chunk_simple_gla, q, k, v, log_decay, initial_state):
    # fla takes (B, T, H, D). Older releases had head_first (True by default in some); current ones reject it.
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_simple_gla).parameters else {}
    out, final = chunk_simple_gla(
        q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),
        g=log_decay.float().transpose(1, 2), scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(), output_final_state=True, **extra)
    return out.transpose(1, 2).to(v.dtype), final.float()


def attempt(backend: str, key: tuple, run):
    """run() or None after a failure, which warns once and rules `backend` out for inputs of this `key` (shared by
    the kernels that fall back to a PyTorch reference: the scan here, the Mamba steps in ``mamba_ops``)."""
    if (backend, key) in _failed:
        return None
    try:
        return run()
    except torch.cuda.OutOfMemoryError:  # PyTorch would need more memory still
        raise
    except Exception as error:
        _failed.add((backend, key))
        warnings.warn(f"{backend} failed ({type(error).__name__}: {error}); using PyTorch", RuntimeWarning,
                      stacklevel=3)
        return None


def linear_scan(q, k, v, log_decay, chunk_size=64, initial_state=None):
    """(out, final_state) of the gated linear scan; shapes and dtypes as ``linear_scan.chunked_linear_scan``.

    fla picks its own chunk size; out may then be a transposed view.
    """
    tensors = [t for t in (q, k, v, log_decay, initial_state) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if (needs_grad and q.is_cuda and os.environ.get("T2V_SCAN_GRAD", "").lower() == "triton"
            and _TRITON_BWD is not None and _TRITON.linear_scan_usable(q, v, chunk_size)
            and not torch.compiler.is_compiling()):
        return _TRITON_BWD.TritonLinearScan.apply(q, k, v, log_decay, chunk_size, initial_state)
    if q.is_cuda and not needs_grad and not torch.compiler.is_compiling():
        choice = os.environ.get("T2V_SCAN", "").lower()
        key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1], chunk_size)
        fla_scan = None if choice in ("triton", "torch") else _fla_chunk_simple_gla()
        if fla_scan is not None:
            result = attempt("linear scan: fla", key, lambda: _run_fla(fla_scan, q, k, v, log_decay, initial_state))
            if result is not None:
                return result
        if choice != "torch" and _TRITON is not None and _TRITON.linear_scan_usable(q, v, chunk_size):
            result = attempt("linear scan: Triton", key,
                              lambda: _TRITON.linear_scan(q, k, v, log_decay, chunk_size, initial_state))
            if result is not None:
                return result
    return chunked_linear_scan(q, k, v, log_decay, chunk_size, initial_state)
