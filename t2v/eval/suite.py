"""Generate a prompt suite with a pipeline and score it: the yardstick for every attention method and guidance."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from t2v.data import prompt_suite
from t2v.eval.scorer import CONFUSION_ATTRIBUTES, confusion, read_clip, score_suite


def generate_suite(pipe, split: str, n_prompts: int, seeds: int, batch_size: int = 32, prompt_seed: int = 0,
                   **call_kwargs) -> tuple[np.ndarray, list, list[str]]:
    """Clips (n_prompts * seeds, T, H, W, 3) for the split's prompts, clip i seeded with a generator of seed i."""
    return generate_clips(pipe, prompt_suite(split, n_prompts, seed=prompt_seed), seeds, batch_size,
                          f"{split} suite", **call_kwargs)


def generate_clips(pipe, suite: list, seeds: int, batch_size: int, description: str,
                   **call_kwargs) -> tuple[np.ndarray, list, list[str]]:
    """Clips of every (caption, spec) of `suite` with seeds 0..seeds-1 each, in batches; and their specs, captions."""
    captions = [c for c, _ in suite for _ in range(seeds)]
    specs = [s for _, s in suite for _ in range(seeds)]
    seeds_per_clip = [k for _ in suite for k in range(seeds)]
    device = getattr(pipe, "_execution_device", "cpu")
    clips = []
    for start in tqdm(range(0, len(captions), batch_size), desc=description, leave=False):
        stop = start + batch_size
        generators = [torch.Generator(device).manual_seed(s) for s in seeds_per_clip[start:stop]]
        out = pipe(captions[start:stop], generator=generators, output_type="np", **call_kwargs)
        clips.append(out.frames)
    return np.concatenate(clips), specs, captions


def evaluate_suite(pipe, split: str = "heldout", n_prompts: int = 50, seeds: int = 4, batch_size: int = 32,
                   **call_kwargs) -> dict:
    """Scorer accuracy per attribute over the split's suite, the motion and shape confusion tables, and the time."""
    started = time.time()
    clips, specs, _ = generate_suite(pipe, split, n_prompts, seeds, batch_size, **call_kwargs)
    readings = [read_clip(clip) for clip in clips]  # each clip is read once, for both summaries
    result = score_suite(list(clips), specs, readings)
    result.pop("per_clip")
    for attribute in CONFUSION_ATTRIBUTES:
        result[f"{attribute}_confusion"] = confusion(clips, specs, attribute, readings=readings)
    result["seconds"] = time.time() - started
    result["split"] = split
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two clips with values in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
