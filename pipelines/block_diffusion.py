"""BlockDiffusionPipeline: videos of any length, made chunk by chunk by a block-causal model (block diffusion).

Each chunk of a few frames is denoised in full (all its steps, with classifier-free guidance) while attending to the
finished chunks before it, whose keys and values the model keeps in a KV cache (one cache per guidance branch,
filled once per chunk). A prompt whose motion changes part-way ("a red circle moves right, then up") is split into
segments and each chunk reads its own segment's caption. The call conventions and the output are those of
`TextToVideoPipeline`, plus `callback_on_chunk_end`, called with each finished chunk's frames, and `prefix_latents`,
a clean start to continue from.

An optional opening model (`opening_transformer`, a bidirectional `VideoDiT` with its own `opening_text_encoder`)
makes the clip's first `opening_frames` frames, at the length it was trained at, and the block model continues from
them: a block model starting from nothing sees four frames at a time, too few to set a motion going.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import numpy as np
import torch

from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from pipelines.text_to_video import TextToVideoPipeline, TextToVideoPipelineOutput
from t2v.data.captions import segment_bounds, split_chained_prompt
from t2v.guidance import resolve_guidance
from t2v.models import BlockVideoDiT, TextEncoder, VideoDiT


class BlockDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->opening_text_encoder->opening_transformer->transformer"
    _optional_components = ["guider", "opening_text_encoder", "opening_transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, text_encoder: TextEncoder, transformer: BlockVideoDiT,
                 scheduler: FlowMatchEulerDiscreteScheduler, guider: ClassifierFreeGuidance | None = None,
                 opening_text_encoder: TextEncoder | None = None, opening_transformer: VideoDiT | None = None,
                 opening_frames: int | None = None):
        super().__init__()
        guider = guider if guider is not None else ClassifierFreeGuidance(guidance_scale=5.0)
        self.register_modules(text_encoder=text_encoder, transformer=transformer, scheduler=scheduler, guider=guider)
        self.set_opening_model(opening_transformer, opening_text_encoder, opening_frames)
        self.video_processor = VideoProcessor(vae_scale_factor=1)
        self.default_guidance: list = []

    default_video_shape = TextToVideoPipeline.default_video_shape
    encode_prompt = TextToVideoPipeline.encode_prompt

    @property
    def chunk_frames(self) -> int:
        return self.transformer.config.chunk_frames

    def set_opening_model(self, transformer: VideoDiT | None, text_encoder: TextEncoder | None = None,
                          frames: int | None = None) -> None:
        """A clip's first `frames` frames are made by `transformer` (bidirectional, on `text_encoder`'s embeddings of
        the first caption segment) and the block model continues from them. None removes the opening model."""
        if transformer is None:
            text_encoder, frames = None, None
        else:
            if text_encoder is None or frames is None:
                raise ValueError("an opening transformer needs its text encoder and a number of frames")
            frames = int(frames)
            if frames <= 0 or frames % self.chunk_frames:
                raise ValueError(f"opening frames must be a positive multiple of the chunk ({self.chunk_frames} "
                                 f"frames), got {frames}")
            ours, theirs = self.transformer.config, transformer.config
            different = [key for key in ("in_channels", "out_channels", "patch_size") if ours[key] != theirs[key]]
            if different:
                raise ValueError(f"the opening transformer differs from the block model in {', '.join(different)}")
        self.register_modules(opening_text_encoder=text_encoder, opening_transformer=transformer)
        self.register_to_config(opening_frames=frames)

    def opening_frames_for(self, num_frames: int, chunk_segment: list[list[int]]) -> int:
        """Frames the opening model makes for a call: its `opening_frames` when every prompt's first caption segment
        covers them, else 0 (the block model makes the whole clip)."""
        frames = self.config.opening_frames if self.opening_transformer is not None else None
        if not frames or frames > num_frames:
            return 0
        first_segment_only = all(row[j] == 0 for row in chunk_segment for j in range(frames // self.chunk_frames))
        return frames if first_segment_only else 0

    def check_inputs(self, prompt, negative_prompt, num_frames, height, width, num_inference_steps, output_type):
        prompts = TextToVideoPipeline.check_inputs(self, prompt, negative_prompt, num_frames, height, width,
                                                   num_inference_steps, output_type)
        chunks = num_frames // self.chunk_frames
        # Each prompt's segments, and for each chunk the segment that holds it.
        segments = [split_chained_prompt(p) for p in prompts]
        chunk_segment = []
        for parts in segments:
            bounds = segment_bounds(num_frames, len(parts), self.chunk_frames)
            chunk_segment.append([next(s for s, (start, stop) in enumerate(bounds) if start <= j * self.chunk_frames
                                       < stop) for j in range(chunks)])
        return prompts, segments, chunk_segment

    def _chunk_text(self, segments, chunk_segment, num_videos_per_prompt: int, device):
        """Per video and chunk, the caption embedding (B, chunks, L, D) and mask (B, chunks, L)."""
        texts = [text for parts in segments for text in parts]
        embeds, mask = self.text_encoder.encode(texts, device=device)
        embeds = embeds.to(self.transformer.dtype)
        starts = np.cumsum([0] + [len(parts) for parts in segments])
        index = torch.tensor([[starts[p] + s for s in row] for p, row in enumerate(chunk_segment)], device=device)
        index = index.repeat_interleave(num_videos_per_prompt, dim=0)
        return embeds[index], mask[index]

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
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        callback_on_chunk_end: Callable | None = None,
        prefix_latents: torch.Tensor | None = None,
    ):
        """As `TextToVideoPipeline.__call__`; `num_frames` may be any multiple of the model's chunk. `latents`:
        the starting noise of the whole clip. callback_on_chunk_end(pipeline, chunk_index, frames): called as each
        chunk is finished, with its frames as numpy (batch, chunk_frames, height, width, 3) in [0, 1].
        `prefix_latents`: the clean start of the clip (batch, channels, frames, height, width), whole chunks and
        fewer than `num_frames`; generation continues after it and the output includes it. The opening model, if
        set, runs under the same classifier-free guidance and calls `callback_on_step_end` at its steps too (with
        its own pipeline as the first argument); `guidance` objects act on the block model's chunks."""
        default_frames, default_height, default_width = self.default_video_shape
        num_frames, height, width = num_frames or default_frames, height or default_height, width or default_width
        prompts, segments, chunk_segment = self.check_inputs(prompt, negative_prompt, num_frames, height, width,
                                                             num_inference_steps, output_type)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback tensor inputs must be among {self._callback_tensor_inputs}, got {sorted(unknown)}")
        device = self._execution_device
        extra_guidance = resolve_guidance(self.default_guidance if guidance is None else guidance)
        model = self.transformer
        chunk, window = self.chunk_frames, model.config.window_chunks
        chunks = num_frames // chunk
        batch = len(prompts) * num_videos_per_prompt

        text, text_mask = self._chunk_text(segments, chunk_segment, num_videos_per_prompt, device)
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * len(prompts) if isinstance(negative, str) else negative
        negative_embeds, negative_mask = self.encode_prompt(negatives, num_videos_per_prompt, device)
        negative_text = negative_embeds[:, None].expand(-1, chunks, -1, -1)
        negative_text_mask = negative_mask[:, None].expand(-1, chunks, -1)

        shape = (batch, model.config.in_channels, num_frames, height, width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=torch.float32)
        finished = self._prefix_chunks(prefix_latents, shape, device)
        opening = 0 if finished else self.opening_frames_for(num_frames, chunk_segment)

        def chunk_noise(j):
            # Drawn chunk by chunk, so a clip's first chunks do not depend on how long it is (nor its later chunks on
            # whether a prefix or the opening model made the first).
            return (randn_tensor((*shape[:2], chunk, height, width), generator=generator, device=device,
                                 dtype=torch.float32) if latents is None else latents[:, :, j * chunk:(j + 1) * chunk])

        start_noise = [chunk_noise(j) for j in range(max(len(finished), opening // chunk))]
        caches = {}

        with ExitStack() as active_guidance, self.progress_bar(total=chunks * num_inference_steps) as progress_bar:
            for g in extra_guidance:
                g.begin(self, num_inference_steps)
                active_guidance.callback(g.end, self)
            guider = self.guider if guidance_scale is None else self.guider.new(guidance_scale=guidance_scale)
            if opening:
                progress_bar.set_description("opening")
                finished = self._make_opening(segments, negative_prompt, torch.cat(start_noise, 2), num_inference_steps,
                                              guider, num_videos_per_prompt, callback_on_step_end,
                                              callback_on_step_end_tensor_inputs)
                for j, sample in enumerate(finished):
                    if callback_on_chunk_end is not None:
                        callback_on_chunk_end(self, j, self.video_processor.postprocess_video(
                            sample.clamp(-1, 1), output_type="np"))
            progress_bar.update(len(finished) * num_inference_steps)
            for j in range(len(finished), chunks):
                progress_bar.set_description(f"chunk {j + 1}/{chunks}")
                noise = chunk_noise(j)
                first = max(0, j - window)
                context = torch.cat(finished[first:], 2) if finished[first:] else None
                inputs = {
                    "encoder_hidden_states": (text[:, j], negative_text[:, j]),
                    "encoder_attention_mask": (text_mask[:, j], negative_text_mask[:, j]),
                    "context_hidden_states": (text[:, first:j], negative_text[:, first:j]),
                    "context_attention_mask": (text_mask[:, first:j], negative_text_mask[:, first:j]),
                }
                filled = set()
                sample = self._denoise_chunk(noise, context, inputs, caches, filled, guider, extra_guidance,
                                             num_inference_steps, progress_bar, callback_on_step_end,
                                             callback_on_step_end_tensor_inputs)
                finished.append(sample)
                if callback_on_chunk_end is not None:
                    callback_on_chunk_end(self, j, self.video_processor.postprocess_video(sample.clamp(-1, 1),
                                                                                          output_type="np"))

        self.maybe_free_model_hooks()
        latents = torch.cat(finished, 2)
        frames = latents if output_type == "latent" else self.video_processor.postprocess_video(
            latents.clamp(-1, 1), output_type=output_type)
        if not return_dict:
            return (frames,)
        return TextToVideoPipelineOutput(frames=frames)

    def _make_opening(self, segments, negative_prompt, noise, num_inference_steps, guider, num_videos_per_prompt,
                      callback_on_step_end, callback_inputs):
        """The opening model's clip start, denoised from `noise` on each prompt's first caption segment, as chunks."""
        opener = TextToVideoPipeline(self.opening_text_encoder, self.opening_transformer,
                                     FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config), guider)
        opener.set_progress_bar_config(disable=True)
        start = opener([parts[0] for parts in segments], negative_prompt=negative_prompt, num_frames=noise.shape[2],
                       height=noise.shape[3], width=noise.shape[4], num_inference_steps=num_inference_steps,
                       num_videos_per_prompt=num_videos_per_prompt, latents=noise, guidance=[], output_type="latent",
                       callback_on_step_end=callback_on_step_end,
                       callback_on_step_end_tensor_inputs=callback_inputs).frames
        return list(start.float().split(self.chunk_frames, dim=2))

    def _prefix_chunks(self, prefix_latents, shape, device) -> list[torch.Tensor]:
        """The given clean start of the clip as finished chunks (checked against the clip's shape)."""
        if prefix_latents is None:
            return []
        frames, chunk = prefix_latents.shape[2] if prefix_latents.ndim == 5 else 0, self.chunk_frames
        expected = (*shape[:2], frames, *shape[3:])
        if tuple(prefix_latents.shape) != expected or frames % chunk or not 0 < frames < shape[2]:
            raise ValueError(f"prefix_latents must have shape {tuple(shape[:2])} + (frames, {shape[3]}, {shape[4]}) "
                             f"with frames a multiple of {chunk} below num_frames={shape[2]}, got "
                             f"{tuple(prefix_latents.shape)}")
        prefix = prefix_latents.to(device=device, dtype=torch.float32)
        return list(prefix.split(chunk, dim=2))

    def _denoise_chunk(self, latents, context, inputs, caches, filled, guider, extra_guidance, num_inference_steps,
                       progress_bar, callback_on_step_end, callback_inputs):
        """All denoising steps of one chunk; returns its clean sample (B, C, chunk, H, W) in float32."""
        model = self.transformer
        batch, device = latents.shape[0], latents.device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=num_inference_steps, timestep=t)
            states = guider.prepare_inputs(inputs)
            model_input = latents.to(model.dtype)
            for state in states:
                branch = getattr(state, guider._identifier_key)
                cache = caches.setdefault(branch, model.new_cache())
                if branch not in filled:  # this branch's context, with its own captions, once per chunk
                    self._fill_cache(cache, context, state.context_hidden_states, state.context_attention_mask)
                    filled.add(branch)
                cache.step = i
                guider.prepare_models(model)
                for g in extra_guidance:
                    g.before_model(self, i, t)
                state.noise_pred = model(hidden_states=model_input, timestep=t.expand(batch).to(device),
                                         encoder_hidden_states=state.encoder_hidden_states,
                                         encoder_attention_mask=state.encoder_attention_mask, kv_cache=cache,
                                         return_dict=False)[0].float()
                for g in extra_guidance:
                    g.after_model(self, i, t)
                guider.cleanup_models(model)
            noise_pred = guider(states)[0]
            for g in extra_guidance:
                noise_pred = g.adjust_prediction(self, i, t, noise_pred, latents)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, i, t, {name: latents for name in callback_inputs})
                latents = outputs.pop("latents", latents)
            progress_bar.update()
        return latents

    def _fill_cache(self, cache, context, context_text, context_mask) -> None:
        """Stores the keys and values of the finished context frames (clean, timestep 0) for the next chunk."""
        cache.clear()
        if context is not None:
            cache.filling = True
            try:
                self.transformer(hidden_states=context.to(self.transformer.dtype),
                                 timestep=torch.zeros(context.shape[0], device=context.device),
                                 encoder_hidden_states=context_text, encoder_attention_mask=context_mask,
                                 kv_cache=cache, return_dict=False)
            finally:
                cache.filling = False
        cache.begin_chunk()
