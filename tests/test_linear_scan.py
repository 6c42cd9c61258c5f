"""The gated linear scan: the chunked PyTorch form (forward and gradients) and the Triton forward against the
token-by-token recurrence in float64; lengths that are not whole chunks, an initial state, more chunks than one group
of the inter-chunk matrix form, heads that do not decay or decay hard, a long sequence; and the CPU dispatch."""

import warnings

import pytest
import torch

from attention.kernels import scan_dispatch
from attention.kernels.linear_scan import chunked_linear_scan, naive_linear_scan


def _rel(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _inputs(L, B=2, H=3, N=8, P=5, decay_scales=(0.0, 0.05, 3.0), seed=0):
    """float64 q, k, v, log decay (one head per scale: g uniform in [-scale, 0]) and an initial state."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, N, generator=gen, dtype=torch.float64), torch.randn(B, H, L, N, generator=gen,
                                                                                        dtype=torch.float64)
    v = torch.randn(B, H, L, P, generator=gen, dtype=torch.float64)
    scales = torch.tensor(decay_scales, dtype=torch.float64)[:, None]
    g = -torch.rand(B, H, L, generator=gen, dtype=torch.float64) * scales
    return q, k, v, g, torch.randn(B, H, N, P, generator=gen, dtype=torch.float64)


def _check_against_naive(L, chunk, tol=1e-5, **shape):
    """Chunked (float32) against naive (float64): outputs, final state and all gradients, via one random upstream
    gradient on both outputs."""
    inputs = _inputs(L, **shape)
    expected = [t.clone().requires_grad_() for t in inputs]
    got = [t.float().requires_grad_() for t in inputs]
    out_e, state_e = naive_linear_scan(*expected[:4], initial_state=expected[4])
    out_g, state_g = chunked_linear_scan(*got[:4], chunk_size=chunk, initial_state=got[4])
    assert out_g.dtype == torch.float32 and out_g.shape == out_e.shape and state_g.shape == state_e.shape
    assert _rel(out_g, out_e) < tol and _rel(state_g, state_e) < tol
    gen = torch.Generator().manual_seed(1)
    d_out, d_state = torch.randn(out_e.shape, generator=gen), torch.randn(state_e.shape, generator=gen)
    ((out_e * d_out).sum() + (state_e * d_state).sum()).backward()
    ((out_g * d_out).sum() + (state_g * d_state).sum()).backward()
    for name, e, g in zip(("q", "k", "v", "log_decay", "initial_state"), expected, got):
        assert torch.isfinite(g.grad).all(), name
        assert _rel(g.grad, e.grad) < tol, name


@pytest.mark.parametrize("L,chunk", [(1, 16), (37, 16), (130, 16), (37, 64), (130, 64)])
def test_chunked_matches_naive(L, chunk):
    _check_against_naive(L, chunk)


def test_chunked_matches_naive_across_chunk_groups():
    # 69 chunks: two groups of the inter-chunk matrix form, the second mostly padding.
    _check_against_naive(1100, 16, B=1, H=3, N=4, P=3)


def test_chunked_float64_is_exact():
    q, k, v, g, s0 = _inputs(100)
    out_e, state_e = naive_linear_scan(q, k, v, g, s0)
    out_g, state_g = chunked_linear_scan(q, k, v, g, chunk_size=16, initial_state=s0)
    assert out_g.dtype == state_g.dtype == torch.float64
    assert _rel(out_g, out_e) < 1e-12 and _rel(state_g, state_e) < 1e-12


def test_extreme_decays_match_naive():
    # Per-token decays from 0 (a head that never forgets) to -60 (exp underflows to 0 in float32), mixed.
    q, k, v, _, s0 = _inputs(300, B=1, H=3)
    gen = torch.Generator().manual_seed(3)
    g = torch.stack([torch.zeros(300, dtype=torch.float64), -60 * torch.rand(300, generator=gen, dtype=torch.float64),
                     torch.where(torch.rand(300, generator=gen) < 0.5, -40.0, -0.001).double()])[None]
    g = g.requires_grad_()
    out_e, state_e = naive_linear_scan(q, k, v, g, s0)
    g32 = g.detach().float().requires_grad_()
    out_g, state_g = chunked_linear_scan(q.float(), k.float(), v.float(), g32, chunk_size=64, initial_state=s0.float())
    assert _rel(out_g, out_e) < 1e-5 and _rel(state_g, state_e) < 1e-5
    (out_e.sum() + state_e.sum()).backward()
    (out_g.sum() + state_g.sum()).backward()
    assert torch.isfinite(g32.grad).all() and _rel(g32.grad, g.grad) < 1e-5


def test_long_sequence_stays_finite_and_exact():
    # 20,000 tokens: summed over the whole sequence, the log decays reach -30,000; nothing may overflow.
    L = 20000
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, L, 16, generator=gen), torch.randn(1, 2, L, 16, generator=gen)
    v = torch.randn(1, 2, L, 16, generator=gen)
    g = (-3 * torch.rand(1, 2, L, generator=gen)).requires_grad_()
    out, state = chunked_linear_scan(q, k, v, g, chunk_size=64)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(state).all() and torch.isfinite(g.grad).all()
    out_e, state_e = naive_linear_scan(q.double(), k.double(), v.double(), g.detach().double())
    assert _rel(out, out_e) < 1e-5 and _rel(state, state_e) < 1e-5


def test_low_precision_inputs_keep_their_dtype():
    q, k, v, g, _ = _inputs(40)
    out, state = chunked_linear_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), chunk_size=16)
    out_e, _ = naive_linear_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16())
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert _rel(out, out_e) < 1e-2


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_triton_forward_matches_naive(with_initial_state):
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels import triton_linear_scan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, g, s0 = (t.float() for t in _inputs(70, B=1, H=2, N=16, P=16, decay_scales=(0.05, 3.0)))
    s0 = s0 if with_initial_state else None
    out_e, state_e = naive_linear_scan(q.double(), k.double(), v.double(), g.double(),
                                       None if s0 is None else s0.double())
    # q as a transposed view of (B, L, H, N), as adapters pass it: the kernels read strides.
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    to = (lambda t: None if t is None else t.to(device))
    out, state = triton_linear_scan.linear_scan(to(q_view), to(k), to(v), to(g), chunk_size=16, initial_state=to(s0))
    assert out.dtype == torch.float32 and state.dtype == torch.float32 and out.shape == out_e.shape
    assert _rel(out.cpu(), out_e) < 1e-4 and _rel(state.cpu(), state_e) < 1e-4


@pytest.mark.parametrize("L,N,P,chunk,with_initial_state,final_used", [
    (70, 16, 16, 16, True, True), (37, 16, 32, 16, False, False), (50, 32, 128, 16, True, False)])
def test_triton_backward_matches_naive(L, N, P, chunk, with_initial_state, final_used):
    """Gradients of every input (the initial state's too) through the Triton forward and backward against the float64
    recurrence; ragged chunks, values wider than one value tile (P 128), with and without a final-state gradient."""
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels.triton_linear_scan_bwd import TritonLinearScan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = list(_inputs(L, B=2, H=3, N=N, P=P, seed=L))
    if not with_initial_state:
        inputs[4] = None
    expected = [None if t is None else t.clone().requires_grad_() for t in inputs]
    got = [None if t is None else t.float().to(device).requires_grad_() for t in inputs]
    out_e, state_e = naive_linear_scan(*expected[:4], initial_state=expected[4])
    out_g, state_g = TritonLinearScan.apply(*got[:4], chunk, got[4])
    gen = torch.Generator().manual_seed(2)
    d_out, d_state = torch.randn(out_e.shape, generator=gen), torch.randn(state_e.shape, generator=gen)
    loss_e, loss_g = (out_e * d_out).sum(), (out_g.cpu() * d_out).sum()
    if final_used:
        loss_e, loss_g = loss_e + (state_e * d_state).sum(), loss_g + (state_g.cpu() * d_state).sum()
    loss_e.backward()
    loss_g.backward()
    assert _rel(out_g.cpu(), out_e) < 1e-5 and _rel(state_g.cpu(), state_e) < 1e-5
    for name, e, g in zip(("q", "k", "v", "log_decay", "initial_state"), expected, got):
        if e is not None:
            assert g.grad.dtype == torch.float32 and _rel(g.grad.cpu(), e.grad) < 1e-5, name


def test_triton_backward_half_precision():
    """fp16 inputs (the interpreter's bf16 is not faithful; fp16 takes the same 16-bit path): gradients keep each
    input's dtype and stay within 16-bit rounding of the float64 recurrence's."""
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels.triton_linear_scan_bwd import TritonLinearScan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, g, _ = _inputs(150, B=1, H=3, N=32, P=64, decay_scales=(0.0, 0.05, 0.5))
    q, k = 0.5 * q, 0.5 * k
    expected = [t.clone().requires_grad_() for t in (q, k, v, g)]
    got = [t.half().to(device).requires_grad_() for t in (q, k, v)] + [g.float().to(device).requires_grad_()]
    out_e, _ = naive_linear_scan(*expected)
    out_g, _ = TritonLinearScan.apply(*got, 64, None)
    d_out = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out_e * d_out).sum().backward()
    (out_g.cpu().double() * d_out).sum().backward()
    assert out_g.dtype == torch.float16 and _rel(out_g.cpu(), out_e) < 3e-3
    for name, e, g, dtype in zip("qkvg", expected, got, [torch.float16] * 3 + [torch.float32]):
        assert g.grad.dtype == dtype and _rel(g.grad.cpu(), e.grad) < 3e-3, name
    # Values in float32 beside 16-bit q and k: the output and dv keep v's dtype, as the scan's other backends do.
    v32 = v.float().to(device).requires_grad_()
    out_mixed, _ = TritonLinearScan.apply(got[0], got[1], v32, got[3], 64, None)
    (out_mixed.double().cpu() * d_out).sum().backward()
    assert out_mixed.dtype == torch.float32 and v32.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch takes the Triton backward on CUDA only")
def test_dispatch_takes_triton_backward_when_asked(monkeypatch):
    q, k, v, g, _ = (t.float().cuda() for t in _inputs(100, B=1, H=3, N=16, P=32))
    tensors = [t.requires_grad_() for t in (q, k, v, g)]
    monkeypatch.setenv("T2V_SCAN_GRAD", "triton")
    out, _ = scan_dispatch.linear_scan(*tensors, chunk_size=32)
    assert out.grad_fn is not None and "TritonLinearScan" in type(out.grad_fn).__name__
    monkeypatch.delenv("T2V_SCAN_GRAD")
    out, _ = scan_dispatch.linear_scan(*tensors, chunk_size=32)
    assert "TritonLinearScan" not in type(out.grad_fn).__name__


def test_triton_usable_rules():
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels import triton_linear_scan

    q, v = torch.empty(1, 1, 4, 16), torch.empty(1, 1, 4, 64)
    assert not triton_linear_scan.linear_scan_usable(q, v)  # on the CPU
    if torch.cuda.is_available():
        assert triton_linear_scan.linear_scan_usable(q.cuda(), v.cuda())
        assert not triton_linear_scan.linear_scan_usable(q.cuda(), torch.empty(1, 1, 4, 48, device="cuda"))


def test_dispatch_on_cpu_is_the_chunked_scan():
    q, k, v, g, s0 = (t.float() for t in _inputs(50))
    expected = chunked_linear_scan(q, k, v, g, chunk_size=16, initial_state=s0)
    got = scan_dispatch.linear_scan(q, k, v, g, chunk_size=16, initial_state=s0)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    q.requires_grad_()
    scan_dispatch.linear_scan(q, k, v, g, chunk_size=16)[0].sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_dispatch_failure_warns_once_and_is_not_retried():
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("no kernel image")

    key = ("test", torch.float16, 16, 16, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert scan_dispatch.attempt("test backend", key, broken) is None
        assert scan_dispatch.attempt("test backend", key, broken) is None
    assert len(calls) == 1 and len(caught) == 1 and "test backend" in str(caught[0].message)
    assert scan_dispatch.attempt("test backend", ("other",), lambda: 7) == 7


def test_chunked_ignores_autocast():
    # Autocast would run the matmuls in bfloat16, rounding decay weights and states; the scan keeps float32.
    q, k, v, g, s0 = (t.float() for t in _inputs(100))
    expected = chunked_linear_scan(q, k, v, g, chunk_size=16, initial_state=s0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_linear_scan(q, k, v, g, chunk_size=16, initial_state=s0)
    assert got[0].dtype == torch.float32
    assert _rel(got[0], expected[0]) < 1e-6 and _rel(got[1], expected[1]) < 1e-6
