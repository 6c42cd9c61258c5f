"""MateVideoDiT: the VideoDiT with LinGen's MATE token mixer where self-attention stood (see `t2v.models.mate`).

Every other part (patch embedding, conditioning, cross-attention, feed-forward, output) is VideoDiT's, so a trained
VideoDiT's weights load into it (`mate_model_from`): its self-attention weights become the TE-branch's (the same
projections, now attending within windows), and the MA-branch starts closed (zero output projection), so the
converted model starts as the trained one with windowed attention, and training opens the Mamba branch.

Its cost is linear in the number of tokens, so it takes more frames than the attention model (`max_frames`).
"""

from __future__ import annotations

import torch

from diffusers.configuration_utils import register_to_config
# diffusers loads a pipeline component by finding its loading base class in the component's own module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from t2v.models.mate import MambaBranch, MateMixer, TemporalSwinProcessor, _Holder
from t2v.models.video_dit import VideoDiT, lengthen_tables


class MateVideoDiT(VideoDiT):
    """mate_window: (frames, rows, columns) of the TE-branch's windows (fitted to divide the grid); mate_state_size,
    mate_expand, mate_conv_size, mate_review_tokens, mate_chunk_size: the MA-branch's state, inner width factor,
    convolution, review tokens and scan chunk."""

    _repeated_blocks = ["WanTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        patch_size: tuple[int, int, int] = (1, 4, 4),
        num_attention_heads: int = 4,
        attention_head_dim: int = 64,
        num_layers: int = 8,
        ffn_dim: int = 1024,
        text_dim: int = 128,
        freq_dim: int = 256,
        max_frames: int = 128,
        max_height: int = 64,
        max_width: int = 64,
        sample_frames: int = 16,
        sample_height: int = 32,
        sample_width: int = 32,
        eps: float = 1e-6,
        absolute_positions: bool = False,
        frame_modulation: bool = False,
        position_modulation: bool = False,
        caption_layout: bool = False,
        mate_window: tuple[int, int, int] = (4, 4, 4),
        mate_state_size: int = 32,
        mate_expand: int = 1,
        mate_conv_size: int = 4,
        mate_review_tokens: int = 4,
        mate_chunk_size: int = 64,
    ):
        super().__init__(in_channels, out_channels, patch_size, num_attention_heads, attention_head_dim, num_layers,
                         ffn_dim, text_dim, freq_dim, max_frames, max_height, max_width, sample_frames, sample_height,
                         sample_width, eps, absolute_positions, frame_modulation, position_modulation, caption_layout)
        self.token_grid = _Holder()
        dim = num_attention_heads * attention_head_dim
        for index, block in enumerate(self.blocks):
            temporal = block.attn1
            temporal.set_processor(TemporalSwinProcessor(self.token_grid, mate_window, shifted=index % 2 == 1))
            mamba = MambaBranch(dim, num_attention_heads, mate_state_size, mate_expand, mate_conv_size,
                                mate_review_tokens, index, mate_chunk_size)
            block.attn1 = MateMixer(temporal, mamba, self.token_grid)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        pt, ph, pw = self.config.patch_size
        frames, height, width = hidden_states.shape[2:]
        self.token_grid.grid = (frames // pt, height // ph, width // pw)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self.token_grid.grid = None


def mate_model_from(transformer: VideoDiT, **mate_options) -> MateVideoDiT:
    """A MateVideoDiT holding a trained VideoDiT's weights (self-attention's as the TE-branch's); `mate_options`
    are MateVideoDiT's config (max_frames, mate_window, ...)."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config.update(mate_options)
    mate = MateVideoDiT(**config).to(transformer.device)
    state = {key.replace(".attn1.", ".attn1.temporal."): value for key, value in transformer.state_dict().items()}
    state = lengthen_tables(state, mate.state_dict())  # per-frame tables made longer (max_frames)
    missing, unexpected = mate.load_state_dict(state, strict=False)
    if unexpected or any(".mamba." not in key for key in missing):
        raise ValueError(f"weights that do not fit a MATE model: missing {missing}, unexpected {unexpected}")
    return mate if transformer.dtype == torch.float32 else mate.to(transformer.dtype)


__all__ = ["MateVideoDiT", "mate_model_from"]
