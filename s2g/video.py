"""Text-to-video: the text-to-image pipeline over clips, and animated grids.

A clip is sampled exactly as an image is: the latent of one sample is [C, F, H, W] instead of [C, H, W], and every
sampler, guider and the Denoiser seam are shape-agnostic, so `TextToVideo` is `TextToImage` with that shape and a
decoder that returns frames. Videos come back as [N, F, 3, H, W] in [0, 1] (frame-major, as s2g.data.clips renders
them and s2g.eval.video reads them), not in the network's [N, C, F, H, W] layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import make_grid

from .pipeline import TextToImage


def pixel_clips(x: torch.Tensor) -> torch.Tensor:
    """Decoder of a pixel-space video model: [N, 3, F, H, W] in [-1, 1] -> [N, F, 3, H, W] in [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1).transpose(1, 2).contiguous()


@dataclass
class TextToVideo(TextToImage):
    """`pipe(prompts, guider, seed=..., steps=...) -> videos [N, F, 3, H, W]`; latent_shape is (C, F, H, W)."""

    @property
    def num_frames(self) -> int:
        return self.latent_shape[1]


def video_grid(videos: torch.Tensor, rows: int, cols: int, pad: int = 2, scale: int = 1,
               pad_value: float = 0.5) -> torch.Tensor:
    """[rows*cols, F, 3, H, W] (row-major) -> [F, 3, H', W']: one grid per frame, each tile upscaled by `scale`."""
    if videos.ndim != 5 or videos.shape[0] != rows * cols:
        raise ValueError(f"videos {list(videos.shape)} do not fill a {rows}x{cols} grid of [F, 3, H, W] clips")
    if scale > 1:
        videos = videos.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    return torch.stack([make_grid(videos[:, f], nrow=cols, padding=pad, pad_value=pad_value)
                        for f in range(videos.shape[1])])


def save_gif(frames: torch.Tensor, path, fps: float = 4.0) -> Path:
    """Frames [F, 3, H, W] in [0, 1] -> an endlessly looping GIF. Never overwrites: an existing path is an error."""
    from PIL import Image

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; outputs are never overwritten")
    arrays = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(a) for a in arrays]
    # one shared palette is enough for flat-coloured shapes; disposal 1 keeps each frame whole
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, disposal=1)
    return path


def load_gif(path) -> torch.Tensor:
    """A GIF written by save_gif -> frames [F, 3, H, W] in [0, 1] (for tests and eye checks)."""
    from PIL import Image, ImageSequence
    import numpy as np

    with Image.open(path) as im:
        frames = [torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1) for f in ImageSequence.Iterator(im)]
    return torch.stack(frames).float() / 255
