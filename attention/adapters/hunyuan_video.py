"""HunyuanVideo: diffusers' HunyuanVideoTransformer3DModel (text-to-video, and its image-to-video variants).

Its self-attention joins the text tokens after the video tokens, in the dual-stream blocks (`transformer_blocks`:
the text has its own projections `add_q_proj`... and its own output `to_add_out`) and in the single-stream blocks
(`single_transformer_blocks`: video and text are projected together and the block has no output projection). q and
k get a per-head RMS norm; the 3D rotary embedding rotates the video part only. The model masks the padded text keys
with a boolean (B, 1, 1, video + text) mask, which the processor reads as a text key-padding mask
(`joint_text.text_key_mask`); any other mask goes to the model's own processor.
"""

from __future__ import annotations

import torch

from attention.adapters.joint_text import (JointTextProcessor, check_method_returns_lse, forward_argument,
                                           rotate_pairs, text_key_mask)
from attention.layout import VideoLayout


def _heads(attn, query, key, value, norm_q, norm_k) -> list[torch.Tensor]:
    """(B, N, inner) projections -> normed (B, H, N, D); the norms act per head, so the order is the model's."""
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return [x.transpose(1, 2) for x in (query, key, value)]


class HunyuanVideoProcessor(JointTextProcessor):
    """Self-attention of one HunyuanVideo block (dual- or single-stream), the video-video part by the method."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        original = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None or kwargs:
            return self.original(*original, **kwargs)
        num_video, num_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if not self.serves(num_video, num_text):
            return self.original(*original)
        servable, kept_text = text_key_mask(attention_mask, num_video, num_text, text_first=False)
        if not servable:
            return self.original(*original)

        if attn.add_q_proj is None:  # single-stream: video and text through the same projections
            joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)
            qkv = _heads(attn, attn.to_q(joint), attn.to_k(joint), attn.to_v(joint), attn.norm_q, attn.norm_k)
            video = [x[:, :, :num_video] for x in qkv]
            text = [x[:, :, num_video:] for x in qkv]
        else:
            video = _heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states),
                           attn.norm_q, attn.norm_k)
            text = _heads(attn, attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                          attn.add_v_proj(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            video[0], video[1] = rotate_pairs(video[0], cos, sin), rotate_pairs(video[1], cos, sin)
        dtype = video[0].dtype
        video_out, text_out = self.attend(video, text, kept_text)
        video_out, text_out = (x.transpose(1, 2).flatten(2, 3).to(dtype) for x in (video_out, text_out))
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


class HunyuanVideoFamily:
    name = "hunyuan-video"
    model_classes = ("HunyuanVideoTransformer3DModel",)

    def matches(self, model) -> bool:
        names = {cls.__name__ for cls in type(model).__mro__}
        blocks = [*getattr(model, "transformer_blocks", ()), *getattr(model, "single_transformer_blocks", ())]
        return (bool(names.intersection(self.model_classes)) and len(blocks) > 0
                and all(getattr(block, "attn", None) is not None for block in blocks))

    def self_attention_modules(self, model) -> list:
        return [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]

    def layout(self, model, args, kwargs, block_size: int) -> VideoLayout | None:
        latents = forward_argument(args, kwargs, "hidden_states", 0)
        text = forward_argument(args, kwargs, "encoder_hidden_states", 2)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or not isinstance(text, torch.Tensor):
            return None
        p, pt = model.config.patch_size, model.config.patch_size_t
        # Same floor division as the model's Conv3d patch embedding; its token refiner keeps the text length.
        grid = (latents.shape[2] // pt, latents.shape[3] // p, latents.shape[4] // p)
        layout = VideoLayout(grid, text_tokens=text.shape[1], text_position="suffix", block_size=block_size)
        layout.tile_permutation(latents.device)  # built here, outside any compiled block
        return layout

    def device(self, args, kwargs) -> torch.device:
        return forward_argument(args, kwargs, "hidden_states", 0).device

    def timestep(self, args, kwargs):
        return forward_argument(args, kwargs, "timestep", 1)

    def make_processor(self, original, state, method, layer_index: int, dense: bool) -> HunyuanVideoProcessor:
        check_method_returns_lse(method)
        return HunyuanVideoProcessor(original, state, method, layer_index, dense)
