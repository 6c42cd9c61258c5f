"""Adapters: attention processors per model family, and the state they share with the transformer's forward hook.

A family knows how to find a model's self-attention modules, how to read the video layout and the timestep from the
transformer's forward arguments, and how to build a processor that computes q, k, v exactly as the model's own
processor does before handing them to a method. Models are recognised by class name, never imported, so this
package does not depend on diffusers.

Adding a family: one file in this package plus one entry in `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attention.adapters.block_causal import BlockCausalFamily
from attention.adapters.cogvideox import CogVideoXFamily
from attention.adapters.hunyuan_video import HunyuanVideoFamily
from attention.adapters.wan_style import WanStyleFamily
from attention.layout import VideoLayout

# The block-causal family first: its models are VideoDiTs too, which the Wan-style family would also claim.
FAMILIES = [BlockCausalFamily(), WanStyleFamily(), HunyuanVideoFamily(), CogVideoXFamily()]


def find_family(model):
    """The family that supports `model`; ValueError naming the class and the supported ones otherwise."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    supported = ", ".join(name for family in FAMILIES for name in family.model_classes)
    raise ValueError(f"no attention adapter for {type(model).__name__}; supported model classes: {supported}")


def timestep_value(timestep) -> float | None:
    """One number for a timestep given as a number or a tensor (per sample or per token: the largest counts)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max()) if timestep.numel() else None
    return float(timestep)


@dataclass
class AdapterState:
    """What the forward hook learns each call (layout, denoising step) and every processor of the model reads.

    The step counts distinct timesteps: repeated calls at one timestep (conditional and unconditional passes of
    classifier-free guidance) share a step, a lower timestep advances it, and a higher one starts a new generation
    (step 0, stateful methods reset), as does `attention.reset(model)`.
    """

    method: str
    options: dict
    warmup_steps: int = 0
    block_size: int = 64
    layout: VideoLayout | None = None
    step: int = 0
    last_timestep: float | None = None
    # Read by the processors; a bool rather than the step so that compiled code specialises on two values only.
    dense_now: bool = False
    layer_methods: list = field(default_factory=list)
    originals: list = field(default_factory=list)
    hook: object = None

    def set_layout(self, layout: VideoLayout | None) -> None:
        # Keep the same object while nothing changed, so compiled processors see a stable input.
        if layout != self.layout:
            self.layout = layout

    def observe_timestep(self, timestep) -> None:
        t = timestep_value(timestep)
        # After apply or reset (no last timestep) the generation is already fresh.
        if t is not None and self.last_timestep is not None:
            if t > self.last_timestep:
                self._new_generation()
            elif t < self.last_timestep:
                self.step += 1
        if t is not None:
            self.last_timestep = t
        self.dense_now = self.step < self.warmup_steps

    def reset(self) -> None:
        self.last_timestep = None
        self._new_generation()
        self.dense_now = self.step < self.warmup_steps

    def _new_generation(self) -> None:
        self.step = 0
        for layer_method in self.layer_methods:
            layer_method.reset()


__all__ = ["FAMILIES", "AdapterState", "find_family", "timestep_value"]
