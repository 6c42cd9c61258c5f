"""Temporal self-guidance and Fourier motion enhancement as diffusers guiders.

diffusers' perturbed-attention and skip-layer guiders are classifier-free guidance plus hooks that a guider
installs in `prepare_models` and removes in `cleanup_models`, around each model call of a step. These two are the
same shape: classifier-free guidance (diffusers' own, unchanged) plus this project's frame-mass edit in the chosen
layers and steps, installed only while the model runs. So they work wherever a diffusers guider does, e.g. as the
`guider` of this project's pipelines, and they compose with CFG's scale, rescale and start/stop the diffusers way:

    from t2v.guidance.guiders import TemporalSelfGuider
    pipe.guider = TemporalSelfGuider(guidance_scale=2.5, strength=0.6)

The `guidance=["temporal-self-guidance"]` names of a call keep working; both routes run the same edit.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import BaseGuidance

from t2v.guidance.fourier_motion import FourierMotionEnhancement
from t2v.guidance.temporal_maps import TemporalMapGuidance
from t2v.guidance.temporal_self_guidance import TemporalSelfGuidance


class _FrameMassGuider(ClassifierFreeGuidance):
    """Classifier-free guidance whose model calls run with a frame-mass edit (`map_guidance`)."""

    map_guidance: TemporalMapGuidance

    def _set_cfg(self, guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled):
        # ClassifierFreeGuidance.__init__ would register its own arguments to the config a second time and mark
        # them as defaults, so that `from_config` lost the scale; its attributes are set here instead.
        BaseGuidance.__init__(self, start, stop, enabled)
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.use_original_formulation = use_original_formulation

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        if self._num_inference_steps is None:  # used outside a denoising loop: plain CFG
            return
        self.map_guidance.attach(denoiser, self._num_inference_steps)
        self.map_guidance.set_step(self._step)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self.map_guidance.detach(denoiser)
        super().cleanup_models(denoiser)


class TemporalSelfGuider(_FrameMassGuider):
    """CFG plus temporal self-guidance; the options after `stop` are `TemporalSelfGuidance`'s."""

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                 strength: float = 0.6, reference_layer: int = 1, layers: list[int] | None = None,
                 steps: float | list[int] = 0.2, reference: str = "layer", span: int | None = None,
                 sparse_calls: str = "skip", enabled: bool = True):
        self._set_cfg(guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled)
        self.map_guidance = TemporalSelfGuidance(strength, reference_layer, layers, steps, reference, span,
                                                 sparse_calls)


class FourierMotionGuider(_FrameMassGuider):
    """CFG plus Fourier motion enhancement; the options after `stop` are `FourierMotionEnhancement`'s."""

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                 strength: float = 0.5, split: int = 1, layers: list[int] | None = None,
                 steps: float | list[int] = 0.2, sparse_calls: str = "skip", enabled: bool = True):
        self._set_cfg(guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled)
        self.map_guidance = FourierMotionEnhancement(strength, split, layers, steps, sparse_calls)


__all__ = ["FourierMotionGuider", "TemporalSelfGuider"]
