"""A frozen dense teacher for fine-tuning with sparse attention.

Fine-tuning on the data alone lets a sparse model draw clips of its own: as good, maybe, but not the dense model's
clips from the same seed. Regressing onto the dense model's velocity instead pulls it toward the dense model's paths.
"""

from __future__ import annotations

import copy

import torch


class DenseTeacher(torch.nn.Module):
    """A frozen copy of a text encoder and transformer, with the attention they had when copied.

    Copy before a sparse method is installed in the student, so the teacher keeps the model's own attention.
    """

    def __init__(self, text_encoder: torch.nn.Module, transformer: torch.nn.Module):
        super().__init__()
        self.text_encoder = copy.deepcopy(text_encoder).eval().requires_grad_(False)
        self.transformer = copy.deepcopy(transformer).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, input_ids, text_mask, videos, t, noise) -> torch.Tensor:
        """The teacher's velocity on the student's inputs (the same noisy videos and times as the flow loss)."""
        text = self.text_encoder(input_ids, text_mask)
        tt = t.view(-1, 1, 1, 1, 1)
        return self.transformer((1 - tt) * videos + tt * noise, t * 1000, text, text_mask).sample


def blended_target(videos: torch.Tensor, noise: torch.Tensor, teacher_velocity: torch.Tensor | None,
                   teacher_weight: float) -> torch.Tensor:
    """The regression target (1 - w) * (noise - videos) + w * teacher velocity.

    Its squared error differs from (1 - w) * flow loss + w * distillation loss by a constant only, so one target
    serves both and the pixel weights apply to both.
    """
    target = (noise - videos).float()
    if teacher_velocity is None or teacher_weight == 0:
        return target
    return torch.lerp(target, teacher_velocity.float(), teacher_weight)
