"""The fused Triton merge against the PyTorch reference (float64), on a GPU or under Triton's interpreter
(tests/conftest.py): strided outputs as SDPA returns them, row counts that are not multiples of the tile, a head
size that is not a power of two, and rows empty on one side or both."""

import pytest
import torch

from attention.kernels import reference


@pytest.mark.parametrize("n,d", [(45, 16), (70, 24), (1, 64)])
def test_triton_merge_matches_the_reference(n, d):
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels import triton_merge

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n * d)
    # (B, N, H, D) transposed to (B, H, N, D), as attention outputs come: not contiguous.
    out_a = torch.randn(2, n, 3, d, generator=g).transpose(1, 2)
    out_b = torch.randn(2, 3, n, d, generator=g)
    lse_a, lse_b = torch.randn(2, 3, n, generator=g) * 3, torch.randn(2, 3, n, generator=g) * 3
    lse_a[0, 0, 0] = float("-inf")                      # one side empty: the other side's row
    lse_a[1, 2, -1] = lse_b[1, 2, -1] = float("-inf")   # both empty: zeros and -inf
    expected, expected_lse = reference.merge_attention(out_a.double(), lse_a.double(), out_b.double(),
                                                       lse_b.double())
    assert triton_merge.merge_usable(out_a, out_b)
    got, got_lse = triton_merge.merge_attention(out_a.to(device), lse_a.to(device), out_b.to(device),
                                                lse_b.to(device))
    got, got_lse = got.cpu().double(), got_lse.cpu().double()
    assert got.shape == expected.shape and got.is_contiguous()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    torch.testing.assert_close(got[0, 0, 0], out_b[0, 0, 0].double(), rtol=1e-5, atol=1e-6)
    assert got[1, 2, -1].abs().max() == 0 and got_lse[1, 2, -1] == float("-inf")
    finite = torch.isfinite(expected_lse)
    torch.testing.assert_close(got_lse[finite], expected_lse[finite].float().double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isfinite(got_lse), finite)
