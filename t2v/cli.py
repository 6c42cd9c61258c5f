"""The ``t2v`` command.

    t2v generate "a red circle moves to the right" -o red_circle.mp4 --seed 0 --steps 25
    t2v generate "a red circle moves to the right" --cache first-block          # a step cache
    torchrun --nproc-per-node 2 -m t2v.cli generate "a red circle moves up" --parallel ulysses   # one video, 2 GPUs
    t2v list

The pipelines package sits above this one, so it is imported inside the commands, never at import time.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import time
import warnings


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def parse_value(text: str) -> object:
    """A Python literal where it is one (2, 0.5, True, [0, 1]); true / false / none in any case; else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_option(text: str, flag: str = "--attention-option") -> tuple[str, object]:
    """'key=value' with the value read by `parse_value`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{flag} must look like key=value, got {text!r}")
    return key.strip(), parse_value(value)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.caches import available_caches
    from pipelines.parallel import KINDS as PARALLEL_KINDS

    parser = argparse.ArgumentParser(prog="t2v", description="Text-to-video generation with the t2v toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate one video from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="video.mp4", help="an .mp4 or .gif file (default: video.mp4)")
    gen.add_argument("--model", default=None,
                     help="a model name, a pipeline folder, or a diffusers folder of Wan, HunyuanVideo or CogVideoX "
                          "(default: the embedded model)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25, help="denoising steps")
    gen.add_argument("--frames", type=int, default=None, help="default: what the model was trained at")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--attention", default=None, help="attention method (see `t2v list`)")
    gen.add_argument("--attention-option", action="append", default=[], metavar="KEY=VALUE",
                     help="option of the attention method, repeatable (e.g. dense_warmup_steps=2)")
    gen.add_argument("--guidance", action="append", default=[], metavar="NAME",
                     help="extra guidance method, repeatable (see `t2v list`)")
    gen.add_argument("--guidance-option", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                     help="option of a guidance method, repeatable (e.g. fourier-motion.strength=1.0); "
                          "NAME may be left out when one --guidance is given")
    gen.add_argument("--cache", default=None, metavar="NAME",
                     help=f"step cache: {', '.join(available_caches())} (see `t2v list`)")
    gen.add_argument("--cache-option", action="append", default=[], metavar="KEY=VALUE",
                     help="option of the step cache, repeatable (e.g. threshold=0.1)")
    gen.add_argument("--parallel", default=None, choices=PARALLEL_KINDS,
                     help="split the video across the processes of a torchrun launch (context parallelism); "
                          "the first process writes the file")
    gen.add_argument("--no-position-interpolation", action="store_true",
                     help="past the frames the model was trained at, leave out the position interpolation this "
                          "project's pipeline adds by itself (the clip then plays its motion back)")
    gen.add_argument("--device", default=None,
                     help="cuda, cpu, ... (default: cuda if available; with --parallel, this process's GPU)")
    gen.add_argument("--fps", type=int, default=8)

    commands.add_parser("list", help="list models, attention methods, guidance methods and step caches")
    return parser


def cmd_list(args) -> None:
    import attention
    from pipelines.caches import CACHES
    from pipelines.loading import (available_models, measured_quality, pipeline_class, trained_attention,
                                   trained_high_noise_model, trained_opening_model)
    from t2v import EMBEDDED_MODEL
    from t2v.guidance import available_guidance

    print("models:")
    for name, path in available_models().items():
        try:
            trained = trained_attention(path)
            transformer = json.loads((path / "transformer" / "config.json").read_text())
            note = (f"fine-tuned with {trained[0]} {trained[1]}" if trained
                    else "embedded, default" if name == EMBEDDED_MODEL
                    else "block diffusion: any number of frames, chunk by chunk"
                    if pipeline_class(path).__name__ == "BlockDiffusionPipeline"
                    else f"MATE token mixer: linear cost, up to {transformer.get('max_frames')} frames"
                    if transformer.get("_class_name") == "MateVideoDiT" else "a variant")
            lead = trained_high_noise_model(path)
            if lead:
                note += f"; {lead[0]} runs the noisiest steps, timestep >= {lead[1]:.0%} of the schedule's"
            opening = trained_opening_model(path)
            if opening:
                note += f"; {opening[0]} makes the first {opening[1]} frames"
            quality = measured_quality(path)
        except (OSError, ValueError) as error:
            note, quality = str(error), None
        print(f"  {name} ({note})  {path}")
        if quality:
            print(f"      measured: {quality}")
    print("attention methods:")
    for name in attention.available_methods():
        print(f"  {name}")
    print("guidance methods (classifier-free guidance is always on; set its scale with --guidance-scale):")
    for name in available_guidance() or ["(none registered)"]:
        print(f"  {name}")
    print("step caches (--cache NAME --cache-option KEY=VALUE):")
    for name, cache in CACHES.items():
        print(f"  {name}: {cache.summary}")


def cmd_generate(args) -> None:
    import torch

    import attention
    from pipelines import check_output_path, export_video, load_pipeline
    from pipelines.caches import available_caches
    from pipelines.loading import launched_distributed
    from t2v.guidance import get_guidance

    # Everything that needs no model is checked first, the output folder included.
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    for name, value in (("--frames", args.frames), ("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    options = dict(parse_option(text) for text in args.attention_option)
    if args.attention is not None:
        attention.get_method(args.attention)
    guidance_options = {name: {} for name in args.guidance}
    for text in args.guidance_option:
        key, value = parse_option(text, "--guidance-option")
        name, _, key = key.rpartition(".")
        if not name and len(guidance_options) != 1:
            raise UsageError(f"--guidance-option {text!r}: say which guidance it is for, as NAME.{key}=...")
        name = name or next(iter(guidance_options))
        if name not in guidance_options:
            raise UsageError(f"--guidance-option {text!r} is for {name!r}, which no --guidance names")
        guidance_options[name][key] = value
    guidance = [get_guidance(name, **guidance_options[name]) for name in args.guidance]
    cache_options = dict(parse_option(text, "--cache-option") for text in args.cache_option)
    if args.cache is not None and args.cache not in available_caches():
        raise UsageError(f"unknown cache {args.cache!r}; known caches: {', '.join(available_caches())}")
    if args.cache is None and cache_options:
        raise UsageError("--cache-option given without --cache")
    if args.cache == "mag":  # its ratios are laid out over the steps of the generation
        cache_options.setdefault("num_inference_steps", args.steps)
    if args.parallel and not launched_distributed():
        raise UsageError(f"--parallel {args.parallel} splits one video across several processes: launch them with "
                         "`torchrun --nproc-per-node N -m t2v.cli generate ...`")
    output = check_output_path(args.output)

    start = time.perf_counter()
    pipe = load_pipeline(args.model, attention=args.attention, guidance=guidance, device=args.device,
                         cache=args.cache, cache_options=cache_options, parallel=args.parallel, **options)
    # Under --parallel every process makes the same video; the first one shows progress and writes it.
    first = not args.parallel or torch.distributed.get_rank() == 0
    if not first:
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    call = dict(negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height, width=args.width,
                num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generator)
    if args.no_position_interpolation:
        if "interpolate_positions" not in inspect.signature(pipe.__call__).parameters:
            raise UsageError(f"--no-position-interpolation: {type(pipe).__name__} does not interpolate positions")
        call["interpolate_positions"] = False
    # Options not given keep the pipeline's own defaults: diffusers' pipelines (a --model folder of Wan,
    # HunyuanVideo or CogVideoX) take the same names but no None for them.
    frames = pipe(args.prompt, **{key: value for key, value in call.items() if value is not None}).frames[0]
    if first:
        export_video(frames, output, fps=args.fps)
        print(f"{output}  ({time.perf_counter() - start:.1f} s)")
    if args.parallel:
        from pipelines.parallel import leave_process_group
        leave_process_group(0)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"t2v: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not the user's concern
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()  # the loading bars; the denoising bar stays
        {"generate": cmd_generate, "list": cmd_list}[args.command](args)
    except (UsageError, ValueError, TypeError, OSError, ImportError) as error:
        print(f"t2v: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
