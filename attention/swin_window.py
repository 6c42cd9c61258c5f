"""Temporal swin attention: each token attends to the tokens of its window, a box of frames x rows x columns.

LinGen's TE-branch. The windows tile the (frames, rows, columns) token grid; in shifted layers the grid is rolled by
half a window first (cyclically, as Swin's shift), so that tokens on a window's edge meet the neighbours across it
every other layer. A window is a block selection: the tokens are reordered window by window, each window is one
block, and each query block selects its own key block only, so the attention core's block-sparse kernel runs it
(Triton forward and backward on a GPU; elsewhere, and for float32 on a GPU, a batch of dense attentions over the
windows, which equals it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from attention.kernels import block_sparse_attention
from attention.kernels.dispatch import triton_usable


def fitted_window(grid: tuple[int, int, int], window: tuple[int, int, int]) -> tuple[int, int, int]:
    """Per axis, the largest size <= the asked one that divides the grid (so that the windows tile it exactly)."""
    return tuple(max(d for d in range(1, min(w, g) + 1) if g % d == 0) for g, w in zip(grid, window))


def window_ids(grid, window, shifted: bool) -> torch.Tensor:
    """(tokens,) the window of each token of the frame-major grid: the direct definition of the selection."""
    window = fitted_window(grid, window)
    coords = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    ids = torch.zeros(grid, dtype=torch.long)
    for coord, g, w in zip(coords, grid, window):
        shift = w // 2 if shifted else 0
        ids = ids * (g // w) + (coord + shift) % g // w
    return ids.flatten()


@functools.lru_cache(maxsize=64)
def _window_order(grid, window, shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = window_ids(grid, window, shifted)
    order = torch.sort(ids, stable=True).indices  # window by window, frame-major inside each
    return order, torch.argsort(order)


def window_order(grid, window, shifted: bool, device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(order, inverse, block): tokens[order] puts the frame-major `grid`'s tokens window by window, each window
    `block` consecutive tokens; windowed[inverse] puts them back."""
    grid, window = tuple(int(g) for g in grid), tuple(int(w) for w in window)
    order, inverse = (t.to(device) for t in _window_order(grid, window, shifted))
    size = fitted_window(grid, window)
    return order, inverse, size[0] * size[1] * size[2]


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
    """Attention of (B, H, tokens, D) q, k, v already in window order: each run of `block` tokens attends to itself."""
    batch, heads, tokens = q.shape[:3]
    n_windows = tokens // block
    if not triton_usable(q, block):
        # The PyTorch path: windows of equal size are a batch of small dense attentions (the block-sparse
        # reference would compute the same, with gathers).
        windows = [t.unflatten(2, (n_windows, block)) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*windows).flatten(2, 3)
    own_block = torch.arange(n_windows, dtype=torch.int32, device=q.device)
    index = own_block.view(1, 1, -1, 1).expand(batch, heads, -1, 1).contiguous()
    count = torch.ones(batch, heads, n_windows, dtype=torch.int32, device=q.device)
    return block_sparse_attention(q, k, v, index, count, block_size=block)[0]


def temporal_swin_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int],
                            window: tuple[int, int, int], shifted: bool = False) -> torch.Tensor:
    """Windowed attention of (B, H, tokens, D) q, k, v whose tokens are the frame-major `grid`; -> (B, H, tokens, D)."""
    grid = tuple(int(g) for g in grid)
    if q.shape[2] != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"{q.shape[2]} tokens do not make the grid {grid}")
    order, inverse, block = window_order(grid, window, shifted, q.device)
    out = windowed_attention(q[:, :, order], k[:, :, order], v[:, :, order], block)
    return out[:, :, inverse]
