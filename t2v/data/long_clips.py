"""Long clips of the video world (64 frames and more), for generating video chunk by chunk.

Objects move at the per-frame speed of the 16-frame world (``render``) for as
long as the clip lasts: a moving object bounces off the reachable edge of the
frame instead of leaving it, and a growing or shrinking object bounces its
radius between the world's small and large size. An object may chain motions
("moves right, then up"): each motion holds one segment of the clip
(``segment_bounds``), and at a segment's start the object carries on from
where it is, in the new motion's direction. A clip's first 16 frames are drawn as the 16-frame world draws
its clips (the start leaves room for their travel), so a long clip opens as a short one does.

``LongVideoWorld.sample_windows`` cuts windows out of long clips, each chunk
captioned with the single motion of its segment: what a block model trains on.
"""

from __future__ import annotations

import dataclasses

import torch

from .captions import (BACKGROUNDS, CHAIN_MOTIONS, COLOURS, MOTIONS, SHAPES, SPEEDS, ClipSpec, ObjectSpec,
                       as_python_rng, canonical_caption, caption, segment_bounds)
from .render import (_DIRECTIONS, _SIGNED_DISTANCES, BACKGROUND_RGB, EDGE_MARGIN, GROWN_RADIUS, GROWTH,
                     GROWTH_JITTER, LINEAR_RADIUS, OBJECT_RGB, PLACEMENT_TRIES, REFERENCE_SIZE,
                     TRAVEL, TRAVEL_JITTER, TWO_OBJECT_SCALE, Layout, _rgb_table, _spec_table, separated_try)
from .world import HELD_OUT_COLOUR_MOTION, SPLITS, _object_is_held_out, draw_objects

REFERENCE_STEPS = 15  # frame steps of the 16-frame world, over which TRAVEL and GROWTH are spread


def _frame_motions(specs: list[ClipSpec], frames: int, chunk_frames: int):
    """(B, K, T) motion index of each object on each frame, and (B, K, T) True where a segment starts."""
    slots = max(len(spec.objects) for spec in specs)
    motion = torch.zeros(len(specs), slots, frames, dtype=torch.long)
    starts = torch.zeros(len(specs), slots, frames, dtype=torch.bool)
    for b, spec in enumerate(specs):
        for k, obj in enumerate(spec.objects):
            bounds = segment_bounds(frames, len(obj.motions), chunk_frames) if obj.then else [(0, frames)]
            for name, (start, stop) in zip(obj.motions, bounds):
                motion[b, k, start:stop] = MOTIONS.index(name)
                starts[b, k, start] = True
    return motion, starts


def _bounce(position, sign, low, high):
    """Reflect positions past ``low`` or ``high`` back inside, turning their direction round."""
    over, under = position > high, position < low
    position = torch.where(over, 2 * high - position, torch.where(under, 2 * low - position, position))
    return position, torch.where(over | under, -sign, sign)


def long_layout(specs: list[ClipSpec], frames: int, height: int, width: int,
                generator: torch.Generator | None = None, chunk_frames: int = 4) -> Layout:
    """Seeded geometry of whole long clips, (B, K, T) in pixels, drawn as ``render.sample_layout`` draws it.

    Each clip draws ``PLACEMENT_TRIES`` candidate placements; the first whose
    objects stay apart on every frame is kept, else the furthest-apart one.
    """
    fields, present = _spec_table(specs)
    batch, slots = present.shape
    scale = min(height, width) / REFERENCE_SIZE
    rand_device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(4, batch, PLACEMENT_TRIES, slots, generator=generator, device=rand_device).cpu()
    u_size, u_rate, u_x, u_y = draws

    motion = fields["motion"][:, None, :]  # the first motion; chains never change size
    fast = fields["fast"][:, None, :].bool()
    size_scale = scale * torch.where(present.sum(1, keepdim=True) > 1, TWO_OBJECT_SCALE, 1.0)[:, :, None]
    linear_radius = (LINEAR_RADIUS[0] + (LINEAR_RADIUS[1] - LINEAR_RADIUS[0]) * u_size) * size_scale
    large = (GROWN_RADIUS[0] + (GROWN_RADIUS[1] - GROWN_RADIUS[0]) * u_size) * size_scale
    growth = torch.where(fast, GROWTH["fast"], GROWTH["slow"]) * (1 + GROWTH_JITTER * (2 * u_rate - 1))
    grows, shrinks = motion == MOTIONS.index("grow"), motion == MOTIONS.index("shrink")
    sized = grows | shrinks
    radius_low = torch.where(sized, large / growth, linear_radius)
    radius_high = torch.where(sized, large, linear_radius)
    radius_step = (radius_high - radius_low) / REFERENCE_STEPS
    travel = torch.where(fast, TRAVEL["fast"], TRAVEL["slow"]) * (1 + TRAVEL_JITTER * (2 * u_rate - 1))

    margin = EDGE_MARGIN * scale
    x_low, x_high = margin + radius_high, width - margin - radius_high
    y_low, y_high = margin + radius_high, height - margin - radius_high
    radius = torch.where(grows, radius_low, radius_high)
    sign_r = torch.where(grows, 1.0, torch.where(shrinks, -1.0, 0.0))

    unit_x, unit_y = torch.zeros(len(MOTIONS)), torch.zeros(len(MOTIONS))
    for name, (dx, dy) in _DIRECTIONS.items():
        unit_x[MOTIONS.index(name)], unit_y[MOTIONS.index(name)] = dx, dy
    # The start is drawn as the 16-frame world draws it: where the first 16 frames' travel fits, so that a long
    # clip opens as a short one does and its first chunks move the way the caption says (an object that started
    # at the far edge would turn round at once). Across the motion, and for still objects, anywhere it fits.
    shift_x = unit_x[motion] * travel * width
    shift_y = unit_y[motion] * travel * height
    x = x_low + shift_x.clamp(max=0).neg() + u_x * (x_high - x_low - shift_x.abs()).clamp(min=0)
    y = y_low + shift_y.clamp(max=0).neg() + u_y * (y_high - y_low - shift_y.abs()).clamp(min=0)
    frame_motion, segment_start = _frame_motions(specs, frames, chunk_frames)
    sign_x, sign_y = unit_x[frame_motion[:, None, :, 0]], unit_y[frame_motion[:, None, :, 0]]
    xs, ys, radii = [x], [y], [radius]
    for t in range(1, frames):
        # The step into frame t moves the way frame t's segment says.
        new = segment_start[:, None, :, t]
        sign_x = torch.where(new, unit_x[frame_motion[:, None, :, t]], sign_x)
        sign_y = torch.where(new, unit_y[frame_motion[:, None, :, t]], sign_y)
        x, sign_x = _bounce(x + sign_x * travel * width / REFERENCE_STEPS, sign_x, x_low, x_high)
        y, sign_y = _bounce(y + sign_y * travel * height / REFERENCE_STEPS, sign_y, y_low, y_high)
        radius, sign_r = _bounce(radius + sign_r * radius_step, sign_r, radius_low, radius_high)
        xs.append(x), ys.append(y), radii.append(radius)
    centre_x, centre_y, radius = torch.stack(xs, -1), torch.stack(ys, -1), torch.stack(radii, -1)

    return separated_try(centre_x, centre_y, radius, present, scale)


def render_long(specs: list[ClipSpec], frames: int, height: int = 32, width: int = 32,
                generator: torch.Generator | None = None, device="cpu", chunk_frames: int = 4,
                start_frame: int | list[int] = 0, num_frames: int | None = None) -> torch.Tensor:
    """Frames [start_frame, start_frame + num_frames) of ``frames``-long clips: (B, 3, T, H, W) in [-1, 1].

    Deterministic given the generator; any window holds the same pixels as the
    whole clip sliced. ``start_frame`` may also be one start per clip.
    """
    if min(height, width) < 16:
        raise ValueError("the world needs images of at least 16x16 pixels")
    num_frames = frames if num_frames is None else num_frames
    starts = torch.as_tensor(start_frame, dtype=torch.long).expand(len(specs))
    if num_frames < 1 or starts.min() < 0 or starts.max() + num_frames > frames:
        raise ValueError(f"frames {start_frame}..+{num_frames} are not inside a clip of {frames} frames")
    layout = long_layout(specs, frames, height, width, generator, chunk_frames)
    fields, present = _spec_table(specs)
    device = torch.device(device)
    clip_index, slot = present.nonzero(as_tuple=True)
    shown = (starts[:, None] + torch.arange(num_frames))[clip_index]  # (N, num_frames)
    cx, cy, r = (t[clip_index, slot].gather(1, shown).to(device)[..., None, None]
                 for t in (layout.centre_x, layout.centre_y, layout.radius))  # (N, T, 1, 1)
    shapes = fields["shape"][clip_index, slot]
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] + 0.5
    coverage = torch.empty(len(shapes), num_frames, height, width, device=device)
    for shape_index, shape_name in enumerate(SHAPES):
        chosen = (shapes == shape_index).nonzero(as_tuple=True)[0].to(device)
        if len(chosen):
            distance = _SIGNED_DISTANCES[shape_name](xs - cx[chosen], ys - cy[chosen], r[chosen])
            coverage[chosen] = (0.5 - distance).clamp(0, 1)

    colours = _rgb_table(COLOURS, OBJECT_RGB, device)[fields["colour"][clip_index, slot].to(device)]
    background_index = torch.tensor([BACKGROUNDS.index(s.background) for s in specs], device=device)
    backgrounds = _rgb_table(BACKGROUNDS, BACKGROUND_RGB, device)[background_index]
    video = backgrounds[:, :, None, None, None].expand(-1, -1, num_frames, height, width).clone()
    # Long paths may cross: later objects are laid over earlier ones, so an overlap shows one colour.
    for k in range(present.shape[1]):
        mine = (slot == k).nonzero(as_tuple=True)[0].to(device)
        clips, cover = clip_index.to(device)[mine], coverage[mine][:, None]
        video[clips] = video[clips] * (1 - cover) + cover * colours[mine][:, :, None, None, None]
    return video.clamp(-1, 1)


def _chained_object(rng, first: ObjectSpec, split: str, max_chain: int) -> ObjectSpec:
    """``first`` (its colour and shape) with 2..max_chain linear or still motions, neighbours different."""
    # A held-out colour-motion pair stays in the chain, so the clip stays held out.
    held = next((m for m in first.motions if (first.colour, m) in HELD_OUT_COLOUR_MOTION), None)
    segments = rng.randint(2, max_chain)
    while True:
        motions = [rng.choice(CHAIN_MOTIONS)]
        while len(motions) < segments:
            motions.append(rng.choice([m for m in CHAIN_MOTIONS if m != motions[-1]]))
        chained = ObjectSpec(first.colour, first.shape, motions[0], first.speed or rng.choice(SPEEDS),
                             tuple(motions[1:]))
        if split == "heldout" and held is not None and held not in motions:
            continue
        if split == "train" and _object_is_held_out(chained):
            continue
        return chained


def sample_long_specs(n: int, generator=None, split: str = "train", two_object_prob: float = 0.2,
                      chain_prob: float = 0.3, max_chain: int = 3) -> list[ClipSpec]:
    """``n`` long-clip specs: as ``world.sample_specs``, and with ``chain_prob`` a one-object clip
    chains 2..max_chain motions. Held-out rules apply to every motion of a chain."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if chain_prob > 0 and max_chain < 2:
        raise ValueError(f"a chain has at least 2 motions, got max_chain={max_chain}")
    rng = as_python_rng(generator)
    specs = []
    for _ in range(n):
        objects = draw_objects(rng, split, two_object_prob)
        if len(objects) == 1 and rng.random() < chain_prob:
            objects = [_chained_object(rng, objects[0], split, max_chain)]
        specs.append(ClipSpec(tuple(objects), rng.choice(BACKGROUNDS)))
    return specs


def segment_spec(spec, segment: int):
    """The clip (a ClipSpec or CaptionSpec) as it is during one segment: each object with that
    segment's single motion (an object with fewer motions keeps its last)."""
    objects = []
    for obj in spec.objects:
        motion = obj.motions[min(segment, len(obj.motions) - 1)]
        speed = None if motion == "still" else obj.speed
        objects.append(dataclasses.replace(obj, motion=motion, speed=speed, then=()))
    return dataclasses.replace(spec, objects=tuple(objects))


class LongVideoWorld:
    """An endless source of long clips, whole (``sample``) or as captioned windows (``sample_windows``)."""

    def __init__(self, frames: int = 64, height: int = 32, width: int = 32, split: str = "train",
                 two_object_prob: float = 0.2, chain_prob: float = 0.3, chunk_frames: int = 4, device="cpu"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        segment_bounds(frames, 1, chunk_frames)  # checks frames is a whole number of chunks
        self.frames, self.height, self.width, self.split = frames, height, width, split
        self.two_object_prob, self.chain_prob = two_object_prob, chain_prob
        self.chunk_frames, self.device = chunk_frames, device

    def _specs(self, batch_size: int, rng) -> list[ClipSpec]:
        return sample_long_specs(batch_size, rng, self.split, self.two_object_prob, self.chain_prob)

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        """Videos (B, 3, frames, H, W) in [-1, 1], one chained paraphrase per clip, and the specs."""
        rng = as_python_rng(generator)
        specs = self._specs(batch_size, rng)
        captions = [caption(spec, rng) for spec in specs]
        videos = render_long(specs, self.frames, self.height, self.width, generator, self.device,
                             self.chunk_frames)
        return videos, captions, specs

    def sample_windows(self, batch_size: int, generator: torch.Generator | None = None,
                       window_frames: int = 16, start_share: float = 0.35):
        """Windows of long clips: videos (B, 3, window_frames, H, W), each chunk's caption, and the offsets.

        A window starts at frame 0 with probability ``start_share`` (so clip
        openings are well covered), else at a random later chunk boundary.
        Chunk j is captioned with one paraphrase of the motion of the segment
        holding its first frame, shared by the segment's chunks.
        """
        chunk = self.chunk_frames
        if window_frames % chunk or not 0 < window_frames <= self.frames:
            raise ValueError(f"window_frames must be a multiple of {chunk} up to {self.frames}, got {window_frames}")
        rng = as_python_rng(generator)
        specs = self._specs(batch_size, rng)
        later_starts = (self.frames - window_frames) // chunk
        offsets = [0 if later_starts == 0 or rng.random() < start_share else chunk * rng.randint(1, later_starts)
                   for _ in specs]
        chunk_captions = []
        for spec, offset in zip(specs, offsets):
            bounds = segment_bounds(self.frames, max(len(o.motions) for o in spec.objects), chunk)
            texts: dict[int, str] = {}
            for first in range(offset, offset + window_frames, chunk):
                segment = next(s for s, (start, stop) in enumerate(bounds) if start <= first < stop)
                if segment not in texts:
                    texts[segment] = caption(segment_spec(spec, segment), rng)
                chunk_captions.append(texts[segment])
        per_clip = window_frames // chunk
        chunk_captions = [chunk_captions[i:i + per_clip] for i in range(0, len(chunk_captions), per_clip)]
        videos = render_long(specs, self.frames, self.height, self.width, generator, self.device, chunk,
                             start_frame=offsets, num_frames=window_frames)
        return videos, chunk_captions, offsets


def long_prompt_suite(split: str = "heldout", n_prompts: int = 200, seed: int = 0,
                      chain_prob: float = 0.3) -> list[tuple[str, ClipSpec]]:
    """A fixed evaluation list of (canonical caption, spec) for long clips; chained ones included."""
    # Its own seed stream: the short suite's prompts are not a prefix of these.
    rng = as_python_rng(seed * 1000 + SPLITS.index(split) + 71)
    specs = sample_long_specs(n_prompts, rng, split, 0.2, chain_prob)
    return [(canonical_caption(spec), spec) for spec in specs]
