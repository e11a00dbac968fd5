"""The embedded tiny text-to-image model from its shipped files: MMDiT (pixel space, x̂0-predicting) + tiny word-level
text encoder in one safetensors file, and an optional weak MMDiT (Autoguidance) -> a `TextToImage` pipeline.

    pipe = load_tiny()                                   # s2g/assets/tiny.safetensors + tiny_weak.safetensors
    images = pipe(["a red circle left of a blue square"], S2Guidance(scale=6), steps=28)   # [1, 3, 32, 32]

The file is SD3's single-file layout (`model.diffusion_model.*`) plus the text encoder under `text_encoders.tiny.*`;
its header holds the training record (`describe_checkpoint`), the image size and `prediction: x0`.
The model, its data and its training: s2g/models/README.md, experiments/tiny_model/README.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import ASSETS
from .models.checkpoint import load_mmdit, load_state_dict
from .models.tiny_text import TinyTextEncoder
from .pipeline import TextToImage, XPrediction, pixels_to_images

TINY_CHECKPOINT = ASSETS / "tiny.safetensors"
TINY_WEAK_CHECKPOINT = ASSETS / "tiny_weak.safetensors"
TEXT_PREFIX = "text_encoders.tiny."


def _as_denoiser(net, meta: dict):
    prediction = meta.get("prediction", "velocity")
    if prediction not in ("velocity", "x0"):
        raise ValueError(f"checkpoint header says prediction={prediction!r}; known: velocity, x0")
    return XPrediction(net) if prediction == "x0" else net


def _metadata(path) -> dict[str, str]:  # the safetensors header's string map
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
              dtype: torch.dtype | str = torch.float32) -> TextToImage:
    """The embedded pixel-space model: MMDiT + tiny text encoder from one file, optional weak MMDiT.
    `dtype`: a torch dtype or its name as the model configs write it (float32, bfloat16, float16; auto = float32);
    the sampler still steps in float32, the networks cast their inputs to their weights' dtype."""
    from .sd3 import _dtype

    try:  # a config's "float16" is a name: Tensor.to("float16") would read it as a device
        dtype = _dtype(dtype, torch.float32)
    except ValueError as e:
        raise ValueError(f"model.{e}") from None
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


def describe_checkpoint(path) -> dict:
    """The training record stored in a tiny checkpoint's header (command, steps, time, machine, config)."""
    meta = _metadata(path)
    out = {k: meta[k] for k in ("command", "steps", "train_seconds", "final_loss", "machine") if k in meta}
    for key in ("config", "commands"):  # commands: every run a resumed training went through, in order
        if key in meta:
            out[key] = json.loads(meta[key])
    return out
