import math

import pytest
import torch
import torch.nn.functional as F

import attention
from attention.kernels import block_index_from_mask, block_sparse_attention
from attention.layout import VideoLayout
from attention.methods.block_sparse import (
    block_token_counts, diagonal_blocks, keep_top_fraction, mean_pool_blocks, method_density,
)
from attention.methods.rectified import (
    RectifiedSparseAttention, pooled_attention, pooling_gain_mask, rectify,
)
from tiny_models import tiny_models


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _block_constant(num_tokens, block_size, heads, dim, generator):
    """(1, H, N, D) whose tokens equal their block's mean: pooled statistics are then exact."""
    per_block = torch.randn(1, heads, -(-num_tokens // block_size), dim, generator=generator)
    return per_block.repeat_interleave(block_size, 2)[:, :, :num_tokens]


def _pieces(q, k, v, block_size, sparsity):
    """What `select` computes, on tile-ordered tensors: pooled attention, selection, gain mask, rectification."""
    q_pool, k_pool = mean_pool_blocks(q, block_size), mean_pool_blocks(k, block_size)
    counts = block_token_counts(k.shape[2], block_size)
    probabilities, dots = pooled_attention(q_pool, k_pool, counts, q.shape[-1] ** -0.5)
    own = diagonal_blocks(q_pool.shape[2], k_pool.shape[2])
    mask = keep_top_fraction(probabilities, 1.0 - sparsity, always=own)
    gain_ok = pooling_gain_mask(q, k, q_pool, k_pool, dots, block_size)
    return probabilities, mask, gain_ok, rectify(probabilities, mask, gain_ok, counts)


def test_factors_match_full_attention_and_output_is_dense_when_pooling_is_exact():
    # Every query and key equals its block mean: each pooled weight is exactly the block's full-attention mass,
    # GAPR restores every skipped block (no pooling error), and the rectified output must be dense attention.
    g = torch.Generator().manual_seed(0)
    layout = VideoLayout(grid=(2, 3, 3), block_size=4)  # 18 tokens: 4 full blocks and one of 2
    n, bs = layout.num_video_tokens, 4
    qt, kt = (_block_constant(n, bs, 2, 8, g) * 1.5 for _ in range(2))
    vt = torch.randn(1, 2, n, 8, generator=g)
    probabilities, mask, gain_ok, rect = _pieces(qt, kt, vt, bs, sparsity=0.6)

    full = torch.softmax(qt @ kt.transpose(-1, -2) / math.sqrt(8), -1)  # (1, H, N, N)
    key_block = torch.arange(n) // bs
    for b in range(mask.shape[2]):
        kept_keys = mask[0, :, b][:, key_block]  # (H, N)
        for i in range(b * bs, min(n, (b + 1) * bs)):
            direct = (full[0, :, i] * kept_keys).sum(-1)
            torch.testing.assert_close(rect.factor[0, :, b], direct, rtol=1e-5, atol=1e-6)
    assert bool(gain_ok.all())
    torch.testing.assert_close(rect.kept_scale, torch.ones_like(rect.kept_scale), rtol=1e-5, atol=1e-6)
    assert float(rect.factor.min()) < 0.8  # the kept blocks lose a real share

    # With some skipped blocks left unrestored, the kernel gives the official R_b * O_sparse + Σ_G P̄ v̄_j, every
    # term read off the full attention: R_b = 1 - (full mass of the restored blocks), O_sparse = renormalised.
    gain_ok = torch.rand(gain_ok.shape, generator=g) < 0.5
    rect = rectify(probabilities, mask, gain_ok, block_token_counts(n, bs))
    assert bool(rect.restored.any()) and bool((~gain_ok & ~mask).any())
    index, count = block_index_from_mask(mask)
    out, _ = block_sparse_attention(qt, kt, vt, index, count, block_size=bs, pooled_k=mean_pool_blocks(kt, bs),
                                    pooled_v=mean_pool_blocks(vt, bs), pooled_log_weight=rect.log_weight)
    query_block = torch.arange(n) // bs
    kept = mask[:, :, query_block][..., query_block]
    restored = rect.restored[:, :, query_block][..., query_block]
    factor = 1.0 - (full * restored).sum(-1, keepdim=True)
    sparse = (full * kept) @ vt / (full * kept).sum(-1, keepdim=True)
    official = factor * sparse + (full * restored) @ vt  # keys equal in a block: its attention is uniform there
    assert _rel(out, official) < 1e-5

    q, k, v = (layout.from_tiles(x) for x in (qt, kt, vt))
    dense = F.scaled_dot_product_attention(q, k, v)
    assert _rel(RectifiedSparseAttention(block_size=bs, sparsity=0.6)(q, k, v, layout), dense) < 1e-5
    assert _rel(RectifiedSparseAttention(block_size=bs, sparsity=0.6, rectify=False)(q, k, v, layout), dense) > 0.05


def test_gain_mask_matches_a_direct_computation():
    # Tokens near a shared direction c, except key block 1: a small mean with a wide symmetric spread around it,
    # so its pooling error beats its gain for every query block, while the other blocks are restored.
    g = torch.Generator().manual_seed(1)
    bs, d = 4, 6
    c = torch.ones(d)
    q = c + 0.1 * torch.randn(1, 1, 12, d, generator=g)
    k = c + 0.1 * torch.randn(1, 1, 12, d, generator=g)
    u, w = 3.0 * torch.randn(2, d, generator=g)
    k[0, 0, 4:8] = 0.2 * c + torch.stack([u, -u, w, -w])
    gain_ok = _gain_mask_both_ways(q, k, bs)
    assert not bool(gain_ok[:, 1].any()) and bool(gain_ok[:, [0, 2]].all())

    # Random blocks with random spreads (and a partial last block): the two computations agree everywhere.
    spread = torch.rand(1, 1, 8, 1, generator=g).repeat_interleave(4, 2)[:, :, :30] * 2
    q = torch.randn(1, 1, 30, d, generator=g) * spread + 1.0
    k = torch.randn(1, 1, 30, d, generator=g) * spread.flip(2) + 1.0
    gain_ok = _gain_mask_both_ways(q, k, bs)
    assert 0 < int(gain_ok.sum()) < gain_ok.numel()


def _gain_mask_both_ways(q, k, bs):
    """pooling_gain_mask, checked against the criterion computed block pair by block pair."""
    q_pool, k_pool = mean_pool_blocks(q, bs), mean_pool_blocks(k, bs)
    gain_ok = pooling_gain_mask(q, k, q_pool, k_pool, q_pool @ k_pool.transpose(-1, -2), bs)[0, 0]
    n = q.shape[2]
    for b in range(gain_ok.shape[0]):
        qb = q[0, 0, b * bs:min(n, (b + 1) * bs)]
        for j in range(gain_ok.shape[1]):
            kb = k[0, 0, j * bs:min(n, (j + 1) * bs)]
            qm, km = qb.mean(0), kb.mean(0)
            error = abs(float((qb - qm).abs().mean(0) @ km)) + abs(float(qm @ (kb - km).abs().mean(0)))
            assert bool(gain_ok[b, j]) == (abs(float(qm @ km)) > error), (b, j)
    return gain_ok


def test_kernel_output_is_the_rectified_formula_computed_directly():
    # Random inputs, a partial block, some blocks not restored: the fused kernel must equal
    # [r_b Σ_kept e^{s q·k} v + Σ_{restored} n_j e^{s q·k̄_j} v̄_j] / [the same weights summed].
    g = torch.Generator().manual_seed(2)
    layout = VideoLayout(grid=(3, 5, 7), block_size=16)
    n, bs, d = layout.num_video_tokens, 16, 8
    qt, kt, vt = (torch.randn(2, 2, n, d, generator=g) for _ in range(3))
    kt[:, :, 32:48] *= 6.0  # a block with a large pooling error
    probabilities, mask, gain_ok, rect = _pieces(qt, kt, vt, bs, sparsity=0.5)
    restored = rect.restored
    assert bool(restored.any()) and bool((~gain_ok & ~mask).any())

    method = RectifiedSparseAttention(block_size=bs, sparsity=0.5)
    selection = method.select(qt, kt, vt, layout)
    assert torch.equal(selection.block_mask, mask)
    torch.testing.assert_close(selection.pooled_log_weight, rect.log_weight)

    s = d ** -0.5
    counts = block_token_counts(n, bs)
    k_pool, v_pool = mean_pool_blocks(kt, bs), mean_pool_blocks(vt, bs)
    query_block = torch.arange(n) // bs
    kept_tokens = mask[:, :, query_block][..., query_block]  # (B, H, N, N)
    w_kept = torch.exp(qt @ kt.transpose(-1, -2) * s) * kept_tokens * rect.kept_scale[:, :, query_block, None]
    w_pool = torch.exp(qt @ k_pool.transpose(-1, -2) * s) * counts * restored[:, :, query_block]
    direct = (w_kept @ vt + w_pool @ v_pool) / (w_kept.sum(-1) + w_pool.sum(-1))[..., None]
    out = method(*(layout.from_tiles(x) for x in (qt, kt, vt)), layout)
    assert _rel(out, layout.from_tiles(direct)) < 1e-5


@pytest.mark.parametrize("options", [dict(sparsity=0.0), dict(threshold=1.0)])
def test_every_block_kept_equals_dense(options):
    torch.manual_seed(3)
    layout = VideoLayout(grid=(3, 5, 7), block_size=16)
    q, k, v = (torch.randn(2, 3, 105, 16) for _ in range(3))
    out = RectifiedSparseAttention(block_size=16, **options)(q, k, v, layout)
    assert _rel(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


def _local_inputs(grid, seed, heads=2, dim=16):
    """q, k, v as smooth functions of the token position plus noise: attention is local, as in video."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*(torch.arange(size).float() for size in grid), indexing="ij")
    position = torch.stack(axes, -1).view(-1, 3)
    out = []
    for _ in range(3):
        angles = position @ (torch.randn(heads, 3, dim // 2, generator=g) / 3.0)
        features = torch.cat([angles.sin(), angles.cos()], -1) * 2.0
        out.append((features + 0.3 * torch.randn(heads, position.shape[0], dim, generator=g)).unsqueeze(0))
    return out


def test_rectified_is_closer_to_dense_than_the_same_selection_unrectified():
    layout = VideoLayout(grid=(4, 8, 8), block_size=16)
    ratios = []
    for seed in range(4):
        q, k, v = _local_inputs(layout.grid, seed)
        dense = F.scaled_dot_product_attention(q, k, v)
        rectified = _rel(RectifiedSparseAttention(block_size=16, sparsity=0.875)(q, k, v, layout), dense)
        plain = _rel(RectifiedSparseAttention(block_size=16, sparsity=0.875, rectify=False)(q, k, v, layout), dense)
        assert rectified < plain
        ratios.append(rectified / plain)
    assert sum(ratios) / len(ratios) < 0.9


def test_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        RectifiedSparseAttention(sparsity=0.5, threshold=0.9)
    with pytest.raises(ValueError, match="sparsity"):
        RectifiedSparseAttention(sparsity=1.0)
    assert RectifiedSparseAttention().sparsity == 0.75
    for bad in (3, 0, 2.5, True):
        with pytest.raises(ValueError, match="score_group"):
            RectifiedSparseAttention(block_size=8, score_group=bad)


def test_finer_scoring_groups_find_a_block_whose_mean_hides_its_keys():
    e0 = torch.eye(8)[0]
    q = (3 * e0).expand(32, 8)  # every query looks along e0
    k = torch.cat([-2 * e0.expand(8, 8), 4 * e0.expand(4, 8), -4 * e0.expand(4, 8),  # block 1 averages to zero
                   1 * e0.expand(8, 8), -2 * e0.expand(8, 8)]).contiguous()  # block 2 leans mildly along e0
    q, k = q.reshape(1, 1, 32, 8).contiguous(), k.view(1, 1, 32, 8)
    kept = {}
    for group in (8, 4, 1):
        method = RectifiedSparseAttention(block_size=8, sparsity=0.75, score_group=group)
        kept[group] = method.select(q, k, k, None).block_mask[0, 0, 0].nonzero().flatten().tolist()
    assert kept[8] == [0, 2]  # its own block and the best block mean
    assert kept[4] == kept[1] == [0, 1]  # groups of 4 see block 1's aligned half, as the exact mass does


@pytest.mark.parametrize("family", ["video-dit", "wan"])
@pytest.mark.parametrize("rectify_", [True, False])
def test_apply_runs_on_the_adapters(family, rectify_):
    model = tiny_models()[family]
    torch.manual_seed(1)
    latents, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)  # grid (3, 4, 4): 48 tokens

    def run():
        with torch.no_grad():
            return model(latents, torch.tensor([700.0]), text).sample

    dense = run()
    attention.apply(model, "rectified", sparsity=0.6, block_size=16, rectify=rectify_)
    out = run()
    assert out.shape == dense.shape and bool(torch.isfinite(out).all())
    assert 0.0 < method_density(model) < 1.0
    assert (out - dense).abs().max() > 1e-6
    attention.remove(model)


def test_cli_generates_with_rectified_attention(tmp_path):
    from t2v.cli import main

    out = tmp_path / "x.mp4"
    code = main(["generate", "a red circle moves to the right", "-o", str(out), "--steps", "2", "--frames", "4",
                 "--attention", "rectified", "--attention-option", "sparsity=0.75"])
    assert code == 0 and out.stat().st_size > 0
