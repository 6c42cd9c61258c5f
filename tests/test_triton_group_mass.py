"""The Triton block-mass kernel against its PyTorch reference (float64), on a GPU or under Triton's interpreter
(tests/conftest.py), with token counts that are not multiples of the group, the block or the kernel's tile."""

import pytest
import torch

from attention.kernels import group_mass


@pytest.mark.parametrize("n,m,d,bs,group", [
    (45, 45, 16, 16, 4),     # partial last block and a one-token last group; 4 groups a block
    (300, 333, 32, 32, 2),   # cross lengths; 16 groups a block, several key tiles
    (200, 130, 24, 8, 1),    # exact mass, a head size that is not a power of two
    (150, 97, 16, 128, 1),   # 128 groups a block: one block per tile
    (520, 520, 64, 64, 64),  # one group per block: block-pooled attention
])
def test_triton_group_mass_matches_the_reference(n, m, d, bs, group):
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels import triton_group_mass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n + m + bs + group)
    q, k = torch.randn(2, 3, n, d, generator=g) * 2, torch.randn(2, 3, m, d, generator=g) * 2
    expected = group_mass.group_block_mass(q.double(), k.double(), bs, group)
    assert triton_group_mass.group_mass_usable(q.to(device), bs, group) == (device == "cuda")
    got = triton_group_mass.group_block_mass(q.to(device), k.to(device), bs, group).cpu().double()
    assert got.shape == expected.shape == (2, 3, -(-n // bs), -(-m // bs))
    assert ((got - expected).norm() / expected.norm()).item() < (1e-5 if device == "cpu" else 5e-3)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-4, rtol=0)
    # A custom scale reaches both versions the same way.
    scaled = triton_group_mass.group_block_mass(q.to(device), k.to(device), bs, group, scale=0.05).cpu().double()
    expected_scaled = group_mass.group_block_mass(q.double(), k.double(), bs, group, scale=0.05)
    assert ((scaled - expected_scaled).norm() / expected_scaled.norm()).item() < (1e-5 if device == "cpu" else 5e-3)



def test_triton_group_mass_takes_strided_inputs_and_sequences_shorter_than_a_group():
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels import triton_group_mass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    # Adapters hand over (B, N, H, D) tensors transposed to (B, H, N, D): not contiguous.
    q = torch.randn(2, 70, 3, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 3, 3, 16, generator=g).transpose(1, 2)  # 3 keys: less than one group of 4
    expected = group_mass.group_block_mass(q.double(), k.double(), 16, 4)
    got = triton_group_mass.group_block_mass(q.to(device), k.to(device), 16, 4).cpu().double()
    assert got.shape == (2, 3, 5, 1)
    assert ((got - expected).norm() / expected.norm()).item() < (1e-5 if device == "cpu" else 5e-3)


def test_triton_group_mass_shape_rules():
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels.triton_group_mass import group_block_mass, shape_supported

    assert shape_supported(128, 64, 8, 12)          # the Wan2.1-1.3B shape, groups of 8
    assert shape_supported(64, 128, 1, 12)          # 128 groups a block with heads of 64
    assert not shape_supported(128, 128, 1, 12)     # 128 groups a block with heads of 128: tiles too large
    assert not shape_supported(128, 48, 16, 12)     # 3 groups a block: not a power of two
    assert not shape_supported(128, 256, 1, 12)     # 256 groups a block
    assert not shape_supported(160, 64, 8, 12)      # heads over 128
    assert not shape_supported(128, 64, 3, 12)      # a group that does not divide the block
    assert not shape_supported(64, 64, 8, 70000)    # more batch x heads than the launch grid takes
    with pytest.raises(ValueError, match="no Triton group scoring"):
        group_block_mass(torch.zeros(1, 1, 48, 16), torch.zeros(1, 1, 48, 16), 48, 16)


class _StubKernels:
    """Stands in for a Triton kernel module in the dispatch: records calls, can fail like a launch that does not fit."""

    class LaunchError(Exception):
        pass

    LAUNCH_ERRORS = (LaunchError,)

    def __init__(self, fail=False):
        self.fail, self.calls = fail, 0

    def run(self):
        self.calls += 1
        if self.fail:
            raise self.LaunchError("out of shared memory")
        return "fused"


@pytest.mark.parametrize("fail", [False, True])
def test_dispatch_uses_the_triton_kernel_only_when_allowed_usable_and_launchable(fail, monkeypatch):
    from attention.kernels import dispatch

    stub = _StubKernels(fail)
    monkeypatch.setitem(dispatch._TRITON_MODULES, "stub", stub)
    call = lambda usable: dispatch._scores_in_triton("stub", "T2V_STUB_TRITON", "stub scoring",  # noqa: E731
                                                     lambda t: usable, lambda t: t.run())
    if fail:
        with pytest.warns(RuntimeWarning, match="stub scoring: the Triton kernel cannot run here"):
            assert call(True) is None  # the caller then uses the PyTorch reference
    else:
        assert call(True) == "fused"
    assert stub.calls == 1
    assert call(False) is None and stub.calls == 1  # inputs the kernel does not take: never launched
    monkeypatch.setenv("T2V_STUB_TRITON", "0")
    assert call(True) is None and stub.calls == 1  # turned off by its variable
    monkeypatch.setitem(dispatch._TRITON_MODULES, "stub", None)  # no CUDA or no Triton
    monkeypatch.delenv("T2V_STUB_TRITON")
    assert call(True) is None
