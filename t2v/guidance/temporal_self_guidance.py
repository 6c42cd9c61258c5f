"""Temporal self-guidance (BroadWay): pull the temporal attention maps of several layers toward a reference layer's.

BroadWay observed that clips with structural artifacts and flicker are those whose decoder blocks disagree about
the temporal attention map, and that blending each block's map toward the map of an early decoder block,
A <- A + alpha * (A_ref - A), makes the blocks agree and the clip steadier. In a DiT every layer works at the same
resolution, so the reference is simply an earlier layer and the maps need no interpolation: each query token's
frame masses (see `temporal_maps`) are blended toward the same token's masses in the reference layer. The
reference is averaged over its heads, since head h of one layer has nothing to do with head h of another.
"""

from __future__ import annotations

import torch

from t2v.guidance.temporal_maps import TemporalMapGuidance


class TemporalSelfGuidance(TemporalMapGuidance):
    """strength: alpha in [0, 1] (0: off, 1: the reference's map). reference_layer: the self-attention layer whose
    map the others follow. layers: the layers pulled toward it, all after it (default: every later layer).
    steps: the share of steps it acts in, from the first (or step indices). sparse_calls: see `temporal_maps`."""

    name = "temporal-self-guidance"
    order = 0

    def __init__(self, strength: float = 0.6, reference_layer: int = 1, layers=None, steps=0.2,
                 sparse_calls: str = "skip"):
        if strength > 1:
            raise ValueError(f"{self.name}: strength must be in [0, 1], got {strength}")
        super().__init__(strength, layers, steps, sparse_calls)
        self.reference_layer = int(reference_layer)

    def default_layers(self, num_layers: int) -> list[int]:
        return list(range(self.reference_layer % num_layers + 1, num_layers))

    def resolve(self, num_layers: int, num_inference_steps: int) -> None:
        super().resolve(num_layers, num_inference_steps)
        self.reference_layer %= num_layers
        # The reference map is read in the same forward pass, so it must already have been computed.
        early = sorted(i for i in self.acting_layers if i <= self.reference_layer)
        if early:
            raise ValueError(f"{self.name}: layers {early} do not come after the reference layer "
                             f"{self.reference_layer}; only later layers can follow it")

    def edit(self, layer: int, target: torch.Tensor, original: torch.Tensor, maps: dict) -> torch.Tensor:
        reference = maps.get(self.reference_layer)
        if reference is None:  # the reference call was left to a sparse method: nothing exact to follow
            return target
        return target + self.strength * (reference.mean(1, keepdim=True) - target)
