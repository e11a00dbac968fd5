"""Wan 2.1 text-to-video (T2V 1.3B / 14B) from the released files: DiT + VAE + umT5 -> a `TextToVideo` pipeline.

    pipe = load_wan21("diffusion_pytorch_model.safetensors", vae="wan_2.1_vae.safetensors",
                      text_encoder="umt5_xxl_fp16.safetensors", tokenizer="google/umt5-xxl/spiece.model")
    videos = pipe(["a red fox runs through the snow"], S2Guidance(scale=5), steps=50, shift=5.0,
                  sampler="unipc")                                  # [1, 81, 3, 480, 832] in [0, 1]

Wan's sampling, as its generate.py runs text-to-video (wan/text2video.py):
- the σ grid is Wan's own (`s2g.sampling.wan_sigmas`: 0.999 -> 0 in float64, shifted; not diffusers' default grid),
  and the DiT is fed Wan's truncated integer timesteps (`wan_timesteps`) while the solver steps on the float σ
  (`WanGrid`, through `DiscreteTimesteps`);
- the unconditional text is Wan's default negative prompt (`WAN_NEGATIVE_PROMPT`) unless one is given
  (`negative_prompt`); diffusers' WanPipeline uses "" instead, which gives other samples;
- the context is umT5's rows up to each prompt's EOS, zero after, padded to 512 (`load_wan_text`);
- the VAE decodes one latent frame at a time in fp32, clamped to [-1, 1]; videos come back as [N, F, 3, H, W] in
  [0, 1].
Argument names are the keys of configs/model/wan21_t2v_*.yaml, so every error names the config key to set. Every
check that needs no weights (files, frame count, size) runs before anything is read.

Devices: as s2g/sd3.py, noise and the solver stay on the CPU in fp32; the networks run on `device` in `dtype`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .models.checkpoint import load_wan, load_wan_vae
from .models.text import WAN_NEGATIVE_PROMPT, load_wan_text
from .sampling import DiscreteTimesteps, wan_sigmas, wan_timesteps
from .sd3 import OnDevice, _dtype, _file, _named, _unset
from .video import TextToVideo, pixel_clips

# Wan 2.1's VAE compresses 4x in time and 8x in space, and its DiT patches 2x2 latent pixels: a clip has 1 + 4k
# frames and a size that is a multiple of 16.
TEMPORAL, SPATIAL, PATCH = 4, 8, 2
SD3_CONFIGS = "model=sd3_medium, sd35_medium or sd35_large"


class WanGrid:
    """The pipeline's schedule: Wan's σ grid for (steps, shift) (`wan_sigmas`), remembering the integer timesteps
    that go with the grid it made last, so that `feed(net)` can give the network Wan's integers.

    The pipeline calls its schedule at the start of every sampling run, so the table always matches the run."""

    def __init__(self):
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None

    def __call__(self, steps: int, shift: float) -> torch.Tensor:
        self.sigmas, self.timesteps = wan_sigmas(steps, shift), wan_timesteps(steps, shift)
        return self.sigmas

    def feed(self, net) -> "GridTimesteps":
        return GridTimesteps(net, self)

    def __repr__(self) -> str:
        return "WanGrid()" if self.sigmas is None else f"WanGrid({len(self.timesteps)} steps)"


class GridTimesteps(DiscreteTimesteps):
    """`DiscreteTimesteps` over the grid a `WanGrid` made last: asked for σ_i, the network gets t_i / 1000."""

    def __init__(self, net, grid: WanGrid):  # noqa: D107 - the tables are the grid's, read at each call
        self.net, self.grid = net, grid

    def _table(self, i: int) -> torch.Tensor:
        if self.grid.sigmas is None:
            raise ValueError("no σ grid yet: the network is fed Wan's timesteps for the grid the pipeline's "
                             "schedule made (call pipe.schedule(steps, shift) first)")
        return (self.grid.sigmas[:len(self.grid.timesteps)].double(), self.grid.timesteps.double() / 1000)[i]

    @property
    def _sigmas(self) -> torch.Tensor:
        return self._table(0)

    @property
    def _net_sigmas(self) -> torch.Tensor:
        return self._table(1)

    def __repr__(self) -> str:
        return f"GridTimesteps({type(self.net).__name__}, {self.grid!r})"


class WanText:
    """TextToVideo's text seam over Wan's conditioner: `encode(prompts) -> {"context": [B, 512, 4096]}`."""

    def __init__(self, conditioner):
        self.conditioner = conditioner

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.conditioner.cond(list(prompts))


class WanDecode:
    """Latents [N, 16, 1+k, H/8, W/8] -> videos [N, 1+4k, 3, H, W] in [0, 1] on the CPU, one video at a time,
    each decoded one latent frame at a time (Wan's chunking: the least memory)."""

    def __init__(self, vae):
        self.vae = vae
        self.device = vae.conv2.weight.device

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        out = [self.vae.decode(z[None].to(self.device)).float().cpu() for z in latents]  # [-1, 1], clamped
        return pixel_clips(torch.cat(out))


def _clip_shape(num_frames, height, width) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) for a clip, or a one-line error naming the key."""
    def integer(key, value):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"model.{key} must be an integer, got {value!r}")
        return int(value)

    f, h, w = integer("num_frames", num_frames), integer("height", height), integer("width", width)
    if f < 1 or (f - 1) % TEMPORAL:
        lo, hi = (f - 1) // TEMPORAL * TEMPORAL + 1, ((f - 1) // TEMPORAL + 1) * TEMPORAL + 1
        near = f"{hi}" if f < 1 else f"{lo} or {hi}"
        raise ValueError(f"model.num_frames={f}: Wan's VAE needs 1 + {TEMPORAL}k frames (1, 5, ..., 77, 81, ...); "
                         f"try {near}")
    step = SPATIAL * PATCH
    for key, v in (("height", h), ("width", w)):
        if v < step or v % step:
            raise ValueError(f"model.{key}={v}: not a positive multiple of {step} (VAE factor {SPATIAL} x patch "
                             f"{PATCH}); Wan 2.1 samples at 480x832 (1.3B, 14B) or 720x1280 (14B)")
    return 1 + (f - 1) // TEMPORAL, h // SPATIAL, w // SPATIAL


def _repo_parts(checkpoint, vae, text_encoder, tokenizer):
    """A folder as `checkpoint`: a diffusers Wan repo (model_index.json; Wan-AI/Wan2.1-T2V-*-Diffusers) gives its
    transformer/, and vae/, text_encoder/ and tokenizer/ for the keys left unset; the official repo folder
    (Wan-AI/Wan2.1-T2V-*) gives its DiT shards and the tokenizer in google/umt5-xxl/ (its VAE and umT5 are .pth
    pickles: convert them once and set the keys). Another diffusers pipeline's folder is refused."""
    if _unset(checkpoint):
        return checkpoint, vae, text_encoder, tokenizer
    root = Path(str(checkpoint)).expanduser()
    index = root / "model_index.json"
    if index.is_file():
        import json

        try:
            name = json.loads(index.read_text()).get("_class_name", "?")
        except ValueError:
            name = "?"
        if not str(name).startswith("Wan"):
            hint = f": sample it with {SD3_CONFIGS}" if "StableDiffusion3" in str(name) else ""
            raise ValueError(f"model.checkpoint: {root} is a diffusers {name} folder, not a Wan 2.1 one{hint}")
        pick = lambda value, sub: root / sub if _unset(value) else value  # noqa: E731
        return root / "transformer", pick(vae, "vae"), pick(text_encoder, "text_encoder"), pick(tokenizer,
                                                                                               "tokenizer")
    if root.is_dir() and _unset(tokenizer) and (root / "google" / "umt5-xxl").is_dir():
        tokenizer = root / "google" / "umt5-xxl"
    return checkpoint, vae, text_encoder, tokenizer


def _dit(key: str, path: Path, dtype, device):
    """load_wan with the key in every error, and a pointer to the SD3 configs when the file is an MMDiT."""
    with _named(key):
        try:
            return load_wan(path, dtype=dtype, device=device)
        except ValueError as e:
            if "SD3/SD3.5 MMDiT" in str(e):
                raise ValueError(f"{path.name} is an SD3/SD3.5 MMDiT, not a Wan 2.1 DiT: sample it with "
                                 f"{SD3_CONFIGS}") from None
            raise


@torch.no_grad()
def load_wan21(checkpoint, *, vae=None, text_encoder=None, tokenizer=None, weak_checkpoint=None,
               num_frames: int = 81, height: int = 480, width: int = 832, negative_prompt: str | None = None,
               text_len: int = 512, dtype="auto", text_dtype=None, vae_dtype="float32", fps: float = 16.0,
               device="auto") -> TextToVideo:
    """Wan 2.1 text-to-video pipeline from the user's files (no network; safetensors only).

    checkpoint: the DiT: the official `diffusion_pytorch_model.safetensors` (or its shards + index, or the folder
        holding them), a diffusers `transformer/` folder, or a repackaged single file (`model.diffusion_model.`);
        or a whole diffusers Wan repo folder, whose vae/, text_encoder/ and tokenizer/ fill the keys left unset.
    vae: the Wan 2.1 VAE (`wan_2.1_vae.safetensors`, a diffusers `vae/` folder). text_encoder: umT5-XXL (a
        diffusers `text_encoder/` folder, `umt5_xxl_fp16.safetensors`). tokenizer: umT5's `spiece.model`
        (google/umt5-xxl). The official `.pth` files are pickles and are refused, with the one-line conversion.
    weak_checkpoint: an optional second Wan DiT (same latent channels and text width) for Autoguidance.
    num_frames: 1 + 4k (Wan: 81); height / width: multiples of 16 (1.3B: 480x832; 14B: 720x1280 or 480x832).
    negative_prompt: the unconditional text; None = Wan's default (`WAN_NEGATIVE_PROMPT`), "" = diffusers'.
    dtype: "auto" = bfloat16 on CUDA, float32 on the CPU (the time embedding, modulation, norms and head stay fp32
        inside the DiT, as Wan); text_dtype: umT5's (None = dtype, never fp16); vae_dtype: fp32, as Wan.
    fps: the frame rate of the written MP4 (Wan: 16). device: "auto" = cuda if available.
    """
    # every check that needs no weights first: a typo fails in a second, with the key to fix
    checkpoint, vae, text_encoder, tokenizer = _repo_parts(checkpoint, vae, text_encoder, tokenizer)
    ckpt_path = _file("checkpoint", checkpoint, "Wan 2.1 DiT weights (.safetensors, or a folder of shards)",
                      folder_ok=True)
    vae_path = _file("vae", vae, "Wan 2.1 VAE weights (e.g. wan_2.1_vae.safetensors)", folder_ok=True)
    text_path = _file("text_encoder", text_encoder, "umT5-XXL weights (e.g. umt5_xxl_fp16.safetensors or a "
                      "diffusers text_encoder/ folder)", folder_ok=True)
    spiece = _file("tokenizer", tokenizer, "umT5 tokenizer's spiece.model (google/umt5-xxl)", folder_ok=True)
    if spiece.is_dir():  # a tokenizer folder (google/umt5-xxl/, a diffusers tokenizer/): its spiece.model
        if not (spiece / "spiece.model").is_file():
            raise FileNotFoundError(f"model.tokenizer: no spiece.model in {spiece}")
        spiece = spiece / "spiece.model"
    weak_path = None if _unset(weak_checkpoint) else _file("weak_checkpoint", weak_checkpoint,
                                                           "weak Wan DiT (.safetensors)", folder_ok=True)
    latent_frames, latent_h, latent_w = _clip_shape(num_frames, height, width)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"model.negative_prompt must be a string or null, got {negative_prompt!r}")
    if not (isinstance(text_len, int) and text_len > 0):
        raise ValueError(f"model.text_len must be a positive integer (Wan: 512), got {text_len!r}")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"model.fps must be a positive number (Wan: 16), got {fps!r}")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device: {device} requested, but no CUDA device is available (use device=auto)")
    dtype = _dtype(dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)

    dit = _dit("checkpoint", ckpt_path, dtype, device)
    with _named("vae"):
        vae_model = load_wan_vae(vae_path, dtype=_dtype(vae_dtype, torch.float32), device=device)
    if vae_model.config.z_dim != dit.config.in_dim:
        raise ValueError(f"model.vae: the VAE has {vae_model.config.z_dim} latent channels, the DiT takes "
                         f"{dit.config.in_dim}: a VAE of another model?")
    if dit.config.patch_size[1:] != (PATCH, PATCH) or dit.config.patch_size[0] != 1:
        raise ValueError(f"model.checkpoint: patch size {dit.config.patch_size}, Wan 2.1 T2V's is (1, 2, 2)")
    with _named("text_encoder"):
        text = load_wan_text(umt5=text_path, spiece=spiece, text_len=text_len,
                             dtype=_dtype(text_dtype, dtype), device=device)
    width_text = text.encoder.config.d_model
    if width_text != dit.config.text_dim:
        raise ValueError(f"model.text_encoder: the text encoder gives {width_text}-wide rows, the DiT takes "
                         f"{dit.config.text_dim}: umT5-XXL (4096) is Wan 2.1's")

    grid = WanGrid()
    weak = None
    if weak_path is not None:
        weak_dit = _dit("weak_checkpoint", weak_path, dtype, device)
        fits = lambda c: (c.in_dim, c.text_dim)  # noqa: E731
        if fits(weak_dit.config) != fits(dit.config):
            raise ValueError(f"model.weak_checkpoint: its DiT takes (latent channels, text width) = "
                             f"{fits(weak_dit.config)}, the main one {fits(dit.config)}")
        weak = grid.feed(OnDevice(weak_dit))
    shape = (dit.config.in_dim, latent_frames, latent_h, latent_w)
    return TextToVideo(grid.feed(OnDevice(dit)), WanText(text), shape, WanDecode(vae_model), weak,
                       schedule=grid, negative_prompt=WAN_NEGATIVE_PROMPT if negative_prompt is None
                       else negative_prompt, fps=float(fps))
