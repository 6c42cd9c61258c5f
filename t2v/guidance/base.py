"""The points at which a pipeline calls a guidance object during denoising.

Classifier-free guidance is diffusers' own guider (``diffusers.guiders.ClassifierFreeGuidance``), the pipeline's
``guider`` component. Guidance methods of this project are passed as ``guidance=[...]`` and get these calls; each
default does nothing, so a method overrides only the points it needs.
"""

from __future__ import annotations

import torch


class Guidance:
    name = "guidance"

    def begin(self, pipeline, num_inference_steps: int) -> None:
        """Once before the first step (install hooks, reset state)."""

    def before_model(self, pipeline, step: int, timestep: torch.Tensor) -> None:
        """Before every transformer call of a step."""

    def after_model(self, pipeline, step: int, timestep: torch.Tensor) -> None:
        """After every transformer call of a step."""

    def adjust_prediction(self, pipeline, step: int, timestep, noise_pred: torch.Tensor, latents: torch.Tensor):
        """Returns the velocity the scheduler will use for this step."""
        return noise_pred

    def end(self, pipeline) -> None:
        """Once after the last step (remove hooks)."""
