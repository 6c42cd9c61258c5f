import pytest
import torch

from attention.layout import VideoLayout, choose_tile


def _coords(layout):
    f, h, w = layout.grid
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    return grid.reshape(-1, 3)


@pytest.mark.parametrize(
    "grid, tile", [((8, 8, 8), (4, 4, 4)), ((5, 7, 9), (2, 3, 4)), ((21, 30, 52), (4, 4, 4)), ((1, 3, 5), (4, 4, 4))]
)
def test_permutation_is_a_permutation_and_inverse_inverts(grid, tile):
    layout = VideoLayout(grid, tile=tile)
    perm, inverse = layout.tile_permutation(), layout.inverse_permutation()
    n = layout.num_video_tokens
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(perm[inverse], torch.arange(n))
    assert torch.equal(inverse[perm], torch.arange(n))

    x = torch.randn(2, 3, n, 5)
    tiled = layout.to_tiles(x)
    assert torch.equal(tiled, x[:, :, perm])
    assert torch.equal(layout.from_tiles(tiled), x)
    y = torch.randn(n, 4, 2)
    assert torch.equal(layout.from_tiles(layout.to_tiles(y, dim=0), dim=0), y)


def test_blocks_of_divisible_grid_are_compact_tiles():
    layout = VideoLayout((8, 12, 16), tile=(4, 4, 4))
    coords = layout.token_coordinates().reshape(-1, 64, 3)
    assert torch.equal(layout.token_coordinates(), _coords(layout)[layout.tile_permutation()])
    for block in coords:
        span = block.max(0).values - block.min(0).values + 1
        assert span.tolist() == [4, 4, 4]
        assert torch.all(block.min(0).values % 4 == 0)
    # Blocks follow row-major tile order, and block_coordinates names each block's tile.
    expected = _coords(VideoLayout((2, 3, 4)))
    assert torch.equal(layout.block_coordinates(64), expected)


def test_edge_tiles_come_last_and_full_tiles_stay_whole():
    layout = VideoLayout((6, 10, 9), tile=(4, 4, 4))
    coords = layout.token_coordinates()
    full_tiles = (6 // 4) * (10 // 4) * (9 // 4)
    for block in coords[: full_tiles * 64].reshape(full_tiles, 64, 3):
        assert (block.max(0).values - block.min(0).values + 1).tolist() == [4, 4, 4]
    tail = coords[full_tiles * 64 :]
    # Every tail token lies in an edge tile.
    assert torch.all((tail[:, 0] >= 4) | (tail[:, 1] >= 8) | (tail[:, 2] >= 8))
    assert layout.block_coordinates(64).shape == (layout.num_blocks(64), 3)
    assert layout.num_blocks(64) == -(-540 // 64)


def test_default_tile_has_block_size_tokens_where_the_grid_allows():
    assert VideoLayout((21, 30, 52)).tile == (4, 4, 4)
    assert VideoLayout((1, 30, 52)).tile == (1, 8, 8)
    assert VideoLayout((2, 16, 16), block_size=128).tile == (2, 8, 8)
    # Too small for a full block: the largest tile that fits.
    assert choose_tile((1, 3, 5), 64) == (1, 3, 5)
    # An explicit tile longer than an axis is that axis.
    assert VideoLayout((2, 8, 8), tile=(4, 4, 4)).tile == (2, 4, 4)


def test_check_reports_expected_and_actual_length():
    layout = VideoLayout((2, 3, 4))
    layout.check(24)
    with pytest.raises(ValueError, match=r"layout expects 2\*3\*4 = 24 tokens, got 25"):
        layout.check(25)
    joint = VideoLayout((2, 3, 4), text_tokens=5, text_position="prefix")
    joint.check(29)
    assert not joint.is_video_only
    with pytest.raises(ValueError, match=r"2\*3\*4 \+ 5 text = 29 tokens, got 24"):
        joint.check(24)
    with pytest.raises(ValueError, match="text_position"):
        VideoLayout((2, 3, 4), text_position="middle")
    with pytest.raises(ValueError, match="video tokens"):
        layout.to_tiles(torch.randn(1, 23, 2))


def test_permutations_are_cached_per_grid_and_tile():
    a, b = VideoLayout((3, 5, 7), tile=(2, 2, 2)), VideoLayout((3, 5, 7), tile=(2, 2, 2))
    assert a.tile_permutation() is b.tile_permutation()
    assert a.tile_permutation() is not VideoLayout((3, 5, 7), tile=(1, 2, 4)).tile_permutation()
