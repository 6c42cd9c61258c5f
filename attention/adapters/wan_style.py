"""Wan-style models: diffusers' WanTransformer3DModel (Wan 2.1 / 2.2) and this project's VideoDiT.

Both are a stack of `blocks[i]` whose `attn1` is a self-attention `WanAttention` over the video tokens (3D rotary
embedding, RMS norm on q and k across heads) and whose `attn2` is cross-attention to the text, left untouched.
Text never enters self-attention, so the layout is the latent grid divided by the patch size.
"""

from __future__ import annotations

import torch

from attention.adapters.method_processor import MethodProcessor
from attention.context_parallel import context_parallel_of, ulysses_attention
from attention.layout import VideoLayout
from attention.methods import autocast_dtype


def _apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's rotary embedding rotates interleaved pairs (x[2i], x[2i+1]); cos and sin come repeated per pair.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


def project_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, N, D) of a Wan-style self-attention module, computed exactly as its own processor does."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    # The norms act across all heads, so they come before the split into heads.
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    if rotary_emb is not None:
        query, key = _apply_rotary(query, *rotary_emb), _apply_rotary(key, *rotary_emb)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


class WanStyleProcessor(MethodProcessor):
    """Self-attention processor for a `WanAttention` module that hands q, k, v to an attention method.

    Calls it cannot serve exactly (cross-attention, a mask, image keys, extra arguments), dense layers, warm-up
    steps and calls without a known layout go to the module's original processor, so they stay bit-exact and keep
    whatever attention backend the model was set to.

    Under diffusers' context parallelism (`enable_parallelism`) each rank holds a share of the tokens: the method
    runs on all of them for a share of the heads (`attention.context_parallel`), and under ring attention only
    dense attention runs, through the original processor.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        state, layout = self.state, self.state.layout
        plain = (
            encoder_hidden_states is None
            and attention_mask is None
            and not kwargs
            and not attn.is_cross_attention
            and getattr(attn, "add_k_proj", None) is None
        )
        parallel = context_parallel_of(self._parallel_config)
        if parallel is not None and parallel.kind == "ring":
            parallel.require_dense(state.method)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if plain and layout is not None:
            # Under context parallelism this rank holds a share; the layout describes the whole video.
            local = hidden_states.shape[1]
            layout.check(local if parallel is None else parallel.gathered_tokens(local))
        if not plain or layout is None or self.dense or state.dense_now or not layout.is_video_only:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        dtype = autocast_dtype(query.device.type)
        if dtype is not None:
            # The q/k RMS norms can give float32 here (float32 weights), which the half-precision kernels do not
            # take: training would use the reference.
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if parallel is None:
            out = self.method(query, key, value, layout, state.step)
        else:
            out = ulysses_attention(lambda q, k, v: self.method(q, k, v, layout, state.step), query, key, value,
                                    parallel)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class WanStyleFamily:
    name = "wan-style"
    model_classes = ("WanTransformer3DModel", "VideoDiT")

    def matches(self, model) -> bool:
        names = {cls.__name__ for cls in type(model).__mro__}
        if not names.intersection(self.model_classes):
            return False
        blocks = getattr(model, "blocks", None)
        patch_size = getattr(getattr(model, "config", None), "patch_size", None)
        return (
            blocks is not None
            and len(blocks) > 0
            and patch_size is not None
            and len(patch_size) == 3
            and all(type(getattr(block, "attn1", None)).__name__ == "WanAttention" for block in blocks)
        )

    def self_attention_modules(self, model) -> list:
        return [block.attn1 for block in model.blocks]

    def layout(self, model, args, kwargs, block_size: int) -> VideoLayout | None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            return None
        pt, ph, pw = model.config.patch_size
        # Same floor division as the models' Conv3d patch embedding.
        grid = (latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        layout = VideoLayout(grid, block_size=block_size)
        # Build the tile permutation here, outside any compiled block, so compiled methods only look it up.
        layout.tile_permutation(latents.device)
        return layout

    def device(self, args, kwargs) -> torch.device:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return latents.device

    def timestep(self, args, kwargs):
        return kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)

    def make_processor(self, original, state, method, layer_index: int, dense: bool) -> WanStyleProcessor:
        return WanStyleProcessor(original, state, method, layer_index, dense)
