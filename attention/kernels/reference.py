"""Plain PyTorch block-sparse attention: the specification the Triton kernels must match.

Shapes: q (B, H, N, D); k, v (B, H, M, D). Queries and keys are cut into blocks of
``block_size``; query block b reads the key blocks ``kv_block_index[..., b, :count]`` plus
optional pooled entries. Work is done in float32 (float64 stays float64) and chunked over
query blocks: each chunk gathers its listed key blocks, so that no N x M matrix is built, or, on a GPU where that
copies more than all keys' logits would take, masks its logits over all keys.
"""

import math

import torch
import torch.nn.functional as F

# Upper bound on elements in one chunk's gathered keys / logits (float32: 4 bytes each).
_CHUNK_ELEMS = 1 << 24


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _softmax_and_lse(logits):
    """Softmax over the last dim and its log-sum-exp; rows that are all -inf give p = 0, lse = -inf.

    Written so that gradients stay finite for empty rows (no log(0), no exp(-inf - -inf)).
    """
    if logits.shape[-1] == 0:
        return logits, logits.new_full(logits.shape[:-1], float("-inf"))
    m = logits.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    s = e.sum(-1, keepdim=True)
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, torch.ones_like(s))
    lse = torch.where(nonempty, torch.log(s_safe) + m, torch.full_like(s, float("-inf")))
    return e / s_safe, lse.squeeze(-1)


def dense_attention(q, k, v, scale=None):
    """Full softmax attention; returns (out in q.dtype, lse float32 of shape (B, H, N))."""
    B, H, N, D = q.shape
    M = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cdt = _compute_dtype(q.dtype)
    kf, vf = k.to(cdt), v.to(cdt)
    rows = max(1, _CHUNK_ELEMS // max(1, B * H * M))
    outs, lses = [], []
    for s in range(0, N, rows):
        logits = torch.matmul(q[:, :, s:s + rows].to(cdt), kf.transpose(-1, -2)) * scale
        p, lse = _softmax_and_lse(logits)
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2).float()


def block_sparse_attention(q, k, v, kv_block_index, kv_block_count, *, block_size=64,
                           pooled_k=None, pooled_v=None, pooled_log_weight=None, scale=None):
    """Block-sparse attention with optional pooled entries; returns (out, lse).

    Each query of block b attends to every key (index < M) of the blocks
    ``kv_block_index[..., b, :kv_block_count[..., b]]`` and to each pooled entry p with logit
    ``scale * q . pooled_k[p] + pooled_log_weight[..., b, p]``. Listed blocks must be distinct.
    A query that attends to nothing gets out = 0 and lse = -inf.
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    bs = block_size
    nqb, nkb = math.ceil(N / bs), math.ceil(M / bs)
    scale = D ** -0.5 if scale is None else scale
    cdt = _compute_dtype(q.dtype)
    dev = q.device
    has_pool = pooled_k is not None
    if has_pool and (pooled_v is None or pooled_log_weight is None):
        raise ValueError("pooled_k needs pooled_v and pooled_log_weight")

    # Pad to whole blocks; padded keys are masked out below, padded queries dropped at the end.
    qf = F.pad(q.to(cdt), (0, 0, 0, nqb * bs - N)).view(B, H, nqb, bs, D)
    kf = F.pad(k.to(cdt), (0, 0, 0, nkb * bs - M)).view(B, H, nkb, bs, D)
    vf = F.pad(v.to(cdt), (0, 0, 0, nkb * bs - M)).view(B, H, nkb, bs, D)
    key_ok = (torch.arange(nkb * bs, device=dev) < M).view(nkb, bs)

    maxk = kv_block_index.shape[-1]
    count = kv_block_count.to(device=dev, dtype=torch.long)
    entry_ok = torch.arange(maxk, device=dev) < count[..., None]  # (B, H, nqb, maxk)
    # Entries past the count may hold anything: point them at block 0 and mask them.
    idx = torch.where(entry_ok, kv_block_index.to(device=dev, dtype=torch.long), 0)
    bi = torch.arange(B, device=dev)[:, None, None, None]
    hi = torch.arange(H, device=dev)[None, :, None, None]
    if has_pool:
        pk, pv = pooled_k.to(cdt), pooled_v.to(cdt)
        plw = pooled_log_weight.to(device=dev, dtype=cdt)

    if _mask_instead_of_gather(q, maxk * bs, M):
        return _masked_block_sparse(qf, kf, vf, idx, entry_ok, key_ok, pk if has_pool else None,
                                    pv if has_pool else None, plw if has_pool else None, scale, N, q.dtype)
    g = max(1, _CHUNK_ELEMS // max(1, B * H * max(maxk, 1) * bs * max(D, bs)))
    outs, lses = [], []
    for s in range(0, nqb, g):
        e = min(nqb, s + g)
        qc = qf[:, :, s:e]                                            # (B, H, g, bs, D)
        ib = idx[:, :, s:e]                                           # (B, H, g, maxk)
        kk = kf[bi, hi, ib].flatten(3, 4)                             # (B, H, g, maxk*bs, D)
        vv = vf[bi, hi, ib].flatten(3, 4)
        ok = (entry_ok[:, :, s:e, :, None] & key_ok[ib]).flatten(3, 4)
        logits = torch.matmul(qc, kk.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~ok[:, :, :, None, :], float("-inf"))
        nk = logits.shape[-1]
        if has_pool:
            pl = torch.einsum("bhgqd,bhpd->bhgqp", qc, pk) * scale + plw[:, :, s:e, None, :]
            logits = torch.cat([logits, pl], -1)
        p, lse = _softmax_and_lse(logits)
        o = torch.matmul(p[..., :nk], vv)
        if has_pool:
            o = o + torch.einsum("bhgqp,bhpd->bhgqd", p[..., nk:], pv)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, 2).flatten(2, 3)[:, :, :N]
    lse = torch.cat(lses, 2).flatten(2, 3)[:, :, :N]
    return out.to(q.dtype), lse.float()


def _mask_instead_of_gather(q, listed_keys: int, keys: int) -> bool:
    """Whether to mask all-keys logits instead of gathering the listed blocks' keys and values.

    Per query, gathering copies 2 * head_dim numbers for each listed key and masking computes one logit for every key.
    A GPU does the dense products fast and the copies slowly, so there the smaller of the two wins (masking, for
    short sequences such as the small blocks the Triton kernel does not take); a CPU is bound by the products, so
    it gathers.
    """
    return q.is_cuda and keys <= 2 * listed_keys * q.shape[-1]


def _masked_block_sparse(qf, kf, vf, idx, entry_ok, key_ok, pk, pv, plw, scale, N, out_dtype):
    """The same attention as the gathering loop, from all-keys logits with the unlisted blocks masked out.

    qf, kf, vf are blocked (B, H, blocks, bs, D); chunks of query blocks bound the logits' size.
    """
    B, H, nqb, bs, D = qf.shape
    nkb = kf.shape[2]
    # Entries past the count go to a spare column, dropped after.
    listed = torch.zeros(B, H, nqb, nkb + 1, dtype=torch.bool, device=qf.device)
    listed = listed.scatter_(-1, torch.where(entry_ok, idx, nkb), True)[..., :nkb]
    keys_ok = (listed[..., None] & key_ok).flatten(-2)                # (B, H, nqb, M_padded)
    k_all, v_all = kf.flatten(2, 3), vf.flatten(2, 3)                 # (B, H, M_padded, D)
    g = max(1, _CHUNK_ELEMS // max(1, B * H * bs * k_all.shape[2]))
    outs, lses = [], []
    for s in range(0, nqb, g):
        qc = qf[:, :, s:s + g].flatten(2, 3)                          # (B, H, g * bs, D)
        logits = torch.matmul(qc, k_all.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~keys_ok[:, :, s:s + g].repeat_interleave(bs, 2), float("-inf"))
        nk = logits.shape[-1]
        if pk is not None:
            pl = torch.matmul(qc, pk.transpose(-1, -2)) * scale + plw[:, :, s:s + g].repeat_interleave(bs, 2)
            logits = torch.cat([logits, pl], -1)
        p, lse = _softmax_and_lse(logits)
        o = torch.matmul(p[..., :nk], v_all)
        if pk is not None:
            o = o + torch.matmul(p[..., nk:], pv)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2)[:, :, :N].to(out_dtype), torch.cat(lses, 2)[:, :, :N].float()


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine two attentions over disjoint key sets by log-sum-exp; -inf on both sides gives 0, -inf."""
    cdt = _compute_dtype(out_a.dtype)
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    s = wa + wb
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, torch.ones_like(s))
    out = (out_a.to(cdt) * wa[..., None] + out_b.to(cdt) * wb[..., None]) / s_safe[..., None]
    lse = torch.where(nonempty, torch.log(s_safe) + m, torch.full_like(s, float("-inf")))
    return out.to(out_a.dtype), lse.float()


def full_block_index(n_q_blocks, n_k_blocks, batch, heads, device=None):
    """(index, count) that select every key block for every query block."""
    index = torch.arange(n_k_blocks, dtype=torch.int32, device=device)
    index = index.expand(batch, heads, n_q_blocks, n_k_blocks).contiguous()
    count = torch.full((batch, heads, n_q_blocks), n_k_blocks, dtype=torch.int32, device=device)
    return index, count


def block_index_from_mask(mask):
    """(B, H, NQB, NKB) bool block mask -> (index, count), selected blocks first in ascending order.

    On the CPU the index is trimmed to the largest count (at least 1), which the reference's cost follows. On a
    GPU and under torch.compile it keeps its full width: the kernel reads only `count` entries a row, and reading
    the count on the host would stall the launch queue (and give compiled graphs a data-dependent shape).
    """
    count = mask.sum(-1, dtype=torch.int32)
    order = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    if mask.is_cuda or torch.compiler.is_compiling():
        width = mask.shape[-1]
    else:
        width = max(1, int(count.max())) if count.numel() else 1
    return order[..., :width].to(torch.int32).contiguous(), count
