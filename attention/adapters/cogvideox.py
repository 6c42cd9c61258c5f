"""CogVideoX: diffusers' CogVideoXTransformer3DModel (CogVideoX 1.0 and 1.5).

Each block's `attn1` projects the text tokens and the video tokens together, text first; q and k get a per-head
layer norm, and the 3D rotary embedding (where the model uses one) rotates the video part only. The model never
masks its self-attention (the padded text tokens take part, as the model was trained); a call that does pass a mask
goes to the model's own processor.
"""

from __future__ import annotations

import torch

from attention.adapters.joint_text import (JointTextProcessor, check_method_returns_lse, forward_argument,
                                           rotate_pairs)
from attention.layout import VideoLayout


class CogVideoXProcessor(JointTextProcessor):
    """Self-attention of one CogVideoX block, the video-video part by the method."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        num_text = encoder_hidden_states.shape[1]
        if (attention_mask is not None or kwargs or attn.is_cross_attention
                or not self.serves(hidden_states.shape[1], num_text)):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 **kwargs)

        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        if attn.fused_projections:  # what the model's fused processor (fuse_qkv_projections) computes
            query, key, value = attn.to_qkv(joint).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
        query, key, value = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = [x[:, :, :num_text] for x in (query, key, value)]
        video = [x[:, :, num_text:] for x in (query, key, value)]
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            video[0], video[1] = rotate_pairs(video[0], cos, sin), rotate_pairs(video[1], cos, sin)

        video_out, text_out = self.attend(video, text)
        out = torch.cat([text_out, video_out], dim=2).transpose(1, 2).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, video_out = out.split([num_text, out.shape[1] - num_text], dim=1)
        return video_out, text_out


class CogVideoXFamily:
    name = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)

    def matches(self, model) -> bool:
        names = {cls.__name__ for cls in type(model).__mro__}
        blocks = getattr(model, "transformer_blocks", ())
        return (bool(names.intersection(self.model_classes)) and len(blocks) > 0
                and all(getattr(block, "attn1", None) is not None for block in blocks))

    def self_attention_modules(self, model) -> list:
        return [block.attn1 for block in model.transformer_blocks]

    def layout(self, model, args, kwargs, block_size: int) -> VideoLayout | None:
        latents = forward_argument(args, kwargs, "hidden_states", 0)  # (B, frames, channels, height, width)
        text = forward_argument(args, kwargs, "encoder_hidden_states", 1)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or not isinstance(text, torch.Tensor):
            return None
        p, pt = model.config.patch_size, model.config.patch_size_t
        frames = latents.shape[1] if pt is None else latents.shape[1] // pt
        grid = (frames, latents.shape[3] // p, latents.shape[4] // p)
        layout = VideoLayout(grid, text_tokens=text.shape[1], text_position="prefix", block_size=block_size)
        layout.tile_permutation(latents.device)  # built here, outside any compiled block
        return layout

    def device(self, args, kwargs) -> torch.device:
        return forward_argument(args, kwargs, "hidden_states", 0).device

    def timestep(self, args, kwargs):
        return forward_argument(args, kwargs, "timestep", 2)

    def make_processor(self, original, state, method, layer_index: int, dense: bool) -> CogVideoXProcessor:
        check_method_returns_lse(method)
        return CogVideoXProcessor(original, state, method, layer_index, dense)
