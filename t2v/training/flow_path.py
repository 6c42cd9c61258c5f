"""The rectified-flow path that training regresses on, shared by the student and a distillation teacher, and the
training times drawn along it."""

from __future__ import annotations

import torch


def path_velocity(transformer, text, text_mask, videos, t, noise) -> torch.Tensor:
    """The transformer's velocity at x_t = (1 - t) * video + t * noise, timestep 1000 * t (diffusers' convention).

    t: one time per clip (B,), or one per frame (B, F) for a block-causal model trained with diffusion forcing."""
    tt = t[:, None, :, None, None] if t.ndim == 2 else t.view(-1, 1, 1, 1, 1)
    return transformer((1 - tt) * videos + tt * noise, t * 1000, text, text_mask).sample


def sample_timesteps(batch: int, generator: torch.Generator, device, shift: float,
                     uniform_share: float = 0.1, low: float = 0.0) -> torch.Tensor:
    """Times in (low, 1), 1 = pure noise: shifted logit-normal, with a share drawn uniformly to cover both ends.

    Logit-normal times concentrate training on the middle of the path, where the velocity is hardest to predict.
    The shift moves them toward noise: a clip's global layout (background, where objects are and which way they
    go) is averaged over thousands of pixels, so it is already decided at noise levels that plain logit-normal
    times almost never reach. Sampling uses the same shift (the scheduler's `shift`).
    """
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    uniform = torch.rand(batch, generator=generator, device=device)
    pick_uniform = torch.rand(batch, generator=generator, device=device) < uniform_share
    t = torch.where(pick_uniform, uniform, t)
    t = shift * t / (1 + (shift - 1) * t)
    return low + (1 - low) * t  # the same shape of distribution, squeezed into [low, 1)

