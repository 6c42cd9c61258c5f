"""`scripts/benchmark.py e2e`: whole video transformers at the sizes they run at (random weights, bf16, one GPU).

Models: `wan1.3b` (Wan2.1-1.3B, 480p, 81 frames: latents 21 x 60 x 104, 32,760 tokens, 512 text tokens), `wan14b`
(Wan2.1-14B, 720p, 81 frames: latents 21 x 90 x 160, 75,600 tokens) and `hunyuan` (HunyuanVideo 13B, diffusers'
config, 720p, 129 frames: latents 33 x 90 x 160, 118,800 video tokens and 256 text tokens). Batch 1, no
classifier-free guidance (one transformer call a step, in the cache context "cond").

Rows, per model: the model's own dense attention (SDPA with cuDNN first, as in `model`), then each method of
`--methods` (VMoBA, Rectified SpaAttn and XAttention at 85% sparsity by default), each alone and with each step cache
of `--caches` (`pipelines.caches`). Columns: ms per forward eager and under diffusers' regional compilation
(`compile_repeated_blocks`: fullgraph where it traces, else with graph breaks and a note), the compile time (first
compiled call less one compiled forward), the time of `--steps` denoising steps, the speed-up over dense without a
cache, the peak GPU memory. A size that does not fit is reported as OOM and the run goes on; rows that would start
after `--time-limit` are listed as skipped. The JSON is rewritten after every row.

The N-step time. Without a cache a method at a fixed sparsity does the same work at every step, so N steps are N
compiled forwards (`est`). A cache's gain is what it decides to skip, so a row with a cache (or a method whose work
changes with the step: dense_warmup_steps, select_every) runs the real loop on the models of `--loop-models`
(default wan1.3b; 50 steps of the big models would take minutes a row): FlowMatchEulerDiscreteScheduler, the
transformer alone, compiled without fullgraph (a cache's decisions are graph breaks); a loop that compiled graphs
runs again and the second is timed, the difference being the row's compile time (`loop`). With `--loop-eager` the
loops run eagerly instead (no compile per cache) and their ratio to the eager forwards scales the compiled time
(`est~`). Other models' cache rows scale their no-cache time by the ratio a loop measured on a loop model of this run
or of `--ratios-from` (`est~`). With random weights a cache decides on random activations: its row shows what a
skip costs and saves, and a schedule-driven cache (taylorseer, pyramid-attention, faster) skips as it would on the
real model, but an activation-driven one (first-block, sea) does not.

`--explain-compile SPEC`: only a diagnosis. The first model of `--models` is compiled with its own dense attention
and then with the method SPEC, without fullgraph (graph breaks counted, not fatal), and called at two timesteps;
printed and written: graphs, graph breaks and recompilations with their reasons, and the compile time by phase.

`--tiny`: toy configs of the same model classes on the CPU in float32 with the eager compile backend (checks the
code, not the speed).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

MODEL_NAMES = ("wan1.3b", "wan14b", "hunyuan")
DEFAULT_METHODS = ("vmoba:sparsity=0.85", "rectified:sparsity=0.85", "xattention:sparsity=0.85")
STEP_OPTIONS = ("dense_warmup_steps", "select_every")  # a method with these does not cost the same every step
DENSE = "dense (model)"


@dataclass(frozen=True)
class Size:
    model_class: str
    config: dict
    latents: tuple  # (batch, channels, frames, height, width)
    text_tokens: int
    shift: float = 5.0  # the flow-matching schedule's shift


def sizes(tiny: bool) -> dict:
    from benchmark import WAN_1_3B, WAN_TINY

    if not tiny:
        wan14b = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # dim 5,120
        return {"wan1.3b": Size("WanTransformer3DModel", WAN_1_3B, (1, 16, 21, 60, 104), 512),
                "wan14b": Size("WanTransformer3DModel", wan14b, (1, 16, 21, 90, 160), 512),
                # diffusers' defaults are the 13B model's config (20 dual- and 40 single-stream blocks, 24 x 128).
                "hunyuan": Size("HunyuanVideoTransformer3DModel", {}, (1, 16, 33, 90, 160), 256, shift=7.0)}
    hunyuan = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                   num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                   rope_axes_dim=(4, 6, 6))
    return {"wan1.3b": Size("WanTransformer3DModel", WAN_TINY, (1, 4, 3, 8, 16), 8),
            "wan14b": Size("WanTransformer3DModel", dict(WAN_TINY, num_attention_heads=4, num_layers=3),
                           (1, 4, 3, 8, 16), 8),
            "hunyuan": Size("HunyuanVideoTransformer3DModel", hunyuan, (1, 4, 3, 8, 16), 6, shift=7.0)}


def build(size: Size, device, dtype):
    """The model with random weights, initialised in `dtype` on `device` (a 14B model in float32 would not fit an
    80 GB card beside its bf16 copy), then cast as `from_pretrained` casts."""
    import diffusers
    import torch

    from benchmark import cast_like_pretrained

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, size.model_class)(**size.config)
    finally:
        torch.set_default_dtype(default)
    return cast_like_pretrained(model, dtype)


def make_forward(model, size: Size, device, dtype):
    """(forward(latents, timestep) -> velocity, noise latents, video tokens) with random text inputs of the right
    shapes; HunyuanVideo also gets its pooled text embedding, a full text mask and the embedded guidance 6.0."""
    import torch

    from benchmark import cudnn_first

    config = model.config
    hunyuan = size.model_class.startswith("Hunyuan")
    text_dim = config.text_embed_dim if hunyuan else config.text_dim
    extra = dict(encoder_hidden_states=torch.randn(1, size.text_tokens, text_dim, device=device, dtype=dtype))
    if hunyuan:
        extra.update(encoder_attention_mask=torch.ones(1, size.text_tokens, device=device, dtype=torch.long),
                     pooled_projections=torch.randn(1, config.pooled_projection_dim, device=device, dtype=dtype),
                     guidance=torch.tensor([6000.0], device=device))
    patch = (config.patch_size_t, config.patch_size, config.patch_size) if hunyuan else config.patch_size
    tokens = math.prod(n // p for n, p in zip(size.latents[2:], patch))

    def forward(latents, timestep):
        with torch.no_grad(), cudnn_first():
            return model(hidden_states=latents, timestep=timestep, **extra, return_dict=False)[0]
    return forward, torch.randn(size.latents, device=device, dtype=dtype), tokens


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def uncompile(model):
    """Undoes compile_repeated_blocks: the blocks run eagerly again."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def is_oom(exc) -> bool:
    return "OutOfMemoryError" in type(exc).__name__ or "out of memory" in str(exc).lower()


def free(device):
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def denoise_s(model, forward, latents, steps, shift, device):
    """Seconds of `steps` flow-matching Euler steps of the transformer alone from the noise `latents`, each call in
    the cache context a pipeline gives it (one branch: no guidance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.caches import branch_context, start_generation

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=latents.device)
    start_generation(model, steps)
    sync(device)
    start = time.perf_counter()
    for i, t in enumerate(scheduler.timesteps):
        with branch_context(model, "cond", i, float(scheduler.sigmas[i]), steps):
            velocity = forward(latents, t.expand(latents.shape[0]))
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    sync(device)
    return time.perf_counter() - start


def timed_loop(row, model, forward, latents, steps, shift, device):
    """Seconds of the real N-step loop. If the first run compiled graphs, a second is timed and the difference is
    the row's compile time."""
    graphs = unique_graphs()
    first_s = denoise_s(model, forward, latents, steps, shift, device)
    if unique_graphs() == graphs:
        return first_s
    again_s = denoise_s(model, forward, latents, steps, shift, device)
    if row["compile_s"] is None:
        row["compile_s"] = first_s - again_s
    return again_s


def per_step_s(row):
    """A row's seconds per forward: compiled where compiled."""
    return (row["compiled_ms"] or row["eager_ms"]) / 1e3


def compile_and_time(model, forward, latents, row, args, backend, device):
    """compile_repeated_blocks with fullgraph, or, if that cannot trace, with graph breaks (and a note)."""
    import torch

    mid = torch.tensor([500.0], device=device)

    def once():
        return forward(latents, mid)
    for fullgraph in (True, False):
        uncompile(model)
        torch._dynamo.reset()  # each row compiles from scratch, so its compile time is its own
        graphs = unique_graphs()
        model.compile_repeated_blocks(fullgraph=fullgraph, backend=backend)
        start = time.perf_counter()
        try:
            once()
        except torch._dynamo.exc.TorchDynamoException as exc:
            if not fullgraph or is_oom(exc):
                raise
            row["note"] += f"no fullgraph: {dynamo_reason(exc)}; "
            continue
        sync(device)
        first_s = time.perf_counter() - start
        break
    from benchmark import median_ms
    row["compiled_ms"] = median_ms(once, args.runs, max(args.warmup - 1, 0), device)  # the first call warmed up
    row["compile_s"] = first_s - row["compiled_ms"] / 1e3
    row["graphs"] = unique_graphs() - graphs  # more than the blocks' kinds: recompiles or graph breaks


def dynamo_reason(exc, limit=110):
    """What stopped a fullgraph trace, in a line: the user code dynamo names as the cause, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in lines if line.startswith("Caused by:")), lines[0] if lines else type(exc).__name__)
    cause = cause.replace("Caused by: ", "").rsplit(" (_dynamo/", 1)[0]  # not where in dynamo it gave up
    return short_path(cause)[:limit]


def cache_specs(args):
    from pipelines.caches import available_caches
    return args.caches if args.caches is not None else [(name, {}) for name in available_caches()]


def run_e2e(args):
    import torch

    from benchmark import expand_methods, run_info, spec_text

    if args.no_compile and args.no_eager:
        raise SystemExit("--no-compile and --no-eager leave nothing to time")
    if args.loop_eager and args.no_eager:
        raise SystemExit("--loop-eager compares the loops with the eager forwards: drop --no-eager")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = args.backend or ("eager" if args.tiny else "inductor")
    table = sizes(args.tiny)
    info = dict(run_info(device), benchmark="e2e", dtype=str(dtype), batch=1, guidance="none (one call a step)",
                steps=args.steps, runs=args.runs, warmup=args.warmup, backend=backend, loop_models=args.loop_models)
    if args.explain_compile:
        return explain_compile(args, table[args.models[0]], device, dtype, backend, info)
    run = Run(args, device, dtype, backend, info)
    variants = [(DENSE, None, {})] + [(spec_text(n, o), n, o) for n, o in expand_methods(args.methods)]
    caches = [(None, None, {})] + [(spec_text(n, o), n, o) for n, o in cache_specs(args)]
    # Loop models first: the other models' cache rows scale by the ratios measured there.
    for model_name in sorted(args.models, key=lambda m: m not in args.loop_models):
        run.model(model_name, table[model_name], variants, caches)
        free(device)

    sources = " / ".join(args.loop_models + ([args.ratios_from] if args.ratios_from else [])) or "-"
    print(f"\n{args.steps}-step s: est = {args.steps} forwards; loop = the real flow-matching loop, the cache "
          f"deciding (batch 1, no guidance); est~ = the no-cache time scaled by the ratio of a loop on {sources}. "
          f"Speed-up over {DENSE} without a cache, by the {args.steps}-step times. Compile s = first compiled call "
          f"less one forward ({backend}). {info['device']}, {info['date']}, torch {info['torch']}, {dtype}.")
    print(e2e_table(run.rows, args.steps))
    return run.rows


class Run:
    """The rows of one e2e run, model by model."""

    def __init__(self, args, device, dtype, backend, info):
        self.args, self.device, self.dtype, self.backend, self.info = args, device, dtype, backend, info
        self.rows, self.ratios, self.start = [], {}, time.perf_counter()
        if args.ratios_from:  # loop ratios an earlier run measured, for the keys this run does not loop itself
            with open(args.ratios_from) as fh:
                self.earlier = {(r["variant"], r["cache"]): r["loop_ratio"] for r in json.load(fh)["rows"]
                                if r.get("loop_ratio")}
        else:
            self.earlier = {}

    def model(self, model_name, size, variants, caches):
        import torch

        import attention

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            model = build(size, self.device, self.dtype)
            forward, latents, tokens = make_forward(model, size, self.device, self.dtype)
        except Exception as exc:  # the weights alone may not fit
            self.finish(self.failed(new_row(model_name, "(model)", None, None), exc), None)
            return
        print(f"{model_name}: {size.model_class}, {tokens} video tokens, {size.text_tokens} text tokens, "
              f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
        base = None
        for variant, method, options in variants:
            plain = None  # this method's row without a cache
            for cache_label, cache, cache_options in caches:
                row = new_row(model_name, variant, cache_label, tokens)
                if self.args.time_limit is not None and time.perf_counter() - self.start > self.args.time_limit:
                    row["note"] = "skipped (time limit)"
                elif cache is not None and (plain is None or plain["failed"]):
                    row["note"] = "not run: the row without a cache did not run"
                else:
                    self.measure(row, model, forward, latents, size, method, options, cache, cache_options, plain)
                if cache is None:
                    plain = row
                    base = row if method is None else base
                self.finish(row, base)
                free(self.device)
        uncompile(model)
        attention.remove(model)
        torch._dynamo.reset()

    def measure(self, row, model, forward, latents, size, method, options, cache, cache_options, plain):
        import torch

        import attention
        from benchmark import median_ms

        from pipelines.caches import install_cache, remove_cache

        args, device = self.args, self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            if cache is None:
                uncompile(model)
                attention.remove(model)
                if method is not None:
                    attention.apply(model, method, **options)
                mid = torch.tensor([500.0], device=device)
                if not args.no_eager:
                    row["eager_ms"] = median_ms(lambda: forward(latents, mid), args.runs, args.warmup, device)
                if not args.no_compile:
                    compile_and_time(model, forward, latents, row, args, self.backend, device)
            else:
                install_cache(model, cache, **cache_options)
            loop = cache is not None or any(key in options for key in STEP_OPTIONS)
            ref = plain if cache is not None else row  # whose forwards the cache's loop is compared with
            key = (row["variant"], row["cache"])
            if not loop:
                row["steps_s"], row["steps_how"] = args.steps * per_step_s(row), "est"
            elif row["model"] in args.loop_models:
                self.loop(row, ref, model, forward, latents, size)
            elif key in self.ratios or key in self.earlier:
                ratio = self.ratios.get(key, self.earlier.get(key))
                row["steps_s"], row["steps_how"] = args.steps * per_step_s(ref) * ratio, "est~"
            else:
                row["note"] += "no loop measurement to scale from; "
        except Exception as exc:  # OOM, an option a method does not take, a failure: report and go on
            self.failed(row, exc)
        finally:
            remove_cache(model)

    def loop(self, row, ref, model, forward, latents, size):
        """The real loop, compiled unless --loop-eager (without fullgraph: a cache's decisions are graph breaks).
        Its ratio to `ref`'s forwards in the same mode times `ref`'s N-step estimate is the row's N-step time: the
        loop's own time where the modes agree ("loop"), else scaled ("est~")."""
        import torch

        eager = self.args.no_compile or self.args.loop_eager
        uncompile(model)
        if not eager:
            torch._dynamo.reset()
            model.compile_repeated_blocks(fullgraph=False, backend=self.backend)
        row["loop_s"], row["loop_mode"] = timed_loop(row, model, forward, latents, self.args.steps, size.shift,
                                                     self.device), "eager" if eager else "compiled"
        same_mode = ref["eager_ms"] if eager else per_step_s(ref) * 1e3
        row["loop_ratio"] = row["loop_s"] / (self.args.steps * same_mode / 1e3)
        self.ratios.setdefault((row["variant"], row["cache"]), row["loop_ratio"])  # the first loop model's
        row["steps_s"] = self.args.steps * per_step_s(ref) * row["loop_ratio"]
        row["steps_how"] = "loop" if eager == (ref["compiled_ms"] is None) else "est~"

    @staticmethod
    def failed(row, exc):
        row["oom"], row["failed"] = is_oom(exc), True
        row["note"] += "OOM" if row["oom"] else describe_exc(exc)
        return row

    def finish(self, row, base):
        import torch

        from benchmark import write_json

        if self.device.type == "cuda" and not row["note"].startswith(("skipped", "not run")):
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for key in ("steps_s", "compiled_ms", "eager_ms"):  # the first time both rows have
            if base and row[key] and base[key]:
                row["speedup"] = base[key] / row[key]
                break
        self.rows.append(row)
        print(f"  {row['model']:8s} {row['variant'][:28]:28s} {row['cache'] or '-':20s} eager "
              f"{fmt_ms(row, 'eager_ms')} compiled {fmt_ms(row, 'compiled_ms')} {self.args.steps} steps "
              f"{fmt_ms(row, 'steps_s')} s {row['note']}", flush=True)
        write_json(self.args.json, self.info, self.rows)


def new_row(model_name, variant, cache, tokens):
    return dict(model=model_name, tokens=tokens, variant=variant, cache=cache, eager_ms=None, compiled_ms=None,
                compile_s=None, steps_s=None, steps_how=None, speedup=None, peak_gib=None, oom=False, failed=False,
                note="")


def describe_exc(exc):
    from benchmark import describe
    return describe(exc, 160)


def fmt_ms(row, key, spec=".1f"):
    from benchmark import fmt
    return "OOM" if row["oom"] and row[key] is None else fmt(row[key], spec)


def e2e_table(rows, steps):
    from benchmark import fmt
    head = (f"{'model':8s} {'variant':28s} {'cache':20s} {'eager ms':>9s} {'comp. ms':>9s} {'compile s':>9s} "
            f"{f'{steps}-step s':>11s} {'speed-up':>8s} {'peak GiB':>8s}")
    lines = [head]
    for r in rows:
        how = f" {r['steps_how']:>4s}" if r["steps_how"] else " " * 5
        lines.append(f"{r['model']:8s} {r['variant'][:28]:28s} {(r['cache'] or '-')[:20]:20s} "
                     f"{fmt_ms(r, 'eager_ms'):>9s} {fmt_ms(r, 'compiled_ms'):>9s} {fmt(r['compile_s']):>9s} "
                     f"{fmt_ms(r, 'steps_s'):>6s}{how} {fmt(r['speedup'], '.2f'):>8s} {fmt(r['peak_gib']):>8s}"
                     + (f"  ({r['note'].rstrip('; ')})" if r["note"] else ""))
    return "\n".join(lines)


# ---- --explain-compile: why a method's regional compile takes long --------------------------------------------

class DynamoLog(logging.Handler):
    """Collects dynamo's graph-break and recompile messages (the TORCH_LOGS=graph_breaks,recompiles artifacts)."""

    def __init__(self):
        super().__init__()
        self.breaks, self.recompiles = Counter(), Counter()

    def emit(self, record):
        lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
        if record.name.endswith("__graph_breaks") and lines:
            where = lines[0].replace("Graph break in user code at ", "")
            reason = next((line for line in lines if line.startswith("Graph Break Reason")), "")
            self.breaks[f"{short_path(where)} {reason.replace('Graph Break Reason: ', '')}"[:200]] += 1
        elif record.name.endswith("__recompiles") and lines:
            failed = next((line for line in lines if line.startswith("- ")), "- ?")  # the first failing guard
            self.recompiles[f"{short_path(lines[0].replace('Recompiling function ', ''))}: {failed[2:]}"[:200]] += 1


def short_path(text):
    """'name in /a/b/site-packages/pkg/file.py:12' -> 'name in pkg/file.py:12' (the last two path parts)."""
    words = text.split()
    return " ".join("/".join(w.split("/")[-2:]) if "/" in w else w for w in words)


def explain_compile(args, size, device, dtype, backend, info):
    import torch
    from torch._dynamo.utils import compilation_time_metrics

    import attention
    from benchmark import spec_text, write_json

    name, options = args.explain_compile
    model = build(size, device, dtype)
    forward, latents, tokens = make_forward(model, size, device, dtype)
    info.update(model=args.models[0], tokens=tokens, explain=spec_text(name, options), fullgraph=False)
    rows = []
    for label, method in ((DENSE, None), (spec_text(name, options), name)):
        row = dict(variant=label, note="")
        log, dynamo_logger = DynamoLog(), logging.getLogger("torch._dynamo")
        try:
            uncompile(model)
            attention.remove(model)
            if method is not None:
                attention.apply(model, method, **options)
            torch._dynamo.reset()  # also clears the per-phase times
            graphs = unique_graphs()
            torch._logging.set_logs(graph_breaks=True, recompiles=True)
            dynamo_logger.addHandler(log)
            model.compile_repeated_blocks(fullgraph=False, backend=backend)
            for key, timestep in (("first_call_s", 999.0), ("second_call_s", 500.0)):  # a later step of a generation
                start = time.perf_counter()
                forward(latents, torch.tensor([timestep], device=device))
                sync(device)
                row[key] = time.perf_counter() - start
            phases = {phase: sum(times) for phase, times in compilation_time_metrics.items()}
            # Dynamo and inductor together; the rest of the first call is running (and autotuning) kernels.
            row["in_compile_s"] = phases.get("_compile.compile_inner", 0.0)
            row.update(graphs=unique_graphs() - graphs, graph_breaks=sum(log.breaks.values()),
                       recompiles=sum(log.recompiles.values()), break_reasons=log.breaks.most_common(8),
                       recompile_reasons=log.recompiles.most_common(8),
                       phases_s=dict(sorted(phases.items(), key=lambda kv: -kv[1])[:10]))
        except Exception as exc:
            row["note"] = "OOM" if is_oom(exc) else describe_exc(exc)
        finally:
            dynamo_logger.removeHandler(log)
            torch._logging.set_logs()
        rows.append(row)
        write_json(args.json, info, rows)
        free(device)
    uncompile(model)
    attention.remove(model)
    print(f"\nCompile diagnosis: {args.models[0]} ({tokens} tokens), compile_repeated_blocks(fullgraph=False), "
          f"backend {backend}; calls at t=999 then t=500 ({info['device']}, torch {info['torch']})")
    print(explain_table(rows))
    return rows


def explain_table(rows):
    from benchmark import fmt
    lines = [f"{'variant':28s} {'1st call s':>10s} {'in compile':>10s} {'2nd call s':>10s} {'graphs':>6s} "
             f"{'breaks':>6s} {'recompiles':>10s}"]
    for r in rows:
        lines.append(f"{r['variant'][:28]:28s} {fmt(r.get('first_call_s'), '.2f'):>10s} "
                     f"{fmt(r.get('in_compile_s'), '.2f'):>10s} "
                     f"{fmt(r.get('second_call_s'), '.2f'):>10s} {fmt(r.get('graphs'), 'd'):>6s} "
                     f"{fmt(r.get('graph_breaks'), 'd'):>6s} {fmt(r.get('recompiles'), 'd'):>10s}"
                     + (f"  ({r['note']})" if r["note"] else ""))
    for r in rows:
        lines.append(f"{r['variant']}:")
        for title, key in (("graph breaks", "break_reasons"), ("recompiles", "recompile_reasons")):
            for reason, count in r.get(key) or []:
                lines.append(f"  {title} {count:3d}x  {reason}")
        phases = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in (r.get("phases_s") or {}).items())
        lines.append(f"  compile time by phase (s): {phases or '-'}")
    return "\n".join(lines)


def add_e2e_parser(sub):
    from benchmark import parse_method_spec, positive_int

    p = sub.add_parser("e2e", help="Wan2.1-1.3B / 14B and HunyuanVideo at real sizes: methods x step caches, "
                                   "eager and compiled, N-step time, memory")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument("--methods", nargs="*", type=parse_method_spec,
                   default=[parse_method_spec(spec) for spec in DEFAULT_METHODS],
                   help=f"method specs beside the model's own dense attention (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--caches", nargs="*", type=parse_method_spec, default=None,
                   help="step caches name[:key=value,...] (default: every cache of pipelines.caches; "
                        "none: --caches alone)")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps of the N-step column")
    p.add_argument("--loop-models", nargs="*", default=["wan1.3b"], choices=MODEL_NAMES,
                   help="models whose cache rows run the real N-step loop (others scale by its ratios)")
    p.add_argument("--ratios-from", metavar="JSON",
                   help="an earlier e2e run's JSON: its loop ratios scale the cache rows this run does not loop")
    p.add_argument("--loop-eager", action="store_true",
                   help="run the loops eagerly (no recompile per cache), scaled to the compiled forwards")
    p.add_argument("--runs", type=positive_int, default=3, help="timed forwards (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first (the first compiled call is one)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--no-eager", action="store_true", help="compiled only")
    p.add_argument("--backend", help="torch.compile backend (default: inductor; eager with --tiny)")
    p.add_argument("--time-limit", type=float, help="seconds: rows that would start later are skipped (and listed)")
    p.add_argument("--explain-compile", type=parse_method_spec, metavar="SPEC",
                   help="only diagnose compiling the first model with this method: graph breaks, recompiles, phases")
    p.add_argument("--tiny", action="store_true", help="toy configs on the CPU (checks the code, not speed)")
    p.add_argument("--json", help="write the results here as JSON (after every row)")
    p.set_defaults(func=run_e2e)
