"""`scripts/benchmark.py mate`: LinGen's MATE token mixer against dense attention as the token count grows.

At Wan2.1-1.3B width (hidden 1536, 12 heads of 128), bf16 on CUDA: one self-attention layer (q, k, v and output
projections around cuDNN SDPA, with Wan's q/k RMS norms) against one MATE mixer (the same module attending within
(frames x rows x columns) windows, plus the bidirectional Mamba2 branch), at grids of F x 32 x 64 tokens (8k, 32k,
64k, 128k), forward and forward + backward. Then, unless --skip-model, one forward of a whole 30-block
Wan2.1-1.3B-sized VideoDiT and its MATE variant at the largest size (random weights).
`--scan`: instead, the gated linear scan alone, per backend (the PyTorch chunked scan, our Triton forward, fla's
`chunk_simple_gla` where installed) at the same token counts, 12 heads, state 64, values of 128, with each one's
relative error against the PyTorch scan; with --backward, forward+backward of the PyTorch scan and our Triton pair.
"""

from __future__ import annotations

SIZES = {"8k": 4, "32k": 16, "64k": 32, "128k": 64}  # frames of 32 x 64 tokens


def add_mate_parser(sub):
    p = sub.add_parser("mate", help="MATE token mixer vs dense attention, 8k to 128k tokens")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--window", type=int, nargs=3, default=[4, 4, 8], help="TE-branch window (frames rows columns)")
    p.add_argument("--state-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--skip-model", action="store_true", help="no whole-model forward")
    p.add_argument("--scan", action="store_true", help="time the scan backends alone instead")
    p.add_argument("--backward", action="store_true",
                   help="with --scan: forward+backward of the backends that have one, gradients against PyTorch's")
    p.add_argument("--model-layers", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (checks the plumbing)")
    p.add_argument("--profile", action="store_true",
                   help="also print the MATE mixer's forward at the largest size by operator (torch.profiler)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=run_mate)


def _mixers(dim, heads, window, state_size, device, dtype):
    import torch
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    from t2v.models.mate import MambaBranch, MateMixer, TemporalSwinProcessor, _Holder

    torch.manual_seed(0)
    holder = _Holder()
    dense = WanAttention(dim, heads, dim // heads, eps=1e-6, processor=WanAttnProcessor())
    temporal = WanAttention(dim, heads, dim // heads, eps=1e-6)
    temporal.set_processor(TemporalSwinProcessor(holder, window, shifted=True))
    mate = MateMixer(temporal, MambaBranch(dim, heads, state_size, layer_index=2), holder)
    torch.nn.init.normal_(mate.mamba.out_proj.weight, std=0.02)  # an open branch, as after training
    return dense.to(device, dtype), mate.to(device, dtype), holder


def _time(module, x, backward, median_ms, runs, device):
    import torch

    def fn():
        if backward:
            out = module(x)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                module(x)
    return median_ms(fn, runs, 2, device)


def run_mate(args):
    import torch

    from benchmark import cudnn_first, fmt, median_ms, run_info, write_json

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.scan:
        return _scan_backends(args, device, dtype)
    dim, heads, rows, columns = (1536, 12, 32, 64) if not args.tiny else (64, 2, 4, 8)
    dense, mate, holder = _mixers(dim, heads, tuple(args.window), args.state_size, device, dtype)
    info = dict(run_info(device), hidden=dim, heads=heads, window=args.window, state_size=args.state_size)
    rows_out = []
    with cudnn_first():
        for size in args.sizes:
            frames = SIZES[size] if not args.tiny else SIZES[size] // 4 * 4 or 4
            holder.grid = (frames, rows, columns)
            tokens = frames * rows * columns
            x = torch.randn(1, tokens, dim, device=device, dtype=dtype, requires_grad=True)
            row = dict(size=size, tokens=tokens)
            for name, module in (("dense", lambda h: dense(h, None, None, None)),
                                 ("mate", lambda h: mate(h, None, None, None))):
                for backward in (False, True):
                    key = f"{name}_{'fwd_bwd' if backward else 'fwd'}_ms"
                    try:
                        row[key] = _time(module, x, backward, median_ms, args.runs, device)
                    except torch.OutOfMemoryError:
                        row[key] = None
                    x.grad = None
            rows_out.append(row)
            write_json(args.json, info, rows_out)
    print(f"{info['device']}: one token mixer, hidden {dim}, {heads} heads, window {args.window}")
    print(f"{'tokens':>8}{'dense fwd':>11}{'MATE fwd':>10}{'speed-up':>10}{'dense f+b':>11}{'MATE f+b':>10}"
          f"{'speed-up':>10}")
    for r in rows_out:
        def ratio(a, b):
            return None if r[a] is None or r[b] is None else r[a] / r[b]
        print(f"{r['tokens']:>8}{fmt(r['dense_fwd_ms'], '.2f'):>11}{fmt(r['mate_fwd_ms'], '.2f'):>10}"
              f"{fmt(ratio('dense_fwd_ms', 'mate_fwd_ms'), '.1f'):>10}{fmt(r['dense_fwd_bwd_ms'], '.2f'):>11}"
              f"{fmt(r['mate_fwd_bwd_ms'], '.2f'):>10}{fmt(ratio('dense_fwd_bwd_ms', 'mate_fwd_bwd_ms'), '.1f'):>10}")
    if args.profile:
        _profile(mate, x, device)
    if not args.skip_model:
        model_rows = _whole_model(args, device, dtype, median_ms)
        info["model"] = model_rows
        write_json(args.json, info, rows_out)
    return rows_out


def _profile(mate, x, device):
    """Where one MATE forward spends its time: operators by their own device time (CPU time on the CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        mate(x, None, None, None)  # warm
        with profile(activities=activities) as prof:
            mate(x, None, None, None)
            torch.cuda.synchronize() if device.type == "cuda" else None
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"MATE mixer forward at {x.shape[1]} tokens, by operator:")
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))


def _whole_model(args, device, dtype, median_ms):
    """One forward of a Wan2.1-1.3B-sized VideoDiT and its MATE variant at the largest size asked."""
    import torch

    from t2v.models import MateVideoDiT, VideoDiT

    frames = SIZES[args.sizes[-1]] if not args.tiny else 4
    config = dict(in_channels=16, out_channels=16, patch_size=(1, 2, 2), num_attention_heads=12,
                  attention_head_dim=128, num_layers=args.model_layers, ffn_dim=8960, text_dim=4096,
                  max_frames=frames, max_height=64, max_width=128, sample_frames=frames, sample_height=64,
                  sample_width=128)
    if args.tiny:
        config.update(num_attention_heads=2, attention_head_dim=32, num_layers=2, ffn_dim=64, text_dim=32,
                      max_height=8, max_width=16, sample_height=8, sample_width=16)
    latents = torch.randn(1, 16, frames, config["max_height"], config["max_width"], device=device, dtype=dtype)
    text = torch.randn(1, 512 if not args.tiny else 8, config["text_dim"], device=device, dtype=dtype)
    results = {}
    for name, cls, extra in (("dense", VideoDiT, {}),
                             ("mate", MateVideoDiT, dict(mate_window=tuple(args.window),
                                                         mate_state_size=args.state_size))):
        model = cls(**config, **extra).to(device, dtype).eval()
        with torch.no_grad():
            results[name] = median_ms(lambda: model(latents, torch.tensor([500.0], device=device), text),
                                      max(1, args.runs // 2), 1, device)
        model = None  # freed before the next one is built
        torch.cuda.empty_cache() if device.type == "cuda" else None
    tokens = frames * config["max_height"] // 2 * config["max_width"] // 2
    print(f"whole model forward, {config['num_layers']} blocks, {tokens} tokens: dense {results['dense']:.1f} ms, "
          f"MATE {results['mate']:.1f} ms, speed-up {results['dense'] / results['mate']:.2f}x")
    return dict(tokens=tokens, layers=config["num_layers"], **{f"{k}_ms": v for k, v in results.items()})


def _scan_backends(args, device, dtype):
    """ms of each scan backend at each size (forward, or forward+backward), and its relative error against the
    PyTorch scan (of the output, or of the worst input gradient)."""
    import torch

    from attention.kernels import scan_dispatch
    from attention.kernels.linear_scan import chunked_linear_scan
    from benchmark import fmt, median_ms, run_info, write_json

    backends = {"torch": chunked_linear_scan}
    if device.type == "cuda" and scan_dispatch._TRITON is not None:
        pair = scan_dispatch._TRITON_BWD.TritonLinearScan
        backends["triton"] = ((lambda q, k, v, g: pair.apply(q, k, v, g, 64, None)) if args.backward
                              else scan_dispatch._TRITON.linear_scan)
    fla = scan_dispatch._fla_chunk_simple_gla() if device.type == "cuda" and not args.backward else None
    if fla is not None:
        backends["fla"] = lambda q, k, v, g: scan_dispatch._run_fla(fla, q, k, v, g, None)
    heads, state, width = (12, 64, 128) if not args.tiny else (2, 8, 16)
    info = dict(run_info(device), heads=heads, state_size=state, value_size=width, backends=list(backends),
                backward=args.backward)
    rows = []
    generator = torch.Generator(device).manual_seed(0)
    for size in args.sizes:
        tokens = SIZES[size] * 32 * 64 if not args.tiny else SIZES[size] * 32
        q, k = (0.3 * torch.randn(1, heads, tokens, state, device=device, generator=generator).to(dtype)
                for _ in range(2))
        v = torch.randn(1, heads, tokens, width, device=device, generator=generator).to(dtype)
        log_decay = -0.1 * torch.rand(1, heads, tokens, device=device, generator=generator)
        d_out = torch.randn(v.shape, device=device, generator=generator).to(dtype)
        inputs = [t.requires_grad_(args.backward) for t in (q, k, v, log_decay)]
        row = dict(size=size, tokens=tokens)

        def run(scan):
            if not args.backward:
                with torch.no_grad():
                    return [scan(*inputs)[0].float()]
            return [g.float() for g in torch.autograd.grad(scan(*inputs)[0], inputs, d_out)]
        reference = run(chunked_linear_scan)
        for name, scan in backends.items():
            got = run(scan)
            row[f"{name}_ms"] = median_ms(lambda: run(scan), args.runs, 2, device)
            row[f"{name}_error"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, reference))
        rows.append(row)
        write_json(args.json, info, rows)
    what = "forward+backward" if args.backward else "forward"
    print(f"{info['device']}: gated linear scan, {what}, {heads} heads, state {state}, values {width}, {dtype}")
    print(f"{'tokens':>8}" + "".join(f"{name + ' ms':>12}{name + ' err':>12}" for name in backends))
    for r in rows:
        print(f"{r['tokens']:>8}" + "".join(f"{fmt(r[name + '_ms'], '.2f'):>12}{fmt(r[name + '_error'], '.1e'):>12}"
                                             for name in backends))
    return rows
