"""FlashBlock: reuse of the block-external attention across denoising steps in chunk-by-chunk generation.

While a block-diffusion model denoises one chunk, each of its queries attends to the chunk itself and to the cached
keys and values of the chunks before it. FlashBlock's observation is that the second part, the chunk's attention
over the earlier chunks (its output and log-sum-exp), barely changes from one denoising step to the next, while it
is most of the work once the context is a few chunks long. So it is computed at a chunk's first steps and on a
refresh schedule, kept in the layer's cache in between, and merged by log-sum-exp with the in-chunk part, which is
recomputed every step by any registered method (dense by default, or a sparse one with its options).

    attention.apply(block_model, "flashblock", refresh_every=4)                           # dense in-chunk part
    attention.apply(block_model, "flashblock", chunk_method="vmoba", sparsity=0.75, block_size=16)

refresh_every=1 recomputes it every step: exactly attention without the cache. Only block-causal models with a KV
cache (the "block-causal" adapter family) have a block-external part; on other models FlashBlock is its method.
"""

from __future__ import annotations

import torch

from attention.block_causal import LayerCache, attention_with_lse


class FlashBlock:
    """refresh_every: recompute the block-external attention when it is this many steps old (1: every step).
    exact_steps: the first this many steps of each chunk always recompute it (where the chunk changes most).
    chunk_method: the registered method for the in-chunk part; any other option is that method's."""

    def __init__(self, layer_index: int = 0, chunk_method: str = "dense", refresh_every: int = 4,
                 exact_steps: int = 1, **method_options):
        from attention.apply import bind_method  # apply imports the registry this file is registered in

        if int(refresh_every) != refresh_every or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive integer, got {refresh_every}")
        if int(exact_steps) != exact_steps or exact_steps < 0:
            raise ValueError(f"exact_steps must be a non-negative integer, got {exact_steps}")
        if chunk_method == "flashblock":
            raise ValueError("flashblock's in-chunk method cannot be flashblock itself")
        self.refresh_every, self.exact_steps = int(refresh_every), int(exact_steps)
        self.chunk_method = chunk_method
        self.inner = bind_method(chunk_method, method_options, int(layer_index) + 1)[int(layer_index)]
        if not self.inner.takes_lse:
            raise ValueError(f"attention method {chunk_method!r} does not return its log-sum-exp, so flashblock cannot "
                             "merge it with the block-external part")
        self.refreshes = 0  # block-external computations since the last reset (for benchmarks and tests)

    def reset(self) -> None:
        self.inner.reset()

    def prepare(self, layout, device) -> None:
        self.inner.prepare(layout, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, step: int | None = None,
                 return_lse: bool = False):
        """The in-chunk part: the inner method's attention of the chunk over itself."""
        return self.inner(q, k, v, layout, 0 if step is None else step, return_lse=return_lse)

    def needs_refresh(self, layer: LayerCache, step: int) -> bool:
        return (layer.external is None or step < self.exact_steps or layer.external_step is None
                or step - layer.external_step >= self.refresh_every or step < layer.external_step)

    def external(self, q: torch.Tensor, layer: LayerCache, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's attention (out, lse) over the cached context, recomputed when due, else the kept one."""
        if self.needs_refresh(layer, step):
            out, lse = attention_with_lse(q, layer.key.to(q.dtype), layer.value.to(q.dtype))
            layer.external, layer.external_step = (out, lse), step
            self.refreshes += 1
        return layer.external
