"""Score the world's own renderings of the prompt suites: the scorer's ceiling.

Every attribute should read back at >= 98%; anything lower means the scorer
or the world's geometry needs fixing before the scorer can judge a model.

    python scripts/score_ground_truth.py --prompts 200 --seeds 4
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from t2v.data import render
from t2v.eval import prompt_suite, score_suite
from t2v.eval.scorer import ATTRIBUTES

REQUIRED_ACCURACY = 0.98


def score_split(split: str, prompts: int, seeds: int, frames: int, height: int, width: int) -> dict:
    specs = [spec for _, spec in prompt_suite(split, prompts, seed=0)]
    videos, targets = [], []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        videos += list(render(specs, frames, height, width, generator=generator))
        targets += specs
    return score_suite(videos, targets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts per split")
    parser.add_argument("--seeds", type=int, default=4, help="renderings per prompt")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()

    columns = (*ATTRIBUTES, "all")
    print(f"{'split':<8}" + "".join(f"{c:>11}" for c in columns) + f"{'flicker':>10}{'clips':>7}")
    failed = False
    for split in ("train", "heldout"):
        start = time.perf_counter()
        summary = score_split(split, args.prompts, args.seeds, args.frames, args.height, args.width)
        cells = []
        for column in columns:
            accuracy = summary[column]
            cells.append(f"{'-':>11}" if accuracy is None else f"{100 * accuracy:>10.1f}%")
            failed |= accuracy is not None and accuracy < REQUIRED_ACCURACY
        print(f"{split:<8}" + "".join(cells) + f"{summary['flicker']:>10.4f}{summary['n_clips']:>7}"
              f"   ({time.perf_counter() - start:.1f}s)")
    if failed:
        print(f"FAIL: some attribute is below {100 * REQUIRED_ACCURACY:.0f}%")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
