import pytest
import torch

from attention.layout import VideoLayout
from attention.methods.block_sparse import (
    BlockSparseMethod, Selection, group_block_mass, keep_cumulative, keep_top_fraction, mean_pool_blocks,
)


class KeepAll(BlockSparseMethod):
    def select(self, q, k, v, layout):
        nq, nk = -(-q.shape[2] // self.block_size), -(-k.shape[2] // self.block_size)
        return Selection(torch.ones(q.shape[0], q.shape[1], nq, nk, dtype=torch.bool))


def test_keeping_every_block_equals_dense_attention_on_an_uneven_grid():
    torch.manual_seed(0)
    layout = VideoLayout(grid=(3, 5, 7), block_size=16)
    q, k, v = (torch.randn(2, 3, 105, 8) for _ in range(3))
    out = KeepAll(block_size=16)(q, k, v, layout)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_mean_pool_handles_a_partial_last_block():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    pooled = mean_pool_blocks(x, 4)
    assert pooled.flatten().tolist() == [1.5, 5.5, 8.5]


@pytest.mark.parametrize("group", [1, 4, 16])
def test_group_block_mass_matches_a_direct_sum_over_token_groups(group, monkeypatch):
    n, bs = 45, 16  # 3 blocks, the last of 13 tokens: groups of 4 end with one of a single token
    q, k = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    groups = [list(range(s, min(s + group, n))) for s in range(0, n, group)]
    q_groups = torch.stack([q[:, :, g].mean(2) for g in groups], 2)
    k_groups = torch.stack([k[:, :, g].mean(2) for g in groups], 2)
    sizes = torch.tensor([float(len(g)) for g in groups])
    p = (q_groups @ k_groups.transpose(-1, -2) * 8 ** -0.5 + sizes.log()).softmax(-1)  # a group weighs its tokens
    expected = torch.zeros(1, 2, 3, 3)
    for a, ga in enumerate(groups):
        for b, gb in enumerate(groups):
            expected[..., ga[0] // bs, gb[0] // bs] += p[..., a, b] * len(ga)
    expected /= torch.tensor([16.0, 16.0, 13.0]).view(1, 1, 3, 1)
    torch.testing.assert_close(group_block_mass(q, k, bs, group), expected)
    torch.testing.assert_close(expected.sum(-1), torch.ones(1, 2, 3))
    groups_per_block = bs // group
    # Chunked over queries, one block at a time, then (for whole-block groups) two: chunks start on block boundaries.
    for elems in (1, len(groups) * (groups_per_block + 1)):
        monkeypatch.setattr("attention.kernels.group_mass._QUERY_CHUNK_ELEMS", elems)
        torch.testing.assert_close(group_block_mass(q, k, bs, group), expected)
    for bad in (6, 0, 2.5, True):
        with pytest.raises(ValueError, match="divisor"):
            group_block_mass(q, k, bs, bad)


def test_selection_rules():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    assert keep_top_fraction(scores, 0.5).tolist() == [[False, True, True, False]] or \
        keep_top_fraction(scores, 0.5).tolist() == [[False, True, False, True]]
    assert keep_cumulative(scores, 0.5).tolist() == [[False, True, False, False]]
    assert keep_cumulative(scores, 0.55).sum().item() == 2
    assert keep_cumulative(scores, 1.0).all()


class RandomBlocks(BlockSparseMethod):
    """Keeps a fresh random half of the blocks at every selection (the diagonal always), and counts selections."""

    selections = 0

    def select(self, q, k, v, layout):
        type(self).selections += 1
        nq, nk = -(-q.shape[2] // self.block_size), -(-k.shape[2] // self.block_size)
        mask = torch.rand(q.shape[0], q.shape[1], nq, nk) < 0.5
        return Selection(mask | torch.eye(nq, nk, dtype=torch.bool))


def test_select_every_reuses_each_calls_selection_within_the_interval():
    layout = VideoLayout(grid=(3, 5, 7), block_size=16)
    q, k, v = (torch.randn(2, 3, 105, 8) for _ in range(3))
    method = RandomBlocks(block_size=16, select_every=3)
    assert method.uses_step and not RandomBlocks(block_size=16).uses_step
    masks = {}
    for step in range(7):
        for call in range(2):  # two model calls a step, as with classifier-free guidance
            method._selection(q, k, v, layout, step)
            masks[step, call] = method._reused[call][1].block_mask
    assert RandomBlocks.selections == 2 * 3  # steps 0, 3 and 6, each call its own
    for step in range(7):
        for call in range(2):
            assert torch.equal(masks[step, call], masks[step - step % 3, call])
    assert not torch.equal(masks[0, 0], masks[0, 1]) and not torch.equal(masks[0, 0], masks[3, 0])
    # A different token count is a different layout: selected afresh at once.
    method._selection(q[:, :, :90], k[:, :, :90], v[:, :, :90], VideoLayout(grid=(3, 5, 6), block_size=16), 7)
    assert RandomBlocks.selections == 7
    method.reset()
    method._selection(q, k, v, layout, 8)
    assert RandomBlocks.selections == 8


def test_a_reset_keeps_the_tallies_on_the_device_they_were_used_on():
    # Compiled code guards on the tallies' device: a reset that moved them back to the CPU would recompile.
    method = KeepAll(block_size=16)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    method(q, k, v, VideoLayout(grid=(2, 4, 5), block_size=16))
    assert method.density() == 1.0
    method.kept_blocks, method.total_blocks = (torch.zeros((), device="meta") for _ in range(2))  # used elsewhere
    method.reset()
    assert method.kept_blocks.device.type == method.total_blocks.device.type == "meta"


def test_prepare_moves_the_tallies_of_every_layer_to_the_model_device(monkeypatch):
    # Layers not yet called (training's probe calls only the first) must not meet compiled code on the CPU.
    from attention.methods.vmoba import VMoBAMethod

    layout = VideoLayout(grid=(2, 4, 5), block_size=16)
    method = KeepAll(block_size=16)
    method.prepare(layout, torch.device("meta"))
    assert method.kept_blocks.device.type == method.total_blocks.device.type == "meta"
    prepared = []
    monkeypatch.setattr(BlockSparseMethod, "prepare", lambda self, layout, device: prepared.append(device))
    VMoBAMethod(layer_index=1, block_size=16, sparsity=0.5).prepare(layout, torch.device("cpu"))
    assert prepared == [torch.device("cpu")]  # VMoBA's own preparation keeps the shared one
