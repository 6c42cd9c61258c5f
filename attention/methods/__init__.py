"""Attention methods and their registry.

A method maps `(q, k, v, layout, **options) -> out`, with q, k, v of shape (batch, heads, tokens, head_dim), the
tokens being the layout's video tokens in row-major (frame, height, width) order; `out` has the shape of q.

It is either a function, called once per attention call with its options, or a class, instantiated once per
self-attention layer with its options (so it can keep per-layer state) and then called `inst(q, k, v, layout)`.
Besides the user's options the adapter supplies, only where the signature names them:
  - `layer_index`: index of the layer (function call, or class constructor);
  - `step`: denoising step of the current generation, counted from 0 (function call, or `__call__`).
A class may define `reset()`, called when a new generation starts. A method that can also return its log-sum-exp
takes `return_lse` (then returns (out, lse)): block diffusion merges it with the attention over earlier chunks.

Under torch.compile every Python value a method branches on becomes a guard, and each new value a recompilation.
So a method that varies by layer should be a class that reduces `layer_index` in its constructor to the few
variants it needs (VMoBA: which of 1D / 2D / 3D partitions), rather than a function taking `layer_index`;
and `step` should only be read for decisions that really change with it.

Adding a method: one file in this package plus one line in `_BUILTIN` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

# name -> "module:attribute", imported on first use so that a method's dependencies (Triton) load only when needed.
_BUILTIN = {
    "dense": "attention.methods.dense:dense_attention_method",
    "rectified": "attention.methods.rectified:RectifiedSparseAttention",
    "xattention": "attention.methods.xattention:XAttention",
    "vmoba": "attention.methods.vmoba:VMoBAMethod",
    "oracle": "attention.methods.oracle:OracleBlocks",
    "flashblock": "attention.methods.flashblock:FlashBlock",
}

_REGISTRY: dict[str, object] = dict(_BUILTIN)


@dataclass(frozen=True)
class SparseOptions:
    """Options every sparse method shares; `attention.apply(model, name, **options)` takes them by these names.

    The adapter itself consumes `dense_warmup_steps` and `dense_layers` (those calls run the model's own dense
    attention); the others are passed to the method, which documents what it does with them.

    dense_warmup_steps: the first this many denoising steps of each generation run dense attention.
    dense_layers: indices of self-attention layers (0-based, negative counts from the end) that always run dense.
    block_size: tokens per query/key block; the layout picks a 3D tile of this many tokens where the grid allows.
    sparsity: target fraction of key blocks skipped (0.75 keeps a quarter of the blocks).
    threshold: method-specific alternative to `sparsity`, e.g. the cumulative attention score a query block keeps.
    select_every: block-sparse methods select every this many denoising steps and reuse the selection in between.
    """

    dense_warmup_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    block_size: int = 64
    sparsity: float | None = None
    threshold: float | None = None
    select_every: int = 1


# The options the adapter consumes rather than passing on to the method.
ADAPTER_OPTIONS = ("dense_warmup_steps", "dense_layers")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype adapters cast q, k and v to before a method sees them: an active autocast's (the model's own SDPA
    call would run in it), or None without autocast (they keep their own)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def register_method(name: str, method: Callable | type | str, *, overwrite: bool = False) -> None:
    """Registers a method under `name`: a function, a class, or a "module:attribute" string imported on first use."""
    if not isinstance(name, str) or not name:
        raise ValueError("a method name must be a non-empty string")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"attention method {name!r} is already registered (pass overwrite=True to replace it)")
    if not (callable(method) or (isinstance(method, str) and ":" in method)):
        raise TypeError(f"method {name!r} must be a callable, a class or a 'module:attribute' string")
    _REGISTRY[name] = method


def unregister_method(name: str) -> None:
    """Removes a registered method (built-ins come back with their import string)."""
    _REGISTRY.pop(name, None)
    if name in _BUILTIN:
        _REGISTRY[name] = _BUILTIN[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Callable | type:
    """The function or class registered as `name`; ValueError listing the registered names if there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention method {name!r}; registered methods: {', '.join(available_methods())}")
    method = _REGISTRY[name]
    if isinstance(method, str):
        module_name, attribute = method.split(":")
        method = getattr(importlib.import_module(module_name), attribute)
        _REGISTRY[name] = method
    return method


__all__ = [
    "ADAPTER_OPTIONS",
    "SparseOptions",
    "available_methods",
    "get_method",
    "register_method",
    "unregister_method",
]
