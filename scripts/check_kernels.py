"""GPU correctness check: Triton block-sparse attention, XAttention scoring, group block masses and MATE's fused
Mamba steps against the PyTorch references.

Fresh random inputs every run (the seed is printed). Outputs of the block-sparse kernel are filled
with NaN before each launch, so any element left unwritten fails the check. Exits non-zero on
any failure. Usage: python scripts/check_kernels.py [--seed S] [--skip-compile] [--only antidiagonal|group_mass|fused_backward|mamba_ops]
"""

import argparse
import math
import os
import sys
import time

os.environ.setdefault("T2V_ATTN_AUTOTUNE", "0")  # one config per kernel; the sweep below runs the rest
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from attention.kernels import dispatch, reference as R  # noqa: E402

FAILS = []
DEV = "cuda"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def report(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name:58s} {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def make_case(B, H, N, M, D, bs, density, dtype, pool=False, empty=0.0, layout="bhnd"):
    """Random q, k, v and a random per-(b, h, query block) selection with junk past the count."""
    dev = DEV
    nqb, nkb = math.ceil(N / bs), math.ceil(M / bs)

    def rnd(L):
        if layout == "bnhd":  # non-contiguous (B, H, L, D) view of a (B, L, H, D) tensor
            return torch.randn(B, L, H, D, device=dev, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, device=dev, dtype=dtype)

    q, k, v = rnd(N), rnd(M), rnd(M)
    n_sel = min(nkb, max(1, round(density * nkb)))
    order = torch.rand(B, H, nqb, nkb, device=dev).argsort(-1)
    index = order[..., :n_sel].sort(-1).values.to(torch.int32)
    index = torch.cat([index, torch.randint(0, nkb, (B, H, nqb, 3), device=dev, dtype=torch.int32)], -1)
    count = torch.full((B, H, nqb), n_sel, device=dev, dtype=torch.int32)
    count = torch.where(torch.rand(B, H, nqb, device=dev) < empty, 0, count)
    kw = dict(block_size=bs)
    if pool:
        # Rectified-style: mean key/value per key block, weighted by its size where not selected.
        pad = nkb * bs - M
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, H, nkb, bs, D)
        vp = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, H, nkb, bs, D)
        sizes = torch.full((nkb,), float(bs), device=dev)
        sizes[-1] = M - (nkb - 1) * bs
        pk = (kp.sum(3) / sizes[:, None]).to(dtype)
        pv = (vp.sum(3) / sizes[:, None]).to(dtype)
        selected = torch.zeros(B, H, nqb, nkb + 3, device=dev, dtype=torch.bool)
        valid = torch.arange(index.shape[-1], device=dev) < count[..., None]
        selected.scatter_(-1, torch.where(valid, index.long(), nkb), True)
        lw = torch.where(selected[..., :nkb], float("-inf"), sizes.log())
        if empty:  # some query blocks attend to nothing at all
            lw = torch.where((count == 0)[..., None] & (torch.rand(B, H, nqb, 1, device=dev) < 0.5), float("-inf"), lw)
        kw.update(pooled_k=pk, pooled_v=pv, pooled_log_weight=lw)
    return q, k, v, index, count, kw


def check(name, case, grads=True, configs=None, tol=None, tma=True, bwd_mode="split"):
    from attention.kernels import triton_block_sparse as T
    T.FWD_TMA, T.BWD_MODE = tma, bwd_mode
    q, k, v, index, count, kw = case
    dtype = q.dtype
    tol_out = tol or (1e-2 if dtype == torch.bfloat16 else 3e-3)
    tol_grad = 2 * tol_out
    leaves = [q, k, v] + ([kw["pooled_k"], kw["pooled_v"]] if "pooled_k" in kw else [])
    for t in leaves:
        t.requires_grad_(grads)
    T._forced_configs.clear()
    T._forced_configs.update(configs or {})
    T._poison_outputs = True
    try:
        out, lse = T.block_sparse_attention(q, k, v, index, count, **kw)
        ref_out, ref_lse = R.block_sparse_attention(q, k, v, index, count, **kw)
        fin = torch.isfinite(ref_lse)
        same_empty = torch.equal(fin, torch.isfinite(lse)) and torch.equal(lse[~fin], ref_lse[~fin])
        e_out, e_lse = rel(out, ref_out), rel(lse[fin], ref_lse[fin]) if fin.any() else 0.0
        ok = (not out.isnan().any()) and same_empty and e_out < tol_out and e_lse < 1e-3
        ok = ok and torch.all(out[~fin] == 0).item()
        detail = f"out {e_out:.2e} lse {e_lse:.2e}"
        if grads:
            g_out = torch.randn_like(out)
            g_lse = torch.randn_like(lse) * fin
            loss = (out.float() * g_out).sum() + (torch.where(fin, lse, 0) * g_lse).sum()
            ref_loss = (ref_out.float() * g_out).sum() + (torch.where(fin, ref_lse, 0) * g_lse).sum()
            got = torch.autograd.grad(loss, leaves)
            want = torch.autograd.grad(ref_loss, leaves)
            errs = [rel(a, b) for a, b in zip(got, want)]
            ok = ok and all(torch.isfinite(g).all().item() for g in got) and max(errs) < tol_grad
            detail += " grads " + " ".join(f"{e:.2e}" for e in errs)
    finally:
        T._poison_outputs = False
        T._forced_configs.clear()
        T.FWD_TMA, T.BWD_MODE = True, "split"
    report(name + ("" if bwd_mode == "split" else f" [{bwd_mode} bwd]"), ok, detail)


def compare_scores(label, param_name, cases, reference, fused, spread=1.0):
    """Block scores of a Triton kernel against its PyTorch reference in float64; cases (N, M, D, block, param, dtype),
    inputs of standard deviation `spread` (larger: peakier softmaxes). Returns the last case's q, k and scores."""
    for (n, m, d, bs, param, dtype) in cases:
        q, k = (torch.randn(2, 3, L, d, device=DEV, dtype=dtype) * spread for L in (n, m))
        want = reference(q.double(), k.double(), bs, param)
        got = fused(q, k, bs, param).double()
        err = rel(got, want)
        report(f"{label} {dtype} D{d} N={n} M={m} bs{bs} {param_name}{param} x{spread:g}", err < 1e-2 and
               bool(torch.isfinite(got).all()), f"rel err {err:.2e}")
    return q, k, want


def time_scores(do_bench, label, param_name, params, reference, fused):
    """Both versions timed at the Wan2.1-1.3B shape with blocks of 64."""
    q, k = (torch.randn(1, 12, 32760, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    for param in params:
        ref = do_bench(lambda: reference(q, k, 64, param), return_mode="median")
        fast = do_bench(lambda: fused(q, k, 64, param), return_mode="median")
        print(f"wan1.3b {label} block 64 {param_name} {param}: PyTorch {ref:.3f} ms, Triton {fast:.3f} ms", flush=True)


def check_antidiagonal_scores(do_bench):
    """XAttention's Triton block scores against the PyTorch reference, then both timed."""
    from attention.kernels import antidiagonal, triton_antidiagonal

    cases = [(1000, 1000, 128, 64, 8, torch.bfloat16), (777, 500, 64, 64, 16, torch.float16),
             (4100, 4100, 128, 128, 8, torch.bfloat16), (300, 333, 64, 16, 8, torch.float32)]
    versions = (antidiagonal.antidiagonal_block_scores, triton_antidiagonal.antidiagonal_block_scores)
    compare_scores("antidiagonal scores", "stride", cases, *versions)
    time_scores(do_bench, "antidiagonal scores", "stride", (8, 16), *versions)


def check_group_mass(do_bench):
    """The Triton group block masses against the PyTorch reference, compiled too, then both timed."""
    from attention.kernels import group_mass, triton_group_mass

    cases = [(1000, 1000, 128, 64, 8, torch.bfloat16), (777, 500, 64, 64, 16, torch.float16),
             (4100, 4100, 128, 128, 4, torch.bfloat16), (300, 333, 64, 16, 2, torch.float32),
             (2000, 2000, 128, 64, 1, torch.bfloat16)]
    versions = (group_mass.group_block_mass, triton_group_mass.group_block_mass)
    compare_scores("group mass", "group", [(1000, 1000, 128, 64, 8, torch.bfloat16),
                                           (2048, 2048, 64, 128, 1, torch.bfloat16)], *versions, spread=4.0)
    q, k, want = compare_scores("group mass", "group", cases, *versions)
    compiled = torch.compile(lambda q, k: dispatch.group_block_mass(q, k, 64, 1))  # the last case
    err = rel(compiled(q, k).double(), want)
    report("group mass under torch.compile", err < 1e-2, f"rel err {err:.2e}")
    time_scores(do_bench, "group block mass", "group", (32, 16, 8), *versions)


def check_fused_backward(T, bf, fp):
    """The fused backward (dq added atomically) on the cases that exercise padding, pooling, empty rows and
    strides, and every fused tile config."""
    for name, case in (("bf16 D128 N=M=1000 bs64 30% pooled empty", (1, 3, 1000, 1000, 128, 64, 0.3, bf, True, 0.2)),
                       ("bf16 D64 N=1000 M=1300 bs64 40%", (2, 2, 1000, 1300, 64, 64, 0.4, bf)),
                       ("fp16 D128 N=777 M=500 bs128 50% pooled", (1, 2, 777, 500, 128, 128, 0.5, fp, True)),
                       ("bf16 D128 N=M=32760 bs128 15% pooled", (1, 2, 32760, 32760, 128, 128, 0.15, bf, True, 0.05)),
                       ("bf16 D128 N=M=8190 bs128 100%", (1, 2, 8190, 8190, 128, 128, 1.0, bf)),
                       ("bf16 D128 N=2000 bs128 non-contiguous pooled", (2, 3, 2000, 2000, 128, 128, 0.3, bf, True, 0.0,
                                                                         "bnhd")),
                       ("bf16 D64 all lists empty, some pooled only", (1, 2, 300, 300, 64, 64, 0.3, bf, True, 1.0))):
        check(name, make_case(*case), bwd_mode="fused")
    for cfg in T.FUSED_CONFIGS:
        if T._fits(cfg, 128):
            check(f"config fused {cfg} bs128", make_case(1, 2, 2000, 2037, 128, 128, 0.3, bf, True, 0.1),
                  configs={"fused": cfg}, bwd_mode="fused")


def check_mamba_ops():
    """MATE's fused convolution and gate-norm at the Wan-width shape (inputs sliced from a projection, as the
    branch passes them), both directions, against the float32 reference."""
    from attention.kernels import mamba_ops
    from attention.kernels import triton_mamba_ops as M

    for dtype in (torch.bfloat16, torch.float32):
        tokens, width, channels = 131_080, 1536, 1536 + 128
        projection = torch.randn(1, tokens, 2 * width + 128 + 24, device=DEV, dtype=dtype)
        z, xbc = projection[..., :width], projection[..., width:width + channels]
        weight, bias = torch.randn(channels, 4, device=DEV) * 0.5, torch.randn(channels, device=DEV)
        for reverse in (False, True):
            got = M.causal_conv_silu(xbc, weight, bias, reverse)
            ref = mamba_ops.causal_conv_silu_reference(xbc.float(), weight, bias, reverse)
            e = rel(got, ref)
            report(f"causal conv + SiLU {str(dtype)[6:]} {tokens} x {channels} reverse={reverse}",
                   e < (1e-2 if dtype == torch.bfloat16 else 1e-5), f"rel {e:.2e}")
        forward, backward = (torch.randn(1, tokens, width, device=DEV, dtype=dtype) for _ in range(2))
        norm_weight = torch.rand(width, device=DEV) + 0.5
        got = M.gated_rms_norm(forward, backward, z, norm_weight, 1e-6)
        ref = mamba_ops.gated_rms_norm_reference(forward.float(), backward.float(), z.float(), norm_weight, 1e-6)
        e = rel(got, ref)
        report(f"gated RMSNorm {str(dtype)[6:]} {tokens} x {width}", e < (1e-2 if dtype == torch.bfloat16 else 1e-5),
               f"rel {e:.2e}")


def finish():
    print(f"\n{len(FAILS)} failure(s)" + (": " + ", ".join(FAILS) if FAILS else ""), flush=True)
    sys.exit(1 if FAILS else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--only", choices=["antidiagonal", "group_mass", "fused_backward", "mamba_ops"],
                    help="run only this group of checks")
    args = ap.parse_args()
    import triton
    from attention.kernels import triton_block_sparse as T
    torch.manual_seed(args.seed)
    print(f"seed {args.seed}; torch {torch.__version__}; triton {triton.__version__}; "
          f"{torch.cuda.get_device_name()}", flush=True)
    bf, fp = torch.bfloat16, torch.float16
    if args.only == "fused_backward":
        check_fused_backward(T, bf, fp)
        finish()
    if args.only == "mamba_ops":
        check_mamba_ops()
        finish()
    if args.only:
        from triton.testing import do_bench
        {"antidiagonal": check_antidiagonal_scores, "group_mass": check_group_mass}[args.only](do_bench)
        finish()

    check("bf16 D128 N=M=1000 bs64 30% pooled empty", make_case(1, 3, 1000, 1000, 128, 64, 0.3, bf, True, 0.2))
    check("fp16 D64 N=M=1000 bs64 30% pooled empty", make_case(1, 3, 1000, 1000, 64, 64, 0.3, fp, True, 0.2))
    check("bf16 D64 N=1000 M=1300 bs64 40%", make_case(2, 2, 1000, 1300, 64, 64, 0.4, bf))
    check("fp16 D128 N=777 M=500 bs128 50% pooled", make_case(1, 2, 777, 500, 128, 128, 0.5, fp, True))
    check("bf16 D128 N=M=32760 bs128 15% pooled", make_case(1, 2, 32760, 32760, 128, 128, 0.15, bf, True, 0.05))
    check("fp16 D128 N=M=32760 bs128 15% (fwd)", make_case(1, 2, 32760, 32760, 128, 128, 0.15, fp), grads=False)
    check("bf16 D128 N=M=32760 bs128 15% pointer loads", make_case(1, 2, 32760, 32760, 128, 128, 0.15, bf, True),
          grads=False, tma=False)
    check("bf16 D128 N=2000 bs128 non-contiguous pooled", make_case(2, 3, 2000, 2000, 128, 128, 0.3, bf, True, layout="bnhd"))
    check("bf16 D64 all lists empty, some pooled only", make_case(1, 2, 300, 300, 64, 64, 0.3, bf, True, empty=1.0))
    check("bf16 D64 all empty, pointer loads", make_case(1, 2, 300, 300, 64, 64, 0.3, bf, False, empty=1.0), tma=False)

    # Full density equals dense attention (SDPA for out, float32 logsumexp for lse).
    for dtype, D in ((bf, 128), (fp, 64)):
        N, bs = 4100, 128
        q, k, v = (torch.randn(1, 4, N, D, device="cuda", dtype=dtype) for _ in range(3))
        index, count = R.full_block_index(math.ceil(N / bs), math.ceil(N / bs), 1, 4, "cuda")
        T._poison_outputs = True
        out, lse = T.block_sparse_attention(q, k, v, index, count, block_size=bs)
        T._poison_outputs = False
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        ref_lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * D ** -0.5, -1)
        e, el = rel(out, ref), rel(lse, ref_lse)
        report(f"{str(dtype)[6:]} D{D} N={N} full density vs dense", e < (1e-2 if dtype == bf else 3e-3) and el < 1e-3,
               f"out {e:.2e} lse {el:.2e}")
    check("bf16 D128 N=3000 full density grads", make_case(1, 2, 3000, 3000, 128, 128, 1.0, bf))

    check_fused_backward(T, bf, fp)
    check_mamba_ops()

    # Every tile config of every kernel, at both block sizes.
    for bs, N in ((64, 1000), (128, 2000)):
        for name, cfgs in (("fwd", T.FWD_CONFIGS), ("dq", T.DQ_CONFIGS), ("dkdv", T.DKDV_CONFIGS)):
            for cfg in cfgs:
                for tma in ((True, False) if name == "fwd" else (True,)):
                    if T._fits(cfg, bs):
                        check(f"config {name} {cfg} bs{bs}" + (" tma" if tma and name == "fwd" else ""),
                              make_case(1, 2, N, N + 37, 128, bs, 0.3, bf, True, 0.1),
                              grads=name != "fwd", configs={name: cfg}, tma=tma)

    # Dispatch: Triton on CUDA, no warning; dense_attention with lse.
    import warnings
    q, k, v, index, count, kw = make_case(1, 2, 1000, 1000, 64, 64, 0.5, bf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = dispatch.block_sparse_attention(q, k, v, index, count, **kw)
        d_out, d_lse = dispatch.dense_attention(q, k, v)
    ref_out, ref_lse = R.dense_attention(q, k, v)
    report("dispatch picks Triton on CUDA without warning", not caught and dispatch.triton_usable(q, 64)
           and rel(d_out, ref_out) < 1e-2 and rel(d_lse, ref_lse) < 1e-3,
           f"dense out {rel(d_out, ref_out):.2e} lse {rel(d_lse, ref_lse):.2e}")

    if not args.skip_compile:
        q, k, v, index, count, kw = make_case(1, 2, 1000, 1000, 128, 64, 0.3, bf, True, 0.1)
        leaves = [t.requires_grad_(True) for t in (q, k, v, kw["pooled_k"], kw["pooled_v"])]

        def f(q, k, v, pk, pv):
            o, lse = T.block_sparse_attention(q, k, v, index, count, block_size=64, pooled_k=pk,
                                              pooled_v=pv, pooled_log_weight=kw["pooled_log_weight"])
            return (o.float() ** 2).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
        try:
            t0 = time.time()
            cf = torch.compile(f, fullgraph=True)
            got = torch.autograd.grad(cf(*leaves), leaves)
            want = torch.autograd.grad(f(*leaves), leaves)
            errs = [rel(a, b) for a, b in zip(got, want)]
            report("torch.compile(fullgraph=True) fwd+bwd", max(errs) < 1e-3,
                   f"grads vs eager {max(errs):.2e}, compile {time.time() - t0:.0f}s")
        except Exception as exc:  # report and go on: the timing below still matters
            report("torch.compile(fullgraph=True) fwd+bwd", False, repr(exc)[:300])

    # Backward cost at the Wan2.1-1.3B shape, 15% of blocks (default configs).
    from triton.testing import do_bench
    q, k, v, index, count, kw = make_case(1, 12, 32760, 32760, 128, 128, 0.15, bf)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = T.block_sparse_attention(q, k, v, index, count, **kw)
    g = torch.randn_like(out)
    fwd = do_bench(lambda: T.block_sparse_attention(q, k, v, index, count, **kw), return_mode="median")
    bwd = do_bench(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True), return_mode="median")
    print(f"wan1.3b 15% default configs: fwd {fwd:.3f} ms, bwd {bwd:.3f} ms", flush=True)
    check_antidiagonal_scores(do_bench)
    check_group_mass(do_bench)
    finish()


if __name__ == "__main__":
    main()
