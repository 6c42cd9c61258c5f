"""Generate a batch of videos from a prompts file into a folder, with a manifest.

    python scripts/generate.py prompts.txt -o outputs/batch --steps 25
    accelerate launch --num_processes 4 scripts/generate.py prompts.jsonl -o outputs/batch     # 4 GPUs
    accelerate launch --multi_gpu --num_processes 2 scripts/generate.py prompts.txt           # 2 CPU processes
    torchrun --nproc-per-node 4 scripts/generate.py prompts.txt --parallel ulysses            # each video on 4 GPUs

A .txt file holds one prompt a line (blank lines and lines starting with # are skipped). A .jsonl file holds one
object a line: {"prompt": ..., and optionally "seed", "steps", "frames", "height", "width", "guidance_scale",
"attention", "negative_prompt", "name"}. The folder gets one video per item and manifest.jsonl, one record per item:
prompt, seed, options, file, seconds, status ("ok" or "error") and error.

Running again skips the items whose record is ok and whose file exists. A failed item is recorded and the rest go
on. Under `accelerate launch` the items are split across processes; each appends to its own manifest part, and the
main process merges the parts at the end. With --parallel ulysses or ring, every process works on every item instead,
each video split across all of them (context parallelism), and the main process alone writes videos and manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

ITEM_OPTIONS = {"seed": int, "steps": int, "frames": int, "height": int, "width": int, "guidance_scale": (int, float),
                "attention": str, "negative_prompt": str, "name": str}
MANIFEST = "manifest.jsonl"


class BatchError(Exception):
    """Stops the whole batch before any generation: reported in one line, exit code 2."""


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "video"


def read_items(path: Path, base_seed: int, suffix: str) -> list[dict]:
    """One dict per item; an item that cannot be read carries an `error` naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BatchError(f"cannot read prompts file {str(path)!r}: {error}") from error
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = {"index": len(items), "line": number, "prompt": line.strip(), "options": {}, "error": None}
        if path.suffix.lower() == ".jsonl":
            item["prompt"] = None
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                options = {k: v for k, v in record.items() if k != "prompt"}
                for key, value in options.items():
                    if key not in ITEM_OPTIONS:
                        raise ValueError(f"unknown option {key!r} (known: prompt, {', '.join(ITEM_OPTIONS)})")
                    if not isinstance(value, ITEM_OPTIONS[key]) or isinstance(value, bool):
                        raise ValueError(f"option {key!r} has the wrong type: {value!r}")
                item["prompt"], item["options"] = record.get("prompt"), options
                if not isinstance(item["prompt"], str):
                    raise ValueError("missing \"prompt\" string")
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                item["error"] = f"{path}:{number}: {error}"
        if item["error"] is None and not item["prompt"].strip():
            item["error"] = f"{path}:{number}: the prompt is empty"
        item["seed"] = item["options"].pop("seed", base_seed + item["index"])
        name = item["options"].pop("name", None)
        stem = slug(name) if name else f"{item['index']:04d}-{slug(item['prompt'] or 'invalid')}"
        item["file"] = stem + suffix
        items.append(item)
    names = [item["file"] for item in items]
    for item in items:
        if item["error"] is None and names.count(item["file"]) > 1:
            item["error"] = f"{path}:{item['line']}: another item writes the same file {item['file']!r}"
    return items


def read_manifest(paths) -> dict[str, dict]:
    """Latest record per file from manifest files (a line cut short by a crash is ignored)."""
    records = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                records[record["file"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return records


def is_done(item: dict, records: dict, out_dir: Path) -> bool:
    record = records.get(item["file"])
    return (record is not None and record.get("status") == "ok" and (out_dir / item["file"]).exists()
            and record.get("prompt") == item["prompt"] and record.get("seed") == item["seed"]
            and record.get("options") == item["options"])


def generate_item(pipe, item: dict, args, out_dir: Path, write: bool = True) -> None:
    """Generates one item into the folder (`write` False: generates only, as the other processes of a video split
    across processes do); raises on failure."""
    import torch

    import attention
    from pipelines import export_video
    from pipelines.caches import start_generation
    from pipelines.loading import pipeline_transformers

    if item["error"]:
        raise ValueError(item["error"])
    opts = item["options"]
    method = opts.get("attention", args.attention)
    for transformer in pipeline_transformers(pipe):  # Wan 2.2 has two
        if method is None:
            attention.remove(transformer)
        elif attention.current_method(transformer) != method:
            attention.apply(transformer, method)
        start_generation(transformer, opts.get("steps", args.steps))  # a MagCache follows the item's steps
    call = dict(negative_prompt=opts.get("negative_prompt", args.negative_prompt),
                num_frames=opts.get("frames", args.frames), height=opts.get("height", args.height),
                width=opts.get("width", args.width), num_inference_steps=opts.get("steps", args.steps),
                guidance_scale=opts.get("guidance_scale", args.guidance_scale),
                generator=torch.Generator(device="cpu").manual_seed(item["seed"]))
    # Options not given keep the pipeline's own defaults: diffusers' pipelines (a --model folder of Wan,
    # HunyuanVideo or CogVideoX) take the same names but no None for them.
    frames = pipe(item["prompt"], **{key: value for key, value in call.items() if value is not None}).frames[0]
    if write:
        export_video(frames, out_dir / item["file"], fps=args.fps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", type=Path, help="a .txt or .jsonl file")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("outputs/batch"))
    parser.add_argument("--model", default=None,
                        help="model name, pipeline folder, or diffusers folder of Wan, HunyuanVideo or CogVideoX "
                             "(default: the embedded model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first item; item i gets seed + i")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--attention", default=None, help="attention method for items that name none")
    parser.add_argument("--cache", default=None, help="step cache (see `t2v list`)")
    parser.add_argument("--cache-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of the step cache, repeatable")
    parser.add_argument("--parallel", default=None, choices=["ulysses", "ring"],
                        help="each video split across all processes (context parallelism; launch with torchrun or "
                             "accelerate launch); by default each process makes its own share of the videos")
    parser.add_argument("--format", choices=["mp4", "gif"], default="mp4")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: this process's accelerate device")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BatchError as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2


def run(args) -> int:
    import attention
    from accelerate import PartialState
    from tqdm import tqdm

    from pipelines import load_pipeline
    from pipelines.caches import check_cache_name
    from pipelines.loading import check_writable_dir
    from t2v.cli import UsageError, parse_option

    import torch

    # Without CUDA (or with --device cpu) the processes of `accelerate launch --multi_gpu` join over gloo on the CPU.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    out_dir = args.output_dir
    try:
        check_writable_dir(out_dir)  # before any generation
        if args.attention is not None:
            attention.get_method(args.attention)
        if args.cache is not None:
            check_cache_name(args.cache)
        cache_options = dict(parse_option(text, "--cache-option") for text in args.cache_option)
        if args.parallel and state.num_processes < 2:
            raise ValueError(f"--parallel {args.parallel} splits each video across several processes: launch them "
                             "with `torchrun --nproc-per-node N` or `accelerate launch --num_processes N`")
    except (PermissionError, ValueError, UsageError) as error:
        raise BatchError(error) from error
    items = read_items(args.prompts, args.seed, "." + args.format)
    parts = sorted(out_dir.glob(f"{MANIFEST}.part-*"))  # left by an interrupted run
    records = read_manifest([out_dir / MANIFEST, *parts])
    todo = [item for item in items if not is_done(item, records, out_dir)]
    if state.is_main_process:
        print(f"{len(items)} items, {len(items) - len(todo)} already done, {len(todo)} to generate", flush=True)
    state.wait_for_everyone()  # everyone has read the manifest before anyone appends to a part

    # One video per process, or (context parallelism) every process on every video and the main one writing.
    writes = state.is_main_process or not args.parallel
    with contextlib.nullcontext(todo) if args.parallel else state.split_between_processes(todo) as mine:
        pipe = None
        if any(item["error"] is None for item in mine):
            try:
                pipe = load_pipeline(args.model, device=args.device or state.device, cache=args.cache,
                                     cache_options=cache_options, parallel=args.parallel)
            except (OSError, ValueError, ImportError) as error:
                raise BatchError(" ".join(str(error).split())) from error
            pipe.set_progress_bar_config(disable=True)
        part = out_dir / f"{MANIFEST}.part-{state.process_index}"
        for item in tqdm(mine, desc=f"process {state.process_index}", position=state.process_index,
                         disable=not (mine and writes)):
            start, error = time.perf_counter(), None
            try:
                generate_item(pipe, item, args, out_dir, write=writes)
            except Exception as exc:  # a failed item is recorded and the batch goes on
                error = " ".join(str(exc).split()) or type(exc).__name__
            record = {"prompt": item["prompt"], "seed": item["seed"], "options": item["options"],
                      "file": item["file"], "seconds": round(time.perf_counter() - start, 3),
                      "status": "error" if error else "ok", "error": error}
            if writes:
                with part.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

    state.wait_for_everyone()
    code = 0
    if state.is_main_process:
        parts = sorted(out_dir.glob(f"{MANIFEST}.part-*"))
        merged = read_manifest([out_dir / MANIFEST, *parts])
        order = {item["file"]: item["index"] for item in items}
        ordered = sorted(merged.values(), key=lambda r: order.get(r["file"], len(order)))
        tmp = out_dir / f"{MANIFEST}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered), encoding="utf-8")
        tmp.replace(out_dir / MANIFEST)
        for part in parts:
            part.unlink()
        failed = sum(merged[item["file"]]["status"] != "ok" for item in items if item["file"] in merged)
        print(f"{len(items) - failed} ok, {failed} failed; manifest: {out_dir / MANIFEST}")
        code = 1 if failed else 0
    from pipelines.parallel import leave_process_group
    leave_process_group(code)  # under torchrun: together, and without the exit-time teardown that can abort a rank
    return code


if __name__ == "__main__":
    sys.exit(main())
