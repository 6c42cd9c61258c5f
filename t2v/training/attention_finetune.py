"""Training with a sparse attention method installed (e.g. VMoBA, which the paper trains natively)."""

from __future__ import annotations

import torch

import attention
from attention.layout import VideoLayout
from attention.methods import autocast_dtype


def apply_training_attention(transformer, name: str, options: dict | None = None, device=None):
    """Installs attention method `name` with `options` in `transformer` for training, and returns the transformer.

    Raises ValueError for a method that cannot train: one that declares `supports_backward = False`, or whose output
    carries no finite gradient back to q, k and v on a small probe. The probe runs on `device` (default: the model's)
    in the dtype the adapter would hand the method: under an active autocast (call this inside training's autocast
    context) its dtype, else the model's. So it goes through the kernel training will use, and a fallback to the
    PyTorch reference warns here, outside any compiled graph (where warnings are not raised).
    """
    method = attention.get_method(name)
    if getattr(method, "supports_backward", True) is False:
        raise ValueError(f"attention method {name!r} cannot train: it has no backward pass")
    attention.apply(transformer, name, **dict(options or {}))
    try:
        _probe_backward(transformer, device)
    except Exception as error:
        attention.remove(transformer)
        raise ValueError(f"attention method {name!r} cannot train: {error}") from error
    attention.reset(transformer)  # the probe must leave no state (tallies, caches) behind
    return transformer


def _probe_backward(transformer, device=None) -> None:
    state = attention.adapter_state(transformer)
    parameter = next(transformer.parameters())
    device = torch.device(device or parameter.device)
    dtype = autocast_dtype(device.type) or parameter.dtype  # what the adapter hands the method in training
    config = getattr(transformer, "config", {})
    heads, head_dim = config.get("num_attention_heads", 2), config.get("attention_head_dim", 64)
    # Three blocks' worth of tokens, so that a sparse method really has blocks to choose between.
    layout = VideoLayout((3, 4, max(1, state.block_size // 4)), block_size=state.block_size)
    q, k, v = (torch.randn(1, heads, layout.seq_len, head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    with torch.enable_grad():
        out = state.layer_methods[0](q, k, v, layout, 0)
        if not out.requires_grad:
            raise RuntimeError("its output is not differentiable")
        out.float().square().sum().backward()
    for tensor, label in ((q, "q"), (k, "k"), (v, "v")):
        if tensor.grad is None or not torch.isfinite(tensor.grad).all():
            raise RuntimeError(f"no finite gradient reaches {label}")
