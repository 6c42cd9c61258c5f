"""The procedural video world used for training and evaluation (see ``world``)."""

from .captions import (BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SPEEDS, CaptionSpec, ClipSpec,
                       ObjectSpec, canonical_caption, caption, parse_caption, tokenize_words,
                       vocabulary)
from .render import BACKGROUND_RGB, OBJECT_RGB, render, sample_layout
from .world import (HELD_OUT_COLOUR_MOTION, HELD_OUT_COLOUR_SHAPE, VideoWorld, is_held_out,
                    prompt_suite, sample_specs)

__all__ = [
    "BACKGROUNDS", "COLOURS", "MOTIONS", "SHAPES", "SPEEDS", "BACKGROUND_RGB", "OBJECT_RGB",
    "HELD_OUT_COLOUR_MOTION", "HELD_OUT_COLOUR_SHAPE", "CaptionSpec", "ClipSpec", "ObjectSpec",
    "VideoWorld", "canonical_caption", "caption", "is_held_out", "parse_caption", "prompt_suite",
    "render", "sample_layout", "sample_specs", "tokenize_words", "vocabulary",
]
