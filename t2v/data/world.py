"""The procedural video world: sampling clip specs, their captions and pixels.

A clip shows one or two filled shapes on a plain background:

* colours: red, green, blue, yellow, purple, orange, cyan
* shapes: circle, square, triangle (isosceles, pointing up)
* motions: left, right, up, down, still, grow, shrink; speeds: slow, fast
* backgrounds: black, white, gray

Held-out combinations never occur in the training split and are what the
"heldout" split is made of, to measure compositional generalisation:

* colour-shape pairs: (red, triangle), (green, circle), (blue, square),
  (orange, circle), (cyan, triangle)
* colour-motion pairs: (yellow, left), (purple, down)

Every colour, shape and motion is still seen in training, only not in these
pairings. A clip is held out if any of its objects has a held-out pair.
"""

from __future__ import annotations

import torch

from .captions import (BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SPEEDS, ClipSpec, ObjectSpec,
                       as_python_rng, canonical_caption, caption)
from .render import render

HELD_OUT_COLOUR_SHAPE = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"),
                                   ("orange", "circle"), ("cyan", "triangle")})
HELD_OUT_COLOUR_MOTION = frozenset({("yellow", "left"), ("purple", "down")})
SPLITS = ("train", "heldout")


def _object_is_held_out(obj: ObjectSpec) -> bool:
    # Every motion of a chain counts, so a long clip cannot slip a held-out pair in after a "then".
    return ((obj.colour, obj.shape) in HELD_OUT_COLOUR_SHAPE
            or any((obj.colour, motion) in HELD_OUT_COLOUR_MOTION for motion in obj.motions))


def is_held_out(spec: ClipSpec) -> bool:
    """True if any object of the clip has a held-out colour-shape or colour-motion pair."""
    return any(_object_is_held_out(obj) for obj in spec.objects)


def _random_object(rng, colour=None, shape=None, motion=None) -> ObjectSpec:
    motion = motion or rng.choice(MOTIONS)
    speed = None if motion == "still" else rng.choice(SPEEDS)
    return ObjectSpec(colour or rng.choice(COLOURS), shape or rng.choice(SHAPES), motion, speed)


def _train_object(rng, exclude_colour=None) -> ObjectSpec:
    while True:
        obj = _random_object(rng)
        if obj.colour != exclude_colour and not _object_is_held_out(obj):
            return obj


def _held_out_object(rng) -> ObjectSpec:
    # Each held-out pair is equally likely, so the rarer colour-motion pairs
    # are not swamped by the colour-shape ones.
    pairs = sorted(HELD_OUT_COLOUR_SHAPE) + sorted(HELD_OUT_COLOUR_MOTION)
    colour, other = rng.choice(pairs)
    if other in SHAPES:
        return _random_object(rng, colour=colour, shape=other)
    return _random_object(rng, colour=colour, motion=other)


def sample_specs(n: int, generator=None, split: str = "train",
                 two_object_prob: float = 0.25) -> list[ClipSpec]:
    """``n`` random clip specs. "train" never contains a held-out pair; in
    "heldout" every clip has at least one (its first object)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = as_python_rng(generator)
    specs = []
    for _ in range(n):
        specs.append(ClipSpec(tuple(draw_objects(rng, split, two_object_prob)), rng.choice(BACKGROUNDS)))
    return specs


def draw_objects(rng, split: str, two_object_prob: float) -> list:
    """One clip's objects: a first one fit for the split, and with probability two_object_prob a second of another
    colour (in "heldout" the first carries the held-out pair, the second may be anything)."""
    first = _train_object(rng) if split == "train" else _held_out_object(rng)
    objects = [first]
    if rng.random() < two_object_prob:
        if split == "train":
            objects.append(_train_object(rng, exclude_colour=first.colour))
        else:
            while (second := _random_object(rng)).colour == first.colour:
                pass
            objects.append(second)
    return objects


class VideoWorld:
    """An endless source of (videos, captions, specs) batches from one split."""

    def __init__(self, frames: int = 16, height: int = 32, width: int = 32, split: str = "train",
                 two_object_prob: float = 0.25, device="cpu"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.frames, self.height, self.width = frames, height, width
        self.split, self.two_object_prob, self.device = split, two_object_prob, device

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        """Videos (B, 3, T, H, W) in [-1, 1], one random paraphrase per clip, and the specs."""
        specs, captions = self._specs_and_captions(batch_size, generator)
        videos = render(specs, self.frames, self.height, self.width, generator=generator,
                        device=self.device)
        return videos, captions, specs

    def sample_captions(self, batch_size: int, generator: torch.Generator | None = None) -> list[str]:
        """Captions drawn as `sample` draws them, without rendering their clips."""
        return self._specs_and_captions(batch_size, generator)[1]

    def _specs_and_captions(self, batch_size: int, generator):
        rng = as_python_rng(generator)
        specs = sample_specs(batch_size, rng, self.split, self.two_object_prob)
        return specs, [caption(spec, rng) for spec in specs]


def prompt_suite(split: str = "heldout", n_prompts: int = 200, seed: int = 0) -> list[tuple[str, ClipSpec]]:
    """A fixed evaluation list of (canonical caption, spec); about one in five has two objects."""
    # The split is mixed into the seed so the two suites are not built from one stream.
    rng = as_python_rng(seed * 1000 + SPLITS.index(split) + 17)
    return [(canonical_caption(spec), spec) for spec in sample_specs(n_prompts, rng, split, 0.2)]
