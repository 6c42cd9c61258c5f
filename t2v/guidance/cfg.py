"""Classifier-free guidance as a guidance object: sets the scale (and other options) of diffusers' CFG guider.

The combination of conditional and unconditional predictions stays diffusers' `ClassifierFreeGuidance`, the
pipeline's `guider`; this object swaps in a copy with its options for one call and puts the original back after.
A `guidance_scale` passed to the call itself still wins, as it always has.
"""

from __future__ import annotations

import inspect

from diffusers.guiders import ClassifierFreeGuidance

from t2v.guidance.base import Guidance

_GUIDER_OPTIONS = sorted(set(inspect.signature(ClassifierFreeGuidance.__init__).parameters)
                         - {"self", "guidance_scale"})


class ClassifierFreeGuidanceScale(Guidance):
    """scale: the CFG scale (1: the conditional prediction alone, one transformer pass a step; None: the
    pipeline's own). guider_options: other options of diffusers' ClassifierFreeGuidance (guidance_rescale,
    use_original_formulation, start, stop)."""

    name = "cfg"

    def __init__(self, scale: float | None = None, **guider_options):
        if scale is not None and float(scale) < 0:
            raise ValueError(f"cfg: scale must be >= 0, got {scale}")
        unknown = sorted(set(guider_options) - set(_GUIDER_OPTIONS))
        if unknown:
            raise ValueError(f"cfg: unknown option(s) {', '.join(unknown)}; "
                             f"it takes scale, {', '.join(_GUIDER_OPTIONS)}")
        self.scale = None if scale is None else float(scale)
        self.guider_options = guider_options
        self._saved = None

    def begin(self, pipeline, num_inference_steps: int) -> None:
        options = dict(self.guider_options, **({} if self.scale is None else {"guidance_scale": self.scale}))
        if not options:
            return
        self._saved = pipeline.guider
        pipeline.guider = pipeline.guider.new(**options)

    def end(self, pipeline) -> None:
        if self._saved is not None:
            pipeline.guider, self._saved = self._saved, None
