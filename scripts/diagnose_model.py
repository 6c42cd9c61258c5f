"""Probes of a text-to-video model of this project (default: the embedded one).

    python scripts/diagnose_model.py words      # how much one caption word moves the prediction
    python scripts/diagnose_model.py reversal   # whether the model reads which way a motion goes
    python scripts/diagnose_model.py layout     # whether near pure noise it lays a motion out the prompted way
    python scripts/diagnose_model.py precision  # how far float32 and bfloat16 sampling drift apart
    python scripts/diagnose_model.py block-mass # how much attention mass the best key blocks hold

`words`: from the same noise, the model's predicted clean clip (x - t * velocity) for two captions that differ in
one word, as the relative norm of the difference, at several noise levels. A word the model has learned to follow
moves the prediction; one it ignores does not. First, the same for the text encoder's output: a word pair it maps
to nearly the same features cannot move the prediction.

`reversal`: training-world clips whose motion has a direction (left, right, up, down, grow, shrink), noised to
several times; the model's velocity error with the true caption and with the motion reversed (left for right, grow
for shrink: the clip played backwards). A model that reads the direction predicts worse from the reversed caption;
one that knows only the axis of a motion predicts equally well from both.

`layout`: from pure noise (and nearly pure noise), the model's predicted clean clip for a red circle on black moving
each way, and how far the red mass's centre travels from the first frame to the last, in pixels along the motion's
axis. Near pure noise the best prediction is the mean of all clips with that caption, whose centre travels the
prompted way (objects stay in the picture, so one moving right starts on the left); a model that leaves the
direction to the noise predicts about the same layout for every direction.

`precision`: the held-out suite generated in float32 and in bfloat16 with the same seeds, and the PSNR of each pair:
the yardstick for PSNR against dense attention (a method cannot be judged closer than rounding allows).

`block-mass`: while the model samples the held-out suite with its own (dense) attention, the share of each query
block's exact attention mass that its best key blocks hold (the oracle's selection, `attention/methods/oracle.py`),
per layer, when half, a quarter or a tenth of the key blocks are kept. It bounds what any selection that skips
blocks can keep with that many blocks per query block.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

WORD_PAIRS = {
    "colour": ("a red circle moves to the left on black", "a blue circle moves to the left on black"),
    "shape": ("a red circle moves to the left on black", "a red square moves to the left on black"),
    "direction": ("a red circle moves to the left on black", "a red circle moves to the right on black"),
    "vertical": ("a red circle moves up on black", "a red circle moves down on black"),
}


def text_sensitivity(pipe) -> dict[str, float]:
    """{pair name: relative change of the text encoder's output between the pair's two captions}, over the tokens
    the transformer sees (it zeroes the padding).

    A text encoder that maps two words to nearly the same features leaves the transformer nothing to tell them by.
    """
    device = pipe._execution_device
    changes = {}
    with torch.no_grad():
        for name, captions in WORD_PAIRS.items():
            first, second = ((text * mask.unsqueeze(-1)).float() for text, mask in
                             (pipe.encode_prompt([caption], 1, device) for caption in captions))
            changes[name] = float((first - second).norm() / first.norm())
    return changes


def word_sensitivity(pipe, times=(0.95, 0.8, 0.5), clips: int = 4, seed: int = 0) -> dict[str, list[float]]:
    """{pair name: [relative change of the predicted clean clip at each time]}."""
    transformer = pipe.transformer
    c = transformer.config
    shape = (clips, c.in_channels, c.sample_frames, c.sample_height, c.sample_width)
    noisy = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    device, dtype = pipe._execution_device, transformer.dtype
    noisy = noisy.to(device, dtype)
    changes = {}
    with torch.no_grad():
        for name, captions in WORD_PAIRS.items():
            changes[name] = []
            for t in times:
                clean = []
                for caption in captions:
                    text, mask = pipe.encode_prompt([caption] * clips, 1, device)
                    velocity = transformer(noisy, torch.full((clips,), 1000.0 * t, device=device), text, mask).sample
                    clean.append((noisy - t * velocity).float())
                changes[name].append(float((clean[0] - clean[1]).norm() / clean[0].norm()))
    return changes


REVERSED_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}


def reversal_losses(pipe, times=(0.95, 0.8, 0.5), clips: int = 64, seed: int = 0,
                    batch_size: int = 32) -> dict[float, tuple[float, float]]:
    """{t: (velocity MSE with the true caption, with the motion reversed)} over one-object clips with a direction."""
    import dataclasses

    from t2v.data import canonical_caption, render, sample_specs

    transformer = pipe.transformer
    c = transformer.config
    generator = torch.Generator().manual_seed(seed)
    specs = [s for s in sample_specs(clips * 4, generator, "train", two_object_prob=0.0)
             if s.objects[0].motion in REVERSED_MOTION][:clips]
    reversed_specs = [dataclasses.replace(s, objects=(dataclasses.replace(
        s.objects[0], motion=REVERSED_MOTION[s.objects[0].motion]),)) for s in specs]
    videos = render(specs, c.sample_frames, c.sample_height, c.sample_width, generator=generator)
    noise = torch.randn(videos.shape, generator=generator)
    device, dtype = pipe._execution_device, transformer.dtype
    totals = {t: [0.0, 0.0] for t in times}
    with torch.no_grad():
        for start in range(0, len(specs), batch_size):
            x = videos[start:start + batch_size].to(device, dtype)
            eps = noise[start:start + batch_size].to(device, dtype)
            prompts = [pipe.encode_prompt([canonical_caption(s) for s in chosen[start:start + batch_size]], 1, device)
                       for chosen in (specs, reversed_specs)]
            for t in times:
                noisy, target = (1 - t) * x + t * eps, (eps - x).float()
                timestep = torch.full((len(x),), 1000.0 * t, device=device)
                for i, (text, mask) in enumerate(prompts):
                    velocity = transformer(noisy, timestep, text, mask).sample.float()
                    totals[t][i] += float(((velocity - target) ** 2).mean()) * len(x)
    return {t: (true / len(specs), reversed_ / len(specs)) for t, (true, reversed_) in totals.items()}


LAYOUT_CAPTIONS = {"left": "a red circle moves to the left on black", "right": "a red circle moves to the right on black",
                   "up": "a red circle moves up on black", "down": "a red circle moves down on black"}


def travel_along(direction: str, clips: torch.Tensor) -> torch.Tensor:
    """Per clip, the red mass's travel along `direction`'s axis (right and down positive)."""
    dx, dy = red_mass_travel(clips)
    return dx if direction in ("left", "right") else dy


def red_mass_travel(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) travel in pixels of the red mass's centre from the first to the last frame of clips (B, 3, F, H, W)."""
    mass = (clips[:, 0] - (clips[:, 1] + clips[:, 2]) / 2).clamp(min=0)  # red over black: 2 where red, 0 on black
    total = mass.sum((-2, -1)).clamp(min=1e-6)  # (B, F)
    ys = torch.arange(mass.shape[-2], dtype=mass.dtype, device=mass.device)
    xs = torch.arange(mass.shape[-1], dtype=mass.dtype, device=mass.device)
    centre_x = (mass.sum(-2) * xs).sum(-1) / total
    centre_y = (mass.sum(-1) * ys).sum(-1) / total
    return centre_x[:, -1] - centre_x[:, 0], centre_y[:, -1] - centre_y[:, 0]


def world_layout_travel(clips: int = 512, seed: int = 0,
                        shape: tuple[int, int, int] = (16, 32, 32)) -> dict[str, float]:
    """{direction: travel of the mean of many world clips (frames, height, width) with that caption}: what a model
    should predict at t = 1."""
    from t2v.data import ClipSpec, ObjectSpec, render

    generator = torch.Generator().manual_seed(seed)
    travel = {}
    for direction in LAYOUT_CAPTIONS:
        specs = [ClipSpec((ObjectSpec("red", "circle", direction, speed),), "black")
                 for speed in ("slow", "fast") for _ in range(clips // 2)]
        mean_clip = render(specs, *shape, generator=generator).mean(0, keepdim=True)
        travel[direction] = float(travel_along(direction, mean_clip))
    return travel


def layout_travel(pipe, times=(1.0, 0.95), clips: int = 16, seed: int = 0) -> dict[str, list[float]]:
    """{direction: [mean travel of the predicted clean clip along the direction's axis, at each time]}."""
    transformer = pipe.transformer
    c = transformer.config
    shape = (clips, c.in_channels, c.sample_frames, c.sample_height, c.sample_width)
    device, dtype = pipe._execution_device, transformer.dtype
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    travel = {}
    with torch.no_grad():
        for direction, caption in LAYOUT_CAPTIONS.items():
            text, mask = pipe.encode_prompt([caption] * clips, 1, device)
            travel[direction] = []
            for t in times:
                # The clean clip behind the noise only matters below t = 1; a black frame keeps it neutral.
                noisy = (t * noise + (1 - t) * -1.0).to(dtype)
                velocity = transformer(noisy, torch.full((clips,), 1000.0 * t, device=device), text, mask).sample
                travel[direction].append(float(travel_along(direction, (noisy - t * velocity).float()).mean()))
    return travel


def precision_drift(model, device, prompts: int, seeds: int, steps: int, batch_size: int) -> list[float]:
    from pipelines import load_pipeline
    from t2v.eval.suite import generate_suite, psnr

    clips = []
    for dtype in (torch.float32, torch.bfloat16):
        pipe = load_pipeline(model, dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        clips.append(generate_suite(pipe, "heldout", prompts, seeds, batch_size, num_inference_steps=steps)[0])
    return [psnr(a, b) for a, b in zip(*clips)]


KEPT_FRACTIONS = (0.5, 0.25, 0.1)


def block_mass(pipe, prompts: int, seeds: int, steps: int, batch_size: int, block_size: int = 16) -> dict:
    """{(layer, kept fraction): (mean share of the mass kept, share of query blocks keeping under 3/4 of it)}."""
    import torch.nn.functional as F

    import attention
    from attention.methods.block_sparse import keep_top_fraction
    from attention.methods.oracle import exact_block_mass
    from t2v.eval.suite import generate_suite

    sums: dict = {}

    class MassProbe:  # computes dense attention, and on the side records what the best blocks would keep
        def __init__(self, layer_index: int, block_size: int):  # the layout it is handed is cut into these blocks
            self.layer = layer_index

        def __call__(self, q, k, v, layout):
            mass = exact_block_mass(layout.to_tiles(q), layout.to_tiles(k), layout.block_size)
            for fraction in KEPT_FRACTIONS:
                kept = (mass * keep_top_fraction(mass, fraction)).sum(-1)  # what the oracle would keep
                total = sums.setdefault((self.layer, fraction), [0.0, 0.0, 0])
                total[0] += float(kept.sum())
                total[1] += float((kept < 0.75).sum())
                total[2] += kept.numel()
            return F.scaled_dot_product_attention(q, k, v)

    attention.register_method("block-mass-probe", MassProbe, overwrite=True)
    attention.apply(pipe.transformer, "block-mass-probe", block_size=block_size)
    try:
        generate_suite(pipe, "heldout", prompts, seeds, batch_size, num_inference_steps=steps)
    finally:
        attention.remove(pipe.transformer)
        attention.unregister_method("block-mass-probe")
    return {key: (kept / rows, low / rows) for key, (kept, low, rows) in sorted(sums.items())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["words", "reversal", "layout", "precision", "block-mass"])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompts", type=int, default=8, help="precision, block-mass: held-out prompts")
    parser.add_argument("--seeds", type=int, default=2, help="precision, block-mass: seeds per prompt")
    parser.add_argument("--steps", type=int, default=20, help="precision, block-mass: denoising steps")
    parser.add_argument("--block-size", type=int, default=16, help="block-mass: tokens per block")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clips", type=int, default=64, help="reversal: clips with a directed motion")
    args = parser.parse_args(argv)

    if args.probe == "precision":  # loads the model twice, in two dtypes
        values = precision_drift(args.model, args.device, args.prompts, args.seeds, args.steps, args.batch_size)
        print(f"PSNR float32 vs bfloat16, {len(values)} clips: mean {np.mean(values):.1f} dB, "
              f"min {np.min(values):.1f} dB")
        return
    from pipelines import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    if args.probe == "block-mass":
        pipe.set_progress_bar_config(disable=True)
        result = block_mass(pipe, args.prompts, args.seeds, args.steps, args.batch_size, args.block_size)
        print(f"share of each query block's attention mass held by its best key blocks (block {args.block_size}), "
              "mean / share of query blocks under 0.75, by fraction of key blocks kept")
        print("layer  " + "".join(f"{f'keep {f:g}':>18s}" for f in KEPT_FRACTIONS))
        for layer in sorted({layer for layer, _ in result}):
            print(f"{layer:>5d}  " + "".join(f"{result[layer, f][0]:>11.3f} / {result[layer, f][1]:.2f}"
                                             for f in KEPT_FRACTIONS))
        return
    if args.probe == "words":
        print("relative change of the text encoder's output when one word changes")
        for name, value in text_sensitivity(pipe).items():
            print(f"  {name:<10}{100 * value:.1f}%")
        times = (0.95, 0.8, 0.5)
        print("relative change of the predicted clean clip when one word changes, at t = "
              + " / ".join(str(t) for t in times))
        for name, values in word_sensitivity(pipe, times).items():
            print(f"  {name:<10}" + " / ".join(f"{100 * v:.1f}%" for v in values))
    elif args.probe == "reversal":
        print(f"velocity MSE over {args.clips} clips with a directed motion: true caption / motion reversed")
        for t, (true, reversed_) in reversal_losses(pipe, clips=args.clips, batch_size=args.batch_size).items():
            print(f"  t = {t:<5}{true:.5f} / {reversed_:.5f}  ({100 * (reversed_ / true - 1):+.1f}%)")
    else:
        times = (1.0, 0.95)
        print("travel (px) of the red mass's centre, first to last frame, of the predicted clean clip, along the "
              "motion's axis (right and down positive), at t = " + " / ".join(str(t) for t in times))
        c = pipe.transformer.config
        world = world_layout_travel(shape=(c.sample_frames, c.sample_height, c.sample_width))
        for direction, values in layout_travel(pipe, times).items():
            print(f"  {direction:<6}" + " / ".join(f"{v:+.2f}" for v in values)
                  + f"    (mean of world clips: {world[direction]:+.2f})")


if __name__ == "__main__":
    main()
