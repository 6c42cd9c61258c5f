"""`scripts/benchmark.py flashblock`: attention time per denoising step of chunk-by-chunk generation, with and
without FlashBlock's cache of the block-external attention.

One self-attention layer at a Wan-like width (12 heads of 128, bf16 on CUDA), chunks of 3,120 tokens (two latent
frames of Wan2.1's 480p grid). For the chunk made after `--chunks - 1` earlier ones, every step of its denoising is
timed as generation runs it: without a cache, attention of the chunk over the context and itself in one call
(cuDNN); with FlashBlock, the in-chunk attention every step and the block-external attention only on the steps its
schedule refreshes it (the real `FlashBlock` and `LayerCache` code), merged by log-sum-exp. The mean over the
chunk's steps is the attention time per step; the clip's mean over all its chunks is also printed.
"""

from __future__ import annotations


def add_flashblock_parser(sub):
    p = sub.add_parser("flashblock", help="block-diffusion attention per step: no cache vs FlashBlock")
    p.add_argument("--chunks", type=int, default=8, help="chunks of the clip (the last attends to the others)")
    p.add_argument("--chunk-tokens", type=int, default=3120)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=25, help="denoising steps of a chunk")
    p.add_argument("--refresh", type=int, nargs="+", default=[2, 4, 5, 8], help="refresh_every values to time")
    p.add_argument("--exact-steps", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (checks the plumbing)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run_flashblock)


def _chunk_ms(q, k, v, context_k, context_v, steps, flashblock, median_ms, runs, device):
    """Milliseconds of attention for all `steps` steps of one chunk (the whole schedule, timed as one call)."""
    import torch
    import torch.nn.functional as F

    from attention.block_causal import LayerCache
    from attention.kernels import merge_attention

    if context_k is None:
        def fn():
            for _ in range(steps):
                F.scaled_dot_product_attention(q, k, v)
    elif flashblock is None:
        keys, values = torch.cat([context_k, k], 2), torch.cat([context_v, v], 2)

        def fn():
            for _ in range(steps):
                F.scaled_dot_product_attention(q, keys, values)
    else:
        def fn():
            layer = LayerCache(key=context_k, value=context_v)
            for step in range(steps):
                inside = flashblock(q, k, v, None, step, return_lse=True)
                merge_attention(*inside, *flashblock.external(q, layer, step))
    return median_ms(fn, runs, 1, device)


def run_flashblock(args):
    import torch

    from attention.methods.flashblock import FlashBlock
    from benchmark import cudnn_first, fmt, median_ms, run_info, write_json

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.chunk_tokens, args.heads, args.head_dim, args.runs = 64, 2, 16, 1
    torch.manual_seed(0)
    shape = (1, args.heads, args.chunk_tokens, args.head_dim)
    tokens = [[torch.randn(shape, device=device, dtype=dtype) for _ in range(3)] for _ in range(args.chunks)]
    info = dict(run_info(device), chunks=args.chunks, chunk_tokens=args.chunk_tokens, heads=args.heads,
                head_dim=args.head_dim, steps=args.steps, exact_steps=args.exact_steps)
    settings = [("no cache", None)] + [(f"flashblock refresh_every={r}", r) for r in args.refresh]
    rows = []
    with cudnn_first():
        for label, refresh in settings:
            layer = None if refresh is None else FlashBlock(refresh_every=refresh, exact_steps=args.exact_steps)
            per_chunk = []
            for j in range(args.chunks):
                q, k, v = tokens[j]
                context_k = torch.cat([t[1] for t in tokens[:j]], 2) if j else None
                context_v = torch.cat([t[2] for t in tokens[:j]], 2) if j else None
                per_chunk.append(_chunk_ms(q, k, v, context_k, context_v, args.steps, layer, median_ms,
                                           args.runs, device) / args.steps)
            rows.append(dict(setting=label, refresh_every=refresh, last_chunk_ms=per_chunk[-1],
                             clip_mean_ms=sum(per_chunk) / len(per_chunk)))
            write_json(args.json, info, rows)
    base = rows[0]
    print(f"{info['device']}: {args.chunks} chunks of {args.chunk_tokens} tokens, {args.heads} heads of "
          f"{args.head_dim}, {args.steps} steps a chunk, exact_steps={args.exact_steps}")
    print(f"{'setting':<30}{'last chunk ms/step':>20}{'speed-up':>10}{'clip mean ms/step':>19}{'speed-up':>10}")
    for r in rows:
        print(f"{r['setting']:<30}{fmt(r['last_chunk_ms'], '.3f'):>20}"
              f"{fmt(base['last_chunk_ms'] / r['last_chunk_ms'], '.2f'):>10}"
              f"{fmt(r['clip_mean_ms'], '.3f'):>19}{fmt(base['clip_mean_ms'] / r['clip_mean_ms'], '.2f'):>10}")
    return rows
