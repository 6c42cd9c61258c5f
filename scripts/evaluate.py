"""Score a model over the held-out and training-distribution prompt suites (the scorer reads each clip back).

    python scripts/evaluate.py --model t2v/checkpoints/t2v-tiny --prompts 50 --seeds 4 --json eval.json
"""

from __future__ import annotations

import argparse
import json

import torch

from pipelines import load_pipeline
from t2v.data.captions import MOTIONS, SHAPES
from t2v.eval import evaluate_suite

COLUMNS = ("colour", "shape", "motion", "speed", "background", "count", "all")


CONFUSION_VALUES = {"motion": MOTIONS, "shape": SHAPES}  # the rows and columns of each table


def print_confusion(split: str, attribute: str, table: dict[str, dict[str, int]]) -> None:
    """Rows: the prompted value; columns: what the scorer read (share of that row's objects)."""
    values = CONFUSION_VALUES[attribute]
    read_as = [*values, "missing"]
    print(f"\n{split}: prompted {attribute} (rows) against the {attribute} read back (columns), % of the row's objects")
    print(f"{'prompted':<9}" + "".join(f"{m:>8}" for m in read_as) + f"{'objects':>9}")
    for prompted in values:
        row = table.get(prompted, {})
        total = sum(row.values())
        if total:
            print(f"{prompted:<9}" + "".join(f"{100 * row.get(m, 0) / total:>7.0f}%" for m in read_as) + f"{total:>9}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    parser.add_argument("--splits", default="heldout,train")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompt-seed", type=int, default=0,
                        help="draws the split's prompts; another seed checks a setting chosen on seed 0's prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--confusion", nargs="+", choices=sorted(CONFUSION_VALUES), default=[],
                        help="also print each split's confusion table for these attributes")
    parser.add_argument("--motions", action="store_true", help="same as --confusion motion")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model, device=args.device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for split in args.splits.split(","):
        results.append(evaluate_suite(pipe, split, args.prompts, args.seeds, args.batch_size,
                                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                      prompt_seed=args.prompt_seed))
    scale = args.guidance_scale if args.guidance_scale is not None else pipe.guider.guidance_scale
    for r in results:  # what the table came from, in the JSON
        r.update(prompt_seed=args.prompt_seed, guidance_scale=scale)
    print(f"{'split':<8}" + "".join(f"{c:>11}" for c in COLUMNS) + f"{'flicker':>9}{'clips':>7}{'seconds':>9}")
    for r in results:
        cells = "".join(f"{'-' if r[c] is None else f'{100 * r[c]:.1f}%':>11}" for c in COLUMNS)
        print(f"{r['split']:<8}{cells}{r['flicker']:>9.4f}{r['n_clips']:>7}{r['seconds']:>9.1f}")
    attributes = list(dict.fromkeys([*args.confusion, *(["motion"] if args.motions else [])]))
    for attribute in attributes:
        for r in results:
            print_confusion(r["split"], attribute, r[f"{attribute}_confusion"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
