"""Reading long clips back window by window, allowing for the world's bounces.

A long clip is cut into windows of about 16 frames that never straddle a
segment of a chained prompt ("moves right, then up"). Each window is read as a
short clip for colour, shape, background and count. Motion and speed are read
from the object's track over the whole clip, "unfolded": an object prompted
to move right may turn back only where the world makes it turn, at the edge
of the frame (or, when it grows or shrinks, at the world's largest and
smallest size). The expected direction starts as the prompted one and flips
at each such turn; a window's travel counts positive when it goes the
expected way. So a clip that bounces off the edge reads as moving right all
along, and one that turns back in open space reads as moving left there.

Steadiness across chunks: ``boundary_ratio`` compares how much frames change
across chunk boundaries with how much they change inside chunks (1 = as smooth).
"""

from __future__ import annotations

import time

import numpy as np

from t2v.data.captions import LINEAR_MOTIONS, segment_bounds
from t2v.data.long_clips import REFERENCE_STEPS, long_prompt_suite, segment_spec
from t2v.data.render import GROWN_RADIUS, GROWTH, GROWTH_JITTER, REFERENCE_SIZE, TWO_OBJECT_SCALE
from t2v.eval.scorer import (ATTRIBUTES, FAST_MIN_GROWTH, FAST_MIN_TRAVEL, GROW_MIN_RATIO, STILL_MAX_TRAVEL,
                             _as_target, _line_ends, clip_frames, read_clip, score_clip)
from t2v.eval.suite import generate_clips

# A box this close to the border (px at the reference size) may turn back. The world turns 1 px
# from the border, the nearest frame can be 0.6 px off the turn, and a triangle's thin tip reads
# up to 1.3 px short of where it is drawn.
EDGE_TOLERANCE = 2.5
# Going back by more than this (px at the reference size) in open space is a turn back, not tracking noise.
TURN_BACK_TOLERANCE = 2.0
SIZE_TOLERANCE = 0.5  # px of radius at the reference size, around the world's size limits
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}
_AXIS_SIGN = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}


def long_windows(segments: list[tuple[int, int]], window: int = 16) -> list[tuple[int, int, int]]:
    """(start, stop, segment) of each window: ``window`` frames inside one segment; a leftover
    shorter than half a window joins the window before it."""
    windows = []
    for segment, (start, stop) in enumerate(segments):
        cuts = [*range(start, stop, window), stop]
        pieces = list(zip(cuts[:-1], cuts[1:]))
        if len(pieces) > 1 and pieces[-1][1] - pieces[-1][0] < window // 2:
            pieces[-2:] = [(pieces[-2][0], pieces[-1][1])]
        windows += [(a, b, segment) for a, b in pieces]
    return windows


def _unfold(values: np.ndarray, gap_plus: np.ndarray, gap_minus: np.ndarray, sign: int, tolerance: float):
    """Per frame step, the change of ``values`` counted positive when it goes the expected way.

    The expected way starts as ``sign`` and flips at a step that goes back
    while either of its frames is within ``tolerance`` of the limit it was
    heading for (``gap_plus``: how far above, ``gap_minus``: how far below the
    value the limits are, per frame).
    """
    steps = np.nan_to_num(np.diff(values))
    compliant = np.zeros(len(steps))
    for t, step in enumerate(steps):
        gaps = (gap_plus if sign > 0 else gap_minus)[t:t + 2]
        touching = bool(np.any(gaps[~np.isnan(gaps)] <= tolerance))
        if touching and sign * step < 0:
            sign = -sign
        compliant[t] = sign * step
    return compliant


def _radius(extent: np.ndarray) -> np.ndarray:
    """Half the mean side of the object's box, per frame: the world's radius for every shape."""
    return ((extent[:, 1] - extent[:, 0]) + (extent[:, 3] - extent[:, 2])) / 4


def _plain_motion(dx: float, dy: float, steps: int) -> tuple[str, str | None]:
    """Direction and speed of a net travel (fractions of width and height) over ``steps`` frame steps."""
    scale = steps / REFERENCE_STEPS
    travel = max(abs(dx), abs(dy))
    if travel < STILL_MAX_TRAVEL * scale:
        return "still", None
    motion = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return motion, "fast" if travel >= FAST_MIN_TRAVEL * scale else "slow"


class _ObjectTrack:
    """One prompted object's whole-clip track, unfolded segment by segment."""

    def __init__(self, target, reading, segments, height: int, width: int, num_objects: int):
        self.reading, self.height, self.width = reading, height, width
        self.compliant, self.largest = {}, {}  # per segment: travel per frame step, largest radius
        if reading is None or reading.extent is None:
            return
        size = min(height, width) / REFERENCE_SIZE
        scale = size * (TWO_OBJECT_SCALE if num_objects > 1 else 1.0)
        box, radius = reading.extent, _radius(reading.extent)
        growth = GROWTH[target.speed or "slow"] * (1 - GROWTH_JITTER)  # the least growth the speed allows
        for segment, (start, stop) in enumerate(segments):
            motion = target.motions[min(segment, len(target.motions) - 1)]
            part = slice(start, stop)
            if motion in LINEAR_MOTIONS:
                axis, sign = _AXIS_SIGN[motion]
                extent = (width, height)[axis]
                self.compliant[segment] = _unfold(reading.track[part, axis], extent - box[part, 2 * axis + 1],
                                                  box[part, 2 * axis], sign, EDGE_TOLERANCE * size)
            elif motion in ("grow", "shrink") and not np.all(np.isnan(radius[part])):
                large, small = GROWN_RADIUS[0] * scale, GROWN_RADIUS[1] / growth * scale
                self.compliant[segment] = _unfold(radius[part], large - radius[part], radius[part] - small,
                                                  1 if motion == "grow" else -1, SIZE_TOLERANCE * scale)
                self.largest[segment] = float(np.nanmax(radius[part]))

    def window_motion(self, motion: str, segment: int, frames: tuple[int, int], segment_start: int,
                      window_object) -> tuple[str, str | None]:
        """(motion, speed) the object shows in ``frames`` (start, stop), judged against the prompted ``motion``."""
        if window_object is None:
            return "missing", None
        if segment not in self.compliant:  # prompted still, or not found in the whole clip: read as is
            return window_object.motion, window_object.speed
        if window_object.motion in ("grow", "shrink") and motion in LINEAR_MOTIONS:
            return window_object.motion, window_object.speed  # a size change overrules travel, as in score_clip
        start, stop = frames
        steps = max(stop - start - 1, 1)
        scale = steps / REFERENCE_STEPS
        travel = self.compliant[segment][start - segment_start:stop - segment_start - 1].sum()
        if motion not in LINEAR_MOTIONS:
            # The growth a 16-frame clip would show at this rate, from the object's largest size.
            change = abs(travel) / scale / max(self.largest[segment], 1e-6)
            growth = 1 / max(1 - change, 1e-6)
            if growth < GROW_MIN_RATIO:
                return _plain_motion(*window_object.displacement, steps)
            label = motion if travel > 0 else _OPPOSITE[motion]
            return label, "fast" if growth >= FAST_MIN_GROWTH else "slow"
        axis, _ = _AXIS_SIGN[motion]
        along = travel / (self.width, self.height)[axis]
        times = np.arange(stop - start, dtype=np.float64)
        values = self.reading.track[start:stop, 1 - axis]
        present = ~np.isnan(values)
        first, last = _line_ends(values[present], times[present], steps) if present.any() else (0.0, 0.0)
        across = (last - first) / (self.height, self.width)[axis]
        if max(abs(along), abs(across)) < STILL_MAX_TRAVEL * scale:
            return "still", None
        if abs(across) > abs(along):
            return _plain_motion(*((0.0, across) if axis == 0 else (across, 0.0)), steps)
        label = motion if along > 0 else _OPPOSITE[motion]
        return label, "fast" if abs(along) >= FAST_MIN_TRAVEL * scale else "slow"


def _kept_direction(track: _ObjectTrack, size: float) -> bool:
    """Whether the object went the prompted way from its first frame to its last: some net travel, and never back
    by more than TURN_BACK_TOLERANCE in open space (turns at the world's limits are unfolded away)."""
    if not track.compliant:
        return False  # a prompted mover the reader did not find
    travel = np.cumsum(np.concatenate(list(track.compliant.values())))
    drawdown = float(np.max(np.maximum.accumulate(travel) - travel)) if len(travel) else 0.0
    return bool(travel[-1] > TURN_BACK_TOLERANCE * size and drawdown <= TURN_BACK_TOLERANCE * size)


def _steadiness(frames: np.ndarray, chunk_frames: int) -> tuple[float, float, float]:
    """Mean frame-to-frame change across chunk boundaries, inside chunks, and their ratio."""
    change = np.abs(np.diff(frames, axis=0)).mean((1, 2, 3))
    at_boundary = (np.arange(len(change)) + 1) % chunk_frames == 0
    boundary = float(change[at_boundary].mean()) if at_boundary.any() else 0.0
    inner = float(change[~at_boundary].mean()) if (~at_boundary).any() else 0.0
    return boundary, inner, _ratio(boundary, inner)


def _ratio(boundary: float, inner: float) -> float:
    if inner > 0:
        return boundary / inner
    return 1.0 if boundary == 0 else float("inf")  # a clip that never changes is steady everywhere


def score_long_clip(video, spec_or_caption, window: int = 16, chunk_frames: int = 4) -> dict:
    """Verdicts for one long clip against a ClipSpec, CaptionSpec or (chained) caption, window by window.

    Returns ``windows`` (per window: colour, shape, motion, speed, background,
    count, all, ``frames`` (start, stop) and ``expected_motion``), ``every_window``
    (per attribute: right in every window that states it; None if none does),
    ``colour_and_motion`` and ``all`` (right in every window), ``kept_direction``
    (every prompted mover went its way from first frame to last, turning back
    only at the world's limits; None without movers), ``chained``, the
    whole clip's ``flicker``, ``boundary_jump``, ``inner_jump``, ``boundary_ratio``
    and ``reading`` (the whole clip's ClipReading).
    """
    target = _as_target(spec_or_caption)
    frames = clip_frames(video)
    num_frames, height, width, _ = frames.shape
    chain = max((len(obj.motions) for obj in target.objects), default=1)
    segments = segment_bounds(num_frames, chain, chunk_frames) if chain > 1 else [(0, num_frames)]
    reading = read_clip(frames)
    targets = [obj for obj in target.objects if obj.colour is not None]
    tracks = [_ObjectTrack(obj, reading.find(obj.colour), segments, height, width, len(target.objects))
              for obj in targets]
    windows = []
    for start, stop, segment in long_windows(segments, window):
        now = segment_spec(target, segment)
        window_reading = read_clip(frames[start:stop])
        verdict = score_clip(frames[start:stop], now, window_reading)
        verdict.pop("reading")
        motions, speeds = [], []
        for obj, wanted, track in zip(targets, [o for o in now.objects if o.colour is not None], tracks):
            if wanted.motion is None:
                continue
            motion, speed = track.window_motion(wanted.motion, segment, (start, stop), segments[segment][0],
                                                window_reading.find(obj.colour))
            motions.append(motion == wanted.motion)
            if wanted.speed is not None:  # segment_spec leaves still objects without a speed
                speeds.append(speed == wanted.speed)
        verdict["motion"] = all(motions) if motions else None
        verdict["speed"] = all(speeds) if speeds else None
        verdict["all"] = all(verdict[a] for a in ATTRIBUTES if verdict[a] is not None)
        verdict["frames"] = (start, stop)
        verdict["expected_motion"] = " and ".join(str(obj.motion) for obj in now.objects)
        windows.append(verdict)

    every = {}
    for attribute in (*ATTRIBUTES, "all"):
        verdicts = [w[attribute] for w in windows if w[attribute] is not None]
        every[attribute] = all(verdicts) if verdicts else None
    boundary, inner, ratio = _steadiness(frames, chunk_frames)
    size = min(height, width) / REFERENCE_SIZE
    movers = [(obj, track) for obj, track in zip(targets, tracks)
              if any(m in LINEAR_MOTIONS or m in ("grow", "shrink") for m in obj.motions)]
    kept = all(_kept_direction(track, size) for _, track in movers) if movers else None
    return {
        "kept_direction": kept,
        "windows": windows, "every_window": every,
        "colour_and_motion": all(w["colour"] is not False and w["motion"] is not False for w in windows),
        "all": every["all"], "chained": chain > 1, "flicker": reading.flicker,
        "boundary_jump": boundary, "inner_jump": inner, "boundary_ratio": ratio, "reading": reading,
    }


def _share(verdicts) -> float | None:
    verdicts = [v for v in verdicts if v is not None]
    return float(np.mean(verdicts)) if verdicts else None


def score_long_suite(videos, specs_or_captions, window: int = 16, chunk_frames: int = 4) -> dict:
    """Every-window accuracy over many long clips.

    Returns the share of clips right in every window for ``colour_and_motion``,
    ``all`` and each attribute; ``chained`` (colour_and_motion over the chained
    clips; None without any); ``window_accuracy`` (per attribute, over all
    windows); mean ``flicker``, ``boundary_jump`` and ``inner_jump``;
    ``boundary_ratio`` (of the two means); ``n_clips`` and ``per_clip``.
    """
    targets = list(specs_or_captions)
    if len(videos) != len(targets):
        raise ValueError(f"{len(videos)} videos but {len(targets)} specs or captions")
    per_clip = []
    for video, target in zip(videos, targets):
        result = score_long_clip(video, target, window, chunk_frames)
        result.pop("reading")
        per_clip.append(result)
    windows = [w for r in per_clip for w in r["windows"]]
    summary: dict = {"colour_and_motion": _share(r["colour_and_motion"] for r in per_clip),
                     "all": _share(r["all"] for r in per_clip)}
    for attribute in ATTRIBUTES:
        summary[attribute] = _share(r["every_window"][attribute] for r in per_clip)
    summary["chained"] = _share(r["colour_and_motion"] for r in per_clip if r["chained"])
    summary["kept_direction"] = _share(r["kept_direction"] for r in per_clip)
    summary["window_accuracy"] = {a: _share(w[a] for w in windows) for a in (*ATTRIBUTES, "all")}
    for key in ("flicker", "boundary_jump", "inner_jump"):
        summary[key] = float(np.mean([r[key] for r in per_clip])) if per_clip else 0.0
    summary["boundary_ratio"] = _ratio(summary["boundary_jump"], summary["inner_jump"])
    summary["n_clips"] = len(per_clip)
    summary["per_clip"] = per_clip
    return summary


def generate_long_suite(pipe, split: str, n_prompts: int, seeds: int, num_frames: int = 64, batch_size: int = 16,
                        prompt_seed: int = 0, chain_prob: float = 0.3, **call_kwargs):
    """Clips (n_prompts * seeds, T, H, W, 3) for the split's long prompts, clip i seeded with its seed index,
    as ``suite.generate_suite`` does; and their specs and captions."""
    suite = long_prompt_suite(split, n_prompts, seed=prompt_seed, chain_prob=chain_prob)
    return generate_clips(pipe, suite, seeds, batch_size, f"{split} long suite", num_frames=num_frames,
                          **call_kwargs)


def evaluate_long_suite(pipe, split: str = "heldout", n_prompts: int = 50, seeds: int = 4, num_frames: int = 64,
                        batch_size: int = 16, prompt_seed: int = 0, chain_prob: float = 0.3, **call_kwargs) -> dict:
    """``score_long_suite`` over the split's long prompts as the pipeline makes them, with the time taken.

    Segments are cut on the pipeline's own chunks (``pipe.chunk_frames``, else 4), as it cut them to generate.
    """
    started = time.time()
    clips, specs, _ = generate_long_suite(pipe, split, n_prompts, seeds, num_frames, batch_size, prompt_seed,
                                          chain_prob, **call_kwargs)
    result = score_long_suite(list(clips), specs, chunk_frames=getattr(pipe, "chunk_frames", 4))
    result.pop("per_clip")
    result.update(seconds=time.time() - started, split=split, frames=num_frames)
    return result
