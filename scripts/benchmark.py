"""Benchmarks. Each subcommand registers itself in SUBCOMMANDS.

    python scripts/benchmark.py attention [--shapes wan1.3b ...] [--densities 5 15 100] [--quick] [--json PATH]

``attention`` times, on CUDA, forward attention at video-model shapes: dense cuDNN SDPA,
FlashAttention-2 SDPA, compiled FlexAttention with a BlockMask of the same random selection,
and the Triton block-sparse kernel (median of triton.testing.do_bench); with ``--backward``, forward+backward of
each backward mode of the kernel against the same three (see bench_attention_bwd.py).

    python scripts/benchmark.py model [--methods dense vmoba:threshold=0.25 ...] [--compile] [--tiny] [--json PATH]

``model`` times one forward of a Wan2.1-1.3B-sized WanTransformer3DModel (random weights, 480p / 81 frames):
the model's own dense attention (cuDNN), self-attention replaced by zeros (the floor any method can reach), and
each method through ``attention.apply``; with ``--compile``, under diffusers' regional compilation.

    python scripts/benchmark.py methods [--methods all] [--tiny] [--json PATH]

``methods`` times each block-sparse method at the Wan2.1-1.3B attention shape: its selection alone, the kernel
alone with that selection, the whole call, FlexAttention with the same block mask and dense cuDNN.

    python scripts/benchmark.py flashblock [--chunks 8] [--refresh 2 4 5 8] [--json PATH]

``flashblock`` times block diffusion's attention per denoising step (see bench_flashblock.py): no cache against
FlashBlock's cache of the block-external attention, at a Wan-like width.

    python scripts/benchmark.py e2e [--models wan1.3b wan14b hunyuan] [--methods ...] [--caches ...] [--steps 50]
                                    [--explain-compile SPEC] [--tiny] [--json PATH]

``e2e`` times whole Wan2.1-1.3B, Wan2.1-14B and HunyuanVideo transformers at their real sizes (random weights, see
bench_e2e.py): dense and each method, alone and with each step cache, eager and under regional compilation, per
forward and over N denoising steps, with peak memory; ``--explain-compile`` reports a method's graph breaks,
recompilations and compile time by phase.

    torchrun --nproc-per-node N scripts/benchmark.py parallel [--methods ...] [--kind ulysses|ring] [--compile]
                                                          [--baseline JSON] [--check] [--tiny] [--json PATH]

``parallel`` times one forward of a Wan2.1-14B-sized transformer split across N GPUs by diffusers' context
parallelism (see bench_parallel.py): dense and each method, ms per forward, speed-up over the one-GPU run's JSON,
peak memory per GPU; ``--check`` compares the split output with one process's.

A method spec is ``name`` or ``name:key=value,key=value`` (values read as Python literals; true / false / none
in any case); ``all`` means every registered method, with the options in DEFAULT_OPTIONS where it has some.
"""

import argparse
import datetime
import inspect
import json
import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks kept in their own files beside this

from t2v.cli import parse_value  # noqa: E402  (light: no torch; benchmarks import the rest lazily)

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
    if args.backward:
        result = run_attention_backward(
            args, lambda fn: do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"),
            random_selection, flex_block_mask, shapes, ATTENTION_SHAPES)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        return
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
    p.add_argument("--backward", action="store_true",
                   help="forward+backward of each backward mode against Flex, cuDNN and FA2 (bench_attention_bwd.py)")
    p.set_defaults(func=run_attention)


# ---- shared by the model and methods subcommands -------------------------------------------------------------

# The options `all` gives each method it expands to (a method not listed runs with its own defaults).
DEFAULT_OPTIONS = {"vmoba": {"threshold": 0.25}, "rectified": {"sparsity": 0.85}, "xattention": {"threshold": 0.9}}


def parse_options(text):
    """'k=v,k=v' -> dict. Commas inside a value ('dense_layers=[0,1]') stay: a split needs 'key=' after it."""
    options = {}
    for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text.strip()) if text.strip() else []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        options[key.strip()] = parse_value(value.strip())
    return options


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_method_spec(text):
    """'name' or 'name:k=v,...' -> (name, options)."""
    name, _, options = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"a method spec starts with the method's name, got {text!r}")
    return name.strip(), parse_options(options)


def expand_methods(specs, sparse_only=False):
    """`all` becomes every registered method (block-sparse ones only if `sparse_only`) with DEFAULT_OPTIONS;
    a spec given twice runs once."""
    import attention
    from attention.methods.block_sparse import BlockSparseMethod

    out = []
    for name, options in specs:
        if name != "all":
            out.append((name, options))
            continue
        for method in attention.available_methods():
            cls = attention.get_method(method)
            if not sparse_only or (isinstance(cls, type) and issubclass(cls, BlockSparseMethod)):
                out.append((method, dict(DEFAULT_OPTIONS.get(method, {}))))
    return [spec for i, spec in enumerate(out) if spec not in out[:i]]  # each spec once


def describe(exc, limit=200):
    """One line for a failure: a ValueError's first clause (unknown method or option), else type and message."""
    text = " ".join(str(exc).split())
    text = text.split(";")[0] if type(exc) is ValueError else f"{type(exc).__name__}: {text}"
    return text[:limit]


def spec_text(name, options):
    return name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def median_ms(fn, runs, warmup, device):
    """Median milliseconds of `fn` over `runs` calls: CUDA events on a GPU, the wall clock elsewhere."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cudnn_first():
    """SDPA backends with cuDNN first (the others only where cuDNN cannot serve a call, e.g. on a CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch without priorities
        return sdpa_kernel(order)


def run_info(device):
    import torch
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                date=datetime.date.today().isoformat(), torch=torch.__version__)
    for module in ("diffusers", "triton"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    return info


def write_json(path, info, rows):
    # Written after every row, so a run stopped by a time limit still leaves what it measured.
    if path:
        with open(path + ".part", "w") as fh:
            json.dump(dict(info, rows=rows), fh, indent=1)
        os.replace(path + ".part", path)  # never a half-written file, even when stopped mid-write


def fmt(x, spec=".1f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ---- model: one forward of a Wan2.1-1.3B-sized transformer ---------------------------------------------------

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, ffn_dim=8960, num_layers=30, patch_size=(1, 2, 2), cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# 480p, 81 frames: latents 21 x 60 x 104, patched to 21 x 30 x 52 = 32,760 tokens; 512 text tokens.
WAN_1_3B_INPUTS = ((1, 16, 21, 60, 104), 512)
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
WAN_TINY_INPUTS = ((1, 4, 3, 8, 16), 8)  # 3 x 4 x 8 = 96 tokens


class NoSelfAttention:
    """Self-attention replaced by zeros: the time of everything else, the floor no method can beat."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return hidden_states.new_zeros(hidden_states.shape)


def cast_like_pretrained(model, dtype):
    """Inference mode in `dtype`, cast as from_pretrained(torch_dtype=...) casts: the model's _keep_in_fp32_modules
    (rope, norms, ...) stay float32."""
    import torch
    model.eval().requires_grad_(False)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for tensor_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            fp32 = any(part in keep for part in tensor_name.split("."))
            tensor.data = tensor.data.to(torch.float32 if fp32 else dtype)
    return model


def run_model(args):
    import torch
    from diffusers import WanTransformer3DModel

    import attention
    from attention.methods.block_sparse import method_density

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, (latent_shape, text_tokens) = (WAN_TINY, WAN_TINY_INPUTS) if args.tiny else (WAN_1_3B, WAN_1_3B_INPUTS)
    torch.manual_seed(0)
    with torch.device(device):  # initialise the weights where they will live
        model = WanTransformer3DModel(**config)
    cast_like_pretrained(model, dtype)
    latents = torch.randn(latent_shape, device=device, dtype=dtype)
    text = torch.randn(1, text_tokens, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    modules = [block.attn1 for block in model.blocks]
    originals = [m.processor for m in modules]
    tokens = math.prod(s // p for s, p in zip(latent_shape[2:], config["patch_size"]))
    info = dict(run_info(device), benchmark="model", compiled=args.compile, config=config, latents=latent_shape,
                text_tokens=text_tokens, tokens=tokens, dtype=str(dtype), runs=args.runs, warmup=args.warmup,
                denoising_steps=args.denoising_steps)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=True)
    print(f"model: {config['num_layers']} layers, {tokens} tokens, {dtype}, {info['device']}"
          f"{', regional compile' if args.compile else ''}", flush=True)

    # With --denoising-steps N one timed call is a whole generation of N forwards at falling timesteps, so that
    # work a method reuses across steps (select_every, dense warm-up steps) is timed as it amortises.
    timesteps = torch.linspace(999.0, 1.0, args.denoising_steps, device=device)[:, None]

    def forward():
        with torch.no_grad(), cudnn_first():
            for step_timestep in (timesteps if args.denoising_steps > 1 else [timestep]):
                model(latents, step_timestep, text, return_dict=False)

    def measure(row):
        if args.compile:
            from torch._dynamo.utils import counters
            torch._dynamo.reset()  # each variant compiles from scratch, so its compile time is its own
            graphs = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            forward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["graphs"] = counters["stats"]["unique_graphs"] - graphs  # more than one: recompiles per layer
        row["ms"] = median_ms(forward, args.runs, args.warmup, device) / args.denoising_steps
        if args.compile:
            row["compile_s"] = row["first_call_s"] - args.denoising_steps * row["ms"] / 1e3

    variants = [("dense (model, cuDNN)", None, {}), ("no self-attention", "zeros", {})]
    variants += [(spec_text(n, o), n, o) for n, o in expand_methods(args.methods)]
    rows, dense_ms = [], None
    for label, name, options in variants:
        row = dict(name=label, method=name, options=options, ms=None, speedup=None, density=None, note="")
        for module, processor in zip(modules, originals):
            module.set_processor(processor)
        try:
            if name == "zeros":
                for module in modules:
                    module.set_processor(NoSelfAttention())
                row["density"] = 0.0
            elif name is not None:
                attention.apply(model, name, **options)
            measure(row)
            if name is None:
                dense_ms, row["density"] = row["ms"], 1.0
            elif name != "zeros":
                density = method_density(model)
                row["density"] = 1.0 if density is None and name == "dense" else density
        except Exception as exc:  # not registered, options it does not take, a failure: report and go on
            row["note"] = describe(exc)
        finally:
            attention.remove(model)
        if row["ms"] is not None and dense_ms:
            row["speedup"] = dense_ms / row["ms"]
        rows.append(row)
        extra = f"  compile {row['compile_s']:.1f} s, {row['graphs']} graph(s)" if "compile_s" in row else ""
        print(f"  {label:40s} {fmt(row['ms'])} ms{extra}  {row['note']}", flush=True)
        write_json(args.json, info, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    per = f"one forward of a {args.denoising_steps}-step generation" if args.denoising_steps > 1 else "One forward"
    print(f"\n{per}, {tokens} tokens, {dtype}, median of {args.runs} ({info['device']}, {info['date']}, "
          f"torch {info['torch']}{', compiled' if args.compile else ', eager'})")
    print(model_table(rows, args.compile))


def model_table(rows, compiled=False):
    head = f"{'variant':40s} {'ms':>9s} {'speedup':>8s} {'density':>8s}"
    lines = [head + (f" {'compile s':>9s}" if compiled else "")]
    for r in rows:
        line = f"{r['name']:40s} {fmt(r['ms']):>9s} {fmt(r['speedup'], '.2f'):>8s} {fmt(r['density'], '.3f'):>8s}"
        if compiled:
            line += f" {fmt(r.get('compile_s')):>9s}"
        lines.append(line + (f"  ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


def add_model_parser(sub):
    p = sub.add_parser("model", help="one forward of a Wan2.1-1.3B-sized transformer per attention method")
    p.add_argument("--methods", nargs="*", type=parse_method_spec, default=[("all", {})],
                   help="method specs, e.g. dense vmoba:threshold=0.25 (default: all registered)")
    p.add_argument("--compile", action="store_true", help="regional compilation (compile_repeated_blocks)")
    p.add_argument("--denoising-steps", type=positive_int, default=1,
                   help="time whole generations of this many steps, per forward (for select_every)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a two-layer model on the CPU (checks the code, not speed)")
    p.add_argument("--json", help="write the results here as JSON")
    p.set_defaults(func=run_model)


# ---- methods: selection, kernel and whole call at the Wan2.1-1.3B attention shape ----------------------------

WAN_ATTENTION = ((21, 30, 52), 12, 128)  # grid, heads, head_dim
TINY_ATTENTION = ((4, 6, 8), 2, 32)


def local_qkv(grid, heads, head_dim, device, dtype, seed=0):
    """q, k, v (1, heads, tokens, head_dim) in row-major (frame, height, width) order, with space-time locality.

    Input model: each head gets correlation lengths (1-6 frames, 2-12 tokens in height and width) and a
    positional code p(x): random Fourier features of a Gaussian kernel over the token's (f, h, w), unit-variance
    components, so p(x).p(y) / D ~= exp(-|(x - y) / l|^2 / 2). Then k = a p(x) + 0.5 e_k, q = a p(x) + 0.5 e_q,
    e iid N(0, 1), v iid N(0, 1). A query scores its neighbourhood highest, the logit gap to distant tokens being
    about a^2 sqrt(D); a in [0.6, 1.1] per head gives sharp and diffuse heads. Iid noise instead would make every
    block equally likely and selection meaningless.
    """
    import torch
    gen = torch.Generator(device).manual_seed(seed)
    f, h, w = (torch.arange(n, device=device, dtype=torch.float32) for n in grid)
    coords = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), -1).reshape(-1, 3)
    low = torch.tensor([1.0, 2.0, 2.0], device=device)
    high = torch.tensor([6.0, 12.0, 12.0], device=device)
    lengths = low + (high - low) * torch.rand(heads, 1, 3, generator=gen, device=device)
    omega = torch.randn(heads, head_dim, 3, generator=gen, device=device) / lengths
    phase = 2 * math.pi * torch.rand(heads, 1, head_dim, generator=gen, device=device)
    code = math.sqrt(2) * torch.cos(torch.einsum("nc,hdc->hnd", coords, omega) + phase)
    a = 0.6 + 0.5 * torch.rand(heads, 1, 1, generator=gen, device=device)

    def noisy():
        return a * code + 0.5 * torch.randn(code.shape, generator=gen, device=device)
    v = torch.randn(code.shape, generator=gen, device=device)
    return tuple(x.unsqueeze(0).to(dtype).contiguous() for x in (noisy(), noisy(), v))


def run_methods(args):
    import torch

    import attention
    from attention.apply import bind_method
    from attention.methods import ADAPTER_OPTIONS
    from attention.methods.block_sparse import BlockSparseMethod

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid, H, D = TINY_ATTENTION if args.tiny else WAN_ATTENTION
    q, k, v = local_qkv(grid, H, D, device, dtype)
    N = q.shape[2]
    info = dict(run_info(device), benchmark="methods", grid=grid, heads=H, head_dim=D, tokens=N, dtype=str(dtype),
                runs=args.runs, warmup=args.warmup, inputs="local_qkv (space-time locality)")

    def ms(fn):
        return median_ms(fn, args.runs, args.warmup, device)

    with cudnn_first():
        info["dense_ms"] = dense_ms = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    flex = None
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
    print(f"methods: grid {grid} = {N} tokens, {H} heads, D={D}, {dtype}, {info['device']}; "
          f"dense cuDNN {dense_ms:.3f} ms", flush=True)

    rows = []
    for name, options in expand_methods(args.methods, sparse_only=True):
        options = {key: value for key, value in options.items() if key not in ADAPTER_OPTIONS}
        base = dict(method=name, options=options, note="")
        try:
            cls = attention.get_method(name)
            if not (isinstance(cls, type) and issubclass(cls, BlockSparseMethod)):
                raise ValueError(f"{name!r} is not a block-sparse method (no selection to time)")
            takes_layer = "layer_index" in inspect.signature(cls.__init__).parameters
            layers = args.layers if takes_layer else [0]
            bound = bind_method(name, dict(options), max(layers) + 1)
        except ValueError as exc:
            rows.append(dict(base, layer=None, note=describe(exc)))
            print(f"  {spec_text(name, options)}: skipped ({rows[-1]['note']})", flush=True)
            write_json(args.json, info, rows)
            continue
        for layer in layers:
            row = dict(base, layer=layer)
            try:
                row.update(time_method(bound[layer], q, k, v, grid, ms, flex, dense_ms))
            except Exception as exc:  # report and go on
                row["note"] = describe(exc)
            rows.append(row)
            print(f"  {spec_text(name, options)} layer {layer}: density {fmt(row.get('density'), '.3f')}, select "
                  f"{fmt(row.get('select_ms'), '.3f')} ms, kernel {fmt(row.get('kernel_ms'), '.3f')} ms, total "
                  f"{fmt(row.get('total_ms'), '.3f')} ms {row['note']}", flush=True)
            write_json(args.json, info, rows)

    print(f"\nAttention at grid {grid} ({N} tokens), {H} heads, D={D}, {dtype}; median ms of {args.runs} "
          f"({info['device']}, {info['date']}); dense cuDNN {dense_ms:.3f} ms; selection target <= 10% of total")
    print(methods_table(rows))


def time_method(layer_method, q, k, v, grid, ms, flex, dense_ms):
    """Times one bound method: select on tiled inputs, the kernel on that selection, the adapter's whole call."""
    import torch

    from attention.kernels import block_index_from_mask, block_sparse_attention
    from attention.layout import VideoLayout

    method = layer_method.fn
    bs = method.block_size
    layout = VideoLayout(grid, block_size=bs)
    qt, kt, vt = layout.to_tiles(q), layout.to_tiles(k), layout.to_tiles(v)
    sel = method.select(qt, kt, vt, layout)
    index, count = block_index_from_mask(sel.block_mask)
    nkb = sel.block_mask.shape[-1]
    pooled = dict(pooled_k=sel.pooled_k, pooled_v=sel.pooled_v, pooled_log_weight=sel.pooled_log_weight)
    row = dict(block_size=bs, tile=layout.tile, density=sel.block_mask.float().mean().item(),
               pooled=sel.pooled_k is not None)
    row["select_ms"] = ms(lambda: method.select(qt, kt, vt, layout))
    row["kernel_ms"] = ms(lambda: block_sparse_attention(qt, kt, vt, index, count, block_size=bs, **pooled))
    row["total_ms"] = ms(lambda: layer_method(q, k, v, layout, 0))  # tiling, select, index, kernel, untiling
    row["select_pct"] = 100 * row["select_ms"] / row["total_ms"]
    row["overhead_pct"] = 100 * (row["total_ms"] - row["kernel_ms"]) / row["total_ms"]
    row["speedup_vs_dense"] = dense_ms / row["total_ms"]
    row["ideal_ms"] = row["density"] * dense_ms
    row["flex_ms"] = None
    if flex is not None:  # same block mask; pooled entries (if any) have no Flex counterpart
        try:
            mask = flex_block_mask(index, count, nkb, qt.shape[2], bs)
            kernel_options = None if bs >= 128 else {"BLOCK_M": bs, "BLOCK_N": bs}
            row["flex_ms"] = ms(lambda: flex(qt, kt, vt, block_mask=mask, kernel_options=kernel_options))
            row["kernel_over_flex"] = row["kernel_ms"] / row["flex_ms"]
        except Exception as exc:
            row["note"] = "flex: " + describe(exc, 120)
    del qt, kt, vt, sel
    if q.is_cuda:
        torch.cuda.empty_cache()
    return row


def methods_table(rows):
    head = (f"{'method':34s} {'layer':>5s} {'dens':>6s} {'select':>8s} {'kernel':>8s} {'total':>8s} {'Flex':>8s} "
            f"{'ideal':>8s} {'sel%':>5s} {'ovh%':>5s} {'xdense':>6s}")
    lines = [head]
    for r in rows:
        lines.append(f"{spec_text(r['method'], r['options'])[:34]:34s} {fmt(r['layer'], 'd'):>5s} "
                     f"{fmt(r.get('density'), '.3f'):>6s} {fmt(r.get('select_ms'), '.3f'):>8s} "
                     f"{fmt(r.get('kernel_ms'), '.3f'):>8s} {fmt(r.get('total_ms'), '.3f'):>8s} "
                     f"{fmt(r.get('flex_ms'), '.3f'):>8s} {fmt(r.get('ideal_ms'), '.3f'):>8s} "
                     f"{fmt(r.get('select_pct'), '.1f'):>5s} {fmt(r.get('overhead_pct'), '.1f'):>5s} "
                     f"{fmt(r.get('speedup_vs_dense'), '.2f'):>6s}" + (f"  ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


def add_methods_parser(sub):
    p = sub.add_parser("methods", help="selection vs kernel time of each block-sparse method at the Wan2.1 shape")
    p.add_argument("--methods", nargs="*", type=parse_method_spec, default=[("all", {})],
                   help="method specs (default: all registered block-sparse methods)")
    p.add_argument("--layers", nargs="+", type=int, default=[0, 1, 2],
                   help="layer indices to time, for methods that vary by layer (VMoBA's partitions)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a small grid on the CPU (checks the code, not speed)")
    p.add_argument("--json", help="write the results here as JSON")
    p.set_defaults(func=run_methods)


from bench_e2e import add_e2e_parser  # noqa: E402  (beside this file)
from bench_attention_bwd import run_attention_backward  # noqa: E402
from bench_flashblock import add_flashblock_parser  # noqa: E402
from bench_mate import add_mate_parser  # noqa: E402
from bench_parallel import add_parallel_parser  # noqa: E402

# Each entry adds one subcommand to the parser.
SUBCOMMANDS = [add_attention_parser, add_model_parser, add_methods_parser, add_flashblock_parser, add_mate_parser,
               add_e2e_parser, add_parallel_parser]


def build_parser():
    parser = argparse.ArgumentParser(description="t2v benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
