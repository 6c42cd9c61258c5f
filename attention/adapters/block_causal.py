"""Block-diffusion models: this project's BlockVideoDiT (a VideoDiT whose self-attention is chunk-causal).

Its self-attention modules are Wan-style (`WanAttention`: q/k RMS norm across heads, 3D rotary embedding), so q, k
and v are projected exactly as `wan_style.project_qkv` does. What differs is where they go: the model sets a
`ChunkCall` before each forward, and the processor reads it:

- no cache, or a cache being filled: chunk-causal attention over all tokens of the call (training, and the forward
  that stores the context chunks' keys and values);
- a cache holding context: the chunk's in-chunk attention (the installed method, dense by default, with its
  log-sum-exp) merged with its attention over the cached keys and values. A method that can keep that block-external
  part across steps (`external`, as FlashBlock does) is asked for it; otherwise it is computed every step.

The model installs `BlockCausalProcessor()` (dense) as its own; `attention.apply` replaces it with one that runs a
method, and `attention.remove` restores the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.adapters.wan_style import WanStyleFamily, project_qkv
from attention.block_causal import ChunkCall, attention_with_lse, chunk_causal_attention
from attention.context_parallel import context_parallel_of
from attention.kernels import merge_attention
from attention.layout import VideoLayout
from attention.methods import autocast_dtype


class BlockCausalProcessor:
    """Self-attention of one layer of a block-diffusion model.

    chunk_call: a holder whose `.current` is the ChunkCall of the forward in progress (shared by the model's layers).
    method: a bound attention method for the in-chunk part (None: dense); it must take `return_lse`.
    adapter_state: the `attention.apply` state (block size, dense warm-up steps), None for the model's own.

    Context parallelism is not supported: per-chunk captions and the KV cache's bookkeeping take every token of a
    chunk on one rank. diffusers' `enable_parallelism` sets `_parallel_config` on the processor; a call then fails.
    """

    _parallel_config = None

    def __init__(self, chunk_call, layer_index: int, method=None, adapter_state=None, dense: bool = False):
        self.chunk_call = chunk_call
        self.layer_index = layer_index
        self.method = method
        self.adapter_state = adapter_state
        self.dense = dense

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or kwargs:
            raise ValueError("a block-causal self-attention layer takes no encoder states, mask or extra arguments")
        if context_parallel_of(self._parallel_config) is not None:
            raise ValueError("block-diffusion models do not support context parallelism: a chunk's tokens, its "
                             "caption segments and its KV cache must stay on one rank")
        call: ChunkCall = self.chunk_call.current
        if call is None:
            raise RuntimeError("a block-causal layer was called outside its model's forward")
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        dtype = autocast_dtype(query.device.type)
        if dtype is not None:
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        cache = call.cache
        if cache is None or cache.filling:
            out = chunk_causal_attention(query, key, value, call.chunk_tokens, call.window_chunks)
            if cache is not None:
                layer = cache.layers[self.layer_index]
                layer.key, layer.value = key.detach(), value.detach()
        else:
            out = self._with_context(query, key, value, call)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _in_chunk_method(self, step: int):
        """The method for the in-chunk part at this step, or None for dense attention."""
        if self.method is None or self.dense:
            return None
        state = self.adapter_state
        if state is not None and step < state.warmup_steps:
            return None
        return self.method

    def _with_context(self, query, key, value, call: ChunkCall) -> torch.Tensor:
        cache = call.cache
        layer = cache.layers[self.layer_index]
        method = self._in_chunk_method(cache.step)
        if layer.key is None:  # the first chunk: nothing before it
            if method is None or query.shape[2] != call.chunk_tokens:
                return chunk_causal_attention(query, key, value, call.chunk_tokens, call.window_chunks)
            return method(query, key, value, self._layout(call), cache.step)
        # A method that keeps the block-external part itself (FlashBlock) says so with `external`.
        external = getattr(getattr(method, "fn", method), "external", None) if method is not None else None
        if query.shape[2] != call.chunk_tokens:
            raise ValueError(f"after cached context a forward takes one chunk ({call.chunk_tokens} tokens), "
                             f"got {query.shape[2]} tokens")
        if method is None:
            # Plain attention over the union in one call: the exact reference, and the fastest without a cache.
            keys = torch.cat([layer.key.to(key.dtype), key], 2)
            values = torch.cat([layer.value.to(value.dtype), value], 2)
            return F.scaled_dot_product_attention(query, keys, values)
        inside, inside_lse = method(query, key, value, self._layout(call), cache.step, return_lse=True)
        if external is not None:
            outside, outside_lse = external(query, layer, cache.step)
        else:
            outside, outside_lse = attention_with_lse(query, layer.key.to(key.dtype), layer.value.to(value.dtype))
        return merge_attention(inside, inside_lse, outside, outside_lse)[0]

    def _layout(self, call: ChunkCall) -> VideoLayout:
        block_size = self.adapter_state.block_size if self.adapter_state is not None else 64
        return VideoLayout(call.grid, block_size=block_size)


class BlockCausalFamily(WanStyleFamily):
    """Wan-style blocks, layout and timestep; only the processor differs."""

    name = "block-causal"
    model_classes = ("BlockVideoDiT",)

    def matches(self, model) -> bool:
        names = {cls.__name__ for cls in type(model).__mro__}
        return bool(names.intersection(self.model_classes)) and hasattr(model, "chunk_call")

    def make_processor(self, original, state, method, layer_index: int, dense: bool) -> BlockCausalProcessor:
        if not getattr(method, "takes_lse", False):
            raise ValueError("on a block-diffusion model an attention method must return its log-sum-exp (take a "
                             "`return_lse` option), to be merged with the attention over earlier chunks")
        processor = BlockCausalProcessor(original.chunk_call, layer_index, method, state, dense)
        # Installed after `enable_parallelism`, it must still refuse to run split.
        processor._parallel_config = getattr(original, "_parallel_config", None)
        return processor
