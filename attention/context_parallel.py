"""Ulysses context parallelism for this project's attention methods, under diffusers' own context parallelism.

`transformer.enable_parallelism(config=ContextParallelConfig(...))` splits each video's tokens across ranks before
the first block and gathers them after the last, and gives every attention processor the `ParallelConfig`, so
that attention still sees every token. diffusers' processors do that inside their attention backend. The
processors of `attention.apply` hand q, k and v to a method that needs the whole video (a block selection scores
every key block against every query block), so under Ulysses they exchange heads for tokens around it:

    (B, H, N/P, D) on each of P ranks  --all-to-all-->  (B, H/P, N, D): this rank's heads, every token
    method(q, k, v, layout) on those heads, unchanged: every method treats heads independently
    (B, H/P, N, D)  --all-to-all-->  (B, H, N/P, D)

The layout the method gets describes the whole video: the transformer's forward pre-hook reads it from the latents
before diffusers' plan splits them (the split happens inside the forward, at the first block).

Ring attention keeps each rank's queries and passes keys and values around, so no rank ever holds a whole head:
a method that selects key blocks from scores over all keys cannot run there. Dense layers go to diffusers' own ring
attention (the model's processor); anything else is a ValueError asking for Ulysses.

The config is read by attribute only, as diffusers' dispatcher reads it: this package does not import diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

if torch.distributed.is_available():
    import torch.distributed._functional_collectives as funcol


@dataclass(frozen=True)
class ContextParallel:
    """How diffusers' context parallelism split the tokens of the current call.

    kind: "ulysses", or "ring" (also when ring and Ulysses are combined). ranks: how many ranks share the tokens.
    group: the process group of the Ulysses all-to-all. equal_split: every rank holds the same number of tokens
    (False under diffusers' `ulysses_anything` / `ring_anything`, which this module does not support).
    """

    kind: str
    ranks: int
    group: object = None
    equal_split: bool = True

    def gathered_tokens(self, local_tokens: int) -> int:
        """The length of the whole sequence, of which this rank holds `local_tokens`."""
        if not self.equal_split:
            raise ValueError("this project's attention methods need every rank to hold the same number of tokens; "
                             "diffusers' uneven splits (ulysses_anything / ring_anything) are not supported: use a "
                             "video whose token count divides by the number of ranks")
        return local_tokens * self.ranks

    def require_dense(self, method: str) -> None:
        """Under ring attention only dense attention runs (through diffusers); ValueError for any other method."""
        if self.kind == "ring" and method != "dense":
            raise ValueError(
                f"attention method {method!r} cannot run under ring attention: it selects key blocks from scores "
                "over the whole sequence, and under ring no rank holds the whole sequence of any head. Use Ulysses "
                "context parallelism (ContextParallelConfig(ulysses_degree=N)), or the method 'dense'"
            )


def context_parallel_of(parallel_config) -> ContextParallel | None:
    """Reads diffusers' `ParallelConfig` as set on a processor by `enable_parallelism`; None without context
    parallelism."""
    config = getattr(parallel_config, "context_parallel_config", None)
    if config is None:
        return None
    ring, ulysses = config.ring_degree, config.ulysses_degree
    if ring > 1:
        return ContextParallel("ring", ring * ulysses, equal_split=not config.ring_anything)
    return ContextParallel("ulysses", ulysses, config._ulysses_mesh.get_group(), not config.ulysses_anything)


def _all_to_all(x: torch.Tensor, parallel: ContextParallel, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Part r of `x` along `scatter_dim` goes to rank r; the parts received are joined along `gather_dim` in rank
    order (diffusers gives rank r the r-th equal part of the tokens, so rank order is token order)."""
    send = torch.stack(x.chunk(parallel.ranks, scatter_dim)).contiguous()
    # The autograd variant, so that training through the exchange gets gradients (its backward is the reverse
    # all-to-all); functional collectives also trace under torch.compile.
    received = funcol.all_to_all_single_autograd(send, None, None, parallel.group)
    received = funcol.wait_tensor(received)
    return torch.cat(received.unbind(0), gather_dim)


def ulysses_attention(attend: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      parallel: ContextParallel) -> torch.Tensor:
    """`attend(q, k, v)` over every token of this rank's share of the heads.

    query, key, value: (B, H, N/P, D), this rank's tokens for every head. Returns (B, H, N/P, D), as `attend` would
    give over the whole sequence. ValueError when H does not divide by the number of ranks.
    """
    heads = query.shape[1]
    if heads % parallel.ranks:
        raise ValueError(f"Ulysses context parallelism gives each rank a share of the attention heads: {heads} heads "
                         f"do not divide among {parallel.ranks} ranks; use a degree that divides {heads}")
    # Apart, not stacked into one exchange: q and k may be float32 beside a half-precision v (float32 q/k norms),
    # and the method must get them as they are.
    query, key, value = (_all_to_all(x, parallel, scatter_dim=1, gather_dim=2) for x in (query, key, value))
    return _all_to_all(attend(query, key, value), parallel, scatter_dim=2, gather_dim=1)


__all__ = ["ContextParallel", "context_parallel_of", "ulysses_attention"]
