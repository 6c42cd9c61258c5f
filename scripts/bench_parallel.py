"""`scripts/benchmark.py parallel`: one transformer forward split across GPUs by diffusers' context parallelism.

    torchrun --nproc-per-node 1 scripts/benchmark.py parallel --json one.json                      # one-GPU baseline
    torchrun --nproc-per-node 2 scripts/benchmark.py parallel --baseline one.json --json two.json  # two GPUs

The model is a Wan2.1-14B-sized WanTransformer3DModel by default (`--model wan1.3b` for the 1.3B one), with random
weights in bf16 at 720p and 81 frames (latents 21 x 90 x 160, 75,600 tokens, 40 heads of 128, 40 layers, dim 5,120,
FFN 13,824: the `wan14b` size of `bench_e2e.py`, built and called as there). Rows: the model's own dense attention,
then each method of `--methods` (VMoBA, Rectified SpaAttn and XAttention at 85% sparsity by default) through
`attention.apply`. With several processes the model runs under `pipelines.parallel.enable_context_parallel`:
Ulysses by default (every method runs), `--kind ring` for dense attention only (on diffusers' "_native_cudnn"
backend, which returns the log-sum-exp ring attention merges by; the method rows are listed as not run). With one
process nothing is split: that run is the baseline.

Every rank builds the model from the same seed and then takes rank 0's weights (a broadcast), and draws the same
inputs from the same seed (checked: the ranks compare their latents). Timing: `--warmup` untimed forwards, then
`--runs` forwards, each started together on every rank (a barrier outside the timed span) and timed by each rank
with CUDA events (the wall clock on a CPU); a run's time is its slowest rank's, and a row's is the median over runs.
Columns: ms per forward on this many GPUs, eager and, with `--compile`, under diffusers' regional compilation
(`compile_repeated_blocks`, fullgraph where it traces); the compile time (first compiled call less one forward); the
speed-up over the baseline's row of the same variant (`--baseline`: one-GPU ms / this run's ms); the density the
method kept (mean over the ranks' heads); the peak GPU memory of each rank (`peak_gib_per_rank`; the table shows the
largest). A row that runs out of memory is reported as OOM and the run goes on; rows that would start after
`--time-limit` are listed as skipped. Rank 0 prints the table and writes the JSON (after every row).

`--check`: rank 0 also keeps a one-process copy of the model (no parallelism) and compares each variant's split
output with that copy's output for the same inputs: max |split - one process| / max |one process|. Meant for
`--tiny` (a toy Wan of 4 heads and 3 layers, 96 tokens, float32 on the CPU over gloo); at full size the copy
doubles rank 0's weights (`check_reference_gib`; rank 0's peak includes it).

A failure that only some ranks hit (one rank out of memory, the others waiting in an exchange) cannot be reported:
the waiting ranks stop at the process group's timeout (`--timeout`). Shapes are the same on every rank, so an OOM
is normally everyone's.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import statistics
import time
from types import SimpleNamespace

from bench_e2e import (DEFAULT_METHODS, DENSE, build, compile_and_time, fmt_ms, free, is_oom, make_forward, sizes,
                       uncompile)

MODELS = ("wan14b", "wan1.3b")  # the Wan sizes of bench_e2e.py (models with a context-parallel plan)
KINDS = ("ulysses", "ring")
RING_BACKEND = "_native_cudnn"  # a diffusers attention backend that returns the log-sum-exp ring attention needs


class World:
    """This process's place among the ranks torchrun started (one process when launched without it)."""

    def __init__(self, tiny: bool, timeout_s: float):
        import torch
        import torch.distributed as dist

        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and not tiny
        if cuda:
            torch.cuda.set_device(local)
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")
        self.owns_group = self.size > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=self.device if cuda else None)

    @property
    def split(self) -> bool:
        return self.size > 1

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.split:
            return [value]
        import torch.distributed as dist
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def agree(self, value):
        """Rank 0's `value` on every rank (for decisions every rank must take alike)."""
        return self.gather(value)[0]

    def barrier(self) -> None:
        if self.split:
            import torch.distributed as dist
            dist.barrier()

    def close(self, exit_code: int | None) -> None:
        """Tears down the group this process started: after a failure (exit_code None) only that, so the error goes
        on; after success the rank ends here with exit_code (see `pipelines.parallel.leave_process_group`)."""
        if not self.owns_group:
            return
        import torch.distributed as dist
        if exit_code is None:
            dist.destroy_process_group()
        else:
            from pipelines.parallel import leave_process_group
            leave_process_group(exit_code)


def timed_ms(fn, runs: int, warmup: int, world: World) -> float:
    """Median over `runs` calls of the slowest rank's milliseconds; the ranks start each call together."""
    from benchmark import median_ms

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        world.barrier()  # outside the timed span
        times.append(median_ms(fn, 1, 0, world.device))  # one call: CUDA events on a GPU, the wall clock elsewhere
    return statistics.median(max(per_rank) for per_rank in zip(*world.gather(times)))


def peak_gib(device):
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def take_rank0_weights(model, world: World) -> None:
    """Every rank gets rank 0's parameters and buffers (already equal when the seeded initialisation is)."""
    if world.split:
        import torch.distributed as dist
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def drop_per_token_timestep(model) -> None:
    """diffusers' Wan plan also names the forward's `timestep` for splitting when it is per token (B, tokens: Wan2.2
    TI2V). Wan2.1's timestep is (B,): the entry splits nothing, and on the way diffusers 0.42 calls a `warning_once`
    its logger lacks (AttributeError). This model's own plan leaves the entry out; what is split is unchanged."""
    plan = getattr(type(model), "_cp_plan", None)
    if isinstance(plan, dict) and "" in plan:
        model._cp_plan = {name: entry for name, entry in plan.items() if name != ""}


def new_row(variant, method, options, kind, ranks):
    return dict(variant=variant, method=method, options=options, kind=kind, ranks=ranks, eager_ms=None,
                compiled_ms=None, compile_s=None, graphs=None, speedup=None, compiled_speedup=None,
                baseline_eager_ms=None, baseline_compiled_ms=None, density=None, peak_gib=None,
                peak_gib_per_rank=None, max_rel_err=None, oom=False, failed=False, note="")


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|: elementwise errors against the output's scale (not each element's, which is
    unbounded where the reference is near zero)."""
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class Bench:
    """The rows of one run, every rank measuring each together; rank 0 reports."""

    def __init__(self, args, world: World, info: dict, baseline: dict | None):
        self.args, self.world, self.info, self.baseline = args, world, info, baseline
        self.device = world.device
        self.rows, self.start = [], time.perf_counter()

    def say(self, text: str) -> None:
        if self.world.rank == 0:
            print(text, flush=True)

    def variant(self, model, forward, latents, label, method, options, reference):
        from benchmark import describe

        kind = self.info["kind"]
        row = new_row(label, method, options, kind, self.world.size)
        late = self.args.time_limit is not None and time.perf_counter() - self.start > self.args.time_limit
        if self.world.agree(late):
            row["note"] = "skipped (time limit)"
        elif kind == "ring" and method not in (None, "dense"):
            row["note"] = "not run: ring attention runs dense attention only (use --kind ulysses)"
        else:
            reset_peak(self.device)
            try:
                self.measure(row, model, forward, latents, method, options, reference)
            except Exception as exc:  # OOM, an unknown method or option, a failure: report and go on
                row["oom"], row["failed"] = is_oom(exc), True
                row["note"] += "OOM" if row["oom"] else describe(exc, 160)
            finally:
                self.clean(model)
            self.merge_ranks(row)
        self.finish(row)

    def measure(self, row, model, forward, latents, method, options, reference):
        import torch

        import attention
        from attention.methods.block_sparse import method_density

        args, world, device = self.args, self.world, self.device
        if method is not None:
            attention.apply(model, method, **options)
        mid = torch.tensor([500.0], device=device)

        def call():
            return forward(latents, mid)
        if not args.no_eager:
            row["eager_ms"] = timed_ms(call, args.runs, args.warmup, world)
        if args.check:
            self.check(row, call(), reference, method, options, latents, mid)
        density = method_density(model)  # this rank's heads' share: the ranks' mean is the model's
        row["density"] = 1.0 if method in (None, "dense") and density is None else density
        if args.compile:
            # The first compiled call (and the fullgraph fallback) as in e2e, then the ranks' timing as above.
            compile_and_time(model, forward, latents, row, SimpleNamespace(runs=1, warmup=1), self.info["backend"],
                             device)
            first_s = row["compile_s"] + row["compiled_ms"] / 1e3
            row["compiled_ms"] = timed_ms(call, args.runs, 0, world)
            row["compile_s"] = first_s - row["compiled_ms"] / 1e3

    def check(self, row, out, reference, method, options, latents, mid):
        """Rank 0: the one-process copy's output for the same variant and inputs. Its failures stay this row's
        note (the other ranks do not take part, so they must not change what the ranks do next)."""
        import attention
        from benchmark import describe

        if self.world.rank != 0:
            return
        ref_model, ref_forward = reference
        try:
            if method is not None:
                attention.apply(ref_model, method, **options)
            row["max_rel_err"] = max_rel_err(out, ref_forward(latents, mid))
        except Exception as exc:
            row["note"] += "check: " + ("OOM" if is_oom(exc) else describe(exc, 120)) + "; "
        finally:
            attention.remove(ref_model)
            del out

    def clean(self, model):
        import torch

        import attention

        uncompile(model)
        attention.remove(model)
        if self.args.compile:
            torch._dynamo.reset()
        free(self.device)

    def merge_ranks(self, row):
        """The ranks' peaks, densities, compile times and failures, on every rank."""
        ranks = self.world.gather(dict(peak=peak_gib(self.device), density=row["density"], failed=row["failed"],
                                       oom=row["oom"], note=row["note"], compile_s=row["compile_s"]))
        row["peak_gib_per_rank"] = [r["peak"] for r in ranks]
        peaks = [p for p in row["peak_gib_per_rank"] if p is not None]
        row["peak_gib"] = max(peaks) if peaks else None
        densities = [r["density"] for r in ranks]
        row["density"] = None if None in densities else sum(densities) / len(densities)
        row["failed"] = any(r["failed"] for r in ranks)
        row["oom"] = any(r["oom"] for r in ranks)
        if row["compile_s"] is not None:  # the slowest rank's
            row["compile_s"] = max(r["compile_s"] for r in ranks if r["compile_s"] is not None)
        if not row["note"]:  # rank 0's note, else the first other rank's
            row["note"] = next((f"rank {i}: {r['note']}" for i, r in enumerate(ranks) if r["note"]), "")

    def finish(self, row):
        from benchmark import write_json

        if self.baseline is not None:
            base = self.baseline["rows"].get(row["variant"])
            if base is not None:
                row["baseline_eager_ms"], row["baseline_compiled_ms"] = base.get("eager_ms"), base.get("compiled_ms")
                if row["baseline_eager_ms"] and row["eager_ms"]:
                    row["speedup"] = row["baseline_eager_ms"] / row["eager_ms"]
                if row["baseline_compiled_ms"] and row["compiled_ms"]:
                    row["compiled_speedup"] = row["baseline_compiled_ms"] / row["compiled_ms"]
        self.rows.append(row)
        err = f" max rel err {row['max_rel_err']:.1e}" if row["max_rel_err"] is not None else ""
        self.say(f"  {row['variant'][:36]:36s} eager {fmt_ms(row, 'eager_ms')} ms, compiled "
                 f"{fmt_ms(row, 'compiled_ms')} ms, peak {fmt_ms(row, 'peak_gib')} GiB/GPU{err} {row['note']}")
        if self.world.rank == 0:
            write_json(self.args.json, self.info, self.rows)


def load_baseline(path: str, info: dict) -> dict:
    """An earlier parallel run's JSON (the one-GPU run), its rows by variant; SystemExit unless it timed the same
    model at the same size."""
    import json

    with open(path) as fh:
        data = json.load(fh)
    mine = {key: info[key] for key in ("benchmark", "model", "tokens", "dtype")}
    theirs = {key: data.get(key) for key in mine}
    if theirs != mine:
        raise SystemExit(f"--baseline {path} timed {theirs}, this run times {mine}: not comparable")
    return dict(path=path, world_size=data.get("world_size"), rows={r["variant"]: r for r in data["rows"]})


def run_parallel(args):
    import torch

    from benchmark import expand_methods, run_info, spec_text
    from pipelines.parallel import enable_context_parallel

    if args.no_eager and not args.compile:
        raise SystemExit("--no-eager leaves nothing to time without --compile")
    world = World(args.tiny, args.timeout)
    try:
        device = world.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        size = sizes(args.tiny)[args.model]
        tokens = math.prod(n // p for n, p in zip(size.latents[2:], size.config["patch_size"]))
        kind = args.kind if world.split else None
        heads = size.config["num_attention_heads"]
        if tokens % world.size or (kind == "ulysses" and heads % world.size):
            raise SystemExit(f"{args.model}: {tokens} tokens and {heads} heads do not split across {world.size} "
                             f"ranks{' under Ulysses' if kind == 'ulysses' else ''}")
        if kind == "ring" and device.type != "cuda":
            raise SystemExit("--kind ring needs a GPU: diffusers' attention backends that return the log-sum-exp "
                             "ring attention merges by run on CUDA only; use --kind ulysses")
        info = dict(run_info(device), benchmark="parallel", model=args.model, kind=kind, world_size=world.size,
                    tokens=tokens, tokens_per_rank=tokens // world.size, latents=size.latents,
                    text_tokens=size.text_tokens, heads=heads, layers=size.config["num_layers"], dtype=str(dtype),
                    runs=args.runs, warmup=args.warmup, compile=args.compile,
                    backend=args.backend or ("eager" if args.tiny else "inductor"), check=args.check,
                    timing="median over runs of the slowest rank's ms (CUDA events; wall clock on a CPU)")
        baseline = load_baseline(args.baseline, info) if args.baseline else None
        if baseline is not None:
            info.update(baseline=baseline["path"], baseline_world_size=baseline["world_size"])
        bench = Bench(args, world, info, baseline)

        model = build(size, device, dtype)
        take_rank0_weights(model, world)
        reference = None
        if args.check and world.rank == 0:
            ref_model = copy.deepcopy(model)  # before any parallelism: a plain one-process model
            torch.manual_seed(1)
            ref_forward, _, _ = make_forward(ref_model, size, device, dtype)
            reference = (ref_model, ref_forward)
            info["check_reference_gib"] = sum(p.numel() * p.element_size() for p in ref_model.parameters()) / 2**30
        torch.manual_seed(1)  # the same text and latents on every rank (and for the reference)
        forward, latents, _ = make_forward(model, size, device, dtype)
        if len(set(world.gather(float(latents.double().sum())))) != 1:
            raise RuntimeError("the ranks drew different inputs from the same seed")
        if world.split:
            drop_per_token_timestep(model)
            if kind == "ring":
                model.set_attention_backend(RING_BACKEND)
            enable_context_parallel(model, kind=kind)
        bench.say(f"parallel: {args.model}, {size.model_class}, {tokens} tokens ({tokens // world.size} per rank), "
                  f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {dtype}, {world.size} "
                  f"rank(s){f', {kind}' if kind else ' (baseline: no parallelism)'}, {info['device']}")

        variants = [(DENSE, None, {})] + [(spec_text(n, o), n, o) for n, o in expand_methods(args.methods)]
        for label, method, options in variants:
            bench.variant(model, forward, latents, label, method, options, reference)

        if world.rank == 0:
            how = f"{world.size} ranks, {kind}" if kind else "one process (baseline)"
            print(f"\nOne forward, {args.model} ({tokens} tokens), {dtype}, {how}; ms: median of {args.runs} of the "
                  f"slowest rank; speed-up: {('baseline ' + baseline['path']) if baseline else 'no --baseline'} "
                  f"ms / this ms ({info['device']}, {info['date']}, torch {info['torch']})")
            print(parallel_table(bench.rows, args.compile))
    except BaseException:
        world.close(exit_code=None)
        raise
    world.close(exit_code=0)
    return bench.rows


def parallel_table(rows, compiled=False):
    from benchmark import fmt

    head = (f"{'variant':32s} {'ranks':>5s} {'eager ms':>9s} {'speed-up':>8s} {'density':>7s} {'peak GiB':>8s} "
            f"{'max rel err':>11s}")
    if compiled:
        head += f" {'comp. ms':>9s} {'comp. speed-up':>14s} {'compile s':>9s}"
    lines = [head]
    for r in rows:
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        line = (f"{r['variant'][:32]:32s} {r['ranks']:5d} {fmt_ms(r, 'eager_ms'):>9s} {fmt(r['speedup'], '.2f'):>8s} "
                f"{fmt(r['density'], '.3f'):>7s} {fmt_ms(r, 'peak_gib'):>8s} {err:>11s}")
        if compiled:
            line += (f" {fmt_ms(r, 'compiled_ms'):>9s} {fmt(r['compiled_speedup'], '.2f'):>14s} "
                     f"{fmt(r['compile_s']):>9s}")
        lines.append(line + (f"  ({r['note'].rstrip('; ')})" if r["note"] else ""))
    return "\n".join(lines)


def add_parallel_parser(sub):
    from benchmark import parse_method_spec, positive_int

    p = sub.add_parser("parallel", help="a Wan2.1-14B forward split across GPUs (torchrun): dense and each method "
                                        "under Ulysses / ring context parallelism, ms, speed-up, memory per GPU")
    p.add_argument("--model", default="wan14b", choices=MODELS, help="the model size (bench_e2e.py's)")
    p.add_argument("--methods", nargs="*", type=parse_method_spec,
                   default=[parse_method_spec(spec) for spec in DEFAULT_METHODS],
                   help=f"method specs beside the model's own dense attention (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--kind", default="ulysses", choices=KINDS,
                   help="how the tokens are split (several processes): ulysses (every method) or ring (dense only)")
    p.add_argument("--compile", action="store_true", help="also time under regional compilation")
    p.add_argument("--no-eager", action="store_true", help="with --compile: the compiled forwards only")
    p.add_argument("--backend", help="torch.compile backend (default: inductor; eager with --tiny)")
    p.add_argument("--runs", type=positive_int, default=3, help="timed forwards (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    p.add_argument("--baseline", metavar="JSON", help="the one-GPU run's JSON: adds its ms and the speed-up")
    p.add_argument("--check", action="store_true",
                   help="compare the split output with a one-process copy of the model on rank 0 (for --tiny)")
    p.add_argument("--time-limit", type=float, help="seconds: rows that would start later are skipped (and listed)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a rank waits in a collective before the process group gives up")
    p.add_argument("--tiny", action="store_true", help="a toy Wan on the CPU in float32, ranks over gloo")
    p.add_argument("--json", help="write the results here as JSON (rank 0, after every row)")
    p.set_defaults(func=run_parallel)
