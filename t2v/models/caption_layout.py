"""A caption's layout prior: what each token position should hold, read from the caption alone.

Near pure noise a clip's layout is decided, and for a moving object it depends on the caption, the frame and the
position together (an object that moves right starts on the left). The transformer's own queries are mostly
noise there, so its cross-attention cannot tell positions apart. Here the queries are learned per position instead
(a frame-by-row plus a frame-by-column table, so the frame and one spatial axis meet in one query), they attend
over the caption's tokens, and the result is added to the tokens before the first block. Its output projection
starts at zero, so a trained model grown by this module keeps its function. Every parameter is built from an
explicit tensor rather than `torch.nn.init`, which diffusers turns off while it loads a model: parameters the
weights lack (this module, when a trained model is grown by it) must still start as intended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CaptionLayout(nn.Module):
    def __init__(self, dim: int, heads: int, max_grid: tuple[int, int, int]):
        super().__init__()
        frames, rows, columns = max_grid
        self.heads = heads
        self.frame_row_queries = nn.Parameter(torch.randn(frames, rows, dim) * dim**-0.5)
        self.frame_column_queries = nn.Parameter(torch.randn(frames, columns, dim) * dim**-0.5)
        self.key_weight = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.value_weight = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.out_weight = nn.Parameter(torch.zeros(dim, dim))
        self.out_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, context: torch.Tensor, text_mask: torch.Tensor, grid: tuple[int, int, int],
                frame_offset: int = 0) -> torch.Tensor:
        """context (B, L, D) and text_mask (B, L) -> (B, frames * rows * columns, D), frame-major like the tokens.
        `frame_offset`: the position of the first frame (a chunk that continues earlier frames)."""
        frames, rows, columns = grid
        batch, length, dim = context.shape
        span = slice(frame_offset, frame_offset + frames)
        queries = (self.frame_row_queries[span, :rows, None] + self.frame_column_queries[span, None, :columns])
        queries = queries.reshape(1, -1, self.heads, dim // self.heads).transpose(1, 2).to(context.dtype)
        keys = F.linear(context, self.key_weight).view(batch, length, self.heads, -1).transpose(1, 2)
        values = F.linear(context, self.value_weight).view(batch, length, self.heads, -1).transpose(1, 2)
        keep = text_mask.bool()[:, None, None, :]
        keep = keep | ~keep.any(dim=-1, keepdim=True)  # an all-zero mask would give NaN: attend to every token
        attended = F.scaled_dot_product_attention(queries.expand(batch, -1, -1, -1), keys, values, attn_mask=keep)
        return F.linear(attended.transpose(1, 2).reshape(batch, -1, dim), self.out_weight, self.out_bias)
