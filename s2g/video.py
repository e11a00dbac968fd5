"""Text-to-video: the text-to-image pipeline over clips, animated grids, MP4 files and frame strips.

A clip is sampled exactly as an image is: the latent of one sample is [C, F, H, W] instead of [C, H, W], and every
sampler, guider and the Denoiser seam are shape-agnostic, so `TextToVideo` is `TextToImage` with that shape and a
decoder that returns frames. Videos come back as [N, F, 3, H, W] in [0, 1] (frame-major, as s2g.data.clips renders
them and s2g.eval.video reads them), not in the network's [N, C, F, H, W] layout.

Files: `save_mp4` (H.264 through PyAV, imported only when called, so `import s2g` does not need it), `load_mp4`
(its frames back, for tests and eye checks), `save_frame_strip` (a PNG of the first, middle and last frames, one
row per video); `save_gif` for the small clips. None of them overwrites a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .pipeline import TextToImage


def pixel_clips(x: torch.Tensor) -> torch.Tensor:
    """Decoder of a pixel-space video model: [N, 3, F, H, W] in [-1, 1] -> [N, F, 3, H, W] in [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1).transpose(1, 2).contiguous()


@dataclass
class TextToVideo(TextToImage):
    """`pipe(prompts, guider, seed=..., steps=...) -> videos [N, F, 3, H, W]`; latent_shape is (C, F, H, W).
    `fps`: the frame rate the clips are meant to play at (Wan 2.1: 16), for `save_mp4`."""

    fps: float = 16.0

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
    from .images import tiles  # make_grid's pixels, without torchvision's ~2 s import

    return torch.stack([tiles(videos[:, f], cols, pad, pad_value) for f in range(videos.shape[1])])


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


def _frames_uint8(frames: torch.Tensor, what: str = "frames"):
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{what} must be [F, 3, H, W] with F >= 1, got {list(frames.shape)}")
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_mp4(frames: torch.Tensor, path, fps: float = 16.0, crf: int = 18) -> Path:
    """Frames [F, 3, H, W] in [0, 1] -> an H.264 MP4 (yuv420p, so every player plays it; H and W must be even)
    at `fps` frames a second, `crf` the x264 quality (0 lossless, 18 visually lossless, 23 x264's default).

    Written through PyAV (the `av` package, FFmpeg's libraries in a wheel, no ffmpeg on the PATH needed) into a
    temporary name next to `path` and renamed when complete, so a failure leaves no partial file. Never
    overwrites: an existing path is an error."""
    from fractions import Fraction
    import os

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; outputs are never overwritten")
    arrays = _frames_uint8(frames)
    h, w = arrays.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frames are {h}x{w}; H.264 in yuv420p needs an even height and width")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    try:
        import av
    except ImportError:
        raise ImportError("save_mp4 needs PyAV: pip install av") from None

    tmp = path.with_name(f".{path.name}.partial")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(int(crf))}
            for a in arrays:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
        if path.exists():
            raise FileExistsError(f"{path} exists; outputs are never overwritten")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_mp4(path) -> torch.Tensor:
    """An MP4 (e.g. from save_mp4) -> its frames [F, 3, H, W] in [0, 1], decoded through PyAV."""
    import av

    with av.open(str(path)) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                  for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return torch.stack(frames).float() / 255


def strip_indices(num_frames: int) -> list[int]:
    """The frames a strip shows: the first, the middle and the last (fewer when the clip has fewer)."""
    return sorted({0, (num_frames - 1) // 2, num_frames - 1})


def save_frame_strip(videos: torch.Tensor, path, row_labels=None, scale: int = 1) -> Path:
    """A PNG of each video's first, middle and last frames: one row per video ([N, F, 3, H, W], or one
    [F, 3, H, W]), the columns labelled with their frame numbers, `row_labels` (e.g. the prompts) on the left,
    each tile upscaled by `scale`. Never overwrites."""
    from .images import image_grid, save_png

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; outputs are never overwritten")
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [N, F, 3, H, W] or [F, 3, H, W], got {list(videos.shape)}")
    idx = strip_indices(videos.shape[1])
    tiles = videos[:, idx].flatten(0, 1).float().clamp(0, 1)  # row-major: video n, frames idx
    grid = image_grid(tiles, videos.shape[0], len(idx), scale=scale)
    labels = list(row_labels) if row_labels is not None else None
    if labels is not None and len(labels) != videos.shape[0]:
        raise ValueError(f"{len(labels)} row labels for {videos.shape[0]} videos")
    save_png(grid, path, row_labels=labels, tile=videos.shape[-2] * scale)
    _column_header(path, grid.shape[-1], videos.shape[-1] * scale, [f"frame {i}" for i in idx])
    return path


def _column_header(path: Path, grid_width: int, tile_width: int, labels: list[str], pad: int = 2) -> None:
    """Add a label strip above the columns of the PNG at `path` (a grid `grid_width` wide at its right edge, tiles
    `tile_width` wide). images.save_png's column labels assume square tiles; video frames are not."""
    from PIL import Image, ImageDraw

    from .images import HEADER

    with Image.open(path) as im:
        img = im.convert("RGB")
    canvas = Image.new("RGB", (img.width, img.height + HEADER), (255, 255, 255))
    canvas.paste(img, (0, HEADER))
    draw, left = ImageDraw.Draw(canvas), img.width - grid_width
    for j, label in enumerate(labels):
        draw.text((left + pad + j * (tile_width + pad) + 2, 2), label, fill=(0, 0, 0))
    canvas.save(path)
