"""Rendering clip specs into pixels, batched in torch.

All geometry is fixed at a 32x32, 16-frame reference and scales with the
requested size: radii with the shorter image side, travel with the image
extent along the motion, and travel is spread over however many frames the
clip has. Every object is kept fully inside the frame on every frame. Two
objects of one clip are placed so their boxes stay apart on every frame (in
the very rare clip where no draw manages that, the furthest-apart draw is
kept). Shapes stay readable from 32x32 up; at 16x16 they are only a few
pixels across.

Shapes are drawn from signed distances with a one-pixel soft edge, so motion
below a pixel per frame still shows as a smooth change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .captions import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, ClipSpec

# RGB 0..255. Object colours are at least ~110 apart from each other and
# from every background, so a reader can tell them apart by nearest colour.
OBJECT_RGB = {
    "red": (225, 30, 30),
    "green": (30, 175, 40),
    "blue": (40, 70, 235),
    "yellow": (245, 230, 30),
    "purple": (150, 35, 200),
    "orange": (255, 130, 0),
    "cyan": (10, 215, 230),
}
BACKGROUND_RGB = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}

REFERENCE_SIZE = 32
LINEAR_RADIUS = (4.0, 6.0)  # half-size of still and linearly moving objects at the reference size
GROWN_RADIUS = (5.8, 7.0)  # larger end of a growing or shrinking object
# Whole-clip travel as a fraction of the image extent: at 32 px over 16 frames
# this is 0.55 px/frame (slow) and 1.1 px/frame (fast).
TRAVEL = {"slow": 0.258, "fast": 0.516}
GROWTH = {"slow": 1.8, "fast": 2.4}  # radius ratio between the small and the large end
TRAVEL_JITTER = 0.1
GROWTH_JITTER = 0.04
TWO_OBJECT_SCALE = 0.85  # two objects are drawn a little smaller so both always fit
EDGE_MARGIN = 1.0  # px at the reference size between any object and the frame edge
OBJECT_GAP = 1.0  # px at the reference size between two objects on every frame
PLACEMENT_TRIES = 128  # crossing fast paths need many draws to find a timing that misses

_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass
class Layout:
    """Per-object geometry of a batch: tensors of shape (B, K, T) in pixels."""

    centre_x: torch.Tensor
    centre_y: torch.Tensor
    radius: torch.Tensor
    present: torch.Tensor  # (B, K) bool; clips with fewer objects are padded


def _spec_table(specs: list[ClipSpec]):
    """Per-object categorical fields as (B, K) tensors; padding objects are absent."""
    slots = max(len(spec.objects) for spec in specs)
    fields = {name: torch.zeros(len(specs), slots, dtype=torch.long)
              for name in ("colour", "shape", "motion", "fast")}
    present = torch.zeros(len(specs), slots, dtype=torch.bool)
    for b, spec in enumerate(specs):
        for k, obj in enumerate(spec.objects):
            fields["colour"][b, k] = COLOURS.index(obj.colour)
            fields["shape"][b, k] = SHAPES.index(obj.shape)
            fields["motion"][b, k] = MOTIONS.index(obj.motion)
            fields["fast"][b, k] = int(obj.speed == "fast")
            present[b, k] = True
    return fields, present


def sample_layout(specs: list[ClipSpec], frames: int, height: int, width: int,
                  generator: torch.Generator | None = None) -> Layout:
    """Seeded sizes, speeds and start positions for every object of every clip.

    Each clip draws ``PLACEMENT_TRIES`` candidate placements at once; the
    first whose objects stay apart on every frame is kept.
    """
    fields, present = _spec_table(specs)
    batch, slots = present.shape
    scale = min(height, width) / REFERENCE_SIZE
    rand_device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(4, batch, PLACEMENT_TRIES, slots, generator=generator, device=rand_device).cpu()
    u_size, u_rate, u_x, u_y = draws

    motion = fields["motion"][:, None, :]
    fast = fields["fast"][:, None, :].bool()
    size_scale = scale * torch.where(present.sum(1, keepdim=True) > 1, TWO_OBJECT_SCALE, 1.0)[:, :, None]

    linear_radius = LINEAR_RADIUS[0] + (LINEAR_RADIUS[1] - LINEAR_RADIUS[0]) * u_size
    large_radius = GROWN_RADIUS[0] + (GROWN_RADIUS[1] - GROWN_RADIUS[0]) * u_size
    growth = torch.where(fast, GROWTH["fast"], GROWTH["slow"]) * (1 + GROWTH_JITTER * (2 * u_rate - 1))
    grows = motion == MOTIONS.index("grow")
    shrinks = motion == MOTIONS.index("shrink")
    start_radius = torch.where(grows, large_radius / growth, torch.where(shrinks, large_radius, linear_radius))
    end_radius = torch.where(grows, large_radius, torch.where(shrinks, large_radius / growth, linear_radius))
    start_radius, end_radius = start_radius * size_scale, end_radius * size_scale

    travel = torch.where(fast, TRAVEL["fast"], TRAVEL["slow"]) * (1 + TRAVEL_JITTER * (2 * u_rate - 1))
    unit_x = torch.zeros(len(MOTIONS))
    unit_y = torch.zeros(len(MOTIONS))
    for name, (dx, dy) in _DIRECTIONS.items():
        unit_x[MOTIONS.index(name)], unit_y[MOTIONS.index(name)] = dx, dy
    shift_x = unit_x[motion] * travel * width
    shift_y = unit_y[motion] * travel * height

    margin = EDGE_MARGIN * scale

    def start_centre(u, shift, extent):
        # The path is linear, so it fits if both its ends fit.
        low = torch.maximum(margin + start_radius, margin + end_radius - shift)
        high = torch.minimum(extent - margin - start_radius, extent - margin - end_radius - shift)
        return low + u * (high - low).clamp(min=0)

    x0, y0 = start_centre(u_x, shift_x, width), start_centre(u_y, shift_y, height)
    progress = torch.linspace(0, 1, frames) if frames > 1 else torch.zeros(1)
    centre_x = x0[..., None] + shift_x[..., None] * progress  # (B, tries, K, T)
    centre_y = y0[..., None] + shift_y[..., None] * progress
    radius = start_radius[..., None] + (end_radius - start_radius)[..., None] * progress

    return separated_try(centre_x, centre_y, radius, present, scale)


def separated_try(centre_x, centre_y, radius, present, scale) -> Layout:
    """Of (B, tries, K, T) paths, each clip's first try whose two objects keep OBJECT_GAP apart in every frame; if
    none does, the one that keeps them furthest apart."""
    batch, slots = centre_x.shape[0], centre_x.shape[2]
    if slots > 1:
        reach = radius[:, :, 0] + radius[:, :, 1]
        apart = torch.maximum((centre_x[:, :, 0] - centre_x[:, :, 1]).abs() - reach,
                              (centre_y[:, :, 0] - centre_y[:, :, 1]).abs() - reach)
        closest = torch.where(present[:, None, 1, None], apart, torch.inf).amin(-1)  # (B, tries)
        ok = closest >= OBJECT_GAP * scale
        choice = torch.where(ok.any(1), ok.int().argmax(1), closest.argmax(1))
    else:
        choice = torch.zeros(batch, dtype=torch.long)
    rows = torch.arange(batch)
    return Layout(centre_x[rows, choice], centre_y[rows, choice], radius[rows, choice], present)


def _circle(dx, dy, r):
    return torch.sqrt(dx**2 + dy**2) - r


def _square(dx, dy, r):
    return torch.maximum(dx.abs(), dy.abs()) - r


def _triangle(dx, dy, r):
    # Isosceles, pointing up, filling half of its 2r box: apex at (0, -r),
    # base from (-r, r) to (r, r).
    return torch.maximum(dy - r, (2 * dx.abs() - dy - r) / math.sqrt(5))


# Signed distance (negative inside) from pixel offsets to each shape.
_SIGNED_DISTANCES = {"circle": _circle, "square": _square, "triangle": _triangle}


def _rgb_table(names, table, device):
    return torch.tensor([table[n] for n in names], dtype=torch.float32, device=device) / 127.5 - 1


def render(specs: list[ClipSpec], frames: int = 16, height: int = 32, width: int = 32,
           generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Clips of shape (B, 3, T, H, W) with values in [-1, 1], deterministic given the generator."""
    if min(height, width) < 16:
        raise ValueError("the world needs images of at least 16x16 pixels")
    layout = sample_layout(specs, frames, height, width, generator)
    fields, present = _spec_table(specs)  # cheap; keeps sample_layout's result plain geometry
    device = torch.device(device)
    # Work on the flat list of real objects (no padding), one shape at a time,
    # so each pixel distance is computed once per object.
    clip_index, slot = present.nonzero(as_tuple=True)
    cx, cy, r = (t[clip_index, slot].to(device)[..., None, None]
                 for t in (layout.centre_x, layout.centre_y, layout.radius))  # (N, T, 1, 1)
    shapes = fields["shape"][clip_index, slot]
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] + 0.5
    coverage = torch.empty(len(shapes), frames, height, width, device=device)
    for shape_index, shape_name in enumerate(SHAPES):
        signed_distance = _SIGNED_DISTANCES[shape_name]
        chosen = (shapes == shape_index).nonzero(as_tuple=True)[0]
        if len(chosen):
            chosen_dev = chosen.to(device)
            distance = signed_distance(xs - cx[chosen_dev], ys - cy[chosen_dev], r[chosen_dev])
            coverage[chosen_dev] = (0.5 - distance).clamp(0, 1)

    colours = _rgb_table(COLOURS, OBJECT_RGB, device)[fields["colour"][clip_index, slot].to(device)]
    background_index = torch.tensor([BACKGROUNDS.index(s.background) for s in specs], device=device)
    backgrounds = _rgb_table(BACKGROUNDS, BACKGROUND_RGB, device)[background_index]  # (B, 3)
    clip_index = clip_index.to(device)
    # Objects never overlap, so compositing is a plain weighted sum.
    covered = torch.zeros(len(specs), frames, height, width, device=device)
    covered.index_add_(0, clip_index, coverage)
    video = backgrounds[:, :, None, None, None] * (1 - covered.clamp(max=1))[:, None]
    video.index_add_(0, clip_index, coverage[:, None] * colours[:, :, None, None, None])
    return video.clamp(-1, 1)
