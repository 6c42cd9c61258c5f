"""Evaluation: a model-free scorer for clips of the video world, and fixed prompt suites."""

from t2v.data.long_clips import long_prompt_suite
from t2v.data.world import prompt_suite

from .long_clips import (evaluate_long_suite, generate_long_suite, long_windows, score_long_clip,
                         score_long_suite)
from .scorer import ClipReading, ObjectReading, clip_frames, confusion, read_clip, score_clip, score_suite
from .suite import evaluate_suite, generate_suite, psnr

__all__ = ["ClipReading", "ObjectReading", "clip_frames", "confusion", "evaluate_long_suite", "evaluate_suite",
           "generate_long_suite", "generate_suite", "long_prompt_suite", "long_windows", "prompt_suite", "psnr",
           "read_clip", "score_clip", "score_long_clip", "score_long_suite", "score_suite"]
