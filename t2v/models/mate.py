"""LinGen's MATE token mixer: a bidirectional Mamba2 branch (MA) beside temporal swin attention (TE).

Both branches read the block's normalised tokens and their outputs are summed where self-attention's output went;
the cost of each grows linearly with the number of tokens.

MA-branch (`MambaBranch`): Mamba2's selective state-space layer run forward and backward over the tokens.
- Rotary Major Scan: a 1D scan keeps only one axis's neighbours next to each other, so the order rotates with the
  layer: columns innermost (row neighbours adjacent), then rows innermost (column neighbours), then frames
  innermost (temporal neighbours); `rotary_major_order` gives the permutation and its inverse.
- Review tokens: a few tokens made from the clip (its scan order pooled into that many segments, plus a learned
  embedding) are scanned first and last, so both scans start from a summary of the whole clip.
- Per direction: a causal depthwise convolution over the scan, then the recurrence
  S_t = exp(dt_t A) S_{t-1} + B_t^T (dt_t x_t), y_t = C_t S_t + D x_t (heads share B and C, as Mamba2's single
  group), run by `attention.kernels.scan_dispatch.linear_scan`: a chunked scan (fla or our Triton forward on a GPU,
  PyTorch with autograd to train). The two directions are summed, gated by SiLU(z), normalised and projected out.
  The convolution (with its SiLU and the backward direction's reversal) and the sum-gate-norm are one pass each on
  a GPU (`attention.kernels.mamba_ops`).
TE-branch: the layer's Wan self-attention module with a processor that attends within windows
(`attention.swin_window`), shifted in alternate layers.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from attention.adapters.wan_style import project_qkv
from attention.kernels.mamba_ops import causal_conv_silu, gated_rms_norm
from attention.kernels.scan_dispatch import linear_scan
from attention.swin_window import window_order, windowed_attention

# Innermost axis last: row neighbours, column neighbours, temporal neighbours adjacent in the scan, in turn.
SCAN_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 2, 0))


@functools.lru_cache(maxsize=64)
def rotary_major_order(grid: tuple[int, int, int], layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) of the frame-major tokens of `grid` for this layer's scan: tokens[order] is the scan,
    scanned[inverse] the tokens back in frame-major order."""
    axes = SCAN_ORDERS[layer_index % len(SCAN_ORDERS)]
    order = torch.arange(math.prod(grid)).reshape(grid).permute(axes).flatten()
    return order, torch.argsort(order)


class _Holder:
    """What the model's forward in progress shares with its mixers (the token grid)."""

    grid: tuple[int, int, int] | None = None


class TemporalSwinProcessor:
    """Self-attention of a Wan attention module restricted to (shifted) windows of frames x rows x columns."""

    def __init__(self, holder: _Holder, window: tuple[int, int, int], shifted: bool):
        self.holder, self.window, self.shifted = holder, tuple(window), shifted

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        grid = self.holder.grid
        if hidden_states.shape[1] != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{hidden_states.shape[1]} tokens do not make the grid {grid}")
        # The projections act token by token, so the tokens are put in window order before them (one reorder of
        # the hidden states and the small rotary tables instead of three of q, k and v) and back after them.
        order, inverse, block = window_order(grid, self.window, self.shifted, hidden_states.device)
        if rotary_emb is not None:
            rotary_emb = tuple(t[:, order] for t in rotary_emb)
        query, key, value = project_qkv(attn, hidden_states[:, order], rotary_emb)
        out = windowed_attention(query, key, value, block)
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))[:, inverse]


class MambaBranch(nn.Module):
    def __init__(self, dim: int, heads: int, state_size: int = 32, expand: int = 1, conv_size: int = 4,
                 review_tokens: int = 4, layer_index: int = 0, chunk_size: int = 64):
        super().__init__()
        inner = expand * dim
        if inner % heads:
            raise ValueError(f"the inner width {inner} must split into {heads} heads")
        self.heads, self.state_size, self.inner = heads, state_size, inner
        self.layer_index, self.chunk_size, self.review_count = layer_index, chunk_size, review_tokens
        conv_channels = inner + 2 * state_size  # x, B and C are convolved along the scan, as in Mamba2
        self.in_proj = nn.Linear(dim, 2 * inner + 2 * state_size + 2 * heads)  # z, xBC, dt per direction
        self.conv = nn.ModuleList(nn.Conv1d(conv_channels, conv_channels, conv_size, groups=conv_channels)
                                  for _ in range(2))
        # A = -exp(A_log) in [-1, -16] and dt in [1e-3, 0.1] at first, spread as Mamba2 initialises them.
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 16, heads)).repeat(2, 1))
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(0.1), heads))
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).repeat(2, 1))  # softplus^-1
        self.D = nn.Parameter(torch.ones(heads))
        self.review = nn.Parameter(torch.zeros(review_tokens, dim))
        self.norm = nn.RMSNorm(inner, eps=1e-6)
        self.out_proj = nn.Linear(inner, dim)
        nn.init.zeros_(self.out_proj.weight)  # the branch starts closed: added to a trained model, it changes nothing
        nn.init.zeros_(self.out_proj.bias)

    def _review_tokens(self, scanned: torch.Tensor) -> torch.Tensor:
        """The scan cut into review_count equal segments, each averaged (summed in float32 without a float32 copy
        of the scan), plus the learned embedding."""
        length, count = scanned.shape[1], self.review_count
        bounds = [-(-i * length // count) for i in range(count + 1)]  # segment i: positions p with p*count//L == i
        means = [scanned[:, a:b].sum(1, dtype=torch.float32) / max(b - a, 1) for a, b in zip(bounds, bounds[1:])]
        return torch.stack(means, 1).to(scanned.dtype) + self.review.to(scanned.dtype)

    def _scan(self, xbc: torch.Tensor, dt: torch.Tensor, direction: int) -> torch.Tensor:
        """One direction over (B, L, channels) inputs in forward order (dt already in this direction's order)
        -> (B, L, inner) in this direction's order (reversed for the backward scan)."""
        conv = self.conv[direction]
        xbc = causal_conv_silu(xbc, conv.weight[:, 0], conv.bias, reverse=direction == 1)
        x, b, c = xbc.split([self.inner, self.state_size, self.state_size], -1)
        batch, length, _ = x.shape
        x = x.reshape(batch, length, self.heads, -1).transpose(1, 2)  # (B, H, L, P)
        dt = F.softplus(dt.float() + self.dt_bias[direction].float()).transpose(1, 2)  # (B, H, L)
        log_decay = dt * -torch.exp(self.A_log[direction].float())[:, None]
        b = b[:, None].expand(-1, self.heads, -1, -1)
        c = c[:, None].expand(-1, self.heads, -1, -1)
        y, _ = linear_scan(c, b, x * dt[..., None].to(x.dtype), log_decay, chunk_size=self.chunk_size)
        y = y.to(x.dtype) + x * self.D.to(x.dtype)[:, None, None]
        return y.transpose(1, 2).reshape(batch, length, self.inner)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int, int],
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The branch's output for the frame-major tokens of `grid` (B, L, dim), plus `residual` if given (added
        while the output is put back in frame-major order, which saves a copy)."""
        batch, length, dim = hidden_states.shape
        if length != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{length} tokens do not make the grid {grid}")
        axes = SCAN_ORDERS[self.layer_index % len(SCAN_ORDERS)]  # the order of `rotary_major_order`, as a view
        scan_grid = [grid[a] for a in axes]
        r = self.review_count
        # The review tokens start both directions' scans: [review, scan, review], filled in place (one copy).
        sequence = hidden_states.new_empty(batch, length + 2 * r, dim)
        sequence[:, r:r + length].view(batch, *scan_grid, dim).copy_(
            hidden_states.reshape(batch, *grid, dim).permute(0, *(a + 1 for a in axes), 4))
        review = self._review_tokens(sequence[:, r:r + length])
        sequence[:, :r], sequence[:, r + length:] = review, review
        z, xbc, dt = self.in_proj(sequence).split([self.inner, self.inner + 2 * self.state_size, 2 * self.heads], -1)
        dt_forward, dt_backward = dt.chunk(2, -1)
        forward = self._scan(xbc, dt_forward, 0)
        backward_reversed = self._scan(xbc, dt_backward.flip(1), 1)  # the convolution reverses xbc as it reads it
        y = gated_rms_norm(forward, backward_reversed, z, self.norm.weight, self.norm.eps).to(hidden_states.dtype)
        out = self.out_proj(y[:, r:r + length]).view(batch, *scan_grid, dim)
        back = [0] + [axes.index(a) + 1 for a in range(3)] + [4]
        out = out.permute(*back)  # frame-major again, as a view
        if residual is not None:
            out = residual.reshape(batch, *grid, dim) + out
        return out.reshape(batch, length, dim)


class MateMixer(nn.Module):
    """Stands where a Wan block's self-attention module stands (same call), summing the two branches."""

    def __init__(self, temporal: nn.Module, mamba: MambaBranch, holder: _Holder):
        super().__init__()
        self.temporal, self.mamba = temporal, mamba
        self.holder = holder

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.holder.grid is None:
            raise RuntimeError("a MATE mixer was called outside its model's forward")
        return self.mamba(hidden_states, self.holder.grid, residual=self.temporal(hidden_states, None, None, rotary_emb))
