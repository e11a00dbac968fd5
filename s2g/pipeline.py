"""Text-to-image: prompts -> conditioning -> guided rectified-flow sampling -> decode -> images.

The pipeline is model-agnostic along two seams:
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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .guidance.base import row_seed
from .models.checkpoint import load_mmdit, load_state_dict
from .models.sweep import check_variants
from .models.tiny_text import TinyTextEncoder
from .sampling import sample, sd3_sigmas

ASSETS = Path(__file__).parent / "assets"
TINY_CHECKPOINT = ASSETS / "tiny.safetensors"
TINY_WEAK_CHECKPOINT = ASSETS / "tiny_weak.safetensors"
TEXT_PREFIX = "text_encoders.tiny."


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

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> tuple[dict, dict]:
        """(cond, uncond) for the prompts; the unconditional input is the encoding of ""."""
        cond = self.text_encoder.encode(list(prompts))
        uncond = self.text_encoder.encode([""] * len(prompts))
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
        sigmas = sd3_sigmas(steps, shift)
        batch_size = batch_size or len(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            sl = slice(i, i + batch_size)
            out.append(sample(self.denoiser, noise[sl], sigmas, guider,
                              {k: v[sl] for k, v in cond.items()}, {k: v[sl] for k, v in uncond.items()},
                              sampler=sampler, progress=progress, rows=row_seeds[sl]))
        return self.decode(torch.cat(out))


# ---------------------------------------------------------------------------------------------- the tiny model


class XPrediction(torch.nn.Module):
    """A network that outputs x̂0, seen through the Denoiser seam as a velocity: v = (x - x̂0)/σ.

    The tiny pixel-space model is trained this way (scripts/train_tiny.py, `prediction: x0`); its checkpoint
    says so in the header. Skipped blocks, `num_blocks` and `forward_shared` pass through, so every guider
    (S², SLG) works unchanged. σ = 0 is never evaluated by the samplers (the last step lands on x̂0).
    The conditioning passes through as given (MMDiT: context, pooled; Wan: context), so one wrapper serves
    every family."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    @property
    def num_blocks(self) -> int:
        return self.net.num_blocks

    @property
    def config(self):
        return self.net.config

    @staticmethod
    def _velocity(x, sigma, x0):
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - x0) / s

    def compile(self, **kwargs) -> None:
        self.net.compile(**kwargs)  # the network's own (regional) compilation

    def forward(self, x, sigma, *cond, skip=None, **named):
        return self._velocity(x, sigma, self.net(x, sigma, *cond, skip=skip, **named))

    def forward_shared(self, x, sigma, *cond, skips, inputs=None, **named):
        skips = list(skips)
        outs = self.net.forward_shared(x, sigma, *cond, skips=skips, inputs=inputs, **named)
        inputs, _, B = check_variants(skips, inputs, x.shape[0])
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        xs, sigs = x.split(B), sig.split(B)  # variant j reads stacked input k = inputs[j]
        return [self._velocity(xs[k], sigs[k], o) for k, o in zip(inputs, outs)]


def _as_denoiser(net, meta: dict):
    prediction = meta.get("prediction", "velocity")
    if prediction not in ("velocity", "x0"):
        raise ValueError(f"checkpoint header says prediction={prediction!r}; known: velocity, x0")
    return XPrediction(net) if prediction == "x0" else net


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_tiny_text(path, dtype: torch.dtype = torch.float32) -> TinyTextEncoder:
    """The tiny text encoder stored under `text_encoders.tiny.` (vocabulary and sizes in the header)."""
    state = load_state_dict(path)
    text_state = {k[len(TEXT_PREFIX):]: v.to(dtype) for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    if not text_state:
        raise ValueError(f"{path}: no tensors under {TEXT_PREFIX!r}: not a tiny text-to-image checkpoint")
    return TinyTextEncoder.from_state_dict(text_state, _metadata(path)).eval()


def load_tiny(checkpoint=TINY_CHECKPOINT, weak_checkpoint=TINY_WEAK_CHECKPOINT, image_size: int | None = None,
              dtype: torch.dtype = torch.float32) -> TextToImage:
    """The embedded pixel-space model: MMDiT + tiny text encoder from one file, optional weak MMDiT."""
    checkpoint = Path(checkpoint).expanduser()
    for key, path in (("checkpoint", checkpoint), ("weak_checkpoint", weak_checkpoint)):
        if path and not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"model.{key}: file not found: {path}")
    text = load_tiny_text(checkpoint, dtype)
    # load_mmdit reads the model.diffusion_model.* part of the single file; other prefixes are ignored there
    mmdit = load_mmdit({k: v for k, v in load_state_dict(checkpoint).items() if not k.startswith(TEXT_PREFIX)},
                       dtype=dtype)
    meta = _metadata(checkpoint)
    size = image_size or int(meta.get("image_size", 32))
    weak = None
    if weak_checkpoint:
        weak_path = Path(weak_checkpoint).expanduser()
        weak = _as_denoiser(load_mmdit(weak_path, dtype=dtype), _metadata(weak_path))
    return TextToImage(_as_denoiser(mmdit, meta), text, (mmdit.config.in_channels, size, size), pixels_to_images,
                       weak)


# ------------------------------------------------------------------------------------------------------ grids


def image_grid(images: torch.Tensor, rows: int, cols: int, pad: int = 2, scale: int = 1,
               pad_value: float = 0.5) -> torch.Tensor:
    """[rows*cols, C, H, W] (row-major) -> one [C, H', W'] image, each tile upscaled by `scale` (nearest)."""
    if images.shape[0] != rows * cols:
        raise ValueError(f"{images.shape[0]} images do not fill a {rows}x{cols} grid")
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    C, H, W = images.shape[1:]
    grid = torch.full((C, rows * (H + pad) + pad, cols * (W + pad) + pad), pad_value)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    return grid


def save_png(image: torch.Tensor, path, row_labels=None, col_labels=None, tile: int | None = None,
             pad: int = 2) -> None:
    """Save a [C, H, W] image in [0, 1] as PNG, optionally with text labels left of rows / above columns."""
    from PIL import Image, ImageDraw

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if row_labels or col_labels:
        left = 8 + 6 * max((len(s) for s in row_labels or []), default=0)
        top = 16 if col_labels else 0
        canvas = Image.new("RGB", (img.width + left, img.height + top), (255, 255, 255))
        canvas.paste(img, (left, top))
        draw = ImageDraw.Draw(canvas)
        for i, s in enumerate(row_labels or []):
            draw.text((4, top + pad + i * (tile + pad) + tile // 2 - 5), s, fill=(0, 0, 0))
        for j, s in enumerate(col_labels or []):
            draw.text((left + pad + j * (tile + pad) + 2, 2), s, fill=(0, 0, 0))
        img = canvas
    img.save(path)


def describe_checkpoint(path) -> dict:
    """The training record stored in a tiny checkpoint's header (command, steps, time, machine, config)."""
    meta = _metadata(path)
    out = {k: meta[k] for k in ("command", "steps", "train_seconds", "final_loss", "machine") if k in meta}
    for key in ("config", "commands"):  # commands: every run a resumed training went through, in order
        if key in meta:
            out[key] = json.loads(meta[key])
    return out
