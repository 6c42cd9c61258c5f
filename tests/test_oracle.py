import pytest
import torch
import torch.nn.functional as F

import attention
from attention.kernels import antidiagonal_block_scores
from attention.layout import VideoLayout
from attention.methods.block_sparse import keep_top_fraction, method_density
from attention.methods.oracle import OracleBlocks, exact_block_mass
from tiny_models import tiny_models


def test_block_mass_matches_a_direct_sum_with_a_partial_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, bs = 45, 16  # 3 blocks, the last of 13 tokens
    q, k = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    p = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)
    expected = torch.zeros(1, 2, 3, 3)
    for i in range(n):
        for j in range(n):
            expected[..., i // bs, j // bs] += p[..., i, j]
    expected /= torch.tensor([16.0, 16.0, 13.0]).view(1, 1, 3, 1)
    torch.testing.assert_close(exact_block_mass(q, k, bs), expected)
    monkeypatch.setattr("attention.kernels.group_mass._QUERY_CHUNK_ELEMS", 20)  # one block of queries at a time
    torch.testing.assert_close(exact_block_mass(q, k, bs), expected)


def test_keeps_the_blocks_a_query_block_looks_at():
    bs, d = 8, 8
    k = torch.eye(d)[:4].repeat_interleave(bs, 0).view(1, 1, -1, d)  # key block j points along e_j
    q = torch.zeros(4 * bs, d)
    for block, looks_at in enumerate([2, 0, 3, 1]):
        q[block * bs:(block + 1) * bs, looks_at] = 30.0
    q = q.view(1, 1, -1, d)
    mask = OracleBlocks(block_size=bs, sparsity=0.75).select(q, k, k, VideoLayout((1, 4, bs), block_size=bs)).block_mask
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[[0, 1, 2, 3], [2, 0, 3, 1]] = True
    assert torch.equal(mask[0, 0], expected)


def test_keeps_at_least_the_mass_of_another_selector_keeping_as_many_blocks():
    torch.manual_seed(3)
    layout = VideoLayout(grid=(4, 6, 8), block_size=16)
    q, k, v = (layout.to_tiles(torch.randn(2, 3, 192, 16) * 2) for _ in range(3))
    mass = exact_block_mass(q, k, 16)
    oracle = OracleBlocks(block_size=16, sparsity=0.75).select(q, k, v, layout).block_mask
    antidiagonal = keep_top_fraction(antidiagonal_block_scores(q, k, 16, 4), 0.25)  # XAttention's guess, same count
    assert torch.equal(oracle.sum(-1), antidiagonal.sum(-1))
    gain = (mass * oracle).sum(-1) - (mass * antidiagonal).sum(-1)
    assert float(gain.min()) >= -1e-6 and float(gain.max()) > 0.01


def test_threshold_one_equals_dense_and_options_are_checked():
    torch.manual_seed(2)
    layout = VideoLayout(grid=(3, 5, 7), block_size=16)
    q, k, v = (torch.randn(2, 3, 105, 16) for _ in range(3))
    out = OracleBlocks(block_size=16, threshold=1.0)(q, k, v, layout)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    with pytest.raises(ValueError, match="not both"):
        OracleBlocks(sparsity=0.5, threshold=0.5)


@pytest.mark.parametrize("family", ["video-dit", "wan"])
def test_apply_runs_on_the_adapters(family):
    model = tiny_models()[family]
    torch.manual_seed(1)
    latents, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)

    def run():
        with torch.no_grad():
            return model(latents, torch.tensor([700.0]), text).sample

    dense = run()
    attention.apply(model, "oracle", sparsity=0.5, block_size=16)
    out = run()
    assert out.shape == dense.shape and bool(torch.isfinite(out).all()) and not torch.allclose(out, dense)
    assert 0.0 < method_density(model) < 1.0
    attention.remove(model)
