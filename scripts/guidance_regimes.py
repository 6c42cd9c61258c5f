"""Guidance where the model fails: each guidance setting against none, on the same prompts and seeds, per regime.

    python scripts/guidance_regimes.py length --frames 32 --prompts 50 --seeds 4 --json length32.json
    python scripts/guidance_regimes.py sparse --attention xattention --attention-option threshold=0.3 --json sparse.json
    python scripts/guidance_regimes.py block --model t2v-tiny-block --frames 64 --json block.json
    python scripts/guidance_regimes.py length --setting none --setting "win=temporal-self-guidance:reference=window"

Regimes: `length`, a model asked for more frames than it was trained at (the embedded model's per-frame tables
are lengthened with untrained rows when --frames passes its max_frames); `sparse`, a training-free sparse method
at high sparsity (each clip is also compared with the dense model's unguided clip of the same seed); `block`, a
chunk-by-chunk model (jumps at chunk boundaries). A setting is `LABEL=SPEC`, SPEC a `+`-joined list of guidance
names each with `:KEY=VALUE` options, or `none`.

Columns: kept (every prompted mover went its way from the first frame to the last, turning back only at the
canvas edge), the whole-clip scorer's motion, colour and shape, colour+motion right in every 16-frame window,
flicker, the boundary/inside change ratio across chunks, PSNR against the reference clip, seconds per clip.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from t2v.cli import parse_option
from t2v.data import prompt_suite
from t2v.data.long_clips import long_prompt_suite
from t2v.eval.long_clips import score_long_clip
from t2v.eval.scorer import score_clip
from t2v.eval.suite import generate_clips, psnr
from t2v.guidance import get_guidance

DEFAULT_SETTINGS = {
    "none": "none",
    "tsg": "temporal-self-guidance",
    "fme": "fourier-motion",
    "tsg+fme": "temporal-self-guidance+fourier-motion",
}
COLUMNS = ("kept", "motion", "colour", "shape", "windows")


def parse_setting(spec: str) -> list:
    """Guidance objects of one SPEC ("none", or "name:key=value:...+name2...")."""
    if spec.strip() == "none":
        return []
    guidance = []
    for part in spec.split("+"):
        name, *options = part.split(":")
        guidance.append(get_guidance(name.strip(), **dict(parse_option(o, "--setting") for o in options)))
    return guidance


def labelled(text: str) -> tuple[str, str]:
    """(label, spec) of a --setting: "LABEL=SPEC", or a bare SPEC that is its own label."""
    head = text.split(":")[0]  # an "=" before the first ":" names the label; later ones are options
    return tuple(text.split("=", 1)) if "=" in head else (text, text)


def clip_measures(clip, spec, chunk_frames: int) -> dict:
    long = score_long_clip(clip, spec, chunk_frames=chunk_frames)
    whole = score_clip(clip, spec, long["reading"])
    return {"kept": long["kept_direction"], "motion": whole["motion"], "colour": whole["colour"],
            "shape": whole["shape"], "windows": long["colour_and_motion"], "flicker": long["flicker"],
            "boundary_jump": long["boundary_jump"], "inner_jump": long["inner_jump"]}


def summarise(measures: list[dict], clips, reference=None) -> dict:
    def share(key):
        values = [m[key] for m in measures if m[key] is not None]
        return float(np.mean(values)) if values else None

    result = {key: share(key) for key in COLUMNS}
    for key in ("flicker", "boundary_jump", "inner_jump"):
        result[key] = float(np.mean([m[key] for m in measures]))
    result["boundary_ratio"] = result["boundary_jump"] / max(result["inner_jump"], 1e-12)
    if reference is not None:
        values = sorted(min(psnr(a, b), 99.0) for a, b in zip(clips, reference))
        result.update(psnr_mean=float(np.mean(values)), psnr_median=values[len(values) // 2])
    return result


def report(results: dict, args, frames: int) -> dict:
    """Prints the table so far and writes the JSON (--json)."""
    base = results.get("none", {}).get("seconds_per_clip")
    for r in results.values():
        r["overhead"] = None if base is None else r["seconds_per_clip"] / base - 1
    print(f"{'setting':<14}" + "".join(f"{c:>9}" for c in COLUMNS)
          + f"{'flicker':>9}{'boundary':>9}{'PSNR':>7}{'s/clip':>8}{'overhead':>9}", flush=True)
    for label, r in results.items():
        cells = "".join(f"{'-' if r[c] is None else f'{100 * r[c]:.1f}%':>9}" for c in COLUMNS)
        quality = f"{r['psnr_mean']:>7.1f}" if "psnr_mean" in r else f"{'-':>7}"
        overhead = "-" if r["overhead"] is None else f"{100 * r['overhead']:+.1f}%"
        print(f"{label:<14}{cells}{r['flicker']:>9.4f}{r['boundary_ratio']:>9.3f}{quality}"
              f"{r['seconds_per_clip']:>8.2f}{overhead:>9}", flush=True)
    run = {"regime": args.regime, "model": args.model, "frames": frames, "prompts": args.prompts,
           "seeds": args.seeds, "steps": args.steps, "split": args.split, "attention": args.attention,
           "attention_options": args.attention_option, "device": args.device, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=2)
    return run


def load(args):
    from pipelines import load_pipeline
    from t2v.models.video_dit import with_max_frames

    pipe = load_pipeline(args.model, device=args.device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    frames = args.frames or pipe.default_video_shape[0]
    if frames > pipe.transformer.config.max_frames and not hasattr(pipe, "chunk_frames"):
        pipe.transformer = with_max_frames(pipe.transformer, frames)
    return pipe, frames


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("regime", choices=("length", "sparse", "block"))
    parser.add_argument("--model", default=None, help="default: the embedded model (block: t2v-tiny-block)")
    parser.add_argument("--frames", type=int, default=None, help="default: 32 (length), 64 (block), the model's own")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", default=None, help="sparse: the method under test")
    parser.add_argument("--attention-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--setting", action="append", default=[], metavar="LABEL=SPEC",
                        help=f"repeatable; default: {', '.join(DEFAULT_SETTINGS)}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.regime == "sparse" and args.attention is None:
        parser.error("the sparse regime needs --attention")
    if args.regime == "block":
        args.model = args.model or "t2v-tiny-block"
    args.frames = args.frames or {"length": 32, "block": 64}.get(args.regime)
    settings = dict(labelled(text) for text in args.setting) or DEFAULT_SETTINGS
    guidance_of = {label: parse_setting(spec) for label, spec in settings.items()}  # typos fail before loading

    import attention

    pipe, frames = load(args)
    chunk_frames = getattr(pipe, "chunk_frames", 4)
    if args.regime == "block":
        suite = long_prompt_suite(args.split, args.prompts, chain_prob=0.0)
    else:
        suite = prompt_suite(args.split, args.prompts)

    # "none" means none: the pipeline's automatic position interpolation only where a setting names it.
    extra = {} if args.regime == "block" else {"interpolate_positions": False}

    def generate(guidance):
        started = time.perf_counter()
        clips, specs, _ = generate_clips(pipe, suite, args.seeds, args.batch_size, args.regime, num_frames=frames,
                                         num_inference_steps=args.steps, guidance=guidance, **extra)
        return clips, specs, (time.perf_counter() - started) / len(clips)

    reference, results = None, {}
    if args.regime == "sparse":  # the dense model's unguided clips: what the sparse clips should equal
        reference, specs, seconds = generate([])
        results["dense"] = dict(summarise([clip_measures(c, s, chunk_frames) for c, s in zip(reference, specs)],
                                          reference), seconds_per_clip=seconds)
        attention.apply(pipe.transformer, args.attention,
                        **dict(parse_option(o, "--attention-option") for o in args.attention_option))
    # Warm-up, untimed: one batch of the timed batches' size, two steps (the whole suite again, as before, doubled
    # a single setting's time).
    generate_clips(pipe, suite[:args.batch_size], 1, args.batch_size, "warm-up", num_frames=frames,
                   num_inference_steps=2, guidance=[], **extra)
    for label, guidance in guidance_of.items():
        clips, specs, seconds = generate(guidance)
        measures = [clip_measures(c, s, chunk_frames) for c, s in zip(clips, specs)]
        results[label] = dict(summarise(measures, clips, reference), seconds_per_clip=seconds,
                              setting=settings[label])
        run = report(results, args, frames)  # after every setting, so that a run cut short keeps what it did
    return run


if __name__ == "__main__":
    main()
