"""Gated linear scan (Mamba2's SSD / "simple GLA" recurrence) in PyTorch: the reference and the chunked form.

Per batch and head, with a scalar log decay g_t <= 0 per token:

    S_t = exp(g_t) S_{t-1} + k_t^T v_t        (N x P state)
    o_t = q_t S_t                             (no scale on q)

Shapes: q, k (B, H, L, N); v (B, H, L, P); log_decay (B, H, L); states (B, H, N, P).

The chunked form never exponentiates a positive number: every decay is exp of a sum of g over a span of tokens
(or chunks), summed directly over that span rather than as a difference of two long prefix sums, so long sequences
with strong decays neither overflow nor lose the small differences to cancellation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP_CHUNKS = 64  # chunks per group of the inter-chunk matrix form; the Python loop runs once per group


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def naive_linear_scan(q, k, v, log_decay, initial_state=None):
    """(out, final_state) by stepping the recurrence token by token: the specification.

    Float32 arithmetic (float64 inputs stay float64); out in v's dtype, final_state float32 (float64 likewise).
    """
    dtype = _compute_dtype(q, k, v, log_decay)
    B, H, L, N = q.shape
    P = v.shape[-1]
    q, k, v, g = q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype)
    state = (torch.zeros(B, H, N, P, dtype=dtype, device=q.device) if initial_state is None
             else initial_state.to(dtype))
    out = []
    with torch.autocast(q.device.type, enabled=False):  # the specification stays in full precision
        for t in range(L):
            state = g[:, :, t, None, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
            out.append(torch.einsum("bhn,bhnp->bhp", q[:, :, t], state))
    out = torch.stack(out, dim=2) if out else v.new_zeros(B, H, 0, P, dtype=dtype)
    return out.to(v.dtype), state


def _segment_sums(x: torch.Tensor) -> torch.Tensor:
    """(..., T, T) with [i, j] = x[j+1] + ... + x[i] for j <= i and -inf above the diagonal.

    Summed over each span directly (a cumulative sum down the columns of a masked copy): differences of prefix sums
    would lose small spans to rounding once the prefix sums grow large. The -inf goes in before any exp.
    """
    T = x.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=x.device)
    spans = x[..., :, None].expand(*x.shape, T).masked_fill(~ones.tril(-1), 0.0).cumsum(dim=-2)
    return spans.masked_fill(~ones.tril(), float("-inf"))


def _chunk_states(decay: torch.Tensor, updates: torch.Tensor, initial: torch.Tensor):
    """States entering each chunk (B, H, C, N, P) and the final state, for S_c = exp(decay_c) S_{c-1} + U_c.

    Groups of up to GROUP_CHUNKS chunks run in matrix form, all groups at once and from a zero state; a loop over
    groups then carries the state between them, and each group adds its entering state, decayed, to its states.
    """
    B, H, C = decay.shape
    G = min(GROUP_CHUNKS, C)
    pad = -C % G  # padded chunks decay by nothing and add nothing
    decay = F.pad(decay, (0, pad)).unflatten(-1, (-1, G))                       # (B, H, ng, G)
    updates = F.pad(updates, (0, 0, 0, 0, 0, pad)).unflatten(2, (-1, G))       # (B, H, ng, G, N, P)
    within = torch.einsum("bhgij,bhgjnp->bhginp", _segment_sums(decay).exp(), updates)
    from_start = decay.cumsum(-1).exp()                                        # decay from group start, inclusive
    carried, state = [], initial
    for group in range(decay.shape[2]):
        carried.append(state)
        state = within[:, :, group, -1] + from_start[:, :, group, -1, None, None] * state
    carried = torch.stack(carried, dim=2)                                      # (B, H, ng, N, P)
    after = (within + from_start[..., None, None] * carried[:, :, :, None]).flatten(2, 3)[:, :, :C]
    entering = torch.cat([initial[:, :, None], after[:, :, :-1]], dim=2)
    return entering, after[:, :, -1]


def chunked_linear_scan(q, k, v, log_decay, chunk_size=64, initial_state=None):
    """(out, final_state) of the same recurrence, computed chunk by chunk and differentiable through autograd.

    Float32 arithmetic (float64 inputs stay float64), also under autocast, which would round the decay weights and
    states to 16 bits in the matmuls; out in v's dtype, final_state in the arithmetic's dtype.
    """
    with torch.autocast(q.device.type, enabled=False):
        return _chunked(q, k, v, log_decay, chunk_size, initial_state)


def _chunked(q, k, v, log_decay, chunk_size, initial_state):
    dtype = _compute_dtype(q, k, v, log_decay)
    B, H, L, N = q.shape
    P = v.shape[-1]
    out_dtype = v.dtype
    if L == 0:
        return naive_linear_scan(q, k, v, log_decay, initial_state)
    pad = -L % chunk_size
    # Padded tokens: g = 0 and k = 0 leave the state as it is; their outputs are cut off.
    q, k = (F.pad(x.to(dtype), (0, 0, 0, pad)).unflatten(2, (-1, chunk_size)) for x in (q, k))
    v = F.pad(v.to(dtype), (0, 0, 0, pad)).unflatten(2, (-1, chunk_size))     # (B, H, C, T, P)
    g = F.pad(log_decay.to(dtype), (0, pad)).unflatten(2, (-1, chunk_size))    # (B, H, C, T)
    initial = (torch.zeros(B, H, N, P, dtype=dtype, device=q.device) if initial_state is None
               else initial_state.to(dtype))

    spans = _segment_sums(g)                                                   # (B, H, C, T, T), -inf above diagonal
    intra = (q @ k.transpose(-1, -2)) * spans.exp()
    out = intra @ v
    to_end = spans[..., -1, :]                                                 # g summed over j+1..T-1, <= 0
    updates = (k * to_end.exp()[..., None]).transpose(-1, -2) @ v               # (B, H, C, N, P)
    entering, final = _chunk_states(g.sum(-1), updates, initial)
    out = out + g.cumsum(-1).exp()[..., None] * (q @ entering)
    return out.flatten(2, 3)[:, :, :L].to(out_dtype), final
