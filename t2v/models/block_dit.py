"""BlockVideoDiT: the VideoDiT made block-causal, for chunk-by-chunk generation (block diffusion).

The video is cut into chunks of `chunk_frames` frames. Self-attention is full inside a chunk and causal across
chunks: a chunk sees the `window_chunks` chunks before it and nothing after (`attention.block_causal`). Each frame
has its own timestep, so that a chunk can be denoised at its own noise level while the chunks before it are clean
(diffusion forcing), and each chunk may read its own caption: a prompt whose motion changes part-way ("moves right,
then up") conditions every chunk on its segment.

Generation keeps a KV cache: the finished chunks a chunk attends to are run once (timestep 0) with the cache in
fill mode, which stores every layer's keys and values; each denoising step of the chunk then runs the chunk alone,
attending to them. Positions are relative to the window: the context starts at frame 0 and the chunk follows it,
so a clip of any length never takes a position past the window the model was trained on. When the window slides,
the chunks it keeps move to earlier positions, so the cache is filled again for every chunk (one forward over the
context per chunk, against one per denoising step and guidance branch for the chunk itself).

Same weights as VideoDiT (a trained VideoDiT loads into it); only the forward differs.
"""

from __future__ import annotations

import torch

from attention.adapters.block_causal import BlockCausalProcessor
from attention.block_causal import ChunkCall, KVCache
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
# diffusers loads a pipeline component by finding its loading base class in the component's own module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from t2v.models.video_dit import VideoDiT, pool_caption


class _CurrentCall:
    """Holds the ChunkCall of the forward in progress; shared by the model and its self-attention processors."""

    current: ChunkCall | None = None


class SegmentCrossAttention:
    """Cross-attention in which each run of tokens reads its own caption: text given as (B * segments, L, D) is
    matched with the tokens cut into that many equal runs (chunks in frame-major order). Text given as (B, L, D)
    goes to the module's own processor unchanged."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        batch, tokens, dim = hidden_states.shape
        if encoder_hidden_states is None or encoder_hidden_states.shape[0] == batch:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        segments = encoder_hidden_states.shape[0] // batch
        runs = hidden_states.reshape(batch * segments, tokens // segments, dim)
        out = self.original(attn, runs, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        return out.reshape(batch, tokens, -1)


class BlockVideoDiT(VideoDiT):
    """A block-causal VideoDiT; `forward(..., kv_cache=)` generates chunk by chunk (see the module docstring)."""

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
        chunk_frames: int = 4,
        window_chunks: int = 3,
    ):
        super().__init__(in_channels, out_channels, patch_size, num_attention_heads, attention_head_dim, num_layers,
                         ffn_dim, text_dim, freq_dim, max_frames, max_height, max_width, sample_frames, sample_height,
                         sample_width, eps, absolute_positions, frame_modulation, position_modulation, caption_layout)
        if chunk_frames < 1 or chunk_frames % patch_size[0]:
            raise ValueError(f"chunk_frames must be a positive multiple of the temporal patch {patch_size[0]}")
        if window_chunks < 0 or (window_chunks + 1) * chunk_frames > max_frames:
            raise ValueError(f"a window of {window_chunks} + 1 chunks of {chunk_frames} frames exceeds max_frames "
                             f"{max_frames}")
        self.chunk_call = _CurrentCall()
        for index, block in enumerate(self.blocks):
            block.attn1.set_processor(BlockCausalProcessor(self.chunk_call, index))
            block.attn2.set_processor(SegmentCrossAttention(block.attn2.processor))

    @property
    def window_frames(self) -> int:
        """The frames one forward may span: the context window and the chunk being made."""
        return (self.config.window_chunks + 1) * self.config.chunk_frames

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def supported_shapes(self) -> str:
        c = self.config
        _, ph, pw = c.patch_size
        return (f"any number of frames that is a multiple of {c.chunk_frames} (made {c.chunk_frames} at a time), "
                f"height a multiple of {ph} up to {c.max_height}, width a multiple of {pw} up to {c.max_width}")

    def check_video_shape(self, num_frames: int, height: int, width: int) -> None:
        """Raises ValueError for a clip this model cannot make chunk by chunk."""
        c = self.config
        _, ph, pw = c.patch_size
        if (num_frames < c.chunk_frames or num_frames % c.chunk_frames or height < ph or height % ph
                or height > c.max_height or width < pw or width % pw or width > c.max_width):
            raise ValueError(f"this model cannot make {num_frames} frames of {height}x{width}; it makes "
                             f"{self.supported_shapes()}")

    def _rotary(self, hidden_states: torch.Tensor, frame_offset: int):
        """The rotary tables of this call's tokens when its first frame sits at `frame_offset`."""
        _, _, frames, height, width = hidden_states.shape
        probe = torch.empty((1, 1, frame_offset + frames, height, width), device="meta")
        cos, sin = self.rope(probe)
        pt, ph, pw = self.config.patch_size
        skip = (frame_offset // pt) * (height // ph) * (width // pw)
        return cos[:, skip:], sin[:, skip:]

    @staticmethod
    def frame_timesteps(timestep, batch: int, frames: int, chunks: int, device) -> torch.Tensor:
        """(B, frames) timesteps from one per clip, one per chunk or one per frame."""
        t = torch.as_tensor(timestep, device=device).float()
        if t.ndim <= 1:
            return t.reshape(-1, 1).expand(batch, frames)
        if t.shape[1] == frames:
            return t.expand(batch, frames)
        if t.shape[1] == chunks:
            return t.repeat_interleave(frames // chunks, dim=1).expand(batch, frames)
        raise ValueError(f"timestep must be one per clip, per chunk ({chunks}) or per frame ({frames}), got "
                         f"shape {tuple(t.shape)}")

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                return_dict: bool = True):
        """hidden_states (B, C, F, H, W), F a multiple of chunk_frames; timestep per clip, chunk or frame;
        encoder_hidden_states (B, L, D) for every chunk or (B, chunks, L, D) one per chunk (mask alike).

        kv_cache: None, a whole window at once (training); in fill mode, these are the context frames, whose keys
        and values it stores; otherwise this is the chunk after the cached context."""
        c = self.config
        batch, channels, frames, height, width = hidden_states.shape
        if channels != c.in_channels:
            raise ValueError(f"expected {c.in_channels} channels, got {channels}")
        offset = kv_cache.frames if kv_cache is not None and not kv_cache.filling else 0
        if frames % c.chunk_frames or offset + frames > c.max_frames:
            raise ValueError(f"a forward takes whole chunks of {c.chunk_frames} frames within {c.max_frames} "
                             f"positions; got {frames} frames after {offset}")
        VideoDiT.check_video_shape(self, c.chunk_frames, height, width)
        pt, ph, pw = c.patch_size
        grid = grid_f, grid_h, grid_w = frames // pt, height // ph, width // pw
        chunks = frames // c.chunk_frames
        per_frame = grid_h * grid_w
        device = hidden_states.device

        tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        if c.absolute_positions:
            span = slice(offset // pt, offset // pt + grid_f)
            position = (self.frame_embedding[span, None, None] + self.row_embedding[None, :grid_h, None]
                        + self.column_embedding[None, None, :grid_w])
            tokens = tokens + position.reshape(1, -1, tokens.shape[-1]).to(tokens.dtype)

        text, mask = self._chunk_text(encoder_hidden_states, encoder_attention_mask, chunks, device)
        segments = text.shape[1]
        pooled = pool_caption(text.flatten(0, 1), mask.flatten(0, 1)).view(batch, segments, -1)
        pooled = pooled.repeat_interleave(grid_f // segments, dim=1)  # (B, grid_f, text_dim)
        t = self.frame_timesteps(timestep, batch, grid_f, chunks, device)
        time_freqs = self.time_proj(t.reshape(-1)).to(self.time_embedding.linear_1.weight.dtype)
        # Per frame, in float32 for the modulation's add, as VideoDiT keeps it.
        temb = (self.time_embedding(time_freqs).float().view(batch, grid_f, -1)
                + self.pooled_text_embedding(pooled).float())
        positions = self._modulation_positions(grid, offset // pt)
        if positions is not None and not c.position_modulation:
            temb = temb + positions  # per frame
        temb = VideoDiT._per_token(temb, per_frame)  # (B, tokens, D)
        if positions is not None and c.position_modulation:
            temb = temb + positions
        block_modulation = self.time_modulation(temb.to(self.time_modulation[1].weight.dtype)).unflatten(-1, (6, -1))

        context = self.text_projection(text) * mask.to(text.dtype).unsqueeze(-1)  # (B, segments, L, D)
        if c.caption_layout:
            frames_per_segment = grid_f // segments
            prior = [self.layout_prior(context[:, s], mask[:, s], (frames_per_segment, grid_h, grid_w),
                                       offset // pt + s * frames_per_segment) for s in range(segments)]
            tokens = tokens + torch.cat(prior, 1).to(tokens.dtype)
        context = context[:, 0] if segments == 1 else context.flatten(0, 1)

        chunk_tokens = (c.chunk_frames // pt) * per_frame
        rotary_emb = self._rotary(hidden_states, offset)
        self.chunk_call.current = ChunkCall(grid, chunk_tokens, c.window_chunks, kv_cache)
        try:
            for block in self.blocks:
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    tokens = self._gradient_checkpointing_func(block, tokens, context, block_modulation, rotary_emb)
                else:
                    tokens = block(tokens, context, block_modulation, rotary_emb)
        finally:
            self.chunk_call.current = None
        if kv_cache is not None and kv_cache.filling:
            kv_cache.frames = frames

        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        patches = self.proj_out(tokens).reshape(batch, *grid, c.out_channels, pt, ph, pw)
        video = patches.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, c.out_channels, frames, height, width)
        if not return_dict:
            return (video,)
        return Transformer2DModelOutput(sample=video)

    @staticmethod
    def _chunk_text(text: torch.Tensor, mask: torch.Tensor | None, chunks: int, device):
        """Text as (B, segments, L, D) and its mask (B, segments, L), segments 1 or one per chunk."""
        if text.ndim == 3:
            text = text[:, None]
        if mask is None:
            mask = torch.ones(text.shape[:3], device=device)
        elif mask.ndim == 2:
            mask = mask[:, None]
        if text.shape[1] not in (1, chunks) or mask.shape[:2] != text.shape[:2]:
            raise ValueError(f"text must be one caption per clip or one per chunk ({chunks}), got text of shape "
                             f"{tuple(text.shape)} and mask of shape {tuple(mask.shape)}")
        return text, mask


def block_model_from(transformer: VideoDiT, chunk_frames: int = 4, window_chunks: int = 3) -> BlockVideoDiT:
    """A BlockVideoDiT with the weights of a trained VideoDiT (the same parameters; only attention and conditioning
    per chunk differ), e.g. to start block-diffusion training from the embedded model."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config.update(chunk_frames=chunk_frames, window_chunks=window_chunks)
    block = BlockVideoDiT(**config).to(transformer.device)
    block.load_state_dict(transformer.state_dict())
    return block if transformer.dtype == torch.float32 else block.to(transformer.dtype)


__all__ = ["BlockVideoDiT", "SegmentCrossAttention", "block_model_from"]
