"""Text-to-image: prompts -> conditioning -> guided rectified-flow sampling -> decode -> images.

The pipeline is model-agnostic along two seams (s2g/sd3.py and s2g/tiny.py load it for their model families):
- `text_encoder.encode(prompts) -> dict of batched cond tensors` (here {"context", "pooled"}); the empty prompt
  "" gives the unconditional input, as SD3's negative prompt does;
- `decode(latents) -> images in [0, 1]`: `pixels_to_images` for the pixel-space tiny model, a VAE for SD3.
The denoiser is anything with the Denoiser seam (`denoiser(x, sigma, *, skip, **cond)`), the guider any
s2g.guidance guider.

Randomness: the initial noise comes from a generator seeded with `seed` and is drawn once for the whole request,
so an image depends on its seed and its position in the request, not on how requests are split into batches.
Each image also has an integer key (`row_seeds`; by default a hash of the seed and its position) from which
guiders that draw per-image randomness (S² masks) seed their own generators, so those never consume the noise
generator and never depend on the batch either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .guidance.base import row_seed
# the grids live in s2g/images.py; re-exported for tests/test_integrations_diffusers.py, which imports them from here
from .images import image_grid, save_png  # noqa: F401
from .models.sweep import check_variants
from .sampling import sample, sd3_sigmas


def pixels_to_images(x: torch.Tensor) -> torch.Tensor:
    """Decoder of the pixel-space tiny model: [-1, 1] -> [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


@dataclass
class TextToImage:
    denoiser: Callable
    text_encoder: object
    latent_shape: tuple[int, int, int]  # (C, H, W) of one sample
    decode: Callable = pixels_to_images
    weak: Callable | None = None  # Autoguidance's weak denoiser, if the model config names one
    schedule: Callable = sd3_sigmas  # (steps, shift) -> σ grid; Wan brings its own (s2g.sampling.wan_sigmas)
    negative_prompt: str = ""  # the unconditional text (SD3 and the tiny models: ""; Wan: its default negative)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> tuple[dict, dict]:
        """(cond, uncond) for the prompts; the unconditional input is the encoding of `negative_prompt`."""
        cond = self.text_encoder.encode(list(prompts))
        uncond = self.text_encoder.encode([self.negative_prompt] * len(prompts))
        return cond, uncond

    def noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, *self.latent_shape), generator=g)

    @torch.no_grad()
    def __call__(self, prompts: list[str], guider, *, seed: int = 0, steps: int = 28, shift: float = 3.0,
                 sampler: str = "euler", batch_size: int | None = None, noise: torch.Tensor | None = None,
                 row_seeds: list[int] | None = None, progress: bool = False) -> torch.Tensor:
        """Images [N, C, H, W] in [0, 1] for N prompts. Prompts are validated (encoded) before any sampling.
        `row_seeds`: each image's key for per-image guider randomness (default: from `seed` and its position)."""
        prompts = list(prompts)
        cond, uncond = self.conditioning(prompts)  # bad prompts fail here, before the expensive part
        if getattr(guider, "needs_weak_model", False) and guider.weak is None:
            if self.weak is None:
                raise ValueError(f"{type(guider).__name__} needs a weak model, but this model config names none "
                                 f"(set model.weak_checkpoint)")
            guider.weak = self.weak
        if noise is None:
            noise = self.noise(len(prompts), seed)
        if row_seeds is None:
            row_seeds = [row_seed(seed, i) for i in range(len(prompts))]
        if len(row_seeds) != len(prompts):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
        sigmas = self.schedule(steps, shift)
        batch_size = batch_size or len(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            sl = slice(i, i + batch_size)
            out.append(sample(self.denoiser, noise[sl], sigmas, guider,
                              {k: v[sl] for k, v in cond.items()}, {k: v[sl] for k, v in uncond.items()},
                              sampler=sampler, progress=progress, rows=row_seeds[sl]))
        return self.decode(torch.cat(out))


# ------------------------------------------------------------------------------------------ x̂0-predicting networks


class Wrapped(torch.nn.Module):
    """A module around a DiT that keeps its seams: `num_blocks`, `config`, `blocks` and its own compilation pass
    through, so guiders that skip or perturb blocks see the network inside (XPrediction, tiny_video.TimeChannel)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    @property
    def num_blocks(self) -> int:
        return self.net.num_blocks

    @property
    def config(self):
        return self.net.config

    @property
    def blocks(self):
        return self.net.blocks

    def compile(self, **kwargs) -> None:
        self.net.compile(**kwargs)  # the network's own (regional) compilation


class XPrediction(Wrapped):
    """A network that outputs x̂0, seen through the Denoiser seam as a velocity: v = (x - x̂0)/σ.

    The embedded pixel-space models are trained this way (scripts/train_tiny.py, `prediction: x0`; their loaders
    are s2g/tiny.py and s2g/tiny_video.py); a checkpoint says so in its header. Skipped blocks, `num_blocks` and `forward_shared` pass through, so every guider
    (S², SLG) works unchanged. σ = 0 is never evaluated by the samplers (the last step lands on x̂0).
    The conditioning passes through as given (MMDiT: context, pooled; Wan: context), so one wrapper serves
    every family."""

    @staticmethod
    def _velocity(x, sigma, x0):
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - x0) / s

    def forward(self, x, sigma, *cond, skip=None, **named):
        return self._velocity(x, sigma, self.net(x, sigma, *cond, skip=skip, **named))

    def forward_shared(self, x, sigma, *cond, skips, inputs=None, **named):
        skips = list(skips)
        outs = self.net.forward_shared(x, sigma, *cond, skips=skips, inputs=inputs, **named)
        inputs, _, B = check_variants(skips, inputs, x.shape[0])
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        xs, sigs = x.split(B), sig.split(B)  # variant j reads stacked input k = inputs[j]
        return [self._velocity(xs[k], sigs[k], o) for k, o in zip(inputs, outs)]

