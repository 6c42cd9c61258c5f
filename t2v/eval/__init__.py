"""Evaluation: a model-free scorer for clips of the video world, and fixed prompt suites."""

from t2v.data.world import prompt_suite

from .scorer import ClipReading, ObjectReading, clip_frames, confusion, read_clip, score_clip, score_suite
from .suite import evaluate_suite, generate_suite, psnr

__all__ = ["ClipReading", "ObjectReading", "clip_frames", "confusion", "evaluate_suite", "generate_suite",
           "prompt_suite", "psnr", "read_clip", "score_clip", "score_suite"]
