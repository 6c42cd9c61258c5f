"""BroadWay guidance on the embedded model: none, temporal self-guidance, Fourier motion enhancement, and both.

For each setting, over the scorer's prompt suite (same prompts and seeds for all): flicker (lower is steadier),
motion along the prompted direction (each left/right/up/down object's fitted whole-clip travel projected on its
direction, in pixels; objects the scorer does not find are left out and counted), travel in any direction (the
same objects' fitted whole-clip displacement length: motion whatever its direction), scorer accuracy (all and per
attribute), seconds per clip and the overhead against no guidance.

    python scripts/guidance_eval.py --prompts 50 --seeds 4 --steps 25 --json guidance_eval.json
    python scripts/guidance_eval.py --option temporal-self-guidance.strength=0.3 --option fourier-motion.split=2
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import numpy as np
import torch

from pipelines import load_pipeline
from t2v.cli import parse_option
from t2v.data.captions import LINEAR_MOTIONS
from t2v.eval.scorer import ATTRIBUTES, read_clip, score_suite
from t2v.eval.suite import generate_suite
from t2v.guidance import get_guidance

SETTINGS = {
    "none": [],
    "tsg": ["temporal-self-guidance"],
    "fme": ["fourier-motion"],
    "tsg+fme": ["temporal-self-guidance", "fourier-motion"],
}
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0)}


def directed_motion(clips, specs, readings) -> tuple[float | None, float | None, int, int]:
    """Mean travel in pixels along the prompted direction and in any direction (None if no object), objects measured,
    objects not found; `readings` are the clips' ClipReadings."""
    travels, distances, missing = [], [], 0
    for clip, spec, reading in zip(clips, specs, readings):
        height, width = clip.shape[1:3]
        for obj in spec.objects:
            if obj.motion not in LINEAR_MOTIONS:
                continue
            found = reading.find(obj.colour)
            if found is None:
                missing += 1
                continue
            dx, dy = found.displacement[0] * width, found.displacement[1] * height
            ux, uy = DIRECTIONS[obj.motion]
            travels.append(dx * ux + dy * uy)
            distances.append(float(np.hypot(dx, dy)))
    if not travels:
        return None, None, 0, missing
    return float(np.mean(travels)), float(np.mean(distances)), len(travels), missing


def settings_of(guidance) -> dict:
    """The constructor options of a guidance object as it stands (defaults included), for the record."""
    names = [p for p in inspect.signature(type(guidance).__init__).parameters if p != "self"]
    return {n: getattr(guidance, n) for n in names if hasattr(guidance, n)}


def evaluate(pipe, guidance, args) -> dict:
    started = time.perf_counter()
    clips, specs, _ = generate_suite(pipe, args.split, args.prompts, args.seeds, args.batch_size,
                                     num_inference_steps=args.steps, guidance=guidance,
                                     guidance_scale=args.guidance_scale)
    seconds = time.perf_counter() - started
    readings = [read_clip(clip) for clip in clips]  # read once for the scores and the motion measures
    scores = score_suite(list(clips), specs, readings)
    motion, distance, measured, missing = directed_motion(clips, specs, readings)
    return {
        "flicker": scores["flicker"], "motion_px": motion, "travel_px": distance, "motion_objects": measured,
        "motion_missing": missing,
        "accuracy": {a: scores[a] for a in (*ATTRIBUTES, "all")},
        "seconds_per_clip": seconds / len(clips), "clips": len(clips),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--attention", default=None, help="attention method to run under the guidance")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {','.join(SETTINGS)}")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="guidance option, repeatable (e.g. fourier-motion.strength=1.0)")
    parser.add_argument("--json", default="guidance_eval.json")
    args = parser.parse_args(argv)

    options: dict[str, dict] = {}
    known = {name for names in SETTINGS.values() for name in names}
    for text in args.option:
        key, value = parse_option(text, "--option")
        name, _, key = key.rpartition(".")
        if name not in known:
            parser.error(f"--option {text!r}: NAME must be one of {', '.join(sorted(known))}")
        options.setdefault(name, {})[key] = value
    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    pipe = load_pipeline(args.model, attention=args.attention, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    # Untimed calls at the suite's batch size first, so that no setting pays for start-up (allocations, kernel
    # compilation and tuning).
    warm_batch = ["a red circle moves to the right on black"] * min(args.batch_size, args.prompts * args.seeds)
    for names in SETTINGS.values():
        pipe(warm_batch, num_inference_steps=2,
             guidance=[get_guidance(name, **dict(options.get(name, {}), steps=1.0)) for name in names])

    results = {}
    for setting in args.settings.split(","):
        guidance = [get_guidance(name, **options.get(name, {})) for name in SETTINGS[setting]]
        results[setting] = evaluate(pipe, guidance, args)
        results[setting]["guidance"] = {g.name: settings_of(g) for g in guidance}
    base = results.get("none", {}).get("seconds_per_clip")
    for r in results.values():
        r["overhead"] = None if base is None else r["seconds_per_clip"] / base - 1

    columns = [*ATTRIBUTES, "all"]
    print(f"{'setting':<9}{'flicker':>9}{'motion px':>10}{'travel px':>10}{'objs':>6}"
          + "".join(f"{c:>11}" for c in columns) + f"{'s/clip':>8}{'overhead':>9}")
    for name, r in results.items():
        accuracy = r["accuracy"]
        acc = "".join(f"{'-' if accuracy[c] is None else f'{100 * accuracy[c]:.1f}%':>11}" for c in columns)
        overhead = "-" if r["overhead"] is None else f"{100 * r['overhead']:+.1f}%"
        motion = "-" if r["motion_px"] is None else f"{r['motion_px']:.2f}"
        travel = "-" if r["travel_px"] is None else f"{r['travel_px']:.2f}"
        print(f"{name:<9}{r['flicker']:>9.4f}{motion:>10}{travel:>10}{r['motion_objects']:>6}{acc}"
              f"{r['seconds_per_clip']:>8.2f}{overhead:>9}")
    run = {"prompts": args.prompts, "seeds": args.seeds, "steps": args.steps, "split": args.split,
           "device": str(pipe._execution_device), "options": options, "attention": args.attention,
           "torch": torch.__version__, "results": results}
    with open(args.json, "w") as f:
        json.dump(run, f, indent=2)
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
