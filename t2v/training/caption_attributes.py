"""An auxiliary training loss that keeps every attribute a caption states apart in the text encoder's output.

The text encoder is trained only through the transformer's loss. An attribute the transformer has not learned to
use yet (which way a motion goes: "left" against "right") then gets almost no gradient, and the encoder maps its
words to nearly the same features (6% apart after 16,000 steps, against 20% for two colours), so the transformer
has nothing to learn from either. A linear head that reads the stated attributes back from the pooled caption
breaks that deadlock: the features must keep every attribute apart. The head is used only in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2v.data import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SPEEDS, parse_caption
from t2v.models.video_dit import pool_caption

ATTRIBUTE_VALUES = (
    [f"colour:{c}" for c in COLOURS] + [f"shape:{s}" for s in SHAPES] + [f"motion:{m}" for m in MOTIONS]
    + [f"speed:{s}" for s in SPEEDS] + [f"background:{b}" for b in BACKGROUNDS]
)
_INDEX = {value: i for i, value in enumerate(ATTRIBUTE_VALUES)}


def attribute_targets(captions: list[str]) -> torch.Tensor:
    """(B, len(ATTRIBUTE_VALUES)) multi-hot: every value the caption states, for any of its objects or the background.

    Read from the caption, not from the clip: paraphrases leave out the background or the speed half of the time,
    and a value the words do not state cannot be read back from them.
    """
    targets = torch.zeros(len(captions), len(ATTRIBUTE_VALUES))
    for row, caption in enumerate(captions):
        stated = parse_caption(caption)
        if stated.background is not None:
            targets[row, _INDEX[f"background:{stated.background}"]] = 1
        for obj in stated.objects:
            for name in ("colour", "shape", "motion", "speed"):
                value = getattr(obj, name)
                if value is not None:
                    targets[row, _INDEX[f"{name}:{value}"]] = 1
    return targets


class CaptionAttributeHead(nn.Module):
    """Reads the stated attributes back from the caption's pooled features, pooled as the transformer pools them."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, len(ATTRIBUTE_VALUES))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, targets: torch.Tensor,
                stated: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy over the clips whose caption was kept (`stated`, (B,): 1 kept, 0 dropped); 0 if none
        was."""
        logits = self.classifier(pool_caption(text, text_mask).float())
        per_clip = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)
        return (per_clip * stated).sum() / stated.sum().clamp(min=1)
