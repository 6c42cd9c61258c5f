"""What one self-attention call sees: a grid of video tokens (and maybe text), and how to group it into 3D tiles.

Block-sparse methods pick key blocks of `block_size` consecutive tokens. In row-major (frame, height, width) order
such a block is a thin strip of one row; after `tile_permutation()` it is a compact space-time cube, so a block's
mean-pooled key stands for a neighbourhood rather than a line.

Tiles that fit whole in the grid come first (in row-major tile order), then the smaller edge tiles (also in tile
order). So when the grid is not a multiple of the tile, every full tile is still exactly one block of
`tf*th*tw` tokens, and only the tail mixes neighbouring edge tiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

TEXT_POSITIONS = ("none", "prefix", "suffix")


@functools.lru_cache(maxsize=256)
def choose_tile(grid: tuple[int, int, int], block_size: int = 64) -> tuple[int, int, int]:
    """The most cube-like tile of `block_size` tokens that fits in `grid` (fewest partial tiles breaks ties).

    When no tile of exactly `block_size` fits (tiny grids), the largest tile that fits is taken.
    """
    best, best_key = None, None
    for tf in range(1, min(grid[0], block_size) + 1):
        for th in range(1, min(grid[1], block_size // tf) + 1):
            for tw in range(1, min(grid[2], block_size // (tf * th)) + 1):
                volume = tf * th * tw
                full = (grid[0] // tf * tf) * (grid[1] // th * th) * (grid[2] // tw * tw)
                # Larger tiles first, then compact ones (smaller sum of sides), then fewer tokens in edge tiles.
                key = (volume, -(tf + th + tw), full)
                if best_key is None or key > best_key:
                    best, best_key = (tf, th, tw), key
    return best


@functools.lru_cache(maxsize=64)
def _cpu_permutation(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    (nf, nh, nw), (tf, th, tw) = grid, tile
    f, h, w = torch.meshgrid(torch.arange(nf), torch.arange(nh), torch.arange(nw), indexing="ij")
    f, h, w = f.reshape(-1), h.reshape(-1), w.reshape(-1)
    tiles = (math.ceil(nf / tf), math.ceil(nh / th), math.ceil(nw / tw))
    tile_f, tile_h, tile_w = f // tf, h // th, w // tw
    partial = (tile_f >= nf // tf) | (tile_h >= nh // th) | (tile_w >= nw // tw)
    tile_index = (tile_f * tiles[1] + tile_h) * tiles[2] + tile_w
    within = ((f % tf) * th + (h % th)) * tw + (w % tw)
    key = (partial.long() * (tiles[0] * tiles[1] * tiles[2]) + tile_index) * (tf * th * tw) + within
    perm = torch.argsort(key)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm, inverse


_DEVICE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(frozen=True)
class VideoLayout:
    """Token layout of one attention call, independent of the batch.

    grid: (frames, height, width) in tokens, after patching. text_tokens: number of text tokens; text_position says
    where they sit in the sequence: "none" (text only reaches the model through cross-attention), "prefix" or
    "suffix" (joint attention). tile: 3D tile size; by default the most compact tile of `block_size` tokens.
    """

    grid: tuple[int, int, int]
    text_tokens: int = 0
    text_position: str = "none"
    tile: tuple[int, int, int] | None = None
    block_size: int = 64

    def __post_init__(self):
        grid = tuple(int(g) for g in self.grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid must be three positive sizes (frames, height, width), got {self.grid}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
        if self.text_tokens < 0 or self.block_size < 1:
            raise ValueError("text_tokens must be >= 0 and block_size >= 1")
        if self.tile is None:
            tile = choose_tile(grid, int(self.block_size))
        else:
            if len(self.tile) != 3 or min(self.tile) < 1:
                raise ValueError(f"tile must be three positive sizes, got {self.tile}")
            # A tile longer than the grid is the whole axis.
            tile = tuple(min(int(t), g) for t, g in zip(self.tile, grid))
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "tile", tile)

    @property
    def num_video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def seq_len(self) -> int:
        """Length of the attention sequence: video tokens plus text tokens when text joins self-attention."""
        return self.num_video_tokens + (0 if self.text_position == "none" else self.text_tokens)

    @property
    def is_video_only(self) -> bool:
        return self.text_position == "none" or self.text_tokens == 0

    def num_blocks(self, block_size: int | None = None) -> int:
        return math.ceil(self.num_video_tokens / (block_size or self.block_size))

    def check(self, seq_len: int) -> None:
        """Raises ValueError when a sequence of `seq_len` tokens is not what this layout describes."""
        if seq_len != self.seq_len:
            f, h, w = self.grid
            text = "" if self.text_position == "none" else f" + {self.text_tokens} text"
            raise ValueError(
                f"layout expects {f}*{h}*{w}{text} = {self.seq_len} tokens, got {seq_len}; "
                "the attention layout does not match this call (a different latent shape or a split sequence?)"
            )

    def _permutations(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (self.grid, self.tile, str(device))
        cached = _DEVICE_CACHE.get(key)
        if cached is None:
            perm, inverse = _cpu_permutation(self.grid, self.tile)
            cached = _DEVICE_CACHE[key] = (perm.to(device), inverse.to(device))
        return cached

    def tile_permutation(self, device=None) -> torch.Tensor:
        """Indices that reorder row-major (f, h, w) video tokens into tile order: `x_tiled = x[..., perm, :]`."""
        return self._permutations(device)[0]

    def inverse_permutation(self, device=None) -> torch.Tensor:
        """Indices that bring tile-ordered tokens back to row-major order."""
        return self._permutations(device)[1]

    def _check_dim(self, x: torch.Tensor, dim: int) -> None:
        if x.shape[dim] != self.num_video_tokens:
            raise ValueError(
                f"expected {self.num_video_tokens} video tokens along dim {dim}, got shape {tuple(x.shape)}"
            )

    def to_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Reorders the video tokens of `x` along `dim` from row-major to tile order."""
        self._check_dim(x, dim)
        return x.index_select(dim, self.tile_permutation(x.device))

    def from_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of `to_tiles`."""
        self._check_dim(x, dim)
        return x.index_select(dim, self.inverse_permutation(x.device))

    def token_coordinates(self, device=None) -> torch.Tensor:
        """(N, 3) LongTensor: the (f, h, w) position of each token, in tile order."""
        _, nh, nw = self.grid
        perm = self.tile_permutation(device)
        return torch.stack([perm // (nh * nw), (perm // nw) % nh, perm % nw], dim=-1)

    def block_coordinates(self, block_size: int | None = None, device=None) -> torch.Tensor:
        """(num_blocks, 3) LongTensor: the tile (f, h, w) index of each block of `block_size` tile-ordered tokens.

        A block that is one full tile gets that tile's index; a block in the edge tail gets the tile that holds its
        mean position. Methods group blocks by these coordinates (by frame, by spatial tile, by space-time tile).
        """
        block_size = block_size or self.block_size
        coords = self.token_coordinates(device).float()
        block = torch.arange(coords.shape[0], device=coords.device) // block_size
        num_blocks = int(block[-1]) + 1
        sums = torch.zeros(num_blocks, 3, device=coords.device).index_add_(0, block, coords)
        counts = torch.bincount(block, minlength=num_blocks).unsqueeze(-1).float()
        tile = torch.tensor(self.tile, device=coords.device, dtype=torch.float32)
        return torch.div(sums / counts, tile, rounding_mode="floor").long()
