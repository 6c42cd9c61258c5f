"""CPU tests of the block-sparse attention reference and the dispatch fallback."""

import math
import warnings

import pytest
import torch

from attention.kernels import dispatch, reference as R


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rand_qkv(B, H, N, M, D, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, M, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, M, D, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.fixture(params=["gather", "mask"])
def reference_strategy(request, monkeypatch):
    """Runs a test through each of the reference's two ways: gathering listed blocks (its CPU way) and masking
    all-keys logits (its GPU way)."""
    monkeypatch.setattr(R, "_mask_instead_of_gather", lambda *args: request.param == "mask")
    return request.param


def test_masking_and_gathering_are_the_same_attention(monkeypatch):
    # Padded queries and keys, pooled entries (one of them off), junk past the count, an empty row, and chunks of one
    # query block: both ways must give the same outputs, lse and gradients.
    B, H, N, M, D, bs, P = 2, 2, 45, 61, 8, 8, 3
    g = torch.Generator().manual_seed(3)
    nqb, nkb = math.ceil(N / bs), math.ceil(M / bs)
    mask = torch.rand(B, H, nqb, nkb, generator=g) < 0.4
    index, count = R.block_index_from_mask(mask | (torch.arange(nkb) == 0))
    count[0, 1, 2] = 0
    index = torch.where(torch.arange(index.shape[-1]) >= count[..., None], torch.randint_like(index, nkb), index)
    pooled = [torch.randn(B, H, P, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    log_weight = torch.randn(B, H, nqb, P, generator=g, dtype=torch.float64)
    log_weight[..., 1] = float("-inf")
    log_weight[0, 1, 2] = float("-inf")  # with count 0 there, a row that attends to nothing
    results = {}
    monkeypatch.setattr(R, "_CHUNK_ELEMS", 1)
    for way in ("gather", "mask"):
        monkeypatch.setattr(R, "_mask_instead_of_gather", lambda *args, way=way: way == "mask")
        q, k, v = rand_qkv(B, H, N, M, D, dtype=torch.float64, grad=True, seed=4)
        out, lse = R.block_sparse_attention(q, k, v, index, count, block_size=bs, pooled_k=pooled[0],
                                            pooled_v=pooled[1], pooled_log_weight=log_weight)
        grads = torch.autograd.grad(out.square().sum() + lse[torch.isfinite(lse)].sum(), (q, k, v, *pooled))
        results[way] = (out, lse, *grads)
    assert torch.isinf(results["mask"][1][0, 1, 2 * bs:3 * bs]).all()  # the empty row
    for gathered, masked in zip(results["gather"], results["mask"]):
        torch.testing.assert_close(masked, gathered, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("N,M,bs", [(256, 256, 64), (1000, 1000, 64), (200, 333, 32)])
def test_full_density_equals_dense(N, M, bs, reference_strategy):
    q, k, v = rand_qkv(1, 2, N, M, 32)
    index, count = R.full_block_index(math.ceil(N / bs), math.ceil(M / bs), 1, 2)
    out, lse = R.block_sparse_attention(q, k, v, index, count, block_size=bs)
    ref_out, ref_lse = R.dense_attention(q, k, v)
    assert rel(out, ref_out) < 1e-5
    assert rel(lse, ref_lse) < 1e-5
    # And dense itself against a float64 textbook formula.
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)
    assert rel(ref_out, torch.softmax(s, -1) @ v.double()) < 1e-5
    assert rel(ref_lse, torch.logsumexp(s, -1)) < 1e-5


def test_sparse_selection_matches_masked_dense(reference_strategy):
    B, H, N, M, D, bs = 2, 2, 150, 170, 16, 32
    q, k, v = rand_qkv(B, H, N, M, D, dtype=torch.float64)
    nqb, nkb = math.ceil(N / bs), math.ceil(M / bs)
    mask = torch.rand(B, H, nqb, nkb, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[..., 0] = True  # no empty rows in this test
    index, count = R.block_index_from_mask(mask)
    # Entries past the count must be ignored, whatever they hold.
    junk = torch.arange(index.shape[-1]) >= count[..., None]
    index = torch.where(junk, torch.full_like(index, nkb - 1), index)
    out, lse = R.block_sparse_attention(q, k, v, index, count, block_size=bs)
    key_mask = mask.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :N, :M]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~key_mask, float("-inf"))
    assert rel(out, torch.softmax(s, -1) @ v) < 1e-10
    assert rel(lse, torch.logsumexp(s, -1)) < 1e-6  # lse is returned in float32


def test_pooled_entry_equals_repeated_keys(reference_strategy):
    B, H, N, M, D, bs, P = 1, 2, 96, 100, 16, 32, 3
    q, k, v = rand_qkv(B, H, N, M, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    pk = torch.randn(B, H, P, D, generator=g, dtype=torch.float64)
    pv = torch.randn(B, H, P, D, generator=g, dtype=torch.float64)
    nqb, nkb = math.ceil(N / bs), math.ceil(M / bs)
    mask = torch.rand(B, H, nqb, nkb, generator=g) < 0.5
    reps = torch.randint(0, 4, (B, H, nqb, P), generator=g)  # 0 = entry not used by the block
    log_w = torch.where(reps > 0, reps.double().log(), float("-inf"))
    index, count = R.block_index_from_mask(mask)
    out, lse = R.block_sparse_attention(q, k, v, index, count, block_size=bs,
                                        pooled_k=pk, pooled_v=pv, pooled_log_weight=log_w)
    for b in range(B):
        for h in range(H):
            for qb in range(nqb):
                rows = slice(qb * bs, min(N, (qb + 1) * bs))
                keys = [k[b, h, j * bs:(j + 1) * bs] for j in range(nkb) if mask[b, h, qb, j]]
                vals = [v[b, h, j * bs:(j + 1) * bs] for j in range(nkb) if mask[b, h, qb, j]]
                for p in range(P):
                    keys += [pk[b, h, p:p + 1]] * int(reps[b, h, qb, p])
                    vals += [pv[b, h, p:p + 1]] * int(reps[b, h, qb, p])
                if not keys:
                    assert torch.all(out[b, h, rows] == 0) and torch.all(lse[b, h, rows] == float("-inf"))
                    continue
                kk, vv = torch.cat(keys), torch.cat(vals)
                s = q[b, h, rows] @ kk.T / math.sqrt(D)
                assert rel(out[b, h, rows], torch.softmax(s, -1) @ vv) < 1e-10
                assert rel(lse[b, h, rows], torch.logsumexp(s, -1)) < 1e-6


def test_empty_lists_give_zero_and_neg_inf(reference_strategy):
    B, H, N, M, D, bs = 1, 2, 100, 100, 16, 32
    q, k, v = rand_qkv(B, H, N, M, D, grad=True)
    nqb = math.ceil(N / bs)
    index = torch.zeros(B, H, nqb, 2, dtype=torch.int32)
    count = torch.zeros(B, H, nqb, dtype=torch.int32)
    count[:, 1, 1] = 2  # one query block of one head attends to blocks 0 (twice listed would be wrong) and 1
    index[:, 1, 1] = torch.tensor([0, 1], dtype=torch.int32)
    out, lse = R.block_sparse_attention(q, k, v, index, count, block_size=bs)
    empty = torch.ones(B, H, N, dtype=torch.bool)
    empty[:, 1, bs:2 * bs] = False
    assert torch.all(out[empty] == 0)
    assert torch.all(lse[empty] == float("-inf"))
    assert torch.isfinite(lse[~empty]).all() and torch.isfinite(out).all()
    (out.sum() + lse[~empty].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[empty] == 0)


def test_merge_of_disjoint_halves_equals_dense():
    B, H, N, M, D = 1, 3, 64, 130, 16
    q, k, v = rand_qkv(B, H, N, M, D)
    oa, la = R.dense_attention(q, k[:, :, :50], v[:, :, :50])
    ob, lb = R.dense_attention(q, k[:, :, 50:], v[:, :, 50:])
    out, lse = R.merge_attention(oa, la, ob, lb)
    ref_out, ref_lse = R.dense_attention(q, k, v)
    assert rel(out, ref_out) < 1e-5 and rel(lse, ref_lse) < 1e-5
    # An empty side leaves the other unchanged; two empty sides give 0 and -inf.
    ninf = torch.full_like(la, float("-inf"))
    out2, lse2 = R.merge_attention(oa, la, torch.zeros_like(oa), ninf)
    assert torch.allclose(out2, oa) and torch.allclose(lse2, la)
    out3, lse3 = R.merge_attention(torch.zeros_like(oa), ninf, torch.zeros_like(oa), ninf)
    assert torch.all(out3 == 0) and torch.all(lse3 == float("-inf"))


def test_gradients_match_dense_autograd(reference_strategy):
    B, H, N, M, D, bs = 1, 2, 90, 110, 16, 32
    q, k, v = rand_qkv(B, H, N, M, D, dtype=torch.float64, grad=True)
    index, count = R.full_block_index(math.ceil(N / bs), math.ceil(M / bs), B, H)
    g = torch.Generator().manual_seed(3)
    w_out, w_lse = torch.randn(B, H, N, D, generator=g, dtype=torch.float64), torch.randn(B, H, N, generator=g)
    out, lse = R.block_sparse_attention(q, k, v, index, count, block_size=bs)
    grads = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    ref = torch.softmax(s, -1) @ v
    ref_grads = torch.autograd.grad((ref * w_out).sum() + (torch.logsumexp(s, -1) * w_lse).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < 1e-6


def test_pooled_gradients_finite_and_match_expanded(reference_strategy):
    # d/d pooled_k of an entry with weight n equals the summed grads of its n copies.
    B, H, N, M, D, bs = 1, 1, 64, 64, 8, 32
    q, k, v = rand_qkv(B, H, N, M, D, dtype=torch.float64)
    pk = torch.randn(B, H, 1, D, dtype=torch.float64, requires_grad=True)
    pv = torch.randn(B, H, 1, D, dtype=torch.float64, requires_grad=True)
    index, count = R.full_block_index(2, 2, B, H)
    log_w = torch.full((B, H, 2, 1), math.log(3.0))
    out, _ = R.block_sparse_attention(q, k, v, index, count, block_size=bs, pooled_k=pk,
                                      pooled_v=pv, pooled_log_weight=log_w)
    gk, gv = torch.autograd.grad(out.sum(), (pk, pv))
    kk = torch.cat([k, pk.expand(B, H, 3, D)], 2)
    vv = torch.cat([v, pv.expand(B, H, 3, D)], 2)
    ref, _ = R.dense_attention(q, kk, vv)
    rk, rv = torch.autograd.grad(ref.sum(), (pk, pv))
    assert rel(gk, rk) < 1e-6 and rel(gv, rv) < 1e-6  # log(3) is stored in float32


def test_block_index_from_mask_roundtrip():
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(4)) < 0.4
    index, count = R.block_index_from_mask(mask)
    assert index.dtype == torch.int32 and count.dtype == torch.int32
    rebuilt = torch.zeros_like(mask)
    for b, h, qb in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(5)).tolist():
        sel = index[b, h, qb, :count[b, h, qb]].long()
        assert torch.all(sel[1:] > sel[:-1])  # ascending, distinct
        rebuilt[b, h, qb, sel] = True
    assert torch.equal(rebuilt, mask)


def test_dispatch_falls_back_on_cpu_with_one_warning_per_dtype(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = rand_qkv(1, 1, 64, 64, 16)
    index, count = R.full_block_index(1, 1, 1, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = dispatch.block_sparse_attention(q, k, v, index, count)
        dispatch.block_sparse_attention(q, k, v, index, count)
        dispatch.block_sparse_attention(q.double(), k.double(), v.double(), index, count)
    messages = [str(w.message) for w in caught if "reference" in str(w.message)]
    assert len(messages) == 2 and "float32" in messages[0] and "float64" in messages[1]
    ref_out, ref_lse = R.dense_attention(q, k, v)
    assert rel(out, ref_out) < 1e-5 and rel(lse, ref_lse) < 1e-5
    out2, lse2 = dispatch.dense_attention(q, k, v)
    assert rel(out2, ref_out) < 1e-6
    out3, none = dispatch.dense_attention(q, k, v, return_lse=False)
    assert none is None and rel(out3, ref_out) < 1e-5


def test_reference_keeps_input_dtype(reference_strategy):
    q, k, v = rand_qkv(1, 1, 70, 70, 16, dtype=torch.bfloat16)
    index, count = R.full_block_index(2, 2, 1, 1)
    out, lse = R.block_sparse_attention(q, k, v, index, count, block_size=64)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref, _ = R.dense_attention(q.float(), k.float(), v.float())
    assert rel(out, ref) < 1e-2
