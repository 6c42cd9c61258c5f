"""A frozen dense teacher for fine-tuning with sparse attention.

Fine-tuning on the data alone lets a sparse model draw clips of its own: as good, maybe, but not the dense model's
clips from the same seed. Regressing onto the dense model's velocity instead pulls it toward the dense model's paths.
"""

from __future__ import annotations

import torch

from t2v.training.flow_path import path_velocity


class DenseTeacher(torch.nn.Module):
    """A text encoder and transformer, frozen, with the attention they have when handed over.

    Hand it copies of the student's models made before a sparse method is installed in them, or models loaded for it.
    """

    def __init__(self, text_encoder: torch.nn.Module, transformer: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.transformer = transformer.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, input_ids, text_mask, videos, t, noise) -> torch.Tensor:
        """The teacher's velocity on the student's inputs (the same noisy videos and times as the flow loss)."""
        return path_velocity(self.transformer, self.text_encoder(input_ids, text_mask), text_mask, videos, t, noise)


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


def guidance_pairs(half: int, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first ``half`` clips of each tensor, twice: the student and teacher see each noisy clip once with its
    caption and once without, so that their classifier-free-guided velocities can be compared."""
    return tuple(torch.cat([x[:half], x[:half]]) for x in batch)


def guided_error(error: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The error of the guided velocity u + s * (c - u) for a batch laid out [captioned half; uncaptioned half],
    divided by s so that it is on the scale of one velocity's error.

    Sampling with guidance scale s moves along s * c - (s - 1) * u, so the student's errors on the two passes count
    s and s - 1 times there, and opposite errors cancel; fitting each pass alone weighs neither fact.
    """
    captioned, uncaptioned = error.chunk(2)
    return captioned - (1 - 1 / guidance_scale) * uncaptioned
