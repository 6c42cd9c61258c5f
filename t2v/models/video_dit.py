"""VideoDiT: a small video diffusion transformer trained with flow matching.

Built from the same blocks as diffusers' Wan 2.1 transformer (``WanTransformerBlock``: self-attention with 3D rotary
embedding, cross-attention to text, AdaLN-zero modulation from the timestep), so that one attention adapter serves
both this model and real Wan checkpoints. What differs: a pixel-space patch embedding (no VAE), the text
conditioning from this project's small text encoder (its pooled embedding also joins the timestep embedding), and
explicit checks of what frame counts and sizes the model can take.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

from t2v.models.caption_layout import CaptionLayout


def pool_caption(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a caption's token features (B, L, D) over its real tokens (mask (B, L)): the pooled text that joins
    the timestep embedding."""
    weights = mask.to(text.dtype).unsqueeze(-1)
    return (text * weights).sum(1) / weights.sum(1).clamp(min=1)


class VideoDiT(ModelMixin, ConfigMixin, AttentionMixin, CacheMixin):
    """Predicts the flow-matching velocity (noise - clean) of a video (B, C, F, H, W) at a timestep in [0, 1000]."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["WanTransformerBlock"]
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
        max_frames: int = 32,
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
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        patch_size = tuple(patch_size)
        max_grid = (max_frames // patch_size[0], max_height // patch_size[1], max_width // patch_size[2])
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        if absolute_positions:
            # Rotary embedding tells a token only where others are relative to it; "moves right" is easier to tie to
            # the frame index and the column. Zero at first, so weights trained without them keep their function.
            self.frame_embedding = nn.Parameter(torch.zeros(max_grid[0], inner_dim))
            self.row_embedding = nn.Parameter(torch.zeros(max_grid[1], inner_dim))
            self.column_embedding = nn.Parameter(torch.zeros(max_grid[2], inner_dim))
        if frame_modulation:
            # A per-frame term in the conditioning vector, so each frame gets its own AdaLN modulation (as Wan 2.2
            # modulates per token): "moves left" and the frame number meet in the modulation MLP, which is what
            # the direction of a motion needs. Zero at first, like the absolute positions.
            self.frame_modulation_embedding = nn.Parameter(torch.zeros(max_grid[0], inner_dim))
        if position_modulation:
            # Row and column terms as well, so each token gets its own modulation. Noise swamps position embeddings
            # added to the tokens, but the modulation's shift is added after the normalisation, so near pure noise
            # (where a clip's layout, and so a motion's direction, is decided) a token still knows where it is.
            self.row_modulation_embedding = nn.Parameter(torch.zeros(max_grid[1], inner_dim))
            self.column_modulation_embedding = nn.Parameter(torch.zeros(max_grid[2], inner_dim))
        if caption_layout:
            self.layout_prior = CaptionLayout(inner_dim, num_attention_heads, max_grid)
        self.rope = WanRotaryPosEmbed(attention_head_dim, patch_size, max(max_grid))
        # Wan builds its rotary tables in float64, which promotes q and k to float64 in every attention call.
        self.rope.freqs_cos, self.rope.freqs_sin = self.rope.freqs_cos.float(), self.rope.freqs_sin.float()

        self.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(freq_dim, inner_dim)
        self.pooled_text_embedding = nn.Linear(text_dim, inner_dim)
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(inner_dim, 6 * inner_dim))
        self.text_projection = nn.Sequential(
            nn.Linear(text_dim, inner_dim), nn.GELU(approximate="tanh"), nn.Linear(inner_dim, inner_dim)
        )

        self.blocks = nn.ModuleList(
            [
                WanTransformerBlock(inner_dim, ffn_dim, num_attention_heads, cross_attn_norm=True, eps=eps)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.gradient_checkpointing = False
        self._init_adaln_zero()

    def _init_adaln_zero(self):
        # Every residual branch starts closed (gate 0) and the output starts at 0, so training begins from identity.
        nn.init.zeros_(self.time_modulation[1].weight)
        nn.init.zeros_(self.time_modulation[1].bias)
        for block in self.blocks:
            with torch.no_grad():
                block.scale_shift_table[:, 2].zero_()
                block.scale_shift_table[:, 5].zero_()
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @staticmethod
    def _per_token(per_frame: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """(B, frames, ...) -> (B, frames * tokens_per_frame, ...), frame-major like the token sequence."""
        expanded = per_frame[:, :, None].expand(-1, -1, tokens_per_frame, *per_frame.shape[2:])
        return expanded.flatten(1, 2)

    def _modulation_positions(self, grid: tuple[int, int, int], frame_offset: int = 0) -> torch.Tensor | None:
        """The conditioning's positional term: (frames, D) per frame, (frames * rows * columns, D) per token, or None.
        `frame_offset`: the position of the first frame (a chunk that continues earlier frames)."""
        c = self.config
        frames, rows, columns = grid
        span = slice(frame_offset, frame_offset + frames)
        if not c.position_modulation:
            return self.frame_modulation_embedding[span].float() if c.frame_modulation else None
        # Summed in float32: in bfloat16 the sum of three tables would round away part of each.
        term = (self.row_modulation_embedding[:rows, None].float()
                + self.column_modulation_embedding[None, :columns].float())
        if c.frame_modulation:
            term = self.frame_modulation_embedding[span, None, None].float() + term
        return term.expand(frames, rows, columns, -1).flatten(0, 2)

    @property
    def _cp_plan(self) -> dict | None:
        """Where diffusers' context parallelism (`enable_parallelism`) splits this forward's tokens across ranks and
        gathers them back: the rotary tables and the first block's tokens are split, every block's per-token
        modulation too (one tensor for all blocks, so each block's input is split), and the final norm's output is
        gathered, so the final per-token modulation and the unpatching see the whole video. A subclass with a
        forward of its own (block-causal, MATE) gets no plan: this one describes VideoDiT's forward only."""
        if type(self).forward is not VideoDiT.forward:
            return None
        c = self.config
        plan = {
            "rope": {
                0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
                1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            },
            "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
            "norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }
        if c.frame_modulation or c.position_modulation:
            # Only then is the modulation per token (B, tokens, 6, D). Named only then: diffusers warns about a
            # tensor of other dimensions, and fails where its logger has no `warning_once`.
            plan["blocks.*"] = {"temb": ContextParallelInput(split_dim=1, expected_dims=4)}
        return plan

    def supported_shapes(self) -> str:
        c = self.config
        pt, ph, pw = c.patch_size
        return (
            f"frames a multiple of {pt} up to {c.max_frames}, height a multiple of {ph} up to {c.max_height}, "
            f"width a multiple of {pw} up to {c.max_width}"
        )

    def check_video_shape(self, num_frames: int, height: int, width: int) -> None:
        """Raises ValueError when the model cannot take this many frames or this size, saying what it can take."""
        c = self.config
        pt, ph, pw = c.patch_size
        bad = (
            num_frames < pt or num_frames % pt or num_frames > c.max_frames
            or height < ph or height % ph or height > c.max_height
            or width < pw or width % pw or width > c.max_width
        )
        if bad:
            raise ValueError(
                f"this model cannot take {num_frames} frames of {height}x{width}; it takes {self.supported_shapes()}"
            )
        parallel = getattr(self._parallel_config, "context_parallel_config", None)
        if parallel is not None and not (parallel.ulysses_anything or parallel.ring_anything):
            ranks = parallel.ring_degree * parallel.ulysses_degree
            tokens = (num_frames // pt) * (height // ph) * (width // pw)
            if tokens % ranks:
                raise ValueError(f"{num_frames} frames of {height}x{width} make {tokens} tokens, which do not split "
                                 f"evenly across the {ranks} ranks of context parallelism")

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        batch, channels, frames, height, width = hidden_states.shape
        if channels != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} channels, got {channels}")
        self.check_video_shape(frames, height, width)
        pt, ph, pw = self.config.patch_size
        rotary_emb = self.rope(hidden_states)
        grid = grid_f, grid_h, grid_w = frames // pt, height // ph, width // pw

        tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        if self.config.absolute_positions:
            position = (self.frame_embedding[:grid_f, None, None] + self.row_embedding[None, :grid_h, None]
                        + self.column_embedding[None, None, :grid_w])
            tokens = tokens + position.reshape(1, -1, tokens.shape[-1]).to(tokens.dtype)

        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=hidden_states.device)
        text_mask = encoder_attention_mask.to(encoder_hidden_states.dtype).unsqueeze(-1)
        pooled_text = pool_caption(encoder_hidden_states, encoder_attention_mask)

        time_freqs = self.time_proj(timestep).to(self.time_embedding.linear_1.weight.dtype)
        # The conditioning vector is kept in float32 for the modulation's add; its linear layers take their own dtype.
        temb = self.time_embedding(time_freqs).float() + self.pooled_text_embedding(pooled_text).float()
        positions = self._modulation_positions(grid)
        if positions is not None:
            temb = temb[:, None] + positions  # (B, frames or tokens, D)
            # The blocks take per-token modulation as (B, tokens, 6, D); a per-frame term is repeated over its frame.
            repeat = 1 if self.config.position_modulation else grid_h * grid_w
        modulation_dtype = self.time_modulation[1].weight.dtype
        block_modulation = self.time_modulation(temb.to(modulation_dtype)).unflatten(-1, (6, -1))
        if positions is not None:
            block_modulation = self._per_token(block_modulation, repeat)
        # Padding tokens are zeroed (as Wan zero-pads its text), so the blocks' cross-attention needs no mask.
        context = self.text_projection(encoder_hidden_states) * text_mask
        if self.config.caption_layout:
            tokens = tokens + self.layout_prior(context, encoder_attention_mask, grid).to(tokens.dtype)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, context, block_modulation, rotary_emb)
            else:
                tokens = block(tokens, context, block_modulation, rotary_emb)

        if positions is not None:
            shift_scale = self.scale_shift_table[:, None] + temb[:, :, None]  # (B, frames or tokens, 2, D)
            shift, scale = self._per_token(shift_scale, repeat).unbind(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        patches = self.proj_out(tokens)

        patches = patches.reshape(batch, *grid, self.config.out_channels, pt, ph, pw)
        video = patches.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, self.config.out_channels, frames, height, width)
        if not return_dict:
            return (video,)
        return Transformer2DModelOutput(sample=video)


def lengthen_tables(state: dict, own: dict) -> dict:
    """`state` with each per-frame table made as long as `own`'s (a model with a larger max_frames): the rows
    `state` has first, then `own`'s rows, which are untrained like the rows a model never saw frames for."""
    state = dict(state)
    for name, value in state.items():
        if name in own and value.shape != own[name].shape and value.shape[1:] == own[name].shape[1:]:
            table = own[name].clone()
            table[:value.shape[0]] = value
            state[name] = table
    return state


def with_max_frames(transformer: VideoDiT, max_frames: int) -> VideoDiT:
    """A copy of `transformer` that takes up to `max_frames` frames: frames past the trained ones get untrained
    per-frame rows, exactly as frames between the trained length and the old max_frames already had."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    if max_frames <= config["max_frames"]:
        return transformer
    longer = type(transformer)(**dict(config, max_frames=max_frames)).to(transformer.device)
    longer.load_state_dict(lengthen_tables(transformer.state_dict(), longer.state_dict()))
    return longer.to(transformer.dtype)

