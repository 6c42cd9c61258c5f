"""Benchmarks. Each subcommand registers itself in SUBCOMMANDS.

    python scripts/benchmark.py attention [--shapes wan1.3b ...] [--densities 5 15 100] [--quick] [--json PATH]

``attention`` times, on CUDA, forward attention at video-model shapes: dense cuDNN SDPA,
FlashAttention-2 SDPA, compiled FlexAttention with a BlockMask of the same random selection,
and the Triton block-sparse kernel (median of triton.testing.do_bench).
"""

import argparse
import datetime
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name: (tokens, heads, head_dim)
ATTENTION_SHAPES = {
    "wan1.3b": (32760, 12, 128),
    "wan14b-720p": (75600, 40, 128),
    "hunyuan-720p": (118800, 24, 128),
}


def random_selection(B, H, n_q_blocks, n_k_blocks, density, device):
    """Exactly round(density * NKB) random key blocks per (batch, head, query block), ascending."""
    import torch
    n_sel = min(n_k_blocks, max(1, round(density * n_k_blocks)))
    order = torch.rand(B, H, n_q_blocks, n_k_blocks, device=device).argsort(-1)
    index = order[..., :n_sel].sort(-1).values.to(torch.int32).contiguous()
    count = torch.full((B, H, n_q_blocks), n_sel, dtype=torch.int32, device=device)
    return index, count


def flex_block_mask(index, count, n_k_blocks, seq_len, block_size):
    """A FlexAttention BlockMask with the selection as full (unmasked) blocks."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask
    B, H, nqb, width = index.shape
    full_index = torch.zeros(B, H, nqb, n_k_blocks, dtype=torch.int32, device=index.device)
    full_index[..., :width] = index
    zeros = torch.zeros_like(count)
    return BlockMask.from_kv_blocks(zeros, torch.zeros_like(full_index), count, full_index,
                                    BLOCK_SIZE=block_size, seq_lengths=(seq_len, seq_len))


def sweep_configs(T, bench, fn, variants, bs):
    """Time every fitting forward config explicitly (for tuning the config lists)."""
    res = {}
    for variant in variants:
        T.FWD_TMA = variant == "tma"
        for cfg in T.FWD_CONFIGS:
            if not T._fits(cfg, bs):
                continue
            T._forced_configs["fwd"] = cfg
            try:
                fn()
                res[f"{variant} {cfg}"] = bench(fn)
            except Exception as exc:  # e.g. out of shared memory
                res[f"{variant} {cfg}"] = float("nan")
                print(f"    {variant} {cfg}: {type(exc).__name__}", flush=True)
            print(f"    sweep {variant} {cfg}: {res[f'{variant} {cfg}']:.3f} ms", flush=True)
        # The first config again, masking every key tile instead of only the one crossing M.
        T._forced_configs["fwd"], T.FWD_TAIL_BRANCH = T.FWD_CONFIGS[0], False
        fn()
        res[f"{variant} {T.FWD_CONFIGS[0]} mask-all-tiles"] = t = bench(fn)
        print(f"    sweep {variant} {T.FWD_CONFIGS[0]} mask-all-tiles: {t:.3f} ms", flush=True)
        T.FWD_TAIL_BRANCH = True
    T._forced_configs.clear()
    return res


def run_attention(args):
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    from attention.kernels import triton_block_sparse as T

    shapes = ["wan1.3b"] if args.quick else args.shapes
    bs, dev, dtype = args.block_size, "cuda", torch.bfloat16
    flex = torch.compile(flex_attention)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []

    def bench(fn):
        return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    def sdpa_time(backend, q, k, v):
        try:
            with sdpa_kernel(backend):
                sdpa(q, k, v)
                return bench(lambda: sdpa(q, k, v))
        except RuntimeError as exc:
            print(f"  {backend}: {str(exc)[:120]}", flush=True)
            return float("nan")

    for shape in shapes:
        N, H, D = ATTENTION_SHAPES[shape]
        B = 1
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
        nb = math.ceil(N / bs)
        t_cudnn = sdpa_time(SDPBackend.CUDNN_ATTENTION, q, k, v)
        t_fa2 = sdpa_time(SDPBackend.FLASH_ATTENTION, q, k, v)
        print(f"{shape}: N={N} H={H} D={D}  cuDNN {t_cudnn:.3f} ms  FA2 {t_fa2:.3f} ms", flush=True)
        for dens in args.densities:
            index, count = random_selection(B, H, nb, nb, dens / 100, dev)
            keys = count[0, 0, 0].item() * bs  # keys read per query (tail block counted whole)
            flops = 4 * B * H * N * keys * D
            mask = flex_block_mask(index, count, nb, N, bs)
            ours_fn = lambda: T.block_sparse_attention(q, k, v, index, count, block_size=bs)  # noqa: E731
            flex_fn = lambda: flex(q, k, v, block_mask=mask)  # noqa: E731
            ref = flex_fn()
            t_flex = bench(flex_fn)
            variants = {}
            for variant in args.variants:  # forward K/V loads: tensor descriptors or pointers
                T.FWD_TMA = variant == "tma"
                out, _ = ours_fn()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                variants[variant] = dict(ms=bench(ours_fn), rel_err_vs_flex=err, config=str(
                    getattr(T._tuned.get(("fwd", bs)), "best_config", None)))
                print(f"  {dens:5.1f}%  {variant:4s} {variants[variant]['ms']:8.3f} ms  "
                      f"(vs flex err {err:.1e})  {variants[variant]['config']}", flush=True)
            best = min(variants, key=lambda name: variants[name]["ms"])
            t_ours = variants[best]["ms"]
            row = dict(shape=shape, tokens=N, heads=H, head_dim=D, density_pct=dens, block_size=bs,
                       cudnn_ms=t_cudnn, fa2_ms=t_fa2, flex_ms=t_flex, ours_ms=t_ours, ours_variant=best,
                       ours_over_flex=t_ours / t_flex, cudnn_over_ours=t_cudnn / t_ours,
                       ours_tflops=flops / t_ours * 1e-9, flex_tflops=flops / t_flex * 1e-9,
                       variants=variants)
            rows.append(row)
            print(f"  {dens:5.1f}%  flex {t_flex:8.3f}  ours {t_ours:8.3f} ms ({best}, "
                  f"{row['ours_tflops']:.0f} TFLOP/s; flex {row['flex_tflops']:.0f})", flush=True)
            if args.sweep and shape == shapes[0] and dens in (15, 100):
                row["sweep"] = sweep_configs(T, bench, ours_fn, args.variants, bs)
            del mask
        del q, k, v
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    print(f"\nForward attention, bf16, B=1, block {bs}, median ms ({device}, {date}, "
          f"torch {torch.__version__}, triton {triton.__version__})")
    head = (f"{'shape':14s} {'dens%':>6s} {'cuDNN':>9s} {'FA2':>9s} {'Flex':>9s} {'ours':>9s} {'loads':>5s} "
            f"{'ours/Flex':>9s} {'cuDNN/ours':>10s} {'TFLOP/s':>8s}")
    print(head)
    for r in rows:
        print(f"{r['shape']:14s} {r['density_pct']:6.1f} {r['cudnn_ms']:9.3f} {r['fa2_ms']:9.3f} {r['flex_ms']:9.3f} "
              f"{r['ours_ms']:9.3f} {r['ours_variant']:>5s} {r['ours_over_flex']:9.2f} {r['cudnn_over_ours']:10.2f} "
              f"{r['ours_tflops']:8.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=device, date=date, torch=torch.__version__, triton=triton.__version__,
                           rows=rows), fh, indent=1)


def add_attention_parser(sub):
    p = sub.add_parser("attention", help="dense vs FlexAttention vs Triton block-sparse attention")
    p.add_argument("--shapes", nargs="+", default=list(ATTENTION_SHAPES), choices=list(ATTENTION_SHAPES))
    p.add_argument("--densities", nargs="+", type=float, default=[5, 10, 15, 25, 50, 100],
                   help="percent of key blocks selected per query block")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="only the wan1.3b shape")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--variants", nargs="+", default=["tma", "ptr"], choices=["tma", "ptr"],
                   help="forward K/V loads: tensor descriptors (tma) and/or pointers (ptr)")
    p.add_argument("--sweep", action="store_true", help="also time every forward config on the first shape")
    p.set_defaults(func=run_attention)


# Each entry adds one subcommand to the parser.
SUBCOMMANDS = [add_attention_parser]


def main(argv=None):
    parser = argparse.ArgumentParser(description="t2v benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
