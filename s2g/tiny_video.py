"""The embedded tiny text-to-video model: a Wan 2.1 DiT in pixel space + the tiny text encoder, one file.

    pipe = load_tiny_video()                                   # s2g/assets/tiny_video.safetensors
    videos = pipe(["a red circle moving left"], CFG(scale=4))  # [1, 8, 3, 32, 32] in [0, 1]

Trained here by scripts/train_tiny_video.py on the clips of s2g.data.clips; the file holds the DiT under
`model.diffusion_model.` (Wan's own parameter names), the text encoder under `text_encoders.tiny.`, and the training
record in its header (frames, size, what the network predicts, the head count, which the tensors do not say).
Prompts must follow the clip grammar (`parse_video_prompt`): every prompt is checked before any sampling.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data.clips import parse_video_prompt
from .models.checkpoint import load_state_dict, load_wan
from .models.tiny_text import TinyTextEncoder
from . import ASSETS
from .pipeline import XPrediction
from .tiny import TEXT_PREFIX, _metadata
from .video import TextToVideo, pixel_clips

TINY_VIDEO_CHECKPOINT = ASSETS / "tiny_video.safetensors"
TINY_VIDEO_WEAK_CHECKPOINT = ASSETS / "tiny_video_weak.safetensors"
DIT_PREFIX = "model.diffusion_model."


class GrammarTextEncoder(torch.nn.Module):
    """The tiny text encoder behind the clip grammar: a prompt the grammar does not parse is a ValueError that
    names what is wrong ("" stays the unconditional input); Wan's context has no pooled vector."""

    def __init__(self, text: TinyTextEncoder):
        super().__init__()
        self.text = text

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        for p in prompts:
            if p != "":
                parse_video_prompt(p)
        return {"context": self.text.encode(list(prompts))["context"]}


def _dit(path: Path, dtype: torch.dtype):
    meta = _metadata(path)
    if meta.get("format") != "s2g-tiny-video":
        raise ValueError(f"{path}: not a tiny text-to-video file (header format={meta.get('format')!r}); "
                         f"an image model goes with model=tiny")
    state = {k: v for k, v in load_state_dict(path).items() if not k.startswith(TEXT_PREFIX)}
    net = load_wan(state, dtype=dtype, heads=int(meta["num_heads"]), text_len=None)
    if meta.get("prediction", "velocity") == "x0":
        net = XPrediction(net)
    return net, meta


def load_tiny_video(checkpoint=TINY_VIDEO_CHECKPOINT, weak_checkpoint=TINY_VIDEO_WEAK_CHECKPOINT,
                    num_frames: int | None = None, dtype: torch.dtype = torch.float32) -> TextToVideo:
    """The pixel-space video model (and Autoguidance's weak one, if given). `num_frames`: None = the trained
    count; any other count is refused (RoPE would extrapolate and the clips' motion is defined on 8 frames)."""
    checkpoint = Path(checkpoint).expanduser()
    for key, path in (("checkpoint", checkpoint), ("weak_checkpoint", weak_checkpoint)):
        if path and not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"model.{key}: file not found: {path}")
    denoiser, meta = _dit(checkpoint, dtype)
    text_state = {k[len(TEXT_PREFIX):]: v.to(dtype) for k, v in load_state_dict(checkpoint).items()
                  if k.startswith(TEXT_PREFIX)}
    text = TinyTextEncoder.from_state_dict(text_state, meta).eval()
    frames, size = int(meta["num_frames"]), int(meta["frame_size"])
    if num_frames is not None and int(num_frames) != frames:
        raise ValueError(f"model.num_frames={num_frames}, but {checkpoint.name} was trained on {frames} frames; "
                         f"set model.num_frames=null or {frames}")
    weak = _dit(Path(weak_checkpoint).expanduser(), dtype)[0] if weak_checkpoint else None
    return TextToVideo(denoiser, GrammarTextEncoder(text), (3, frames, size, size), pixel_clips, weak)
