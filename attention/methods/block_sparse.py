"""What every block-sparse method shares: tiles, pooled block representatives, selection rules, the kernel call.

A block-sparse method is a *selector* (which key blocks each query block reads, and optionally pooled entries that
stand in for skipped blocks) in front of one shared kernel. Subclasses implement `select`; `__call__` moves the
tokens into 3D tiles (so a block is a compact space-time cube), runs the kernel, and moves them back.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from attention.kernels import block_index_from_mask, block_sparse_attention
# Pooling and group scoring live with the kernels (the Triton scoring needs them); methods import them from here.
from attention.kernels import group_block_mass  # noqa: F401
from attention.kernels.group_mass import (  # noqa: F401
    block_token_counts, block_views, check_score_group, mean_pool_blocks,
)
from attention.layout import VideoLayout
from attention.methods import SparseOptions


@dataclass
class Selection:
    """block_mask: (B, H, NQB, NKB) bool. Pooled entries (optional): pooled_k/v (B, H, P, D), log-weight (B, H, NQB, P)."""

    block_mask: torch.Tensor
    pooled_k: torch.Tensor | None = None
    pooled_v: torch.Tensor | None = None
    pooled_log_weight: torch.Tensor | None = None


class _ScoreEditor:
    """The edit, if any, that the block-score maps of the calls now running go through before selection (set by
    `editing_block_scores`; a plain holder rather than a context variable, so compiled selection code only guards
    on it being None)."""

    edit = None


_SCORE_EDITOR = _ScoreEditor()


@contextmanager
def editing_block_scores(edit):
    """Within the block, every selector passes its (B, H, NQB, K) block scores through `edit(scores, query_tiles)`
    before it ranks them; `query_tiles` is the (NQB, 3) tile (f, h, w) index of each query block. Guidance that
    acts on the map a sparse call has (its pooled scores) installs itself this way."""
    before, _SCORE_EDITOR.edit = _SCORE_EDITOR.edit, edit
    try:
        yield
    finally:
        _SCORE_EDITOR.edit = before


def edited_scores(scores: torch.Tensor, layout: VideoLayout, block_size: int) -> torch.Tensor:
    """`scores` through the installed edit (unchanged when none is installed)."""
    if _SCORE_EDITOR.edit is None:
        return scores
    return _SCORE_EDITOR.edit(scores, layout.block_coordinates(block_size, scores.device))


def keep_top_fraction(scores: torch.Tensor, keep: float, always: torch.Tensor | None = None) -> torch.Tensor:
    """Per row (last dim), keeps the ceil(keep * n) highest scores; `always` marks blocks kept regardless."""
    n = scores.shape[-1]
    k = max(1, min(n, math.ceil(keep * n - 1e-9)))
    idx = scores.topk(k, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    return mask if always is None else mask | always


def keep_cumulative(probabilities: torch.Tensor, threshold: float, always: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, keeps the fewest highest-probability blocks whose sum reaches `threshold` (rows sum to 1)."""
    sorted_p, order = probabilities.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the blocks ranked above each one
    keep_sorted = before < threshold
    keep_sorted[..., 0] = True
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return mask if always is None else mask | always


def diagonal_blocks(num_q_blocks: int, num_k_blocks: int, device=None) -> torch.Tensor:
    """(NQB, NKB) bool: each query block's own key block (self-attention keeps it: it is where a token's mass is)."""
    return torch.eye(num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)


class BlockSparseMethod:
    """Base class: subclasses implement `select(q, k, v, layout) -> Selection` on tiled (B, H, N, D) tensors.

    A method takes a sparsity or a threshold, not both; given neither, it uses its class's defaults.
    select_every: make a new selection every this many denoising steps and reuse it in between (1: every step).
    """

    name = "block-sparse"
    default_sparsity: float | None = None
    default_threshold: float | None = None

    def __init__(self, block_size: int = SparseOptions.block_size, sparsity: float | None = None,
                 threshold: float | None = None, select_every: int = 1):
        if sparsity is not None and threshold is not None:
            raise ValueError(f"{self.name} takes threshold or sparsity, not both")
        if sparsity is None and threshold is None:
            sparsity, threshold = self.default_sparsity, self.default_threshold
        if sparsity is not None and not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if int(select_every) != select_every or select_every < 1:
            raise ValueError(f"select_every must be a positive integer, got {select_every}")
        self.block_size = int(block_size)
        self.sparsity = sparsity
        self.threshold = threshold
        self.select_every = int(select_every)
        self.reset()

    @property
    def uses_step(self) -> bool:
        # Only a method that reuses selections needs the denoising step (a changing argument would make compiled
        # code specialise on it).
        return self.select_every > 1

    def reset(self) -> None:
        # Tallies stay on the device (no sync in the hot path); `density()` reads them. A reset keeps them on the
        # device they were last used on: compiled code guards on it, so moving them back would recompile.
        device = self.kept_blocks.device if hasattr(self, "kept_blocks") else None
        self.kept_blocks = torch.zeros((), device=device)
        self.total_blocks = torch.zeros((), device=device)
        self._reused: dict[int, tuple[int, Selection]] = {}  # call within a step -> (step selected at, selection)
        self._last_step, self._call_in_step = None, 0

    def prepare(self, layout: VideoLayout, device) -> None:
        """Called before a model call whose layout is new, outside compiled code: the tallies move to the model's
        device here, so that compiled code never meets them on another device (each move would recompile)."""
        self.kept_blocks = self.kept_blocks.to(device)
        self.total_blocks = self.total_blocks.to(device)

    def _selection(self, q, k, v, layout: VideoLayout, step: int | None) -> Selection:
        """`select`, or with select_every > 1 the selection made at most select_every - 1 steps ago.

        Each call of a step keeps its own selection (classifier-free guidance calls the model twice a step, with
        and without the text). Pooled entries are reused with the mask: they stand for the skipped blocks as they
        were when selected."""
        if self.select_every == 1 or step is None:
            return self.select(q, k, v, layout)
        self._call_in_step = self._call_in_step + 1 if step == self._last_step else 0
        self._last_step = step
        made = self._reused.get(self._call_in_step)
        blocks = (-(-q.shape[2] // self.block_size), -(-k.shape[2] // self.block_size))
        if (made is not None and 0 <= step - made[0] < self.select_every
                and made[1].block_mask.shape == (*q.shape[:2], *blocks)):
            return made[1]
        selection = self.select(q, k, v, layout)
        self._reused[self._call_in_step] = (step, selection)
        return selection

    def density(self) -> float:
        """Share of (query block, key block) pairs computed since the last reset."""
        total = float(self.total_blocks)
        return float(self.kept_blocks) / total if total else 1.0

    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> Selection:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout,
                 step: int | None = None, return_lse: bool = False):
        """The attention output (B, H, N, D), or with `return_lse` also its log-sum-exp (B, H, N)."""
        q, k, v = layout.to_tiles(q), layout.to_tiles(k), layout.to_tiles(v)
        selection = self._selection(q, k, v, layout, step)
        mask = selection.block_mask
        self.kept_blocks = self.kept_blocks.to(mask.device) + mask.sum()
        self.total_blocks = self.total_blocks.to(mask.device) + mask.numel()
        index, count = block_index_from_mask(mask)
        out, lse = block_sparse_attention(
            q, k, v, index, count, block_size=self.block_size, pooled_k=selection.pooled_k,
            pooled_v=selection.pooled_v, pooled_log_weight=selection.pooled_log_weight,
        )
        if return_lse:
            return layout.from_tiles(out), layout.from_tiles(lse.unsqueeze(-1)).squeeze(-1)
        return layout.from_tiles(out)


def method_density(transformer) -> float | None:
    """Mean density over the layers of the method applied to `transformer` (None if it keeps no tally)."""
    from attention.apply import adapter_state

    state = adapter_state(transformer)
    if state is None:
        return None
    layers = [m.fn for m in state.layer_methods if isinstance(m.fn, BlockSparseMethod)]
    kept = sum(float(m.kept_blocks) for m in layers)
    total = sum(float(m.total_blocks) for m in layers)
    return kept / total if total else None
