"""`scripts/benchmark.py attention --backward`: forward and forward+backward of the Triton block-sparse kernel against
FlexAttention (same block mask), cuDNN and FlashAttention-2 dense, in one run on CUDA.

Each backward mode of the kernel is timed (`split`: a dq pass and a dk/dv pass; `fused`: one pass adding dq
atomically), autotuned, and the parts of a split backward on their own: delta, the transposed selection and the
backward op (both kernels, with the configs autotuning chose). A density's ideal is that share of the dense cuDNN time.
"""

from __future__ import annotations

BWD_MODES = ("split", "fused")


def _grad_fn(fn, q, k, v, g):
    """Forward and backward of fn(q, k, v) -> out with the output gradient g (the same for every kernel compared)."""
    import torch

    def run():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), g)
    return run


def run_attention_backward(args, bench, random_selection, flex_block_mask, shapes, shape_table):
    import datetime

    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from attention.kernels import triton_block_sparse as T

    bs, dev, dtype = args.block_size, "cuda", torch.bfloat16
    flex = torch.compile(flex_attention)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []

    def dense(backend, q, k, v, grad_out=None):
        """Dense attention through one SDPA backend: forward, or forward+backward when given an output gradient."""
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        try:
            run = (lambda: fn(q, k, v)) if grad_out is None else _grad_fn(fn, q, k, v, grad_out)
            run()
            return bench(run)
        except RuntimeError as exc:
            print(f"  {backend}: {str(exc)[:120]}", flush=True)
            return float("nan")

    for shape in shapes:
        N, H, D = shape_table[shape]
        q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        grad_out = torch.randn_like(q)
        nb = -(-N // bs)
        base = {name: dict(fwd=dense(backend, q, k, v), fwd_bwd=dense(backend, q, k, v, grad_out))
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION))}
        print(f"{shape}: N={N} H={H} D={D}  cuDNN {base['cudnn']} FA2 {base['fa2']}", flush=True)
        for dens in args.densities:
            index, count = random_selection(1, H, nb, nb, dens / 100, dev)
            mask = flex_block_mask(index, count, nb, N, bs)
            row = dict(shape=shape, tokens=N, heads=H, head_dim=D, density_pct=dens, block_size=bs,
                       cudnn=base["cudnn"], fa2=base["fa2"], ideal_fwd_bwd=dens / 100 * base["cudnn"]["fwd_bwd"],
                       ideal_fwd=dens / 100 * base["cudnn"]["fwd"])

            def flex_fn(q, k, v):
                return flex(q, k, v, block_mask=mask)

            def ours_fn(q, k, v):
                return T.block_sparse_attention(q, k, v, index, count, block_size=bs)[0]
            row["flex"] = dict(fwd=bench(lambda: flex_fn(q, k, v)), fwd_bwd=bench(_grad_fn(flex_fn, q, k, v, grad_out)))
            row["ours_fwd"] = bench(lambda: ours_fn(q, k, v))
            want = _grad_fn(flex_fn, q, k, v, grad_out)()
            for mode in BWD_MODES:
                T.BWD_MODE = mode
                run = _grad_fn(ours_fn, q, k, v, grad_out)
                got = run()  # autotunes this mode's kernels
                err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want))
                row[mode] = dict(fwd_bwd=bench(run), grad_rel_err_vs_flex=err, configs={
                    name: str(getattr(T._tuned.get((name, bs)), "best_config", None))
                    for name in (("dq", "dkdv") if mode == "split" else ("fused",))})
                print(f"  {dens:5.1f}% {mode:5s} fwd+bwd {row[mode]['fwd_bwd']:8.3f} ms (grads vs flex {err:.1e}) "
                      f"{row[mode]['configs']}", flush=True)
            T.BWD_MODE = "split"
            row["parts"] = _split_parts(T, bench, q, k, v, index, count, bs)
            best = min(BWD_MODES, key=lambda m: row[m]["fwd_bwd"])
            row["best_mode"] = best
            print(f"  {dens:5.1f}% fwd ours {row['ours_fwd']:.3f} flex {row['flex']['fwd']:.3f}; fwd+bwd ours "
                  f"{row[best]['fwd_bwd']:.3f} ({best}) flex {row['flex']['fwd_bwd']:.3f} ideal "
                  f"{row['ideal_fwd_bwd']:.3f}; parts {row['parts']}", flush=True)
            rows.append(row)
        q = k = v = grad_out = mask = None  # free this shape's tensors before the next one
        torch.cuda.empty_cache()

    device, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    print(f"\nBlock-sparse attention, forward and forward+backward, bf16, B=1, block {bs}, median ms ({device}, "
          f"{date}, torch {torch.__version__}, triton {triton.__version__})")
    print(f"{'shape':12s} {'dens%':>6s} {'fwd ours':>9s} {'fwd Flex':>9s} {'f+b split':>10s} {'f+b fused':>10s} "
          f"{'f+b Flex':>9s} {'f+b cuDNN':>10s} {'f+b FA2':>9s} {'ideal':>8s}")
    for r in rows:
        print(f"{r['shape']:12s} {r['density_pct']:6.1f} {r['ours_fwd']:9.3f} {r['flex']['fwd']:9.3f} "
              f"{r['split']['fwd_bwd']:10.3f} {r['fused']['fwd_bwd']:10.3f} {r['flex']['fwd_bwd']:9.3f} "
              f"{r['cudnn']['fwd_bwd']:10.3f} {r['fa2']['fwd_bwd']:9.3f} {r['ideal_fwd_bwd']:8.3f}")
    return dict(device=device, date=date, torch=torch.__version__, triton=triton.__version__, rows=rows)


def _split_parts(T, bench, q, k, v, index, count, bs):
    """Milliseconds of each part of a split backward, with the configs autotuning chose."""
    import torch

    index, count = index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()
    out, lse = T.block_sparse_attention(q.detach(), k.detach(), v.detach(), index, count, block_size=bs)
    do = torch.randn_like(out)
    nkb = -(-k.shape[2] // bs)
    delta = T.attention_delta(do, out)
    parts = dict(
        delta=bench(lambda: T.attention_delta(do, out)),  # the Triton pre-pass the backward runs
        transpose=bench(lambda: T.transpose_block_index(index, count, nkb)),
        backward_op=bench(lambda: torch.ops.t2v.block_sparse_attn_bwd(
            do, q.detach(), k.detach(), v.detach(), lse, delta, index, count,
            None, None, None, bs, q.shape[-1] ** -0.5)))
    return {name: round(ms, 3) for name, ms in parts.items()}
