"""Attention mass per (query block, key block) from mean-pooled token groups: the PyTorch reference.

Block-sparse selection needs, for each query block, how much attention it puts on each key block. Pool the tokens
into groups of G (G divides the block size) and take the softmax attention between pooled queries and pooled keys,
each pooled key weighing the tokens it stands for (log of its count added to its logits):
    P[r] = softmax_c(scale · q̄_r·k̄_c + log n_c),
    mass[b, J] = Σ_{r in b} n_r Σ_{c in J} P[r, c] / Σ_{r in b} n_r.
G = block size is block-pooled attention; G = 1 is the exact mass; between, a block holding a few very different
tokens (an object's edge in a background tile) is not judged by its mean alone. The (N/G x M/G) probabilities are
built a chunk of query blocks at a time. The Triton version (``triton_group_mass``) never builds them: two passes of
tiled matmuls per query tile, the second summing each block's probabilities as it goes.

Also here: the pooling helpers every block-sparse method uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_token_counts(num_tokens: int, block_size: int, device=None) -> torch.Tensor:
    """Tokens in each block of a sequence (the last block may be partial)."""
    starts = torch.arange(0, num_tokens, block_size, device=device)
    return (num_tokens - starts).clamp(max=block_size)


def block_views(x: torch.Tensor, block_size: int) -> list[tuple[torch.Tensor, slice]]:
    """(B, H, N, D) as views (B, H, blocks, tokens, D): the full blocks, then the partial last one if any, each
    with the slice of block indices it covers. Reductions over them need no padded (or upcast) copy of x."""
    n = x.shape[2]
    full = n // block_size
    views = [(x[:, :, : full * block_size].unflatten(2, (full, block_size)), slice(0, full))]
    if n % block_size:
        views.append((x[:, :, full * block_size:].unsqueeze(2), slice(full, full + 1)))
    return views


def mean_pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, ceil(N / block_size), D): the mean of each block's tokens, in float32."""
    sums = torch.cat([view.sum(3, dtype=torch.float32) for view, _ in block_views(x, block_size)], dim=2)
    return sums / block_token_counts(x.shape[2], block_size, x.device).view(1, 1, -1, 1)


def check_score_group(score_group, block_size: int) -> int:
    """`score_group` as an int: a positive divisor of `block_size` (not a bool, which would silently mean 1)."""
    if (isinstance(score_group, bool) or not isinstance(score_group, (int, float)) or int(score_group) != score_group
            or score_group < 1 or block_size % int(score_group)):
        raise ValueError(f"score_group must be a positive divisor of block_size ({block_size}), got {score_group!r}")
    return int(score_group)


def query_group_weights(num_tokens: int, block_size: int, group: int, device=None) -> torch.Tensor:
    """Each query group's share of its block's tokens (n_r / Σ_{r in b} n_r above)."""
    block_counts = block_token_counts(num_tokens, block_size, device).float()
    counts = block_token_counts(num_tokens, group, device).float()
    return counts / block_counts.repeat_interleave(block_size // group)[: counts.numel()]


# Aim for this many (query group, key group) probabilities per batch and head in one chunk of queries; a chunk holds
# at least one block of query groups, so at group 1 and long sequences it can be several times more.
_QUERY_CHUNK_ELEMS = 1 << 18


@torch.no_grad()  # it only chooses blocks: training needs no graph of its probabilities
def group_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, group: int,
                     scale: float | None = None) -> torch.Tensor:
    """(B, H, NQB, NKB) float32: the attention mass each query block puts on each key block (rows sum to 1),
    estimated from the attention between mean-pooled groups of `group` tokens (see the module docstring)."""
    group = check_score_group(group, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups_per_block = block_size // group
    k_groups = mean_pool_blocks(k, group)
    key_log_counts = block_token_counts(k.shape[2], group, k.device).float().log()
    query_weights = query_group_weights(q.shape[2], block_size, group, q.device)
    num_k_blocks = -(-k_groups.shape[2] // groups_per_block)
    key_pad = num_k_blocks * groups_per_block - k_groups.shape[2]
    rows_per_chunk = max(1, _QUERY_CHUNK_ELEMS // max(k_groups.shape[2], 1) // groups_per_block) * groups_per_block
    block_rows = []
    for start in range(0, q.shape[2], rows_per_chunk * group):  # chunks start on block boundaries
        q_groups = mean_pool_blocks(q[:, :, start:start + rows_per_chunk * group], group)
        probabilities = torch.softmax((q_groups @ k_groups.transpose(-1, -2)) * scale + key_log_counts, dim=-1)
        per_key_block = F.pad(probabilities, (0, key_pad)).unflatten(-1, (num_k_blocks, groups_per_block)).sum(-1)
        weighted = per_key_block * query_weights[start // group:start // group + per_key_block.shape[2]].view(-1, 1)
        query_pad = -weighted.shape[2] % groups_per_block
        block_rows.append(F.pad(weighted, (0, 0, 0, query_pad)).unflatten(2, (-1, groups_per_block)).sum(3))
    return torch.cat(block_rows, dim=2)
