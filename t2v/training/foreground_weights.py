"""Per-pixel loss weights that count the objects of a clip more than its plain background.

Objects cover about a tenth of a world clip (4 to 22% of its pixels on 512 training clips), and a shape differs
from another only along its outline, so with a plain mean over pixels the background's noise dominates the
flow-matching loss. Weighting every pixel the object covers, plus a one-pixel ring around it (where circle, square
and triangle differ), by ``weight`` moves the model's capacity to what the caption describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A world background is one flat colour; anything this far from it (in [-1, 1] units, any channel) is object.
OBJECT_THRESHOLD = 0.1


def foreground_weights(videos: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, T, H, W) weights for (B, C, T, H, W) clips in [-1, 1]: ``weight`` on and next to objects, 1 elsewhere,
    scaled so that each clip's weights average 1 (the loss keeps its scale)."""
    batch, channels = videos.shape[:2]
    background = videos.reshape(batch, channels, -1).median(-1).values.view(batch, channels, 1, 1, 1)
    objects = ((videos - background).abs().amax(1, keepdim=True) > OBJECT_THRESHOLD).float()
    near_objects = F.max_pool3d(objects, kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1))
    weights = 1 + (weight - 1) * near_objects
    return weights / weights.mean((2, 3, 4), keepdim=True)
