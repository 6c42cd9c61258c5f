"""Attention for video diffusion transformers: token layout, methods (dense and block-sparse), and adapters that
install a method in a model's self-attention layers.

    import attention
    attention.apply(transformer, "dense")   # any name from attention.available_methods()
    attention.remove(transformer)           # the model's own processors again

This package depends on torch only (Triton where a kernel needs it); it knows model families by their class names.
"""

from attention.apply import adapter_state, apply, current_method, remove, reset
from attention.layout import VideoLayout
from attention.methods import SparseOptions, available_methods, get_method, register_method, unregister_method

__all__ = [
    "SparseOptions",
    "VideoLayout",
    "adapter_state",
    "apply",
    "available_methods",
    "current_method",
    "get_method",
    "register_method",
    "remove",
    "reset",
    "unregister_method",
]
