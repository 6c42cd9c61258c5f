import torch

from attention.layout import VideoLayout
from attention.methods.block_sparse import (
    BlockSparseMethod, Selection, keep_cumulative, keep_top_fraction, mean_pool_blocks,
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


def test_selection_rules():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    assert keep_top_fraction(scores, 0.5).tolist() == [[False, True, True, False]] or \
        keep_top_fraction(scores, 0.5).tolist() == [[False, True, False, True]]
    assert keep_cumulative(scores, 0.5).tolist() == [[False, True, False, False]]
    assert keep_cumulative(scores, 0.55).sum().item() == 2
    assert keep_cumulative(scores, 1.0).all()
