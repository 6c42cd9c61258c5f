"""TextToVideoPipeline: text in, video out, with the embedded model or any VideoDiT checkpoint.

The denoising loop follows diffusers' guider protocol (as in its HunyuanVideo 1.5 pipeline): the guider splits the
conditioning into the batches it needs (conditional, unconditional, ...), the transformer runs once per batch, and
the guider combines the predictions. Extra guidance objects (``guidance=[...]``) are called at the same points.
A clip longer than the model was trained at gets ``position-interpolation`` unless the call passes
``interpolate_positions=False``.

Like Wan 2.2's two experts, an optional high-noise model (``high_noise_transformer`` with its own
``high_noise_text_encoder``) runs the steps whose timestep is at least ``boundary_ratio`` of the scheduler's training
timesteps, and ``transformer`` the rest. The sparse variants use it so that the dense model they were distilled from
lays out the clip, which is decided in the first, noisiest steps.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from pipelines.caches import (branch_context, check_branches, installed_cache, needs_one_call_per_step,
                              start_generation)
from t2v.guidance import Guidance, resolve_guidance
from t2v.guidance.position_interpolation import PositionInterpolation
from t2v.models import TextEncoder, VideoDiT


@dataclass
class TextToVideoPipelineOutput(BaseOutput):
    """``frames``: np (batch, frames, height, width, 3) in [0, 1], pt (batch, frames, 3, height, width), or PIL lists."""

    frames: np.ndarray | torch.Tensor | list


class TextToVideoPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->high_noise_text_encoder->high_noise_transformer->transformer"
    _optional_components = ["guider", "high_noise_text_encoder", "high_noise_transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        text_encoder: TextEncoder,
        transformer: VideoDiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        guider: ClassifierFreeGuidance | None = None,
        high_noise_text_encoder: TextEncoder | None = None,
        high_noise_transformer: VideoDiT | None = None,
        boundary_ratio: float | None = None,
    ):
        super().__init__()
        guider = guider if guider is not None else ClassifierFreeGuidance(guidance_scale=5.0)
        self.register_modules(text_encoder=text_encoder, transformer=transformer, scheduler=scheduler, guider=guider)
        self.set_high_noise_model(high_noise_transformer, high_noise_text_encoder, boundary_ratio)
        self.video_processor = VideoProcessor(vae_scale_factor=1)
        # Guidance objects used when a call passes no `guidance` (load_pipeline(guidance=...) sets them).
        self.default_guidance: list = []

    def set_high_noise_model(self, transformer: VideoDiT | None, text_encoder: TextEncoder | None = None,
                             boundary_ratio: float | None = None) -> None:
        """Steps whose timestep is at least `boundary_ratio` x the scheduler's training timesteps run `transformer`
        on `text_encoder`'s embeddings; the others run the pipeline's own. None removes the high-noise model."""
        if transformer is None:
            text_encoder, boundary_ratio = None, None
        else:
            if text_encoder is None or boundary_ratio is None:
                raise ValueError("a high-noise transformer needs its text encoder and a boundary_ratio")
            if not 0.0 < float(boundary_ratio) <= 1.0:
                raise ValueError(f"boundary_ratio must be in (0, 1], got {boundary_ratio}")
            boundary_ratio = float(boundary_ratio)
            ours, theirs = self.transformer.config, transformer.config
            shared = ("in_channels", "out_channels", "patch_size", "sample_frames", "sample_height", "sample_width")
            different = [key for key in shared if ours.get(key) != theirs.get(key)]
            if different:
                raise ValueError(f"the high-noise transformer differs from the pipeline's in {', '.join(different)}")
        self.register_modules(high_noise_text_encoder=text_encoder, high_noise_transformer=transformer)
        self.register_to_config(boundary_ratio=boundary_ratio)

    def high_noise_steps(self, timesteps: torch.Tensor) -> int:
        """How many of the first `timesteps` the high-noise model runs (0 without one)."""
        if self.high_noise_transformer is None:
            return 0
        boundary = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps
        return int((timesteps >= boundary).sum())

    @contextmanager
    def _run_with(self, transformer, text_encoder):
        """The pipeline's transformer and text encoder are these two for a phase of the steps (guidance objects and
        caches find the model that runs as `pipeline.transformer`)."""
        own = self.transformer, self.text_encoder
        if transformer is own[0]:  # the pipeline's own model: left alone, so a callback that swaps it keeps its swap
            yield
            return
        self.transformer, self.text_encoder = transformer, text_encoder
        try:
            yield
        finally:
            self.transformer, self.text_encoder = own

    @property
    def default_video_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) the transformer was trained at."""
        c = self.transformer.config
        return c.sample_frames, c.sample_height, c.sample_width

    def check_inputs(self, prompt, negative_prompt, num_frames, height, width, num_inference_steps, output_type):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("`prompt` must be a non-empty string or a non-empty list of strings")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"output_type must be one of 'np', 'pt', 'pil', 'latent', got {output_type!r}")
        self.transformer.check_video_shape(num_frames, height, width)
        return prompts

    def _needs_position_interpolation(self, num_frames: int, guidance: list, asked: bool | None) -> bool:
        """Whether a call gets `position-interpolation` added: asked for (True), or by default (None) when the clip
        is longer than the model was trained at (the model's per-frame tables would otherwise send it back along
        its motion: docs/benchmarks.md, "Guidance where the model fails"). False never adds it."""
        if asked is False or any(isinstance(g, PositionInterpolation) for g in guidance):
            return False
        return bool(asked) or num_frames > self.default_video_shape[0]

    def encode_prompt(self, prompts: list[str], num_videos_per_prompt: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings (B * num_videos_per_prompt, L, D) and their mask."""
        embeds, mask = self.text_encoder.encode(prompts, device=device)
        embeds = embeds.to(self.transformer.dtype).repeat_interleave(num_videos_per_prompt, dim=0)
        return embeds, mask.repeat_interleave(num_videos_per_prompt, dim=0)

    def _branch_context(self, state, guider, step: int):
        """The step cache's context of one branch's call: its state is kept per branch ("pred_cond", ...)."""
        return branch_context(self.transformer, getattr(state, guider._identifier_key), step,
                              float(self.scheduler.sigmas[step]), len(self.scheduler.timesteps))

    def _predict_each_branch(self, guider, states, input_names, model_input, timestep, i, t, extra_guidance):
        """One transformer call per guidance branch; sets each state's noise_pred."""
        for state in states:
            guider.prepare_models(self.transformer)
            cond_kwargs = {name: getattr(state, name) for name in input_names}
            for g in extra_guidance:
                g.before_model(self, i, t)
            with self._branch_context(state, guider, i):
                state.noise_pred = self.transformer(
                    hidden_states=model_input, timestep=timestep, return_dict=False, **cond_kwargs
                )[0].float()
            for g in extra_guidance:
                g.after_model(self, i, t)
            guider.cleanup_models(self.transformer)

    def _predict_in_one_call(self, guider, states, input_names, model_input, timestep, i, t, extra_guidance):
        """Every guidance branch stacked in one batch, the unconditional first (the order FasterCache reads)."""
        hooked = [type(g).__name__ for g in extra_guidance if type(g).before_model is not Guidance.before_model
                  or type(g).after_model is not Guidance.after_model]
        if hooked:
            raise ValueError(f"cache {installed_cache(self.transformer)!r} runs the guidance branches in one call, "
                             f"which guidance acting on each call cannot follow: {', '.join(hooked)}")
        check_branches(self.transformer, len(states))
        states = sorted(states, key=lambda state: getattr(state, guider._identifier_key) != "pred_uncond")
        inputs = {name: torch.cat([getattr(state, name) for state in states]) for name in input_names}
        for _ in states:
            guider.prepare_models(self.transformer)
        noise_pred = self.transformer(hidden_states=model_input.repeat(len(states), 1, 1, 1, 1),
                                      timestep=timestep.repeat(len(states)), return_dict=False, **inputs)[0]
        for state, prediction in zip(states, noise_pred.float().chunk(len(states))):
            state.noise_pred = prediction
            guider.cleanup_models(self.transformer)

    def _denoise(self, latents, steps, conditioning, extra_guidance, guidance_scale, num_inference_steps,
                 callback_on_step_end, callback_on_step_end_tensor_inputs, progress_bar):
        """Runs `steps` of the scheduler's timesteps with `self.transformer`; returns the latents."""
        prompt_embeds, prompt_mask, negative_embeds, negative_mask = conditioning
        timesteps, batch, device = self.scheduler.timesteps, latents.shape[0], latents.device
        start_generation(self.transformer, num_inference_steps)
        # Guidance that hooks into the model is undone even when a step fails or the call is interrupted.
        with ExitStack() as active_guidance:
            for g in extra_guidance:
                g.begin(self, num_inference_steps)
                active_guidance.callback(g.end, self)
            # After `begin`, so that a guidance object may set the guider ("cfg"); the call's own scale still wins.
            guider = self.guider if guidance_scale is None else self.guider.new(guidance_scale=guidance_scale)
            for i in steps:
                t = timesteps[i]
                guider.set_state(step=i, num_inference_steps=num_inference_steps, timestep=t)
                guider_inputs = {
                    "encoder_hidden_states": (prompt_embeds, negative_embeds),
                    "encoder_attention_mask": (prompt_mask, negative_mask),
                }
                model_input = latents.to(self.transformer.dtype)
                timestep = t.expand(batch).to(device)
                guider_state = guider.prepare_inputs(guider_inputs)
                # Caches that keep one state per module get every branch in one call (pipelines.caches).
                predict = (self._predict_in_one_call if needs_one_call_per_step(self.transformer)
                           else self._predict_each_branch)
                predict(guider, guider_state, list(guider_inputs), model_input, timestep, i, t, extra_guidance)
                noise_pred = guider(guider_state)[0]
                for g in extra_guidance:
                    noise_pred = g.adjust_prediction(self, i, t, noise_pred, latents)

                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {name: latents for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        return latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance: list | None = None,
        interpolate_positions: bool | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        default_frames, default_height, default_width = self.default_video_shape
        num_frames, height, width = num_frames or default_frames, height or default_height, width or default_width
        prompts = self.check_inputs(prompt, negative_prompt, num_frames, height, width, num_inference_steps, output_type)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback tensor inputs must be among {self._callback_tensor_inputs}, got {sorted(unknown)}")
        device = self._execution_device
        extra_guidance = resolve_guidance(self.default_guidance if guidance is None else guidance)
        if self._needs_position_interpolation(num_frames, extra_guidance, interpolate_positions):
            extra_guidance.append(PositionInterpolation())

        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * len(prompts) if isinstance(negative, str) else negative
        batch = len(prompts) * num_videos_per_prompt
        shape = (batch, self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        lead = self.high_noise_steps(timesteps)
        phases = [(self.high_noise_transformer, self.high_noise_text_encoder, range(lead)),
                  (self.transformer, self.text_encoder, range(lead, len(timesteps)))]
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for transformer, text_encoder, steps in phases:
                if len(steps) == 0:
                    continue
                with self._run_with(transformer, text_encoder):
                    conditioning = (*self.encode_prompt(prompts, num_videos_per_prompt, device),
                                    *self.encode_prompt(negatives, num_videos_per_prompt, device))
                    latents = self._denoise(latents, steps, conditioning, extra_guidance, guidance_scale,
                                            num_inference_steps, callback_on_step_end,
                                            callback_on_step_end_tensor_inputs, progress_bar)

        self.maybe_free_model_hooks()

        if output_type == "latent":
            frames = latents
        else:
            frames = self.video_processor.postprocess_video(latents.clamp(-1, 1), output_type=output_type)
        if not return_dict:
            return (frames,)
        return TextToVideoPipelineOutput(frames=frames)
