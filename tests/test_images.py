"""s2g/images.py: the grids every script writes tile exactly as torchvision's make_grid did (they no longer import
torchvision, whose import cost about 2 s at every entry point)."""
import pytest
import torch

from s2g.images import image_grid, tiles


@pytest.mark.parametrize("n, c, cols, pad, pad_value", [(4, 3, 2, 2, 0.5), (5, 3, 3, 2, 0.5), (7, 1, 8, 1, 0.0),
                                                          (1, 3, 8, 2, 0.5), (12, 3, 8, 2, 0.5), (3, 3, 1, 0, 1.0)])
def test_tiles_are_make_grids_pixels(n, c, cols, pad, pad_value):
    make_grid = pytest.importorskip("torchvision.utils").make_grid
    x = torch.rand(n, c, 6, 9, generator=torch.Generator().manual_seed(n))
    assert torch.equal(tiles(x, cols, pad, pad_value), make_grid(x, nrow=cols, padding=pad, pad_value=pad_value))


def test_image_grid_places_each_tile_row_major():
    x = torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 3, 2, 2)
    grid = image_grid(x, rows=2, cols=3, pad=1, pad_value=-1.0)
    assert grid.shape == (3, 2 * 3 + 1, 3 * 3 + 1)
    assert [grid[0, 1 + 3 * (i // 3), 1 + 3 * (i % 3)].item() for i in range(6)] == [0, 1, 2, 3, 4, 5]
    assert grid[0, 0].eq(-1).all() and grid[0, :, 0].eq(-1).all()  # the padding
