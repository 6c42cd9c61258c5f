"""The Triton block-sparse attention kernels against the PyTorch reference: on a GPU, or on the CPU under Triton's
interpreter (tests/conftest.py), at sizes the interpreter runs in seconds. scripts/check_kernels.py covers real
sizes, half precision and the tensor-descriptor loads on a GPU."""

import math

import pytest
import torch

from attention.kernels import reference as R

triton = pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(N, M, D, bs, density, pooled, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, L, D, generator=g) for L in (N, M, M))
    nqb, nkb = math.ceil(N / bs), math.ceil(M / bs)
    mask = torch.rand(1, 2, nqb, nkb, generator=g) < density
    mask[..., 0] = True
    index, count = R.block_index_from_mask(mask)
    junk = torch.arange(index.shape[-1]) >= count[..., None]  # entries past the count must be ignored
    index = torch.where(junk, torch.full_like(index, nkb - 1), index)
    extra = {}
    if pooled:
        extra = dict(pooled_k=torch.randn(1, 2, 3, D, generator=g), pooled_v=torch.randn(1, 2, 3, D, generator=g),
                     pooled_log_weight=torch.randn(1, 2, nqb, 3, generator=g))
    return q, k, v, index, count, extra


@pytest.mark.parametrize("bwd_mode", ["split", "fused"])
@pytest.mark.parametrize("N,M,D,bs,density,pooled", [(200, 150, 32, 64, 1.0, False), (150, 170, 16, 32, 0.5, False),
                                                     (96, 100, 16, 32, 0.5, True)])
def test_triton_forward_and_backward_match_the_reference(N, M, D, bs, density, pooled, bwd_mode, monkeypatch):
    from attention.kernels import triton_block_sparse as T

    monkeypatch.setattr(T, "BWD_MODE", bwd_mode)  # two dq passes, or dq added atomically in the dk/dv pass
    monkeypatch.setattr(T, "_AUTOTUNE", False)  # one tile config: the interpreter is slow
    monkeypatch.setattr(T, "FWD_TMA", DEVICE == "cuda")  # descriptor loads need a GPU
    q, k, v, index, count, extra = case(N, M, D, bs, density, pooled, seed=N + M)
    leaves = [t.requires_grad_(True) for t in (q, k, v, *extra.values())][: 5 if pooled else 3]
    ref_out, ref_lse = R.block_sparse_attention(q, k, v, index, count, block_size=bs, **extra)
    ref_grads = torch.autograd.grad((ref_out ** 2).sum(), leaves)

    moved = {name: t.detach().to(DEVICE).requires_grad_(t.requires_grad) for name, t in extra.items()}
    q2, k2, v2 = (t.detach().to(DEVICE).requires_grad_(True) for t in (q, k, v))
    out, lse = T.block_sparse_attention(q2, k2, v2, index.to(DEVICE), count.to(DEVICE), block_size=bs, **moved)
    leaves2 = [q2, k2, v2, *[moved[n] for n in ("pooled_k", "pooled_v")]] if pooled else [q2, k2, v2]
    grads = torch.autograd.grad((out ** 2).sum(), leaves2)
    tol = 1e-5 if DEVICE == "cpu" else 2e-2  # TF32 matmuls on a GPU
    assert rel(out.cpu(), ref_out) < tol and rel(lse.cpu(), ref_lse) < tol
    for got, want in zip(grads, ref_grads):
        assert rel(got.cpu(), want) < tol * 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D,with_dlse", [(64, False), (64, True), (48, True)])  # 48: head dim padded to 64
def test_triton_delta_matches_the_reference(dtype, D, with_dlse):
    from attention.kernels import triton_delta as TD

    g = torch.Generator().manual_seed(D + with_dlse)
    N = 1000  # ragged: not a multiple of any row tile
    out = torch.randn(2, 3, N, D, generator=g).to(dtype)
    # dO as a transposed view (B, N, H, D) -> (B, H, N, D), like SDPA's; the dlse broadcast over heads (stride 0).
    dout = torch.randn(2, N, 3, D, generator=g).to(dtype).transpose(1, 2)
    dlse = torch.randn(2, 1, N, generator=g).expand(2, 3, N) if with_dlse else None
    out, dout = out.to(DEVICE), dout.to(DEVICE)
    dlse = None if dlse is None else dlse.to(DEVICE)
    assert TD.delta_usable(dout, out, dlse)
    got = torch.ops.t2v.attention_delta(dout, out, dlse)
    want = TD.attention_delta_reference(dout, out, dlse)
    assert got.dtype == torch.float32 and got.shape == (2, 3, N) and got.is_contiguous()
    assert rel(got.cpu(), want.cpu()) < 1e-5
