"""VMoBA: mixture-of-block attention for video diffusion (Wu et al., 2025), on the shared block-sparse kernel.

Each query attends to the key chunks it selects. What makes it VMoBA rather than MoBA:

1. Layer-wise recurrent partition. Layer l cuts the video into chunks along time (l % 3 == 0: a slab of whole
   frames), space (l % 3 == 1: a spatial patch through all frames) or space-time (l % 3 == 2: a cube).
2. Global selection. A chunk's representative is the mean of its keys; a query's score for a chunk is the dot
   product with it. Scores are min-max normalised over the whole head and the (query, chunk) pairs compete for the
   head's total score together, so heads and queries with peaked scores spend fewer pairs than flat ones.
3. Threshold selection. The head keeps its highest pairs until their share of the head's total reaches
   `threshold`. Each query's own chunk (the one holding its position) is always kept and counts toward the share.

Mapping onto the kernel, exactly. Like the official code, which reorders q, k and v per layer so that chunks are
contiguous, each partition tiles the tokens its own way (`partition_layout`): thin in time for 1D (one frame deep),
thin in space for 2D (the smallest spatial footprint), compact for 3D (the layout's default cube), always
`block_size` tokens per tile. A chunk is the union of the tiles that share a frame-tile index (1D), a spatial-tile
index (2D) or are one tile (3D), so selecting a chunk reads exactly its blocks, and chunk sizes may differ from the
block (a 1D chunk is a whole frame however large). Queries use the same tiles, so every query block lies inside one
chunk: its own. On grids that are not a multiple of the tile, the edge tokens packed into the tail blocks join the
chunk of their block's mean position (`VideoLayout.block_coordinates`).

The kernel shares one selection per query block, whereas the official code selects per query token. A block's
score is the mean of its tokens' scores (exact: the score is linear in the query, so it is the pooled query's
score) and each (query block, chunk) pair weighs as many tokens as the block holds, so the selection is the
official per-head one on scores averaged over each query block. Two small differences with the official code: when
a head's own chunks already reach the threshold nothing else is kept (the official code adds one more pair), and
threshold 1.0 keeps everything, so it is dense attention.

`sparsity` instead of `threshold` is the official top-k variant: the head keeps (1 - sparsity) of its
(query block, chunk) pairs, own chunks first. Density is reported in kernel blocks, so it differs from that share.

`score_group=G` (not in the paper; a divisor of the block size) scores a pair by attention mass instead of the dot
product with the chunk mean: the softmax attention between mean-pooled groups of G tokens, summed over the chunk's
groups and averaged over the query block's (`group_block_mass`). A chunk whose keys differ (an object's edge among
background) is then not judged by its mean alone. The global selection runs on these scores unchanged.
"""

from __future__ import annotations

import functools
import math

import torch

from attention.layout import VideoLayout, choose_tile
from attention.methods.block_sparse import (BlockSparseMethod, Selection, block_token_counts, check_score_group,
                                           edited_scores, group_block_mass, mean_pool_blocks)

PARTITIONS = ("temporal", "spatial", "spatiotemporal")  # 1D, 2D, 3D; layer l uses PARTITIONS[l % 3]
DEFAULT_THRESHOLD = 0.25  # the official default


@functools.lru_cache(maxsize=64)
def partition_tile(grid: tuple[int, int, int], block_size: int, partition: int) -> tuple[int, int, int]:
    """The tile of `block_size` tokens that partition uses: fewest frames (1D), smallest spatial area (2D), cube (3D).

    Ties go to the tile that leaves fewest tokens in edge tiles, then to the most compact one.
    """
    fits = [(tf, th, block_size // (tf * th))
            for tf in range(1, min(grid[0], block_size) + 1) for th in range(1, min(grid[1], block_size) + 1)
            if block_size % (tf * th) == 0 and block_size // (tf * th) <= grid[2]]
    if partition == 2 or not fits:
        return choose_tile(grid, block_size)

    def rank(tile):
        full = math.prod(g // t * t for g, t in zip(grid, tile))
        return (tile[0] if partition == 0 else tile[1] * tile[2], -full, sum(tile))

    return min(fits, key=rank)


@functools.lru_cache(maxsize=64)
def partition_layout(grid: tuple[int, int, int], block_size: int, partition: int) -> VideoLayout:
    """The layout a partition's layer works in: the grid cut into `partition_tile` tiles."""
    return VideoLayout(grid, block_size=block_size, tile=partition_tile(grid, block_size, partition))


_CHUNK_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def chunk_of_block(layout: VideoLayout, partition: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks of `layout` (a `partition_layout`) in `partition`: each block's chunk (num_blocks,) numbered
    0..C-1, and the same as a (num_blocks, C) bool membership. Cached: the selection then needs no host sync."""
    key = (layout.grid, layout.tile, layout.block_size, partition, str(device))
    if key not in _CHUNK_CACHE:
        f, h, w = layout.block_coordinates().unbind(-1)
        tiles_h, tiles_w = (math.ceil(g / t) for g, t in zip(layout.grid[1:], layout.tile[1:]))
        spatial = h * tiles_w + w
        index = (f, spatial, f * tiles_h * tiles_w + spatial)[partition]
        chunk = torch.unique(index, return_inverse=True)[1]
        _CHUNK_CACHE[key] = chunk.to(device), torch.nn.functional.one_hot(chunk).bool().to(device)
    return _CHUNK_CACHE[key]


def select_pairs(scores: torch.Tensor, own: torch.Tensor, threshold: float | None = None,
                 sparsity: float | None = None, weights: torch.Tensor | None = None,
                 per_query: bool = False) -> torch.Tensor:
    """Which (query, chunk) pairs a head keeps: bool of the shape of `scores` (..., Q, C).

    own: (Q, C) bool, each query's own chunk (always kept). weights: (Q,) tokens each query row stands for.
    Selection is global over the Q x C pairs of each head; `per_query` selects within each row instead (the
    official "query_head" variant, for comparison).
    """
    if per_query:
        # Each row becomes a head of its own (its weight then plays no part).
        return select_pairs(scores.unsqueeze(-2), own.unsqueeze(-2), threshold, sparsity).squeeze(-2)
    if threshold is not None and threshold >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    s = scores.float().flatten(-2)
    own_flat = own.flatten(-2).expand_as(s)
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    flat = (hi - lo) <= 1e-6  # no preference in this head: keep everything, as the official code does
    mass = (s - lo) / (hi - lo).clamp_min(1e-6)
    if weights is not None:
        mass = mass * weights.float()[:, None].expand(own.shape).flatten(-2)
    # Rank the pairs that are not own chunks; own ones sort last (-1) and are added back below.
    ranked, order = mass.masked_fill(own_flat, -1.0).sort(dim=-1, descending=True, stable=True)
    if sparsity is not None:
        keep = math.ceil((1.0 - sparsity) * s.shape[-1] - 1e-9) - own_flat.sum(-1, keepdim=True)
        keep_sorted = torch.arange(s.shape[-1], device=s.device) < keep
    else:
        own_mass = (mass * own_flat).sum(-1, keepdim=True)
        gained = ranked.clamp_min(0).cumsum(-1) - ranked.clamp_min(0)  # mass of the pairs ranked above
        needed = threshold * mass.sum(-1, keepdim=True)
        keep_sorted = own_mass + gained < needed
    keep_sorted = keep_sorted & (ranked >= 0)
    chosen = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return (chosen | own_flat | flat).view(scores.shape)


class VMoBAMethod(BlockSparseMethod):
    """VMoBA on the shared kernel (see the module docstring); options: threshold (default 0.25) or sparsity, and
    score_group (score pairs by attention mass between groups of this many tokens; default: the dot product with
    the chunk's mean key, as the paper does; the block size gives the mass between block means)."""

    name = "vmoba"
    default_threshold = DEFAULT_THRESHOLD

    def __init__(self, layer_index: int = 0, block_size: int = 64, threshold: float | None = None,
                 sparsity: float | None = None, select_every: int = 1, score_group: int | None = None):
        super().__init__(block_size=block_size, sparsity=sparsity, threshold=threshold, select_every=select_every)
        self.score_group = None if score_group is None else check_score_group(score_group, self.block_size)
        # Reduced here so compiled code only ever sees three variants.
        self.partition = int(layer_index) % len(PARTITIONS)

    def prepare(self, layout: VideoLayout, device) -> None:
        """Builds this partition's tiling and chunks ahead of the call (they need host work compiled code can't do)."""
        super().prepare(layout, device)
        tiled = partition_layout(layout.grid, self.block_size, self.partition)
        tiled.tile_permutation(device)
        chunk_of_block(tiled, self.partition, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout,
                 step: int | None = None, return_lse: bool = False):
        tiled = partition_layout(layout.grid, self.block_size, self.partition)
        return super().__call__(q, k, v, tiled, step, return_lse=return_lse)

    @torch.no_grad()
    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> Selection:
        bs = self.block_size
        chunk, members = chunk_of_block(layout, self.partition, q.device)
        if self.score_group is not None:
            scores = group_block_mass(q, k, bs, self.score_group) @ members.float()  # (B, H, NQB, C)
        else:
            # Chunk representative: the mean of its keys (block means weighted by their token counts).
            counts = block_token_counts(k.shape[2], bs, k.device).float()
            weighted = members.float() * counts[:, None]  # (NKB, C)
            chunk_keys = torch.einsum("bhnd,nc->bhcd", mean_pool_blocks(k, bs), weighted) / weighted.sum(0)[:, None]
            scores = mean_pool_blocks(q, bs) @ chunk_keys.transpose(-1, -2)  # (B, H, NQB, C)
        scores = edited_scores(scores, layout, bs)
        weights = block_token_counts(q.shape[2], bs, q.device)
        # Self-attention: query block i is key block i, so its own chunk is block i's.
        pairs = select_pairs(scores, members, self.threshold, self.sparsity, weights)
        return Selection(pairs.gather(-1, chunk.expand(*pairs.shape[:-1], -1)))
