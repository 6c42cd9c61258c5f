"""The rectified-flow path that training regresses on, shared by the student and a distillation teacher."""

from __future__ import annotations

import torch


def path_velocity(transformer, text, text_mask, videos, t, noise) -> torch.Tensor:
    """The transformer's velocity at x_t = (1 - t) * video + t * noise, timestep 1000 * t (diffusers' convention)."""
    tt = t.view(-1, 1, 1, 1, 1)
    return transformer((1 - tt) * videos + tt * noise, t * 1000, text, text_mask).sample
