"""Chunk-by-chunk (block-causal) attention: the self-attention of a block-diffusion model.

A block-diffusion model cuts a video into chunks of a few frames and makes them one after another. In a forward
over several chunks (training, or filling the cache with finished chunks) each chunk attends to itself and to the
`window` chunks before it: chunk-causal attention. While one chunk is denoised, its queries attend to its own keys
(the in-chunk part, which any registered method can compute) and to the cached keys and values of the chunks before
it (the block-external part). Merging the two by log-sum-exp is exactly attention over their union, which is what
lets FlashBlock keep the block-external part across denoising steps and recompute only the in-chunk part.

Tokens are in row-major (frame, height, width) order, so a chunk is a contiguous run of `chunk_tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F



@dataclass
class LayerCache:
    """One self-attention layer's cache: keys and values (B, H, N_context, D) of the finished chunks a chunk attends
    to, and a slot for the block-external attention (out, lse) of the chunk's queries over them (FlashBlock)."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    external: tuple[torch.Tensor, torch.Tensor] | None = None
    external_step: int | None = None


class KVCache:
    """Keys and values of the context chunks, per self-attention layer, for chunk-by-chunk generation.

    `fill` mode: a forward over the context frames stores each layer's keys and values (replacing what was there).
    Otherwise a forward over the next chunk attends to them; `step` is the denoising step of that chunk (set by the
    pipeline), which methods that reuse work across steps read. `frames` is how many context frames are cached: the
    next chunk's positions start there.
    """

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.frames = 0
        self.step = 0
        self.filling = False

    def clear(self) -> None:
        for index in range(len(self.layers)):
            self.layers[index] = LayerCache()
        self.frames, self.step, self.filling = 0, 0, False

    def begin_chunk(self) -> None:
        """A new chunk is about to be denoised: step 0, and no block-external attention kept from the last one."""
        self.step = 0
        for layer in self.layers:
            layer.external, layer.external_step = None, None

    @property
    def is_empty(self) -> bool:
        return self.layers[0].key is None if self.layers else True


@dataclass
class ChunkCall:
    """What the current forward of a block-diffusion model asks of its self-attention layers (set by the model).

    grid: (frames, height, width) of the tokens in this call; chunk_tokens: tokens per chunk; window_chunks: how many
    earlier chunks a chunk attends to (None: all); cache: the context's keys and values (None: no context).
    """

    grid: tuple[int, int, int]
    chunk_tokens: int
    window_chunks: int | None = None
    cache: KVCache | None = None
    extra: dict = field(default_factory=dict)


def chunk_causal_mask(num_chunks: int, window_chunks: int | None, device=None) -> torch.Tensor:
    """(num_chunks, num_chunks) bool: chunk i reads chunk j when i - window <= j <= i."""
    i = torch.arange(num_chunks, device=device)[:, None]
    j = torch.arange(num_chunks, device=device)[None, :]
    allowed = j <= i
    if window_chunks is not None:
        allowed &= j >= i - window_chunks
    return allowed


def chunk_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_tokens: int,
                           window_chunks: int | None = None) -> torch.Tensor:
    """Chunk-causal attention over (B, H, N, D) tokens, N a multiple of `chunk_tokens`.

    PyTorch's attention with the token mask: a fused kernel with a backward on a GPU (memory-efficient attention
    takes masks), and one graph under torch.compile, which is what training a block model needs.
    """
    N = q.shape[2]
    if N % chunk_tokens:
        raise ValueError(f"{N} tokens do not split into chunks of {chunk_tokens}")
    allowed = chunk_causal_mask(N // chunk_tokens, window_chunks, q.device)
    if N == chunk_tokens:
        return F.scaled_dot_product_attention(q, k, v)
    token_mask = allowed.repeat_interleave(chunk_tokens, 0).repeat_interleave(chunk_tokens, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention of q over (k, v) with its log-sum-exp (B, H, N), for merging with another part."""
    from attention.kernels import dense_attention

    return dense_attention(q, k, v)
