"""The procedural video world used for training and evaluation (see ``world``, and ``long_clips`` for long clips)."""

from .captions import (BACKGROUNDS, CHAIN_MOTIONS, COLOURS, MOTIONS, SHAPES, SPEEDS, CaptionSpec, ClipSpec,
                       ObjectSpec, canonical_caption, caption, parse_caption, segment_bounds,
                       split_chained_prompt, tokenize_words, vocabulary)
from .long_clips import (LongVideoWorld, long_layout, long_prompt_suite, render_long, sample_long_specs,
                         segment_spec)
from .render import BACKGROUND_RGB, OBJECT_RGB, render, sample_layout
from .world import (HELD_OUT_COLOUR_MOTION, HELD_OUT_COLOUR_SHAPE, VideoWorld, is_held_out,
                    prompt_suite, sample_specs)

__all__ = [
    "BACKGROUNDS", "CHAIN_MOTIONS", "COLOURS", "MOTIONS", "SHAPES", "SPEEDS", "BACKGROUND_RGB", "OBJECT_RGB",
    "HELD_OUT_COLOUR_MOTION", "HELD_OUT_COLOUR_SHAPE", "CaptionSpec", "ClipSpec", "LongVideoWorld", "ObjectSpec",
    "VideoWorld", "canonical_caption", "caption", "is_held_out", "long_layout", "long_prompt_suite",
    "parse_caption", "prompt_suite", "render", "render_long", "sample_layout", "sample_long_specs",
    "sample_specs", "segment_bounds", "segment_spec", "split_chained_prompt", "tokenize_words", "vocabulary",
]
