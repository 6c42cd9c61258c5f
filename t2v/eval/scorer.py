"""Reading clips of the video world back into words, without any learned model.

A clip is read by colour: the background is the median colour of the border
pixels, and each other pixel belongs to the nearest named object colour when
it is clearly away from the background and close to that colour. A colour
with enough pixels on most frames is an object. Its shape comes from how much
of its bounding box it fills, its motion and speed from straight-line fits of
its centroid and of the square root of its area over time.

Accepted clip forms (one helper, ``clip_frames``, turns them into
(T, H, W, 3) floats in [0, 1]):

* numpy array or torch tensor shaped (T, H, W, 3): uint8 in 0..255, or float in [0, 1];
* numpy array or torch tensor shaped (3, T, H, W): float in [-1, 1] (a model's
  output, one clip of a (B, 3, T, H, W) batch), or uint8 in 0..255.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from t2v.data import (BACKGROUND_RGB, COLOURS, OBJECT_RGB, CaptionSpec, ClipSpec, parse_caption)
from t2v.data.render import GROWTH, TRAVEL

# Colour distances are Euclidean in RGB scaled to [0, 1] (at most ~1.73).
# Object colours are >= 0.41 apart from each other and from every background.
COLOUR_TOLERANCE = 0.3  # a pixel this close to an object colour may belong to it
BACKGROUND_TOLERANCE = 0.2  # ... and must be at least this far from the background
MIN_OBJECT_FRACTION = 0.005  # of the image's pixels, per frame, to count as present
MIN_PRESENT_FRAMES = 0.6  # an object must be present on this share of frames

# Fill ratio = area / bounding-box area: square ~1, circle ~0.78, triangle ~0.5.
# Both are measured softly (edge pixels count by coverage, and a box column
# counts by the most it is covered), which keeps squares near 1 whatever their
# sub-pixel position. Small pixel discs still fill up to ~0.89 of their box and
# small pixel triangles up to ~0.7, so the triangle is also told by its
# balance: the centroid's height within the box, 0.5 for circles and squares,
# 2/3 for an upward triangle.
SQUARE_MIN_FILL = 0.91
TRIANGLE_MAX_FILL = 0.66
TRIANGLE_MIN_BALANCE = 0.585
MIN_EXTENT_COVERAGE = 0.3  # box rows and columns covered less than this are not counted
MIN_COVERAGE = 0.1  # softer edge pixels are ignored when measuring size and position
GROW_MIN_RATIO = 1.35  # fitted size change (end / start radius) to call grow or shrink
STILL_MAX_TRAVEL = 0.1  # whole-clip travel (fraction of the image) below which it is still
# Speed thresholds sit halfway between the world's two speeds.
FAST_MIN_TRAVEL = (TRAVEL["slow"] + TRAVEL["fast"]) / 2
FAST_MIN_GROWTH = float(np.sqrt(GROWTH["slow"] * GROWTH["fast"]))

ATTRIBUTES = ("colour", "shape", "motion", "speed", "background", "count")
CONFUSION_ATTRIBUTES = ("motion", "shape")


@dataclass
class ObjectReading:
    colour: str
    shape: str
    fill_ratio: float  # median over frames
    balance: float  # median height of the centroid within the bounding box, 0 = top
    track: np.ndarray  # (T, 2) centroid x, y in pixels; NaN where the object is missing
    areas: np.ndarray  # (T,) area per frame in pixels, edge pixels counted by coverage
    motion: str
    speed: str | None  # None for still objects
    displacement: tuple[float, float]  # fitted whole-clip travel as a fraction of width, height
    size_ratio: float  # fitted radius at the last frame / at the first
    colour_std: float  # how much the object's mean colour changes over frames
    # (T, 4) box x_min, x_max, y_min, y_max in pixels, soft edges counted by coverage; NaN where missing
    extent: np.ndarray | None = None


@dataclass
class ClipReading:
    background: str
    background_rgb: tuple[float, float, float]
    objects: list[ObjectReading] = field(default_factory=list)
    flicker: float = 0.0  # lower is steadier; 0 for a perfectly steady clip

    def find(self, colour: str) -> ObjectReading | None:
        return next((o for o in self.objects if o.colour == colour), None)


def clip_frames(video) -> np.ndarray:
    """Any accepted clip form (see the module docstring) as (T, H, W, 3) float32 in [0, 1]."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        video = video.numpy() if video.dtype == torch.uint8 else video.float().numpy()
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected one clip with 4 dimensions, got shape {video.shape}")
    is_uint8 = video.dtype == np.uint8
    if video.shape[-1] == 3:
        frames = video.astype(np.float32) / 255 if is_uint8 else video.astype(np.float32)
    elif video.shape[0] == 3:
        frames = np.moveaxis(video, 0, -1).astype(np.float32)
        frames = frames / 255 if is_uint8 else (frames + 1) / 2
    else:
        raise ValueError(f"expected (T, H, W, 3) or (3, T, H, W), got shape {video.shape}")
    return np.clip(frames, 0, 1)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    palette = np.array([table[n] for n in names], dtype=np.float32) / 255
    return names[int(np.linalg.norm(palette - rgb, axis=-1).argmin())]


def _line_ends(values: np.ndarray, times: np.ndarray, last: int) -> tuple[float, float]:
    """Least-squares straight line through (times, values), evaluated at 0 and ``last``."""
    if len(times) < 2:
        return float(values[0]), float(values[0])
    slope, intercept = np.polyfit(times, values, 1)
    return float(intercept), float(intercept + slope * last)


def _grow_by_one_pixel(mask: np.ndarray) -> np.ndarray:
    """(T, H, W) masks dilated by one pixel in each of the eight directions."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    height, width = mask.shape[1:]
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[:, dy:dy + height, dx:dx + width]
    return grown


def _soft_fill(coverage: np.ndarray) -> float:
    """Covered area over the area of the box the coverage spans, for one (H, W) frame."""
    columns, rows = coverage.max(0), coverage.max(1)
    width = columns[columns >= MIN_EXTENT_COVERAGE].sum()
    height = rows[rows >= MIN_EXTENT_COVERAGE].sum()
    return float(coverage.sum() / max(width * height, 1e-9))


def _soft_extent(profile: np.ndarray, centre: float) -> tuple[float, float]:
    """Low and high edge of an object along one axis, from the most each pixel line is covered.

    Each line before the centre adds its uncovered share to the low edge (and
    likewise after it to the high edge), so a soft edge lands between pixels.
    """
    middle = int(np.clip(centre, 0, len(profile) - 1))
    return float((1 - profile[:middle]).sum()), float(len(profile) - (1 - profile[middle + 1:]).sum())


def _read_object(colour: str, mask: np.ndarray, coverage: np.ndarray, frames: np.ndarray) -> ObjectReading:
    """``mask``: (T, H, W) pixels clearly of this colour; ``coverage``: (T, H, W)
    how much of each pixel the object covers, including soft edges."""
    steps, height, width = mask.shape
    present = mask.sum((1, 2)) >= max(3, MIN_OBJECT_FRACTION * height * width)
    coverage = coverage * _grow_by_one_pixel(mask)  # stray pixels elsewhere are not the object
    areas = coverage.sum((1, 2)).astype(np.float64)
    track = np.full((steps, 2), np.nan)
    extent = np.full((steps, 4), np.nan)
    grid_y, grid_x = np.mgrid[0:height, 0:width] + 0.5
    fills, balances, mean_colours = [], [], []
    for t in np.flatnonzero(present):
        weight = coverage[t] / max(areas[t], 1e-9)
        track[t] = (weight * grid_x).sum(), (weight * grid_y).sum()
        extent[t] = _soft_extent(coverage[t].max(0), track[t, 0]) + _soft_extent(coverage[t].max(1), track[t, 1])
        fills.append(_soft_fill(coverage[t]))
        ys, xs = np.nonzero(mask[t])
        balances.append((ys.mean() - ys.min() + 0.5) / (ys.max() - ys.min() + 1))
        # Colour steadiness is judged on the object's inside, not its soft edge.
        inside = coverage[t] >= 0.9
        mean_colours.append(frames[t][inside if inside.any() else mask[t]].mean(0))
    fill, balance = float(np.median(fills)), float(np.median(balances))
    if fill >= SQUARE_MIN_FILL:
        shape = "square"
    elif fill < TRIANGLE_MAX_FILL or balance >= TRIANGLE_MIN_BALANCE:
        shape = "triangle"
    else:
        shape = "circle"

    times = np.flatnonzero(present).astype(np.float64)
    last = steps - 1
    x0, x1 = _line_ends(track[present, 0], times, last)
    y0, y1 = _line_ends(track[present, 1], times, last)
    r0, r1 = _line_ends(np.sqrt(areas[present]), times, last)
    size_ratio = max(r1, 1e-6) / max(r0, 1e-6)
    dx, dy = (x1 - x0) / width, (y1 - y0) / height
    travel = max(abs(dx), abs(dy))
    if size_ratio >= GROW_MIN_RATIO or size_ratio <= 1 / GROW_MIN_RATIO:
        motion = "grow" if size_ratio > 1 else "shrink"
        growth = max(size_ratio, 1 / size_ratio)
        speed = "fast" if growth >= FAST_MIN_GROWTH else "slow"
    elif travel < STILL_MAX_TRAVEL:
        motion, speed = "still", None
    else:
        if abs(dx) >= abs(dy):
            motion = "right" if dx > 0 else "left"
        else:
            motion = "down" if dy > 0 else "up"
        speed = "fast" if travel >= FAST_MIN_TRAVEL else "slow"
    colour_std = float(np.std(mean_colours, axis=0).mean()) if len(mean_colours) > 1 else 0.0
    return ObjectReading(colour, shape, fill, balance, track, areas, motion, speed, (dx, dy),
                         size_ratio, colour_std, extent)


def _coverage(frames: np.ndarray, background_rgb: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(T, H, W, C): how much of each pixel each object colour covers.

    A pixel is read as a blend of the background and the one object colour
    whose blend line it lies closest to; the blend weight is its coverage.
    """
    direction = colours - background_rgb  # (C, 3)
    offset = (frames - background_rgb)[..., None, :]  # (T, H, W, 1, 3)
    weight = np.clip((offset * direction).sum(-1) / (direction**2).sum(-1), 0, 1)
    off_line = np.linalg.norm(offset - weight[..., None] * direction, axis=-1)
    owner = off_line.argmin(-1)[..., None] == np.arange(len(colours))
    keep = owner & (off_line < COLOUR_TOLERANCE) & (weight >= MIN_COVERAGE)
    return np.where(keep, weight, 0.0)


def read_clip(video, colours=None) -> ClipReading:
    """Background, objects and steadiness of one clip.

    ``colours`` limits which object colours are looked for (names, default all).
    """
    frames = clip_frames(video)
    steps, height, width, _ = frames.shape
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], 1)
    background_rgb = np.median(border.reshape(-1, 3), axis=0)
    background = _nearest(background_rgb, BACKGROUND_RGB)

    names = list(colours) if colours is not None else list(COLOURS)
    palette = np.array([OBJECT_RGB[n] for n in names], dtype=np.float32) / 255
    distance = np.linalg.norm(frames[..., None, :] - palette, axis=-1)  # (T, H, W, C)
    nearest = distance.argmin(-1)
    from_background = np.linalg.norm(frames - background_rgb, axis=-1)
    assigned = (distance.min(-1) < COLOUR_TOLERANCE) & (from_background > BACKGROUND_TOLERANCE)
    labels = np.where(assigned, nearest, -1)

    minimum = max(3, MIN_OBJECT_FRACTION * height * width)
    found = [i for i in range(len(names))
             if ((labels == i).sum((1, 2)) >= minimum).mean() >= MIN_PRESENT_FRAMES]
    objects = []
    if found:  # a clip with no object of a known colour reads as background alone
        coverage = _coverage(frames, background_rgb, palette[found])
        objects = [_read_object(names[i], labels == i, coverage[..., j], frames) for j, i in enumerate(found)]

    # Steadiness: how much pixels that are background in two neighbouring
    # frames change between them, plus how much object colours drift.
    is_background = from_background <= BACKGROUND_TOLERANCE
    both = is_background[1:] & is_background[:-1]
    change = np.abs(frames[1:] - frames[:-1]).mean(-1)
    flicker = float(change[both].mean()) if both.any() else 0.0
    if objects:
        flicker += float(np.mean([o.colour_std for o in objects]))
    return ClipReading(background, tuple(float(c) for c in background_rgb), objects, flicker)


def _as_target(spec_or_caption) -> CaptionSpec:
    if isinstance(spec_or_caption, str):
        return parse_caption(spec_or_caption)
    if isinstance(spec_or_caption, (ClipSpec, CaptionSpec)):
        return CaptionSpec(tuple(spec_or_caption.objects), spec_or_caption.background)
    raise TypeError(f"expected a ClipSpec, CaptionSpec or caption string, got {type(spec_or_caption)}")


def _judge(targets, reading: ClipReading, attribute: str):
    """True/False over the objects that state ``attribute``; None if none do."""
    verdicts = []
    for target in targets:
        wanted = getattr(target, attribute)
        if attribute == "speed" and target.motion == "still":
            wanted = None  # a still object has no speed to get right
        if wanted is None:
            continue
        found = reading.find(target.colour)
        verdicts.append(found is not None and getattr(found, attribute) == wanted)
    return all(verdicts) if verdicts else None


def score_clip(video, spec_or_caption, reading: ClipReading | None = None) -> dict:
    """Per-attribute verdicts for one clip against a ClipSpec, CaptionSpec or caption.

    Keys: colour, shape, motion, speed, background, count (True/False, or None
    when the target does not state it), ``all`` (every stated attribute right)
    and ``reading`` (the ClipReading). Objects are matched by colour.
    """
    target = _as_target(spec_or_caption)
    reading = reading if reading is not None else read_clip(video)
    targets = [t for t in target.objects if t.colour is not None]
    result = {
        "colour": all(reading.find(t.colour) is not None for t in targets) if targets else None,
        "shape": _judge(targets, reading, "shape"),
        "motion": _judge(targets, reading, "motion"),
        "speed": _judge(targets, reading, "speed"),
        "background": None if target.background is None else reading.background == target.background,
        "count": len(reading.objects) == len(target.objects),
    }
    result["all"] = all(v for v in result.values() if v is not None)
    result["reading"] = reading
    return result


def score_suite(videos, specs_or_captions, readings=None) -> dict:
    """Accuracy per attribute over many clips.

    ``videos``: a (B, 3, T, H, W) batch in [-1, 1] or a sequence of clips in any
    accepted form; ``readings``: their ClipReadings when already read. Returns
    accuracy per attribute (over the clips that state it; None if none do),
    ``all``, mean ``flicker``, ``n_clips`` and ``per_clip`` (the verdict dicts
    without readings).
    """
    targets = list(specs_or_captions)
    if len(videos) != len(targets):
        raise ValueError(f"{len(videos)} videos but {len(targets)} specs or captions")
    readings = readings if readings is not None else [None] * len(targets)
    per_clip, flickers = [], []
    for video, target, reading in zip(videos, targets, readings):
        result = score_clip(video, target, reading)
        flickers.append(result.pop("reading").flicker)
        per_clip.append(result)
    summary: dict = {}
    for attribute in (*ATTRIBUTES, "all"):
        verdicts = [r[attribute] for r in per_clip if r[attribute] is not None]
        summary[attribute] = float(np.mean(verdicts)) if verdicts else None
    summary["flicker"] = float(np.mean(flickers)) if flickers else 0.0
    summary["n_clips"] = len(per_clip)
    summary["per_clip"] = per_clip
    return summary


def confusion(videos, specs_or_captions, attribute: str, *, readings=None) -> dict[str, dict[str, int]]:
    """{prompted value: {value the scorer read: objects}} over every object that states ``attribute``
    ("motion" or "shape").

    An object the scorer does not find (by colour) is read as "missing". Which values a model gets right, and what
    it makes instead, is what the single accuracy hides. ``readings``: the clips' ClipReadings if already read.
    """
    if attribute not in CONFUSION_ATTRIBUTES:
        raise ValueError(f"confusion is kept for {CONFUSION_ATTRIBUTES}, not {attribute!r}")
    targets = list(specs_or_captions)
    readings = readings if readings is not None else [read_clip(video) for video in videos]
    table: dict[str, dict[str, int]] = {}
    for reading, target in zip(readings, targets):
        for obj in _as_target(target).objects:
            prompted = getattr(obj, attribute)
            if prompted is None or obj.colour is None:
                continue
            found = reading.find(obj.colour)
            read = getattr(found, attribute) if found is not None else "missing"
            row = table.setdefault(prompted, {})
            row[read] = row.get(read, 0) + 1
    return table
