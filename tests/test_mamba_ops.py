"""The Mamba branch's fused steps: the PyTorch references against their definitions (float64), and the Triton
versions against the references, on a GPU or under Triton's interpreter (tests/conftest.py), with strided inputs
(slices of the input projection), lengths and widths that are not multiples of the tiles, and both directions."""

import pytest
import torch
import torch.nn.functional as F

from attention.kernels import mamba_ops, scan_dispatch


def _conv_by_definition(x, weight, bias, reverse):
    x = x.flip(1) if reverse else x
    size, length = weight.shape[1], x.shape[1]
    out = torch.zeros_like(x) + bias
    for t in range(length):
        for j in range(size):
            source = t - size + 1 + j
            if source >= 0:
                out[:, t] += weight[:, j] * x[:, source]
    return F.silu(out)


@pytest.mark.parametrize("reverse", [False, True])
def test_causal_conv_reference_is_the_definition(reverse):
    g = torch.Generator().manual_seed(int(reverse))
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mamba_ops.causal_conv_silu_reference(x, weight, bias, reverse),
                               _conv_by_definition(x, weight, bias, reverse))


def test_gated_norm_reference_is_the_definition():
    g = torch.Generator().manual_seed(3)
    f, b, z = (torch.randn(2, 7, 6, generator=g, dtype=torch.float64) for _ in range(3))
    weight = torch.randn(6, generator=g, dtype=torch.float64)
    gated = (f + b.flip(1)) * z * torch.sigmoid(z)
    expected = gated / gated.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * weight
    torch.testing.assert_close(mamba_ops.gated_rms_norm_reference(f, b, z, weight, 1e-6), expected)


def _device():
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("length,channels,reverse", [(45, 40, False), (45, 40, True), (3, 130, True), (70, 7, False)])
def test_triton_causal_conv_matches_the_reference(length, channels, reverse, dtype):
    device = _device()
    from attention.kernels import triton_mamba_ops

    g = torch.Generator().manual_seed(length * channels)
    # A slice of a wider projection, as the branch passes it: rows strided, last dimension contiguous.
    wide = torch.randn(2, length, channels + 11, generator=g)
    weight, bias = torch.randn(channels, 4, generator=g) * 0.5, torch.randn(channels, generator=g)
    x = wide[..., 3:3 + channels]
    expected = mamba_ops.causal_conv_silu_reference(x.double(), weight.double(), bias.double(), reverse)
    got = triton_mamba_ops.causal_conv_silu(x.to(device, dtype), weight.to(device), bias.to(device), reverse)
    assert got.dtype == dtype and got.shape == x.shape
    assert ((got.cpu().double() - expected).norm() / expected.norm()).item() < (1e-6 if dtype == torch.float32 else 2e-3)
    no_bias = triton_mamba_ops.causal_conv_silu(x.to(device, dtype), weight.to(device), None, reverse)
    expected = mamba_ops.causal_conv_silu_reference(x.double(), weight.double(), None, reverse)
    assert ((no_bias.cpu().double() - expected).norm() / expected.norm()).item() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("length,channels", [(13, 24), (5, 130)])
def test_triton_gated_rms_norm_matches_the_reference(length, channels, dtype):
    device = _device()
    from attention.kernels import triton_mamba_ops

    g = torch.Generator().manual_seed(length + channels)
    f = torch.randn(2, length, channels, generator=g)
    b = torch.randn(2, length, channels, generator=g)
    z = torch.randn(2, length, 2 * channels, generator=g)[..., channels:]  # a slice, as z is of the projection
    weight = torch.randn(channels, generator=g)
    expected = mamba_ops.gated_rms_norm_reference(f.double(), b.double(), z.double(), weight.double(), 1e-6)
    got = triton_mamba_ops.gated_rms_norm(*(t.to(device, dtype) for t in (f, b, z)), weight.to(device), 1e-6)
    assert got.dtype == dtype and got.is_contiguous()
    assert ((got.cpu().double() - expected).norm() / expected.norm()).item() < (1e-6 if dtype == torch.float32 else 2e-3)


def test_the_triton_versions_run_only_without_gradients(monkeypatch):
    class CudaInput:  # what the dispatch reads of a tensor on a GPU
        is_cuda, requires_grad = True, True

        def stride(self, dim):
            return 1

    monkeypatch.setattr(mamba_ops, "_TRITON", object())
    monkeypatch.delenv("T2V_MAMBA_OPS", raising=False)
    assert not mamba_ops._use_triton(CudaInput())  # training: the differentiable reference
    with torch.no_grad():
        assert mamba_ops._use_triton(CudaInput())
        monkeypatch.setenv("T2V_MAMBA_OPS", "torch")
        assert not mamba_ops._use_triton(CudaInput())


def test_a_failing_triton_version_falls_back_to_the_reference_once(monkeypatch):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no kernel")

    monkeypatch.setattr(mamba_ops, "_TRITON", type("Broken", (), {"causal_conv_silu": staticmethod(broken)}))
    monkeypatch.setattr(mamba_ops, "_use_triton", lambda *tensors: True)
    monkeypatch.setattr(scan_dispatch, "_failed", set())
    x, weight = torch.randn(1, 6, 4), torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="causal_conv_silu"):
        out = mamba_ops.causal_conv_silu(x, weight)
    torch.testing.assert_close(out, mamba_ops.causal_conv_silu_reference(x, weight, None))
    mamba_ops.causal_conv_silu(x, weight)  # ruled out: not tried again
    assert len(calls) == 1
