import pytest
import torch
import torch.nn.functional as F

import attention
from attention.layout import VideoLayout
from attention.methods.block_sparse import method_density
from attention.kernels import antidiagonal
from attention.kernels.antidiagonal import antidiagonal_block_scores, antidiagonal_logits
from attention.methods.xattention import XAttention
from tiny_models import tiny_models


def _strided_antidiagonal(logits, stride):
    """Direct sums over each stride x stride tile's antidiagonal (lower left to upper right), by loops."""
    rows, cols = logits.shape[-2] // stride, logits.shape[-1] // stride
    out = torch.zeros(*logits.shape[:-2], rows, cols, dtype=logits.dtype)
    for r in range(rows):
        for c in range(cols):
            for j in range(stride):
                out[..., r, c] += logits[..., r * stride + stride - 1 - j, c * stride + j]
    return out


def test_antidiagonal_logits_match_a_direct_strided_sum():
    # A hand-made logit matrix: one-hot queries and keys make q·k^T the integer matrix A[i, t] = i * 12 + t.
    n, stride = 12, 3
    q = torch.zeros(1, 1, n, n * n, dtype=torch.float64)
    k = torch.zeros(1, 1, n, n * n, dtype=torch.float64)
    for i in range(n):
        for t in range(n):
            q[0, 0, i, i * n + t] = i * n + t
            k[0, 0, t, i * n + t] = 1.0
    logits = q @ k.transpose(-1, -2)
    assert logits[0, 0, 2, 5] == 29
    expected = _strided_antidiagonal(logits, stride)
    assert expected[0, 0, 0, 0] == 2 * 12 + 0 + 1 * 12 + 1 + 0 * 12 + 2
    torch.testing.assert_close(antidiagonal_logits(q, k, stride), expected)

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 24, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    torch.testing.assert_close(antidiagonal_logits(q, k, 4), _strided_antidiagonal(q @ k.transpose(-1, -2), 4))


def test_block_scores_match_a_direct_computation_with_padding(monkeypatch):
    g = torch.Generator().manual_seed(1)
    n, d, bs, stride = 45, 8, 16, 4  # 3 blocks, the last of 13 tokens; the last stride group cut short
    q, k = torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, n, d, generator=g)
    padded = 48
    qp, kp = (F.pad(x, (0, 0, 0, padded - n)) for x in (q, k))
    strided = _strided_antidiagonal(qp @ kp.transpose(-1, -2), stride) * d ** -0.5 / stride
    strided[..., 12:] = float("-inf")  # key groups that hold padding only: cS >= n
    p = strided.softmax(-1)
    expected = torch.zeros(1, 2, 3, 3)
    for r in range(12):
        for c in range(12):
            expected[..., r // 4, c // 4] += p[..., r, c]
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(antidiagonal_block_scores(q, k, bs, stride), expected)
    monkeypatch.setattr(antidiagonal, "_CHUNK_ELEMS", 1)  # one query block per chunk: same scores
    torch.testing.assert_close(antidiagonal_block_scores(q, k, bs, stride), expected)


@pytest.mark.parametrize("n,m,d,bs,stride", [(45, 45, 16, 16, 4), (300, 333, 32, 32, 8), (200, 130, 16, 128, 1),
                                             (1000, 1000, 64, 64, 8)])
def test_triton_block_scores_match_the_reference(n, m, d, bs, stride, monkeypatch):
    # On a machine without a GPU this runs under Triton's interpreter (tests/conftest.py).
    pytest.importorskip("triton", reason="needs Triton (CI installs it with the test extra)")
    from attention.kernels import triton_antidiagonal

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n + m + bs)
    q, k = torch.randn(2, 3, n, d, generator=g), torch.randn(2, 3, m, d, generator=g)
    expected = antidiagonal_block_scores(q.double(), k.double(), bs, stride)
    got = triton_antidiagonal.antidiagonal_block_scores(q.to(device), k.to(device), bs, stride).cpu().double()
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < (1e-5 if device == "cpu" else 2e-3)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))
    monkeypatch.setattr(antidiagonal, "_CHUNK_ELEMS", 1)  # one query block per chunk: same scores
    chunked = triton_antidiagonal.antidiagonal_block_scores(q.to(device), k.to(device), bs, stride).cpu().double()
    torch.testing.assert_close(chunked, got)


def test_threshold_one_keeps_every_block_and_equals_dense():
    torch.manual_seed(2)
    layout = VideoLayout(grid=(3, 5, 7), block_size=16)
    q, k, v = (torch.randn(2, 3, 105, 16) for _ in range(3))
    method = XAttention(block_size=16, threshold=1.0, stride=4)
    assert bool(method.select(layout.to_tiles(q), layout.to_tiles(k), layout.to_tiles(v), layout).block_mask.all())
    out = method(q, k, v, layout)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def _targeted(targets, bs=8, d=8, strength=40.0):
    """q, k where every query of block b looks at the key blocks in targets[b] (equally), and nowhere else."""
    nb = len(targets)
    k = torch.eye(d)[:nb].repeat_interleave(bs, 0)  # key block j: e_j
    q = torch.zeros(nb * bs, d)
    for b, blocks in enumerate(targets):
        q[b * bs:(b + 1) * bs, list(blocks)] = strength
    return q.view(1, 1, -1, d), k.view(1, 1, -1, d)


def test_cumulative_threshold_picks_the_expected_blocks_per_query_block():
    layout = VideoLayout(grid=(1, 1, 32), block_size=8)  # 4 blocks in order: tile order is token order
    # Every query block also keeps its own key block, whatever its score (none of `one`'s targets is its own).
    one = [{2}, {0}, {3}, {1}]
    q, k = _targeted(one)
    mask = XAttention(block_size=8, threshold=0.5, stride=4).select(q, k, k, layout).block_mask[0, 0]
    assert mask.tolist() == [[j in t or j == i for j in range(4)] for i, t in enumerate(one)]

    two = [{1, 2}, {0, 3}, {0, 1}, {2, 3}]
    q, k = _targeted(two)
    mask = XAttention(block_size=8, threshold=0.6, stride=4).select(q, k, k, layout).block_mask[0, 0]
    assert mask.tolist() == [[j in t or j == i for j in range(4)] for i, t in enumerate(two)]
    # Half of the score sits in each target: 0.4 is reached by one of them (plus the own block).
    # So does the top quarter that sparsity 0.75 keeps.
    for method in (XAttention(block_size=8, threshold=0.4, stride=4),
                   XAttention(block_size=8, sparsity=0.75, stride=4)):
        mask = method.select(q, k, k, layout).block_mask[0, 0]
        for i, (row, t) in enumerate(zip(mask, two)):
            kept = set(row.nonzero().flatten().tolist())
            assert i in kept and len(kept & t) >= 1 and kept <= t | {i} and len(kept) <= 2


def test_options_are_checked():
    with pytest.raises(ValueError, match="multiple of the stride"):
        XAttention(block_size=64, stride=6)
    with pytest.raises(ValueError, match="not both"):
        XAttention(sparsity=0.5, threshold=0.9)
    with pytest.raises(ValueError, match="stride"):
        XAttention(stride=0)
    method = XAttention()
    assert (method.threshold, method.stride) == (0.9, 8)


@pytest.mark.parametrize("family", ["video-dit", "wan"])
def test_apply_runs_on_the_adapters(family):
    model = tiny_models()[family]
    torch.manual_seed(1)
    latents, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)  # grid (3, 4, 4): 48 tokens, 3 blocks

    def run():
        with torch.no_grad():
            return model(latents, torch.tensor([700.0]), text).sample

    dense = run()
    attention.apply(model, "xattention", threshold=0.5, stride=4, block_size=16)
    out = run()
    assert out.shape == dense.shape and bool(torch.isfinite(out).all())
    assert 0.0 < method_density(model) < 1.0
    attention.apply(model, "xattention", threshold=1.0, block_size=16)
    torch.testing.assert_close(run(), dense, atol=1e-5, rtol=1e-5)
    attention.remove(model)


def test_select_every_gets_the_denoising_step_through_the_adapter(monkeypatch):
    model = tiny_models()["video-dit"]
    latents, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    selections = []
    original = XAttention.select
    monkeypatch.setattr(XAttention, "select", lambda self, *a: selections.append(1) or original(self, *a))
    attention.apply(model, "xattention", sparsity=0.5, stride=4, block_size=16, select_every=2)
    with torch.no_grad():
        for t in (900.0, 700.0, 500.0):  # three denoising steps, two calls each (with and without text)
            for context in (text, torch.zeros_like(text)):
                model(latents, torch.tensor([t]), context)
    assert len(selections) == 2 * 2 * 2  # 2 layers x 2 calls x steps 0 and 2
    attention.remove(model)
