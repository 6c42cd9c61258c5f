"""Score long clips (64 frames and more) of a chunk-by-chunk model window by window, over the long prompt suites.

    python scripts/evaluate_long.py --model NAME --frames 64 --prompts 50 --seeds 4 --steps 20 --json long.json
    python scripts/evaluate_long.py --ground-truth --frames 64   # the world's own clips: the scorer's ceiling
    python scripts/evaluate_long.py --model t2v-tiny-block --attention flashblock --attention-option refresh_every=4 \
        --compare   # also without the method, same seeds: PSNR of each clip against its twin
    python scripts/evaluate_long.py --model t2v-tiny-block --without-opening-model   # the block model from frame 0

Every-window columns count a clip right only if it is right in every window (about 16 frames, never across a
"then"); "chained" is colour+motion over the chained prompts alone; "boundary" is how much frames change across
chunk boundaries over how much they change inside chunks (1 = as smooth). A block folder's opening model
(`t2v-tiny-block`'s: `t2v-tiny` makes the first 16 frames) runs as `load_pipeline` attaches it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from t2v.cli import parse_option
from t2v.data import long_prompt_suite, render_long
from t2v.eval import score_long_suite
from t2v.eval.long_clips import generate_long_suite
from t2v.eval.suite import psnr
from t2v.eval.scorer import ATTRIBUTES

COLUMNS = ("colour_and_motion", "all", *ATTRIBUTES, "chained")
HEADINGS = {"colour_and_motion": "col+motion"}


def ground_truth_suite(split: str, prompts: int, seeds: int, frames: int, prompt_seed: int = 0,
                       chain_prob: float = 0.3, chunk_frames: int = 4) -> dict:
    """``score_long_suite`` of the world's own renderings of the split's long prompts, rendering k seeded with k."""
    started = time.time()
    specs = [spec for _, spec in long_prompt_suite(split, prompts, seed=prompt_seed, chain_prob=chain_prob)]
    videos, targets = [], []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        videos += list(render_long(specs, frames, generator=generator, chunk_frames=chunk_frames))
        targets += specs
    result = score_long_suite(videos, targets, chunk_frames=chunk_frames)
    result.pop("per_clip")
    result.update(seconds=time.time() - started, split=split, frames=frames)
    return result


def model_suite(pipe, split: str, args, chunk_frames: int, reference_clips=None) -> tuple[dict, object]:
    """The long suite as the pipeline makes it, scored; with PSNR against `reference_clips` (same seeds) if given."""
    started = time.time()
    call_kwargs = {"num_inference_steps": args.steps}
    if args.guidance_scale is not None:
        call_kwargs["guidance_scale"] = args.guidance_scale
    clips, specs, _ = generate_long_suite(pipe, split, args.prompts, args.seeds, args.frames, args.batch_size,
                                          args.prompt_seed, args.chain_prob, **call_kwargs)
    result = score_long_suite(list(clips), specs, chunk_frames=chunk_frames)
    result.pop("per_clip")
    result.update(seconds=time.time() - started, split=split, frames=args.frames)
    if reference_clips is not None:
        values = sorted(min(psnr(a, b), 99.0) for a, b in zip(clips, reference_clips))
        result.update(psnr_mean=sum(values) / len(values), psnr_median=values[len(values) // 2],
                      psnr_min=values[0], share_at_least_28db=sum(v >= 28 for v in values) / len(values))
    return result, clips


def print_table(results: list[dict]) -> None:
    headings = [HEADINGS.get(c, c) for c in COLUMNS]
    print(f"{'run':<28}" + "".join(f"{h:>11}" for h in headings) + f"{'flicker':>9}{'boundary':>10}{'clips':>7}"
          f"{'seconds':>9}{'PSNR mean':>11}{'median':>8}{'>=28 dB':>9}")
    for r in results:
        cells = "".join(f"{'-' if r[c] is None else f'{100 * r[c]:.1f}%':>11}" for c in COLUMNS)
        psnr_cells = (f"{r['psnr_mean']:>11.1f}{r['psnr_median']:>8.1f}{100 * r['share_at_least_28db']:>8.1f}%"
                      if "psnr_mean" in r else "")
        print(f"{r['split'] + ' ' + (r.get('attention') or ''):<28}{cells}{r['flicker']:>9.4f}"
              f"{r['boundary_ratio']:>10.3f}{r['n_clips']:>7}{r['seconds']:>9.1f}{psnr_cells}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder or name (default: the embedded model)")
    parser.add_argument("--ground-truth", action="store_true",
                        help="score the world's own renderings instead of a model (no model is loaded)")
    parser.add_argument("--splits", default="heldout,train")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--chain-prob", type=float, default=0.3, help="share of one-object prompts that chain motions")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", default=None, help="an attention method installed in the model")
    parser.add_argument("--attention-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the method (repeatable)")
    parser.add_argument("--compare", action="store_true",
                        help="also run without the method on the same seeds, and give each clip's PSNR against it")
    parser.add_argument("--without-opening-model", action="store_true",
                        help="the block model makes the whole clip (not only what follows the opening model's frames)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.compare and args.attention is None:
        parser.error("--compare needs --attention")

    splits = args.splits.split(",")
    if args.ground_truth:
        results = [ground_truth_suite(split, args.prompts, args.seeds, args.frames, args.prompt_seed,
                                      args.chain_prob) for split in splits]
    else:
        from pipelines import load_pipeline  # only a model run needs the pipelines

        import attention

        pipe = load_pipeline(args.model, device=args.device, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if args.without_opening_model and hasattr(pipe, "set_opening_model"):
            pipe.set_opening_model(None)
        opening = getattr(pipe, "opening_transformer", None) is not None
        chunk_frames = getattr(pipe, "chunk_frames", 4)
        options = dict(parse_option(text) for text in args.attention_option)
        results = []
        for split in splits:
            reference = None
            if args.compare:
                result, reference = model_suite(pipe, split, args, chunk_frames)
                results.append(result)
            if args.attention is not None:
                attention.apply(pipe.transformer, args.attention, **options)
            result, _ = model_suite(pipe, split, args, chunk_frames, reference)
            if args.attention is not None:
                result["attention"] = args.attention + "".join(f" {k}={v}" for k, v in options.items())
                attention.remove(pipe.transformer)
            results.append(result)
    for r in results:  # what the table came from, in the JSON
        r.update(model="ground truth" if args.ground_truth else args.model, prompt_seed=args.prompt_seed,
                 opening_frames=pipe.config.opening_frames if not args.ground_truth and opening else None,
                 steps=None if args.ground_truth else args.steps, guidance_scale=args.guidance_scale)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
