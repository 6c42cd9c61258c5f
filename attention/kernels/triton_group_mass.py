"""Attention mass per (query block, key block) from pooled token groups, fused in Triton.

Same signature and result as ``group_mass.group_block_mass`` (see there for the formulas). The PyTorch version
builds the (N/G x M/G) probabilities, a chunk at a time, and reads them again for the block sums; at the
Wan2.1-1.3B shape with groups of 8 that is 4095 x 4095 per head. Here a program takes a tile of query groups of one
(batch, head), a whole number of query blocks, and sweeps the key groups twice: the first sweep finds each row's
softmax maximum and sum (online, as flash attention does), the second recomputes the logits, normalises them,
weighs each row by its share of its block's tokens and sums the tile's probabilities per (query block, key block)
into the output. Only pooled q and k (G times smaller than q, k) and the (NQB x NKB) output touch memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from .group_mass import block_token_counts, check_score_group, mean_pool_blocks, query_group_weights

LAUNCH_ERRORS = (OutOfResources, CompilationError)
MAX_GROUPS_PER_BLOCK = 128  # a tile is at least one block of groups: larger tiles would not fit in registers
MAX_HEAD_DIM = 128


@triton.jit
def _group_mass_kernel(QueryGroups, KeyGroups, KeyBias, QueryWeight, Out,
                       NUM_QG, NUM_KG, HEAD_DIM, NUM_QB, NUM_KB,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUPS: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    # Pooled queries come pre-scaled by scale * log2(e) and key biases are log2(token count): exp2 is the softmax.
    q = tl.load(QueryGroups + (bh * NUM_QG + rows[:, None]).to(tl.int64) * HEAD_DIM + dims[None, :],
                mask=dims[None, :] < HEAD_DIM, other=0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, NUM_KG, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(KeyGroups + (bh * NUM_KG + cols[:, None]).to(tl.int64) * HEAD_DIM + dims[None, :],
                    mask=dims[None, :] < HEAD_DIM, other=0.0)
        logits = tl.dot(q, tl.trans(k)) + tl.load(KeyBias + cols)[None, :]
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), 1)
        row_max = new_max
    row_scale = tl.load(QueryWeight + rows) / row_sum  # padded query groups weigh 0
    out_rows = tile * (BLOCK_M // GROUPS) + tl.arange(0, BLOCK_M // GROUPS)
    for start in range(0, NUM_KG, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(KeyGroups + (bh * NUM_KG + cols[:, None]).to(tl.int64) * HEAD_DIM + dims[None, :],
                    mask=dims[None, :] < HEAD_DIM, other=0.0)
        logits = tl.dot(q, tl.trans(k)) + tl.load(KeyBias + cols)[None, :]
        p = tl.exp2(logits - row_max[:, None]) * row_scale[:, None]
        per_key_block = tl.sum(tl.reshape(p, (BLOCK_M, BLOCK_N // GROUPS, GROUPS)), 2)
        per_pair = tl.sum(tl.reshape(per_key_block, (BLOCK_M // GROUPS, GROUPS, BLOCK_N // GROUPS)), 1)
        key_blocks = start // GROUPS + tl.arange(0, BLOCK_N // GROUPS)
        tl.store(Out + (bh * NUM_QB + out_rows[:, None]).to(tl.int64) * NUM_KB + key_blocks[None, :], per_pair,
                 mask=(out_rows[:, None] < NUM_QB) & (key_blocks[None, :] < NUM_KB))


def _padded_groups(x: torch.Tensor, group: int, rows: int, factor: float = 1.0) -> torch.Tensor:
    """Mean-pooled groups (B * H, rows, D) in float32, zero rows after the real ones."""
    pooled = mean_pool_blocks(x, group) * factor
    return F.pad(pooled, (0, 0, 0, rows - pooled.shape[2])).flatten(0, 1).contiguous()


@torch.no_grad()
def group_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, group: int,
                     scale: float | None = None) -> torch.Tensor:
    """(B, H, NQB, NKB) float32 block masses, each row summing to 1; q, k (B, H, tokens, D) on CUDA."""
    group = check_score_group(group, block_size)
    b, h, n, d = q.shape
    if not shape_supported(d, block_size, group, b * h):
        raise ValueError(f"no Triton group scoring for head_dim={d}, block_size={block_size}, group={group}, "
                         f"{b * h} batch x heads (see shape_supported); use group_mass.group_block_mass")
    m = k.shape[2]
    groups = block_size // group
    scale = d ** -0.5 if scale is None else scale
    tile = max(64, groups)
    num_qg, num_kg = -(-n // group), -(-m // group)
    rows_q, rows_k = -(-num_qg // tile) * tile, -(-num_kg // tile) * tile
    # Pooled values stay float32 (the matmuls then run in TF32): rounding them to bfloat16 moved enough near-tied
    # blocks across a top-k cut to change a few clips of the quality sweep.
    q_groups = _padded_groups(q, group, rows_q, scale * math.log2(math.e))
    k_groups = _padded_groups(k, group, rows_k)
    key_bias = torch.full((rows_k,), float("-inf"), device=q.device)
    key_bias[:num_kg] = block_token_counts(m, group, q.device).float().log2()
    query_weight = torch.zeros(rows_q, device=q.device)
    query_weight[:num_qg] = query_group_weights(n, block_size, group, q.device)
    num_qb, num_kb = -(-n // block_size), -(-m // block_size)
    out = torch.empty(b, h, num_qb, num_kb, device=q.device, dtype=torch.float32)
    _group_mass_kernel[(rows_q // tile, b * h)](
        q_groups, k_groups, key_bias, query_weight, out, rows_q, rows_k, d, num_qb, num_kb,
        BLOCK_M=tile, BLOCK_N=tile, BLOCK_D=max(16, triton.next_power_of_2(d)), GROUPS=groups,
        num_warps=8 if tile > 64 else 4,
    )
    return out


def shape_supported(head_dim: int, block_size: int, group: int, batch_heads: int) -> bool:
    """Whether the kernel takes this shape: a power-of-two number of groups per block (up to 128), heads up to 128
    (up to 64 with 128 groups a block: the float32 tiles of 128 rows would not fit in shared memory), and at most
    65,535 batch x heads (the launch grid's second axis)."""
    groups = block_size // group if group >= 1 and block_size % group == 0 else 0
    tile_fits = head_dim <= MAX_HEAD_DIM and (groups <= 64 or head_dim <= 64)
    return 1 <= groups <= MAX_GROUPS_PER_BLOCK and groups & (groups - 1) == 0 and tile_fits and batch_heads <= 65535


def group_mass_usable(q: torch.Tensor, block_size: int, group: int) -> bool:
    """Whether this version takes these inputs: CUDA tensors of a supported shape."""
    return q.is_cuda and shape_supported(q.shape[-1], block_size, group, q.shape[0] * q.shape[1])
