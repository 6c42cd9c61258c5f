"""Evaluation: a model-free scorer for clips of the video world, and fixed prompt suites."""

from t2v.data.world import prompt_suite

from .scorer import (ClipReading, ObjectReading, clip_frames, motion_confusion, read_clip, score_clip,
                     score_suite)
from .suite import evaluate_suite, generate_suite, psnr

__all__ = ["ClipReading", "ObjectReading", "clip_frames", "evaluate_suite", "generate_suite", "motion_confusion",
           "prompt_suite", "psnr",
           "read_clip", "score_clip", "score_suite"]
