"""Stable Diffusion 3 / 3.5 from the released files: MMDiT + VAE + CLIP-L/G (+ T5) -> a `TextToImage` pipeline.

    pipe = load_sd3("sd3_medium_incl_clips_t5xxlfp16.safetensors",
                    clip_vocab="tokenizer/vocab.json", clip_merges="tokenizer/merges.txt",
                    t5_spiece="tokenizer_3/spiece.model")
    images = pipe(["a photo of a cat"], S2Guidance(), steps=28)        # [1, 3, 1024, 1024] in [0, 1]

Every part a single-file checkpoint holds (`split_components`: MMDiT, VAE under `first_stage_model.`, text encoders
under `text_encoders.*.transformer.`) is taken from it unless a separate file is given; the tokenizer files are
never inside a checkpoint. Argument names are the keys of configs/model/sd3*.yaml, so every error names the
config key to set (`model.clip_vocab: file not found: ...`).

Devices: the pipeline draws noise and steps on the CPU in fp32 (as diffusers steps in fp32); the networks run on
`device` in `dtype`, and `OnDevice` moves each call's tensors there and the result back.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .models.checkpoint import COMPONENT_PREFIXES, load_mmdit, load_state_dict, split_components
from .models.text import load_sd3_text
from .models.vae import load_vae
from .pipeline import TextToImage

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class OnDevice(nn.Module):
    """The Denoiser seam around a network that lives elsewhere: inputs go to its device, the velocity comes back
    to the caller's device and dtype. `num_blocks` and `forward_shared` (S² prefix sharing) pass through."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.device = next(net.parameters()).device

    @property
    def num_blocks(self) -> int:
        return self.net.num_blocks

    def _to(self, tensors: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in tensors.items()}

    def forward(self, x, sigma, skip=None, **cond):
        return self.net(x.to(self.device), sigma.to(self.device), skip=skip, **self._to(cond)).to(x.device)

    def forward_shared(self, x, sigma, *, skips, **cond):
        outs = self.net.forward_shared(x.to(self.device), sigma.to(self.device), skips=skips, **self._to(cond))
        return [v.to(x.device) for v in outs]


class SD3Text:
    """TextToImage's text seam over the SD3 conditioner: `encode(prompts) -> {"context", "pooled"}`."""

    def __init__(self, conditioner):
        self.conditioner = conditioner

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.conditioner.cond(prompts)


class VAEDecode:
    """Latents -> images in [0, 1] on the CPU, one image at a time (a 1024² decode is the memory peak)."""

    def __init__(self, vae):
        self.vae = vae
        self.device = vae.decoder.conv_in.weight.device

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        out = [self.vae.decode(z[None].to(self.device)).float().cpu() for z in latents]
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def _unset(value) -> bool:
    return value is None or value == "???"  # "???" = Hydra's mandatory value, left unset


def _file(key: str, value, what: str, folder_ok: bool = False) -> Path:
    """The path given for config key `key`, checked to exist; the error names the key to set. Weights may also be
    a diffusers folder of .safetensors shards (`folder_ok`)."""
    if _unset(value):
        raise ValueError(f"model.{key}: not set; give the {what} (model.{key}=/path/...)")
    path = Path(str(value)).expanduser()
    if not (path.is_file() or folder_ok and path.is_dir()):
        raise FileNotFoundError(f"model.{key}: file not found: {path}")
    return path


@contextmanager
def _named(key: str):
    """Prefix a loading error with the config key whose file caused it."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith("model.") else f"model.{key}: {msg}") from None


def _dtype(value, default: torch.dtype) -> torch.dtype:
    if value is None or value == "auto":
        return default
    if isinstance(value, torch.dtype):
        return value
    if str(value) not in DTYPES:
        raise ValueError(f"dtype {value!r} not understood; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[str(value)]


def _size(image_size) -> tuple[int, int]:
    """An int (square) or [height, width]."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return image_size, image_size
    try:
        h, w = (int(v) for v in image_size)
        return h, w
    except (TypeError, ValueError):
        raise ValueError(f"model.image_size must be an int or [height, width], got {image_size!r}") from None


def latent_shape(image_size, mmdit_config, vae_config) -> tuple[int, int, int]:
    """(C, H/8, W/8) for an image size, validated against the VAE factor, the patch size and the position table."""
    h, w = _size(image_size)
    down = 2 ** (len(vae_config.block_out_channels) - 1)  # 8 for the SD3 VAE
    p, P = mmdit_config.patch, mmdit_config.pos_embed_max_size
    step = down * p
    if h <= 0 or w <= 0 or h % step or w % step:
        raise ValueError(f"model.image_size: {h}x{w} is not a positive multiple of {step} (VAE factor {down} x "
                         f"patch {p})")
    if h // step > P or w // step > P:
        raise ValueError(f"model.image_size: {h}x{w} exceeds the position table ({P}x{P} patches: at most "
                         f"{P * step} px per side)")
    return mmdit_config.in_channels, h // down, w // down


@torch.no_grad()
def load_sd3(checkpoint, *, clip_l=None, clip_g=None, t5=None, clip_vocab=None, clip_merges=None, t5_spiece=None,
             vae=None, weak_checkpoint=None, t5_length: int = 256, image_size=1024, dtype="auto",
             t5_dtype=None, vae_dtype="float32", device="auto") -> TextToImage:
    """SD3 / SD3.5 text-to-image pipeline from the user's files (no network; safetensors only).

    checkpoint: the MMDiT, single-file layout (`model.diffusion_model.`, possibly with VAE and text encoders),
        bare original or diffusers layout. clip_l / clip_g / t5 / vae: separate `.safetensors` files for parts
        the checkpoint lacks (None = take it from the checkpoint). t5: None = from the checkpoint if it has T5,
        otherwise no T5 (zeros, as diffusers); False = no T5 even if present.
    clip_vocab / clip_merges: CLIP's vocab.json / merges.txt (one pair for L and G); t5_spiece: T5's spiece.model,
        needed whenever T5 is used.
    weak_checkpoint: an optional second MMDiT (same text widths) for autoguidance.
    image_size: int or [height, width], a multiple of 16 within the position table. dtype: "auto" = bfloat16 on
        CUDA, float32 on the CPU; T5 follows it (never fp16), the VAE runs in `vae_dtype` (fp32, as diffusers'
        force_upcast). device: "auto" = cuda if available.
    """
    # every file is checked before anything is read, so a typo fails in a second with the key to fix
    ckpt_path = _file("checkpoint", checkpoint, "MMDiT checkpoint (.safetensors)", folder_ok=True)
    vocab = _file("clip_vocab", clip_vocab, "CLIP tokenizer vocab.json")
    merges = _file("clip_merges", clip_merges, "CLIP tokenizer merges.txt")
    parts_given = {key: _file(key, value, f"{key} weights (.safetensors)", folder_ok=True) for key, value in
                   (("clip_l", clip_l), ("clip_g", clip_g), ("vae", vae), ("weak_checkpoint", weak_checkpoint))
                   if not _unset(value)}
    no_t5 = t5 is False or (isinstance(t5, str) and t5.lower() in ("false", "none"))
    if not no_t5 and not _unset(t5):
        parts_given["t5"] = _file("t5", t5, "T5 weights (.safetensors)", folder_ok=True)
    spiece = None if _unset(t5_spiece) else _file("t5_spiece", t5_spiece, "T5 tokenizer spiece.model")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device: {device} requested, but no CUDA device is available (use device=auto)")
    dtype = _dtype(dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)

    with _named("checkpoint"):
        parts = split_components(load_state_dict(ckpt_path))  # memory-mapped: parts are views of the file
    for key, path in parts_given.items():
        with _named(key):
            parts_given[key] = load_state_dict(path)
    t5_source = None if no_t5 else parts_given.get("t5") or parts["t5xxl"] or None
    if t5_source is not None and spiece is None:
        raise ValueError("model.t5_spiece: not set, but T5 weights are given; set the T5 tokenizer "
                         "(model.t5_spiece=/path/spiece.model) or run without T5 (model.t5=false)")
    with _named("checkpoint"):
        mmdit = load_mmdit(ckpt_path, dtype=dtype, device=device)

    def part(key: str, component: str, what: str):
        if key in parts_given:
            return parts_given[key]
        if parts[component]:
            return parts[component]
        raise ValueError(f"model.{key}: not set, and {ckpt_path.name} holds no {what} (no "
                         f"'{COMPONENT_PREFIXES[component]}*' tensors); give its file (model.{key}=/path/...)")

    with _named("vae"):
        vae_model = load_vae(part("vae", "vae", "VAE"), dtype=_dtype(vae_dtype, torch.float32), device=device)
    shape = latent_shape(image_size, mmdit.config, vae_model.config)
    if vae_model.config.latent_channels != mmdit.config.in_channels:
        raise ValueError(f"the VAE has {vae_model.config.latent_channels} latent channels, the MMDiT "
                         f"{mmdit.config.in_channels}")

    text = load_sd3_text(clip_l=part("clip_l", "clip_l", "CLIP-L"), clip_g=part("clip_g", "clip_g", "CLIP-G"),
                         t5=t5_source, clip_vocab=vocab, clip_merges=merges,
                         t5_spiece=spiece if t5_source is not None else None, t5_length=int(t5_length),
                         context_dim=mmdit.config.context_dim, dtype=dtype, t5_dtype=_dtype(t5_dtype, dtype),
                         device=device)
    pooled = text.clip_l.config.width + (text.clip_g.config.projection_dim or text.clip_g.config.width)
    if pooled != mmdit.config.pooled_dim:
        raise ValueError(f"the text encoders give a pooled vector of {pooled}, the MMDiT expects "
                         f"{mmdit.config.pooled_dim}: CLIP-L/G files of another model?")

    weak = None
    if "weak_checkpoint" in parts_given:
        with _named("weak_checkpoint"):
            weak_mmdit = load_mmdit(parts_given["weak_checkpoint"], dtype=dtype, device=device)
        fits = lambda c: (c.in_channels, c.context_dim, c.pooled_dim)  # noqa: E731
        if fits(weak_mmdit.config) != fits(mmdit.config):
            raise ValueError(f"model.weak_checkpoint: its MMDiT takes (latent channels, context, pooled) = "
                             f"{fits(weak_mmdit.config)}, the main one {fits(mmdit.config)}")
        weak = OnDevice(weak_mmdit)
    return TextToImage(OnDevice(mmdit), SD3Text(text), shape, VAEDecode(vae_model), weak)
