"""The embedded tiny text-to-video model: a Wan 2.1 DiT in pixel space + the tiny text encoder, one file.

    pipe = load_tiny_video()                                   # s2g/assets/tiny_video.safetensors
    videos = pipe(["a red circle moving left"], CFG(scale=4))  # [1, 8, 3, 32, 32] in [0, 1]

Trained here by scripts/train_tiny_video.py on the clips of s2g.data.clips; the file holds the DiT under
`model.diffusion_model.` (Wan's own parameter names), the text encoder under `text_encoders.tiny.`, and the training
record in its header (frames, size, what the network predicts, the head count, which the tensors do not say).
Prompts must follow the clip grammar (`parse_video_prompt`): every prompt is checked before any sampling.

The network reads one channel more than it makes: each frame's time, a constant plane from -1 (first frame) to +1
(last), concatenated to the RGB input (`TimeChannel`), as Wan's image-to-video model concatenates mask channels
that mark the given frame. Wan's attention knows positions only relative to each other (3-D RoPE), and from
noise alone (high σ, where a motion word has to act) a token cannot tell whether it is early or late in the
clip: the mean clip of "moving left" drifts left with time, which a model that is the same at every frame cannot
draw. Trained without it, the model learned each motion's axis and moving vs still, never its sign
(experiments/tiny_video/README.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data.clips import parse_video_prompt
from .models.checkpoint import load_state_dict, load_wan
from .models.tiny_text import TinyTextEncoder
from . import ASSETS
from .pipeline import Wrapped, XPrediction
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


class TimeChannel(Wrapped):
    """The network `net` over [B, C, F, H, W] clips with each frame's time appended as channel C + 1: a plane of
    2t/(F-1) - 1 for frame t. Skipped blocks, `num_blocks` and `forward_shared` pass through, so every guider
    works unchanged (stacked inputs get the same plane)."""

    @staticmethod
    def with_time(x: torch.Tensor) -> torch.Tensor:
        B, _, F, H, W = x.shape
        t = torch.linspace(-1, 1, F, dtype=x.dtype, device=x.device) if F > 1 else x.new_zeros(1)
        return torch.cat([x, t.view(1, 1, F, 1, 1).expand(B, 1, F, H, W)], 1)

    def forward(self, x, sigma, *cond, skip=None, **named):
        return self.net(self.with_time(x), sigma, *cond, skip=skip, **named)

    def forward_shared(self, x, sigma, *cond, skips, inputs=None, **named):
        return self.net.forward_shared(self.with_time(x), sigma, *cond, skips=skips, inputs=inputs, **named)


def _dit(path: Path, dtype: torch.dtype):
    meta = _metadata(path)
    if meta.get("format") != "s2g-tiny-video":
        raise ValueError(f"{path}: not a tiny text-to-video file (header format={meta.get('format')!r}); "
                         f"an image model goes with model=tiny")
    state = {k: v for k, v in load_state_dict(path).items() if not k.startswith(TEXT_PREFIX)}
    net = load_wan(state, dtype=dtype, heads=int(meta["num_heads"]), text_len=None)
    if meta.get("time_channel") == "ramp":
        net = TimeChannel(net)
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
