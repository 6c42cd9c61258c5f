"""XAttention's block scores from strided antidiagonal sums: the PyTorch reference.

Cut the logit matrix into stride x stride tiles (S = stride). The antidiagonal of tile (r, c) pairs every query of
query group r with one key of key group c: Σ_{j<S} q_{rS+S-1-j}·k_{cS+j}. Stacking each group's S queries in reverse
order into one vector of S*D channels (and each key group's S keys in order) turns all these sums into one matmul of
(N/S) x (N/S): S^2 times smaller than the logit matrix, and no N x N tensor is ever built.

As in the official implementation, the antidiagonal mean (the sum / S) times D^-1/2 is the logit of a strided row;
each strided row is softmax-normalised over all key groups, and a block's score is the probability its key groups
get from the query block's strided rows, normalised per query block:
    A[r, c] = D^-1/2 / S · Σ_{j<S} q_{rS+S-1-j}·k_{cS+j},   P[r] = softmax_c(A[r]),
    score[b, J] = Σ_{r in b} Σ_{c in J} P[r, c] / (number of rows r in b).

Cost at the Wan2.1-1.3B shape (N = 32760, 12 heads, stride 8): a (4095 x 1024) @ (1024 x 4095) matmul per head,
then a softmax and a block sum over 4095^2 elements per head, kept in the input dtype (bfloat16 on GPU) with
float32 accumulation: about 8 bytes of memory traffic per element, 1.6 GB per call. Stride 16 halves the matmul and
quarters the elements. The Triton version (``triton_antidiagonal``) keeps the matmul and replaces the softmax and
the block sums with one pass over the strided logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Strided logits per chunk of query blocks (all batches and heads): bounds the scoring memory on long videos.
_CHUNK_ELEMS = 1 << 28


def antidiagonal_logits(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, N/S, M/S): Σ_{j<S} q[rS+S-1-j]·k[cS+j] for every pair of groups; N and M must be multiples of S."""
    b, h, n, d = q.shape
    m = k.shape[2]
    if n % stride or m % stride:
        raise ValueError(f"token counts {n}, {m} must be multiples of the stride {stride}")
    q_groups = q.reshape(b, h, n // stride, stride, d).flip(3).reshape(b, h, n // stride, stride * d)
    return q_groups @ k.reshape(b, h, m // stride, stride * d).transpose(-1, -2)


def strided_logit_chunks(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float | None = None):
    """Yields (first query block, strided logits (B, H, rows, NKB * group)) chunk by chunk, padded key groups -inf.

    Token counts are zero-padded to whole blocks; strided rows that start past the last query are left in (each
    consumer drops them: `valid_rows`).
    """
    if block_size % stride:
        raise ValueError(f"block_size {block_size} must be a multiple of the stride {stride}")
    b, h, n, d = q.shape
    m = k.shape[2]
    nqb, nkb = -(-n // block_size), -(-m // block_size)
    scale = d ** -0.5 if scale is None else scale
    group = block_size // stride  # strided rows (and key groups) per block
    if n % block_size:
        q = F.pad(q, (0, 0, 0, nqb * block_size - n))
    if m % block_size:
        k = F.pad(k, (0, 0, 0, nkb * block_size - m))
    # The scale goes on q before the matmul: no extra pass over the strided logits.
    q = q * (scale / stride)
    valid_groups = -(-m // stride)  # key groups past this one are all padding (they sit at the end)
    blocks_per_chunk = max(1, _CHUNK_ELEMS // max(1, b * h * group * nkb * group))
    for start in range(0, nqb, blocks_per_chunk):
        stop = min(nqb, start + blocks_per_chunk)
        logits = antidiagonal_logits(q[:, :, start * block_size:stop * block_size], k, stride)
        logits[..., valid_groups:] = float("-inf")  # in place, on the padded columns only
        yield start, logits


def valid_rows(n: int, stride: int, rows: int, device) -> torch.Tensor:
    """Which of the first `rows` strided rows hold a real query (the rest are padding)."""
    return torch.arange(rows, device=device) * stride < n


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int,
                              scale: float | None = None) -> torch.Tensor:
    """(B, H, NQB, NKB) block scores, each row summing to 1 (see the module docstring)."""
    b, h, n, _ = q.shape
    nqb, nkb = -(-n // block_size), -(-k.shape[2] // block_size)
    group = block_size // stride
    row_ok = valid_rows(n, stride, nqb * group, q.device)
    scores = []
    for start, logits in strided_logit_chunks(q, k, block_size, stride, scale):
        rows = logits.shape[2]
        # One pass over the strided logits for the softmax, one for the sum over each key block's groups;
        # the padded query rows are dropped on the (N/S x NKB) row sums, not on the big matrix.
        row_sums = logits.softmax(-1).view(b, h, rows, nkb, group).sum(-1, dtype=torch.float32)
        row_sums = row_sums * row_ok[start * group:start * group + rows, None]
        scores.append(row_sums.view(b, h, rows // group, group, nkb).sum(3))
    scores = torch.cat(scores, 2)
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
