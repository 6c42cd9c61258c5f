"""Fourier-based motion enhancement (BroadWay): amplify the high-frequency part of the temporal attention map.

BroadWay observed that the energy of the temporal attention map (the mean over rows of the sum of squared
weights) tracks how much a clip moves: a flat map averages every frame with every other, a peaked one lets frames
differ. So each row (one query's weights over the key frames) is split by a Fourier transform along the key frames
and its high-frequency components are scaled by beta > 1, which raises the energy while the row's sum, the DC
component, stays 1. When temporal self-guidance acted first and lowered the energy, beta is raised to at least
the value that restores the energy the layer had before any edit: beta_c = sqrt((E_before - E_low) / E_high).
The band split is linear, so it is applied as one small real matrix (the inverse transform of the masked
spectrum of each unit row) rather than a complex transform of every row.
Here the rows are the frame masses of each query token of a DiT layer (see `temporal_maps`); energies are
per clip (so a clip does not depend on what else is in its batch), averaged over heads and tokens.
"""

from __future__ import annotations

import functools

import torch

from t2v.guidance.temporal_maps import TemporalMapGuidance


@functools.lru_cache(maxsize=32)
def high_pass(frames: int, split: int, device: str = "cpu") -> torch.Tensor:
    """(frames, frames) real matrix P with `rows @ P` the part of each row made of frequencies >= `split`
    (cycles per clip): an orthogonal projection, so the energy splits as |rows @ P|^2 + |rows - rows @ P|^2."""
    spectrum = torch.fft.rfft(torch.eye(frames, dtype=torch.float64), dim=-1)
    keep = torch.arange(spectrum.shape[-1]) >= split
    return torch.fft.irfft(spectrum * keep, n=frames, dim=-1).float().to(device)


def map_energy(maps: torch.Tensor) -> torch.Tensor:
    """Per-clip energy (B,): the mean over heads and query tokens of the sum of squared frame masses."""
    return (maps.float() ** 2).sum(-1).mean((1, 2))


class FourierMotionEnhancement(TemporalMapGuidance):
    """strength: beta - 1 (0: off; BroadWay's beta = 1.5 is 0.5). split: the lowest frequency, in cycles per clip,
    counted as high (1: every component but the mean; BroadWay's tau on F frames is split = F/2 - tau).
    layers: the self-attention layers it acts in (default: the early ones after the first, 1 to 3 of 8).
    steps: the share of steps it acts in, from the first (or step indices). sparse_calls: see `temporal_maps`."""

    name = "fourier-motion"
    order = 1  # after temporal self-guidance, whose loss of energy it makes up

    def __init__(self, strength: float = 0.5, split: int = 1, layers=None, steps=0.2, sparse_calls: str = "skip"):
        if int(split) < 1:
            raise ValueError(f"{self.name}: split must be at least 1 (the mean is never amplified), got {split}")
        super().__init__(strength, layers, steps, sparse_calls)
        self.split = int(split)

    def default_layers(self, num_layers: int) -> list[int]:
        # The early layers after the first (1 to 3 of 8): on the embedded model they keep most of the motion gain
        # of acting in every later layer at about a third of the time (docs/benchmarks.md, guidance).
        return list(range(1, max(2, 1 + 3 * num_layers // 8))) if num_layers > 1 else [0]

    def edit(self, layer: int, target: torch.Tensor, original: torch.Tensor, maps: dict) -> torch.Tensor:
        frames = target.shape[-1]
        if self.split > frames // 2:
            return target  # no frequency that high along this many frames
        high = target @ high_pass(frames, self.split, str(target.device))
        high_energy, low_energy = map_energy(high), map_energy(target - high)
        compensate = ((map_energy(original) - low_energy).clamp(min=0) / high_energy.clamp(min=1e-20)).sqrt()
        beta = torch.clamp(compensate, min=1.0 + self.strength).view(-1, 1, 1, 1)
        rows = target + (beta - 1) * high
        # A large beta can push small weights below 0; masses must stay a distribution for the edit to be exact.
        rows = rows.clamp(min=0)
        return rows / rows.sum(-1, keepdim=True).clamp(min=1e-12)
