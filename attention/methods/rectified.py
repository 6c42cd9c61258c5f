"""Rectified sparse attention (Rectified SpaAttn): block-sparse attention corrected against an implicit full attention.

Plain block-sparse attention renormalises its softmax over the kept blocks only, so each kept token's weight is its
full-attention weight divided by the share R of the full attention that the kept blocks hold (too much weight),
and the skipped blocks contribute nothing (weight lost). Both are corrected here from pooled statistics.

Notation, per batch and head: query block b, key block j of n_j tokens, mean-pooled q̄_b, k̄_j, v̄_j, s = D^-1/2.

Pooled attention ("isolated pooling"): P̄[b, j] = n_j exp(s q̄_b·k̄_j) / Σ_j' n_j' exp(s q̄_b·k̄_j'). A pooled key
stands for the n_j tokens it averages, so it weighs n_j. Modalities are pooled apart (a block never mixes text and
video; a joint-attention text token would be its own entry of weight 1). The adapter hands this method video tokens
only (text reaches Wan and VideoDiT through cross-attention), so here every entry is a video block.

Selection: per query block the top (1 - sparsity) of key blocks by P̄, or the fewest whose P̄ sums to `threshold`;
the block's own key block is always kept. `score_group` (a divisor of the block size) scores blocks instead by the
attention between finer pooled groups of that many tokens, summed per key block and averaged over the query block
(`group_block_mass`): a block whose tokens differ (an object's edge inside a background tile) is then not judged by
its mean alone. It costs (block size / score_group)^2 times the pooled scoring; the rectification below keeps P̄.

Gain-Aware Pooling Rectification (GAPR). A token pair's logit is (q̄_b + δq_i)·(k̄_j + δk_t): the pooled entry keeps
q̄_b·k̄_j (its gain) and drops δq_i·k̄_j + q̄_b·δk_t + δq_i·δk_t. As in the official implementation, the first-order
error is estimated with the per-channel mean absolute deviations |δq|_b, |δk|_j of the blocks, and a skipped block
is restored by its pooled entry only where |q̄_b·k̄_j| > |(|δq|_b)·k̄_j| + |q̄_b·(|δk|_j)|. G_b: the restored blocks.

Isolated-Pooling Attention Reallocation (IPAR). The rectification factor of block b's kept tokens is the share of the
implicit full attention left to them: R_b = 1 - Σ_{j in G_b} P̄[b, j] (skipped blocks that GAPR does not restore
give their pooled weight to the kept blocks, as plain sparse attention does). The official output is
R_b · O_sparse + Σ_{j in G_b} P̄[b, j] v̄_j.

Fused into the shared kernel. The kernel computes, for query i of block b,
    out_i = [Σ_{t kept} e^{s q_i·k_t} v_t + Σ_j e^{s q_i·k̄_j + ℓ[b, j]} v̄_j] / [the same sums without v].
The rectified attention weighs each kept token e^{s q_i·k_t} times r_b, and each restored block j in G_b
n_j e^{s q_i·k̄_j} (its pooled entry standing for its n_j tokens), with values v_t and v̄_j, normalised over all of
them. Dividing every weight by r_b leaves the output unchanged, so it is exactly the kernel with
    ℓ[b, j] = log n_j - log r_b  for j in G_b,   -inf otherwise,   r_b = R_b / K_b,  K_b = Σ_{j kept} P̄[b, j].
Where every token equals its block mean (q_i = q̄_b, k_t = k̄_j), the kept share of that softmax is exactly R_b and a
restored block's share exactly P̄[b, j]: the official output. Elsewhere the kernel uses each query's exact kept mass
and its own pooled logits, so the factor varies per token around R_b. `rectify=False` keeps the same selection and
drops the pooled entries (plain block-sparse attention), for comparisons at equal sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention.layout import VideoLayout
from attention.methods import SparseOptions
from attention.methods.block_sparse import (
    BlockSparseMethod, Selection, block_token_counts, block_views, check_score_group, diagonal_blocks,
    edited_scores, group_block_mass, keep_cumulative, keep_top_fraction, mean_pool_blocks,
)

DEFAULT_SPARSITY = 0.75


def pooled_attention(q_pool: torch.Tensor, k_pool: torch.Tensor, key_counts: torch.Tensor, scale: float):
    """P̄ (B, H, NQB, NKB): softmax over key blocks of s q̄·k̄ + log n_j; also returns the raw dot products q̄·k̄."""
    dots = q_pool @ k_pool.transpose(-1, -2)
    probabilities = torch.softmax(dots * scale + key_counts.float().log(), dim=-1)
    return probabilities, dots


def _mean_abs_deviation(x: torch.Tensor, pooled: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, NB, D): per block and channel, the mean over the block's tokens of |x - block mean|."""
    # x's dtype meets the float32 means inside one kernel: no float32 copy of x.
    sums = torch.cat([(view - pooled[:, :, blocks].unsqueeze(3)).abs_().sum(3)
                      for view, blocks in block_views(x, block_size)], dim=2)
    return sums / block_token_counts(x.shape[2], block_size, x.device).view(-1, 1)


def pooling_gain_mask(q, k, q_pool, k_pool, dots, block_size: int) -> torch.Tensor:
    """(B, H, NQB, NKB) bool: where the pooled logit's magnitude (gain) exceeds its estimated pooling error."""
    error = (_mean_abs_deviation(q, q_pool, block_size) @ k_pool.transpose(-1, -2)).abs()
    error = error + (q_pool @ _mean_abs_deviation(k, k_pool, block_size).transpose(-1, -2)).abs()
    return dots.abs() > error


@dataclass
class Rectification:
    """factor: R_b (B, H, NQB); kept_scale: r_b; restored: G (B, H, NQB, NKB); log_weight: ℓ for the kernel."""

    factor: torch.Tensor
    kept_scale: torch.Tensor
    restored: torch.Tensor
    log_weight: torch.Tensor


def rectify(probabilities: torch.Tensor, block_mask: torch.Tensor, gain_ok: torch.Tensor,
            key_counts: torch.Tensor) -> Rectification:
    """IPAR factor and the pooled entries' log-weights for a selection (see the module docstring)."""
    restored = gain_ok & ~block_mask
    kept_share = (probabilities * block_mask).sum(-1)
    factor = 1.0 - (probabilities * restored).sum(-1)
    # The top blocks are always kept, so K_b >= 1 / NKB; the clamps only guard rounding.
    kept_scale = factor.clamp_min(1e-30) / kept_share.clamp_min(1e-30)
    log_weight = key_counts.float().log() - kept_scale.log().unsqueeze(-1)
    log_weight = log_weight.masked_fill(~restored, float("-inf"))
    return Rectification(factor, kept_scale, restored, log_weight)


class RectifiedSparseAttention(BlockSparseMethod):
    """Block selection by pooled attention, with IPAR + GAPR rectification (rectify=False: the selection alone).

    sparsity: fraction of key blocks skipped per query block (default 0.75); threshold: instead, keep the fewest
    blocks whose pooled attention sums to it. A query block always keeps its own key block. score_group: score
    blocks by attention between pooled groups of this many tokens (default, or the block size: block means, as the
    paper does).
    """

    name = "rectified"
    default_sparsity = DEFAULT_SPARSITY

    def __init__(self, block_size: int = SparseOptions.block_size, sparsity: float | None = None,
                 threshold: float | None = None, rectify: bool = True, select_every: int = 1,
                 score_group: int | None = None):
        super().__init__(block_size, sparsity, threshold, select_every)
        self.rectify = bool(rectify)
        self.score_group = check_score_group(self.block_size if score_group is None else score_group, self.block_size)

    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout) -> Selection:
        bs = self.block_size
        q_pool, k_pool = mean_pool_blocks(q, bs), mean_pool_blocks(k, bs)
        key_counts = block_token_counts(k.shape[2], bs, k.device)
        probabilities, dots = pooled_attention(q_pool, k_pool, key_counts, q.shape[-1] ** -0.5)
        own = diagonal_blocks(q_pool.shape[2], k_pool.shape[2], q.device)
        scores = probabilities if self.score_group == bs else group_block_mass(q, k, bs, self.score_group)
        scores = edited_scores(scores, layout, bs)
        if self.threshold is not None:
            mask = keep_cumulative(scores, self.threshold, always=own)
        else:
            mask = keep_top_fraction(scores, 1.0 - self.sparsity, always=own)
        if not self.rectify:
            return Selection(mask)
        gain_ok = pooling_gain_mask(q, k, q_pool, k_pool, dots, bs)
        rect = rectify(probabilities, mask, gain_ok, key_counts)
        v_pool = mean_pool_blocks(v, bs)
        return Selection(mask, k_pool.to(q.dtype), v_pool.to(q.dtype), rect.log_weight)
