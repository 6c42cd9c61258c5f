"""Position interpolation: clips longer than the model was trained at, read at the frame positions it knows.

Asked for more frames than it was trained at, the embedded model plays its motion forward, then back: its
per-frame tables (the absolute frame embedding, the per-frame modulation, the caption layout's frame queries) have
trained rows only for the trained length, and the frames past it get untrained rows. Attention-map guidance cannot
reach that: it lives outside attention (measured in docs/benchmarks.md). As position interpolation does for language
models and RIFLEx for the rotary embedding of video DiTs, the F frames of the clip are instead placed at evenly
spaced positions of the T trained ones (frame f at f * (T - 1) / (F - 1)): every per-frame row is interpolated
between its two trained neighbours, and the rotary embedding's frame angles are taken at the same positions. The
clip then spans the trajectory the model learned for T frames, at T/F of its speed, without turning back.

It changes nothing for clips of at most the trained length, and puts the model's tables back after the call.
"""

from __future__ import annotations

import math

import torch

from t2v.guidance.base import Guidance
from t2v.models.block_dit import BlockVideoDiT

# Per-frame tables of this project's VideoDiT and their first axis: frames.
FRAME_TABLES = ("frame_embedding", "frame_modulation_embedding", "layout_prior.frame_row_queries",
                "layout_prior.frame_column_queries")


def interpolated_rows(table: torch.Tensor, trained: int, frames: int) -> torch.Tensor:
    """`frames` rows of `table` at evenly spaced positions from row 0 to row `trained - 1`."""
    positions = torch.linspace(0, trained - 1, frames, device=table.device, dtype=torch.float64)
    low = positions.floor().long().clamp(max=trained - 1)
    high = (low + 1).clamp(max=trained - 1)
    weight = (positions - low).to(table.dtype).view(-1, *[1] * (table.dim() - 1))
    return table[low] * (1 - weight) + table[high] * weight


def interpolated_rope(cos: torch.Tensor, sin: torch.Tensor, trained: int, frames: int):
    """Rotary tables (positions, dim) taken at the same evenly spaced positions: angle = position * frequency."""
    frequency = torch.atan2(sin[1].double(), cos[1].double())  # row 1 holds each pair's angle per position
    positions = torch.linspace(0, trained - 1, frames, device=cos.device, dtype=torch.float64)
    angles = positions[:, None] * frequency
    return angles.cos().to(cos.dtype), angles.sin().to(sin.dtype)


class PositionInterpolation(Guidance):
    """trained_frames: the length the model was trained at (default: its config's sample_frames). rope: also
    take the rotary embedding's frame angles at the interpolated positions."""

    name = "position-interpolation"

    def __init__(self, trained_frames: int | None = None, rope: bool = True):
        if trained_frames is not None and int(trained_frames) < 2:
            raise ValueError(f"{self.name}: trained_frames must be at least 2, got {trained_frames}")
        self.trained_frames, self.rope = trained_frames, bool(rope)
        self._hooks, self._saved = [], {}

    def begin(self, pipeline, num_inference_steps: int) -> None:
        transformer = pipeline.transformer
        if not hasattr(getattr(transformer, "rope", None), "t_dim") or "sample_frames" not in transformer.config:
            raise ValueError(f"{self.name} needs this project's VideoDiT (per-frame tables, a rotary embedding and "
                             f"the frames it was trained at), got {type(transformer).__name__}")
        if isinstance(transformer, BlockVideoDiT):  # a chunk-by-chunk model takes any length as it is
            raise ValueError(f"{self.name} does not support chunk-by-chunk (block-causal) models")
        config = transformer.config
        trained = self.trained_frames or config.sample_frames
        self._trained = math.ceil(trained / config.patch_size[0])
        self._hooks = [transformer.register_forward_pre_hook(self._swap_in, with_kwargs=True),
                       transformer.register_forward_hook(self._swap_out, always_call=True)]

    def _swap_in(self, transformer, args, kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        frames = latents.shape[2] // transformer.config.patch_size[0]
        if frames <= self._trained:
            return None
        with torch.no_grad():
            parameters = dict(transformer.named_parameters())
            for name in FRAME_TABLES:
                if name in parameters:  # each table only where the config switched it on
                    table = parameters[name]
                    self._saved[name] = table.data[:frames].clone()
                    table.data[:frames] = interpolated_rows(table.data, self._trained, frames)
            if self.rope:
                rope = transformer.rope
                self._saved["rope"] = (rope.freqs_cos, rope.freqs_sin)
                cos, sin = rope.freqs_cos.clone(), rope.freqs_sin.clone()
                cos[:frames, :rope.t_dim], sin[:frames, :rope.t_dim] = interpolated_rope(
                    rope.freqs_cos[:, :rope.t_dim], rope.freqs_sin[:, :rope.t_dim], self._trained, frames)
                rope.freqs_cos, rope.freqs_sin = cos, sin
        return None

    def _swap_out(self, transformer, args, output):
        with torch.no_grad():
            for name, rows in self._saved.items():
                if name == "rope":
                    transformer.rope.freqs_cos, transformer.rope.freqs_sin = rows
                else:
                    transformer.get_parameter(name).data[:len(rows)] = rows
        self._saved = {}
        return output

    def end(self, pipeline) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

