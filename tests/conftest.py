import pytest
import torch
from torch import nn


class TinyBlockNet(nn.Module):
    """A small residual network obeying the Denoiser seam, for testing guiders and the sampler: blocks that can
    be skipped, a label condition with a null label, and a σ input."""

    def __init__(self, dim=3, width=32, blocks=8, classes=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(dim + 1, width)
        self.label = nn.Embedding(classes + 1, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Linear(width, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    @property
    def num_blocks(self):
        return len(self.blocks)

    def forward(self, x, sigma, *, label, skip=frozenset()):
        h = self.inp(torch.cat([x, sigma[:, None]], 1)) + self.label(label)
        for i, block in enumerate(self.blocks):
            if i not in skip:
                h = h + block(h)
        return self.out(h)


@pytest.fixture
def net():
    return TinyBlockNet().eval()


@pytest.fixture
def labels():
    cond = {"label": torch.tensor([0, 1, 0, 1, 1])}
    uncond = {"label": torch.full((5,), 2)}
    return cond, uncond


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: thread start-up dominates, and on a shared 2-core CPU two threads run ~10x slower than one.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
