"""The learned denoiser: a small DiT-like residual MLP, trained with the rectified-flow loss.

It implements the project's Denoiser seam, `model(x, sigma, *, skip=frozenset(), label) -> velocity`, with
`num_blocks` pre-LN residual blocks in an nn.ModuleList; a skipped block is the identity, which is what S²'s
sub-networks and skip-layer guidance need. The conditioning e = embed(σ) + embed(label) enters every block (as
in a DiT), so dropping a block also drops some conditioning. The label table has one extra row, the null label,
trained by label dropout: the unconditional model CFG needs is the same network.

Training: exact mixture samples, σ ~ U(0, 1), target v = ε - x0, Adam with a linear
warm-up (100 iterations, at most 10% of the run) and cosine decay, and an EMA of the weights (the EMA is what
samples). `iterations` and `width` are the
model-quality knob; the Autoguidance weak model is the same recipe at half the width and 1/8 the iterations.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import trange

from s2g.models.sweep import check_plan, check_variants, sweep

from .mixture import GaussianMixture


class Block(nn.Module):
    """h ← h + W2·SiLU(W1·LN(h) + We·e); W2 starts at zero so each block starts as the identity."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.emb = nn.Linear(width, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + self.emb(e)))


class ToyMLP(nn.Module):
    def __init__(self, dim: int, num_classes: int, width: int = 64, num_blocks: int = 8, mlp_ratio: int = 1,
                 num_freqs: int = 16):
        super().__init__()
        if width < 1 or num_blocks < 1 or mlp_ratio < 1:
            raise ValueError(f"width, num_blocks and mlp_ratio must be >= 1, got {width}, {num_blocks}, {mlp_ratio}")
        self.config = dict(dim=dim, num_classes=num_classes, width=width, num_blocks=num_blocks, mlp_ratio=mlp_ratio,
                           num_freqs=num_freqs)  # saved with the weights
        self.dim, self.num_classes, self.width = dim, num_classes, width
        # σ features: sin/cos at log-spaced frequencies 1..200 (resolves σ down to ~0.005).
        self.register_buffer("freqs", torch.logspace(0, math.log10(200), num_freqs), persistent=False)
        self.sigma_embed = nn.Sequential(nn.Linear(2 * num_freqs, width), nn.SiLU(), nn.Linear(width, width))
        self.label_embed = nn.Embedding(num_classes + 1, width)  # last row: the null label
        self.stem = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(Block(width, mlp_ratio * width) for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def null_label(self) -> int:
        return self.num_classes

    perturbations = ("skip",)  # no attention: PAG's and SEG's perturbations do not exist here

    def _check_skip(self, skip) -> frozenset:
        return frozenset(check_plan(skip, self.num_blocks, self.perturbations, "the toy MLP"))

    def _embed(self, x: Tensor, sigma: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        angles = sigma[:, None].float() * self.freqs
        e = self.sigma_embed(torch.cat([angles.sin(), angles.cos()], 1)) + self.label_embed(label.long())
        return self.stem(x.float()) + e, e

    def forward(self, x: Tensor, sigma: Tensor, *, skip=frozenset(), label: Tensor) -> Tensor:
        skip = self._check_skip(skip)
        h, e = self._embed(x, sigma, label)
        for i, block in enumerate(self.blocks):
            if i not in skip:
                h = block(h, e)
        return self.out(self.out_norm(h)).to(x.dtype)

    def forward_shared(self, x: Tensor, sigma: Tensor, *, skips, inputs=None, label: Tensor) -> list[Tensor]:
        """Several variants (stacked input k = inputs[j], skip set skips[j]) in one batched sweep over the
        blocks; equal to separate `forward` calls up to float rounding (s2g/models/sweep.py)."""
        skips = [self._check_skip(s) for s in skips]
        inputs, K, B = check_variants(skips, inputs, x.shape[0])
        h, e = self._embed(x, sigma, label)
        (h, e), slab = sweep((h, e), skips, inputs, K, B, self.num_blocks,
                             lambda i, st, _: (self.blocks[i](st[0], st[1]), st[1]))
        out = self.out(self.out_norm(h)).to(x.dtype).split(B)
        return [out[n] for n in slab]


def train(model: ToyMLP, gmm: GaussianMixture, *, iterations: int, batch_size: int = 1024, lr: float = 2e-3,
          warmup: int = 100, label_dropout: float = 0.15, ema: float = 0.999, seed: int = 0,
          progress: bool = True, desc: str = "train") -> ToyMLP:
    """Rectified-flow training on exact mixture samples; returns the EMA copy (eval mode, no grad)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not 0 <= label_dropout < 1:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    g = torch.Generator().manual_seed(seed)
    warmup = min(warmup, max(1, iterations // 10))  # short runs (the under-trained regime) still reach full lr
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    ema_model = copy.deepcopy(model).requires_grad_(False)
    model.train()
    for it in trange(iterations, disable=not progress, desc=desc, leave=False):
        for group in opt.param_groups:
            warm = min(1.0, (it + 1) / max(warmup, 1))
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * it / iterations))
        label = torch.randint(gmm.num_classes, (batch_size,), generator=g)
        x0 = gmm.means[label].float() + gmm.std * torch.randn(batch_size, gmm.dim, generator=g)
        eps = torch.randn(batch_size, gmm.dim, generator=g)
        sigma = torch.rand(batch_size, generator=g)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        label = torch.where(torch.rand(batch_size, generator=g) < label_dropout, gmm.null_label, label)
        loss = (model(x, sigma, label=label) - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # EMA with a short-run warm-up: decay ramps to `ema`, so 100-iteration models are not stuck at init.
        decay = min(ema, (1 + it) / (10 + it))
        with torch.no_grad():
            for p_ema, p in zip(ema_model.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
    return ema_model.eval()


def save(model: ToyMLP, path: Path) -> None:
    save_file(model.state_dict(), str(path), metadata={k: str(v) for k, v in model.config.items()})


def load(path: Path) -> ToyMLP:
    """Weights through safetensors only; the architecture comes from the file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no toy model at {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        model = ToyMLP(**{k: int(meta[k]) for k in ("dim", "num_classes", "width", "num_blocks", "mlp_ratio",
                                                    "num_freqs")})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path} lacks valid toy model metadata ({e})") from None
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def train_or_load(path: Path, gmm: GaussianMixture, *, width: int, num_blocks: int, mlp_ratio: int,
                  iterations: int, seed: int, progress: bool = True, **train_kwargs) -> ToyMLP:
    """Load `path` if it exists (the caller keys the file name by every training setting), else train and save."""
    path = Path(path)
    arch = dict(dim=gmm.dim, num_classes=gmm.num_classes, width=width, num_blocks=num_blocks, mlp_ratio=mlp_ratio)
    if path.is_file():
        model = load(path)
        if any(model.config[k] != v for k, v in arch.items()):
            raise ValueError(f"cached model {path} does not match the requested architecture {arch}")
        return model
    with torch.random.fork_rng():  # the initialisation depends on the seed alone, not on the global RNG state
        torch.manual_seed(seed)
        model = ToyMLP(**arch)
    model = train(model, gmm, iterations=iterations, seed=seed, progress=progress, desc=path.stem, **train_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path)
    return model
