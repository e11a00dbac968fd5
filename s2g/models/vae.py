"""The SD3 / SD3.5 autoencoder: a 16-channel KL VAE with 8x spatial compression.

Parameter names follow the original (LDM / Stability) layout -- `encoder.down.k.block.j...`, `decoder.up.k...`,
`mid.attn_1.q` as 1x1 convs -- so a standalone `vae.safetensors` or the `first_stage_model.` part of a single-file
checkpoint loads without renaming. The diffusers `AutoencoderKL` layout is renamed into it on load.

Differences from the SD1/SDXL VAE that matter: no quant_conv / post_quant_conv, 16 latent channels, and latents are
normalised with a shift as well as a scale: z = (mean - 0.0609) * 1.5305.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALING_FACTOR = 1.5305
SHIFT_FACTOR = 0.0609


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder res blocks per level; the decoder has one more
    latent_channels: int = 16
    image_channels: int = 3
    norm_groups: int = 32  # not visible in the weights; 32 in every released SD VAE
    has_encoder: bool = True
    scaling_factor: float = SCALING_FACTOR
    shift_factor: float = SHIFT_FACTOR


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj are 1x1 convs (original layout)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C): one head of width C
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right/bottom only, as trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` (res blocks) then an optional `downsample` / `upsample` (named as stored)."""

    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks))
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(k - 1, 0)], ch[k], cfg.layers_per_block, g,
                  Downsample(ch[k]) if k < len(ch) - 1 else None, "downsample")
            for k in range(len(ch))
        )
        self.mid = MidBlock(ch[-1], g)
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # (mean, logvar)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], g)
        # up[k] works at the resolution of down[k]; it is *run* from the last level to the first.
        self.up = nn.ModuleList(
            Level(ch[min(k + 1, len(ch) - 1)], ch[k], cfg.layers_per_block + 1, g,
                  Upsample(ch[k]) if k > 0 else None, "upsample")
            for k in range(len(ch))
        )
        self.norm_out = _norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.image_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    """`encode(images in [-1,1]) -> normalised latents`, `decode(latents) -> images` (SD3 scale/shift inside)."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg) if cfg.has_encoder else None
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None):
        """Images [B,3,H,W] in [-1,1] (H, W multiples of 8) -> latents [B,16,H/8,W/8], SD3-normalised.

        Returns the posterior mean by default; `sample=True` draws mean + std * eps with `generator`."""
        if self.encoder is None:
            raise ValueError("this VAE was loaded without encoder weights (a decode-only file): encode is unavailable")
        moments = self.encoder(images.to(self.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps
        return (z - self.config.shift_factor) * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """SD3-normalised latents -> images nominally in [-1,1]. Not clamped (as diffusers' `decode().sample`):
        clamp when converting to pixels."""
        z = latents.to(self.dtype) / self.config.scaling_factor + self.config.shift_factor
        return self.decoder(z)


# ---------------------------------------------------------------------------------------------------------------
# Loading: layout detection, diffusers -> original renaming, config from shapes.

_DIFFUSERS_MARKERS = ("decoder.up_blocks.", "decoder.mid_block.", "decoder.conv_norm_out.")
_SD3_PREFIX = "first_stage_model."


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to the original layout (the inverse of diffusers'
    `convert_ldm_vae_checkpoint`): up-block index reversed, attention Linear -> 1x1 conv, conv_shortcut ->
    nin_shortcut, conv_norm_out -> norm_out."""
    n_up = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # second row: pre-0.14 diffusers names
    out = {}
    for key, t in sd.items():
        new = key
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block.", new)
        new = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", new)
        new = re.sub(r"\.up_blocks\.(\d+)\.resnets\.", lambda m: f".up.{n_up - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f".up.{n_up - 1 - int(m.group(1))}.upsample.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.mid.attn_1.{attn.get(m.group(2), m.group(2))}.{m.group(3)}"
            if m.group(3) == "weight" and t.ndim == 2:
                t = t[:, :, None, None]  # Linear (C,C) -> 1x1 conv (C,C,1,1)
        out[new] = t
    return out


def _levels(sd, pattern: str) -> dict[int, set[int]]:
    """{level k: {block indices j}} for keys matching e.g. r'decoder\\.up\\.(\\d+)\\.block\\.(\\d+)\\.'."""
    found: dict[int, set[int]] = {}
    for key in sd:
        if m := re.match(pattern, key):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return found


def infer_config(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Channel widths, depth and latent size from an original-layout state dict."""
    if "decoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise ValueError("not an SD3 VAE state dict: no decoder.conv_in / decoder.conv_out weights")
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in sd):
        raise ValueError("this VAE has quant_conv/post_quant_conv: it is an SD1/SDXL-style VAE, not the SD3 one")
    up = _levels(sd, r"decoder\.up\.(\d+)\.block\.(\d+)\.")
    if not up or sorted(up) != list(range(len(up))):
        raise ValueError("not an SD3 VAE state dict: decoder.up.<k>.block.<j> levels are missing or not contiguous")
    widths = tuple(sd[f"decoder.up.{k}.block.0.conv2.weight"].shape[0] for k in range(len(up)))
    has_encoder = any(k.startswith("encoder.") for k in sd)
    n_enc = len(up[0]) - 1
    if has_encoder:
        down = _levels(sd, r"encoder\.down\.(\d+)\.block\.(\d+)\.")
        enc_widths = tuple(sd[f"encoder.down.{k}.block.0.conv2.weight"].shape[0] for k in sorted(down))
        if enc_widths != widths:
            raise ValueError(f"encoder widths {enc_widths} differ from decoder widths {widths}")
        n_enc = len(down[0])
    return VAEConfig(
        block_out_channels=widths,
        layers_per_block=n_enc,
        latent_channels=sd["decoder.conv_in.weight"].shape[1],
        image_channels=sd["decoder.conv_out.weight"].shape[0],
        has_encoder=has_encoder,
    )


def _extract_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept bare keys, a full SD3 checkpoint (first_stage_model.) or the diffusers layout."""
    from .checkpoint import split_components

    part = split_components(sd)["vae"]
    if part:
        sd = part
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    if not sd:
        raise ValueError("no VAE weights found: expected keys under 'encoder.'/'decoder.' "
                         "(standalone or diffusers VAE) or 'first_stage_model.' (single-file SD3 checkpoint)")
    if any(k.startswith(_DIFFUSERS_MARKERS) for k in sd):
        sd = diffusers_to_original(sd)
    return sd


def load_vae(source, *, dtype: torch.dtype | None = None, device=None) -> VAE:
    """Build the VAE from a `.safetensors` path (or a diffusers `vae/` folder) or a state dict.

    Layouts: original standalone (bare `encoder.`/`decoder.` keys), full SD3 single file (`first_stage_model.`),
    diffusers `AutoencoderKL`. The encoder is optional (decode-only files load; `encode` then raises)."""
    from .checkpoint import build_with_weights, load_state_dict

    sd = _extract_vae_keys(load_state_dict(source))
    cfg = infer_config(sd)
    return build_with_weights(lambda: VAE(cfg), sd, dtype=dtype or next(iter(sd.values())).dtype, device=device,
                              what=f"VAE weights do not match the SD3 VAE (inferred {cfg.block_out_channels})")
