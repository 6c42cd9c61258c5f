"""Quality of a sparse attention method against dense attention on the embedded model, over a list of settings.

    python scripts/sweep_quality.py --method vmoba --settings threshold=0.1 threshold=0.25 threshold=0.5
    python scripts/sweep_quality.py --method rectified --settings sparsity=0.75 "sparsity=0.85,rectify=false"
    python scripts/sweep_quality.py --method all --prompts 25 --seeds 2 --json quality.json

The scorer's prompt suite is generated once with the model's own dense attention and once per setting with the same
seeds (clip i of every run starts from the same noise). Per setting: the density the method reached
(`method_density` over its sparse calls; it covers the last pipeline call, so keep the suite in one batch),
sparsity = 1 - density, the density counting warm-up steps and dense layers as dense (`effective_density`), scorer
accuracy (`all` and per attribute) and its difference to dense in points, PSNR of each clip against the dense clip
of the same seed (mean, median, min, the share of clips under 20 dB and under 10 dB, and each clip's in the JSON;
identical clips count as 100 dB), and seconds
(after a one-clip warm-up on GPU). The JSON also lists the captions and, per setting, the clips each attribute got
wrong.
`--sparse-model DIR` runs the settings on another pipeline (one fine-tuned with the method) against `--model`'s
dense clips, with the high-noise model its folder names, if any (the shipped variants: the dense model runs the
noisiest steps; its steps count as dense in the effective density); `--without-high-noise-model` runs it alone,
`--boundary-ratio R` moves its boundary (the steps at timestep >= R x 1000 run the high-noise model).
`--method all` runs every registered method but dense, each with its settings in SWEEP_SETTINGS (or `--settings`),
against one dense run.
`--caches first-block mag` runs every setting once per diffusers step cache (`pipelines/caches.py`; `none` for a
run without one), so `--method dense --caches mag taylorseer` measures what each cache alone costs against no cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# benchmark.py also puts the repository root on the path; write_json rewrites the file after every setting.
from benchmark import describe, fmt, parse_options, write_json  # noqa: E402
from t2v.eval.scorer import ATTRIBUTES  # noqa: E402

# Settings `--method all` uses per method (sparsity >= 0.75 is where the quality target sits).
SWEEP_SETTINGS = {
    "vmoba": ["threshold=0.1", "threshold=0.25", "threshold=0.5", "sparsity=0.75"],
    "rectified": ["sparsity=0.75", "sparsity=0.85", "sparsity=0.85,rectify=false"],
    "xattention": ["threshold=0.8", "threshold=0.9", "threshold=0.95", "sparsity=0.75"],
    "oracle": ["sparsity=0.75"],  # the yardstick: the most mass that many blocks per query block can keep
}
PSNR_CAP = 100.0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", required=True, help="registered method name(s), or all")
    p.add_argument("--settings", nargs="*", default=None,
                   help='option sets "k=v,k=v" (default: SWEEP_SETTINGS for the method, else its own defaults)')
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--sparse-model", default=None,
                   help="run the settings on this pipeline (e.g. one fine-tuned with the method), against --model's "
                        "dense clips")
    p.add_argument("--split", default="heldout")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=None, help="default: what the model was trained at")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=200, help="clips per pipeline call")
    p.add_argument("--dense-warmup-steps", type=int, default=None, help="passed to every setting")
    p.add_argument("--dense-layers", type=int, nargs="*", default=None, help="passed to every setting")
    p.add_argument("--without-high-noise-model", action="store_true",
                   help="run --sparse-model without the high-noise model its folder names")
    p.add_argument("--boundary-ratio", type=float, default=None,
                   help="the boundary of --sparse-model's high-noise model (default: its folder's)")
    p.add_argument("--caches", nargs="*", default=["none"],
                   help="step caches installed for each setting's run, one run per cache (none: without)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    return p


def jobs(args) -> list[tuple[str, dict, str]]:
    """(method, options, cache) per run, the shared adapter options added; one run per cache."""
    import attention

    names = [m for m in attention.available_methods() if m != "dense"] if args.method == ["all"] else args.method
    extra = {}
    if args.dense_warmup_steps is not None:
        extra["dense_warmup_steps"] = args.dense_warmup_steps
    if args.dense_layers is not None:
        extra["dense_layers"] = tuple(args.dense_layers)
    from pipelines.caches import check_cache_name

    for cache in sorted(set(args.caches) - {"none"}):
        try:
            check_cache_name(cache)
        except ValueError as exc:
            raise SystemExit(f"{exc} (or none)") from None
    out = []
    for name in names:
        settings = args.settings if args.settings is not None else SWEEP_SETTINGS.get(name, [""])
        out += [(name, {**parse_options(s), **extra}, cache) for s in (settings or [""]) for cache in args.caches]
    return out


def effective_density(density, options, steps, num_layers, lead_steps=0):
    """Share of attention computed when a high-noise model's `lead_steps`, the method's warm-up steps after them
    and dense layers run dense, and the rest at `density`."""
    if density is None:
        return None
    warm = min(lead_steps + int(options.get("dense_warmup_steps", 0)), steps) / steps
    layers = options.get("dense_layers", ())
    layers = {int(i) % num_layers for i in ((layers,) if isinstance(layers, int) else layers)}
    sparse_share = (1 - warm) * (1 - len(layers) / num_layers)
    return sparse_share * density + (1 - sparse_share)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    import attention
    from attention.methods.block_sparse import method_density
    from pipelines import load_pipeline
    from pipelines.caches import install_cache, remove_cache
    from t2v.eval.scorer import score_suite
    from t2v.eval.suite import generate_suite, psnr

    runs = jobs(args)  # malformed settings fail here, before the model loads
    pipe = load_pipeline(args.model, device=args.device)
    attention.remove(pipe.transformer)  # the reference is the model's own attention, even for a fine-tuned variant
    pipe.set_progress_bar_config(disable=True)
    device = pipe._execution_device
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    if args.frames:
        call["num_frames"] = args.frames
    num_layers = len(pipe.transformer.blocks)

    def generate(warm_steps=1):
        if device.type == "cuda":  # one clip first: CUDA set-up and kernel compilation stay out of the seconds
            generate_suite(pipe, args.split, 1, 1, 1, **dict(call, num_inference_steps=min(warm_steps, args.steps)))
        t0 = time.time()
        clips, specs, captions = generate_suite(pipe, args.split, args.prompts, args.seeds, args.batch_size, **call)
        info.setdefault("captions", captions)
        t1 = time.time()
        score = score_suite(list(clips), specs)
        return clips, score, t1 - t0, time.time() - t1

    info = dict(split=args.split, prompts=args.prompts, seeds=args.seeds, steps=args.steps, frames=args.frames,
                guidance_scale=args.guidance_scale, device=str(device), dtype=str(pipe.transformer.dtype),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    dense_clips, dense, gen_s, score_s = generate()
    rows = [row_from("dense (model)", {}, dense, dense, 1.0, 1.0, None, gen_s, score_s)]
    print(f"dense: all {100 * dense['all']:.1f}%  ({gen_s:.1f} s + {score_s:.1f} s scoring, "
          f"{dense['n_clips']} clips)", flush=True)
    write_json(args.json, info, rows)
    if args.sparse_model:
        info["sparse_model"] = args.sparse_model
        pipe = load_pipeline(args.sparse_model, device=args.device)
        if args.without_high_noise_model:
            pipe.set_high_noise_model(None)
        elif args.boundary_ratio is not None:
            if getattr(pipe, "high_noise_transformer", None) is None:
                raise SystemExit(f"--boundary-ratio: {args.sparse_model} names no high-noise model")
            pipe.set_high_noise_model(pipe.high_noise_transformer, pipe.high_noise_text_encoder, args.boundary_ratio)
        pipe.set_progress_bar_config(disable=True)
        num_layers = len(pipe.transformer.blocks)
    pipe.scheduler.set_timesteps(args.steps)
    lead_steps = pipe.high_noise_steps(pipe.scheduler.timesteps) if hasattr(pipe, "high_noise_steps") else 0
    info["high_noise_steps"] = lead_steps
    for name, options, cache in runs:
        label = name if cache == "none" else f"{name}+{cache}"
        try:
            attention.apply(pipe.transformer, name, **options)
            if cache != "none":
                install_cache(pipe.transformer, cache)
        except (ValueError, TypeError) as exc:
            attention.remove(remove_cache(pipe.transformer))
            rows.append(dict(method=label, options=options, note=describe(exc)))
            print(f"{label} {options}: skipped ({rows[-1]['note']})", flush=True)
            write_json(args.json, info, rows)
            continue
        try:
            clips, score, gen_s, score_s = generate(options.get("dense_warmup_steps", 0) + 1)
            density = method_density(pipe.transformer)  # the tally covers the last pipeline call
        except Exception as exc:  # report and go on with the other settings
            rows.append(dict(method=label, options=options, note=describe(exc)))
            print(f"{label} {options}: failed ({rows[-1]['note']})", flush=True)
            write_json(args.json, info, rows)
            continue
        finally:
            attention.remove(remove_cache(pipe.transformer))
        if density is None and name == "dense":
            density = 1.0
        values = np.array([min(psnr(a, b), PSNR_CAP) for a, b in zip(clips, dense_clips)])
        effective = effective_density(density, options, args.steps, num_layers, lead_steps)
        rows.append(row_from(label, options, score, dense, density, effective, values, gen_s, score_s))
        print(f"{label} {options}: " + row_line(rows[-1]), flush=True)
        write_json(args.json, info, rows)
    print(f"\n{args.split} suite, {args.prompts} prompts x {args.seeds} seeds, {args.steps} steps "
          f"({info['device']}, {info['dtype']}); points and PSNR against dense")
    print(table(rows))


def row_from(name, options, score, dense, density, effective, psnrs, gen_s, score_s):
    return dict(method=name, options=options, density=density,
                sparsity=None if density is None else 1 - density, effective_density=effective,
                all=score["all"], delta_all=points(score["all"], dense["all"]),
                attributes={a: score[a] for a in ATTRIBUTES},
                delta={a: points(score[a], dense[a]) for a in ATTRIBUTES},
                flicker=score["flicker"], n_clips=score["n_clips"],
                psnr_mean=None if psnrs is None else float(psnrs.mean()),
                psnr_min=None if psnrs is None else float(psnrs.min()),
                # Per clip too: a mean cannot tell a few diverged clips from many that drifted a little.
                psnr_median=None if psnrs is None else float(np.median(psnrs)),
                # The tail: clips that are another video rather than a drifted copy of the dense one.
                share_under_20db=None if psnrs is None else float((psnrs < 20).mean()),
                share_under_10db=None if psnrs is None else float((psnrs < 10).mean()),
                psnrs=None if psnrs is None else [round(float(x), 2) for x in psnrs],
                # Which clips each attribute got wrong, to compare settings clip by clip (captions are in the header).
                wrong={a: [i for i, r in enumerate(score["per_clip"]) if r[a] is not None and not r[a]]
                       for a in (*ATTRIBUTES, "all")},
                seconds=gen_s, score_seconds=score_s, note="")


def percent(share):
    return None if share is None else 100 * share


def points(a, b):
    return None if a is None or b is None else 100 * (a - b)


def row_line(r):
    return (f"density {fmt(r['density'], '.3f')}, all {fmt(100 * r['all'])}% ({fmt(r['delta_all'], '+.1f')} pt), "
            f"PSNR {fmt(r['psnr_mean'])} / median {fmt(r['psnr_median'])} / min {fmt(r['psnr_min'])} dB, "
            f"under 20 / 10 dB {fmt(percent(r['share_under_20db']))}% / {fmt(percent(r['share_under_10db']))}%, "
            f"{r['seconds']:.1f} s")


def table(rows):
    setting = [(r["method"] + " " + ",".join(f"{k}={v}" for k, v in r["options"].items())).strip() for r in rows]
    width = max(24, *map(len, setting))
    lines = [f"{'method / setting':{width}s} {'density':>7s} {'sparsity':>8s} {'all%':>6s} {'d pt':>6s} "
             + "".join(f"{a[:6]:>7s}" for a in ATTRIBUTES)
             + f" {'PSNR':>6s} {'median':>6s} {'min':>6s} {'<20dB':>6s} {'<10dB':>6s} {'s':>6s}"]
    for name, r in zip(setting, rows):
        if "all" not in r:
            lines.append(f"{name:{width}s} ({r['note']})")
            continue
        attrs = "".join(f"{fmt(None if v is None else 100 * v):>7s}" for v in r["attributes"].values())
        lines.append(f"{name:{width}s} {fmt(r['density'], '.3f'):>7s} {fmt(r['sparsity'], '.3f'):>8s} "
                     f"{fmt(100 * r['all']):>6s} {fmt(r['delta_all'], '+.1f'):>6s} {attrs} {fmt(r['psnr_mean']):>6s} "
                     f"{fmt(r['psnr_median']):>6s} {fmt(r['psnr_min']):>6s} {fmt(percent(r['share_under_20db'])):>6s} "
                     f"{fmt(percent(r['share_under_10db'])):>6s} {r['seconds']:6.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
