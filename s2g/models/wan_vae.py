"""The Wan 2.1 video VAE: causal 3-D convolutions, 16 latent channels, 4x temporal and 8x spatial compression.

A video of 1 + 4k frames becomes 1 + k latent frames: the first frame is coded on its own (it is an image), each
later latent frame codes the next 4. Every 3x3x3 convolution is causal in time (zero-padded on the left only), so
frame t never sees frames after it. That is what makes chunked coding exact: encode runs frame 0, then frames
1-4, 5-8, ...; decode runs one latent frame at a time; each causal convolution keeps the last two frames of its
input in a *feature cache* (a dict, one entry per layer) and prepends them to the next chunk. Peak memory then
depends on the frame size, not on the frame count, apart from the output itself (s2g/models/README.md gives
the figures).

Parameter names follow the original release (Wan2.1 wan/modules/vae.py, `Wan2.1_VAE.pth` once converted to
safetensors), so such files load with no renaming; checkpoint.py maps diffusers' `AutoencoderKLWan` onto them.

The two time-resampling layers treat the first frame specially, exactly as Wan does:
- down (encoder, stride 2 in time): frame 0 passes through; the rest is a (3,1,1) convolution with stride 2 over
  all frames from frame 0 on, without padding, so frames (0,1,2), (2,3,4), ... make one frame each;
- up (decoder): frame 0 passes through as one frame; every later frame goes through a causal (3,1,1) convolution
  over the frames from frame 1 on (frame 0 is never in its window) whose 2C outputs are two frames.

Latents are normalised per channel with Wan's constants: z = (mu - mean) / std on encode, the inverse on decode,
both inside. Decoded videos are clamped to [-1, 1] (as Wan's `WanVAE.decode` and diffusers do).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Per-channel latent statistics of Wan 2.1 (wan/modules/vae.py `WanVAE`; the same defaults in diffusers'
# AutoencoderKLWan config).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

Cache = dict  # {layer: its state between chunks}; one fresh dict per encode / decode call


@dataclass(frozen=True)
class WanVAEConfig:
    dim: int = 96  # width after the encoder's first convolution
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # level widths = dim * dim_mult
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per level transition; the decoder reverses it
    z_dim: int = 16
    has_encoder: bool = True
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per level "
                             f"transition), got {len(self.temporal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean / latents_std need {self.z_dim} values (one per latent channel), got "
                             f"{len(self.latents_mean)} / {len(self.latents_std)}")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# --------------------------------------------------------------------------------------------------- layers
class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and by 2*p on the left only in time. With a cache, the left padding
    is the previous chunk's last input frames (zeros before the first chunk), so chunked = whole-video output."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(cin, cout, k, stride=stride, padding=(0, p[1], p[2]))
        self.time_pad = 2 * p[0]

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.time_pad:
            prev = None if cache is None else cache.get(self)
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0)) if prev is None else torch.cat([prev, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.time_pad:].clone()  # a copy: the chunk itself can be freed
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / ||x|| over channels, times sqrt(C) and a per-channel gain (`gamma`, shaped to broadcast)."""

    def __init__(self, dim: int, frames: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1, 1) if frames else (1, 1))))
        self.scale = dim ** 0.5

    def forward(self, x: Tensor) -> Tensor:
        # normalised in fp32 (bf16 support), scaled in place: one full-size temporary, not three
        return F.normalize(x.float(), dim=1).mul_(self.scale).to(x.dtype).mul_(self.gamma)


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), shortcut 1x1x1 when the width changes. `residual` keeps the
    indices of the stored names (0 norm, 2 conv, 3 norm, 6 conv); the slots in between hold no weights."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
                                      RMSNorm(cout), nn.SiLU(), nn.Identity(),  # dropout 0 in Wan
                                      CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x), inplace=True), cache)
        h = r[6](F.silu(r[3](h), inplace=True), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (over its H*W positions); 1x1 convs for qkv and out."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, frames=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        q, k, v = self.to_qkv(self.norm(y)).reshape(b * t, 3, c, h * w).transpose(-1, -2).unsqueeze(2).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c], scale 1/sqrt(c)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """Spatial x2 down (zero pad right/bottom, 3x3 stride 2) or up (nearest x2, 3x3 conv to C/2 channels), per
    frame, with an optional time part (`time_conv`; see the module docstring for its first-frame rule)."""

    def __init__(self, dim: int, up: bool, temporal: bool):
        super().__init__()
        self.up, self.temporal = up, temporal
        conv = nn.Conv2d(dim, dim // 2, 3, padding=1) if up else nn.Conv2d(dim, dim, 3, stride=2)
        self.resample = nn.Sequential(nn.Identity(), conv)  # stored as resample.1
        if temporal:
            self.time_conv = (CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if up
                              else CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)))

    def _spatial(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        if self.up:  # nearest-exact x2 (= nearest for a factor 2), in fp32 as Wan (bf16 support)
            y = F.interpolate(y.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)
        else:
            y = F.pad(y, (0, 1, 0, 1))
        y = self.resample[1](y)
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)

    def _time_up(self, x: Tensor, cache: Cache) -> Tensor:
        head = None
        if cache.get(self) is None:  # the chunk holding frame 0: it stays one frame
            cache[self] = True
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache)  # [b, 2c, t, h, w]: channel halves are frames 2i and 2i+1
            x = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return x if head is None else torch.cat([head, x], dim=2)

    def _time_down(self, x: Tensor, cache: Cache) -> Tensor:
        prev = cache.get(self)
        head, buf = (x[:, :, :1], x) if prev is None else (None, torch.cat([prev, x], dim=2))
        n = (buf.shape[2] - 1) // 2  # windows (0,1,2), (2,3,4), ... that are complete
        cache[self] = buf[:, :, 2 * n:].clone()  # the frame that starts the next window
        y = self.time_conv(buf[:, :, :2 * n + 1]) if n else buf[:, :, :0]
        return y if head is None else torch.cat([head, y], dim=2)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        if self.temporal and self.up:
            x = self._time_up(x, cache)
        x = self._spatial(x)
        if self.temporal and not self.up:
            x = self._time_down(x, cache)
        return x


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, cout: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))  # 0 norm, 2 conv


def _run(layers, x: Tensor, cache: Cache) -> Tensor:
    for layer in layers:
        x = layer(x, cache)
    return x


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        widths = [cfg.dim] + [cfg.dim * m for m in cfg.dim_mult]
        self.conv1 = CausalConv3d(3, widths[0], 3, padding=1)
        layers = []
        for i in range(len(cfg.dim_mult)):
            cin = widths[i]
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, widths[i + 1]))
                cin = widths[i + 1]
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(cin, up=False, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(widths[-1])
        self.head = _head(widths[-1], 2 * cfg.z_dim)  # (mu, log variance)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = _run(self.middle, _run(self.downsamples, self.conv1(x, cache), cache), cache)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        widths = [cfg.dim * m for m in reversed(cfg.dim_mult)]  # per level, deepest first
        temporal = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, widths[0], 3, padding=1)
        self.middle = _middle(widths[0])
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, width))
                cin = width
            if i < len(widths) - 1:
                layers.append(Resample(width, up=True, temporal=temporal[i]))
                cin = width // 2  # the upsampling conv halves the width
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(widths[-1], 3)

    def forward(self, z: Tensor, cache: Cache) -> Tensor:
        x = _run(self.upsamples, _run(self.middle, self.conv1(z, cache), cache), cache)
        return self.head[2](F.silu(self.head[0](x), inplace=True), cache)


# ------------------------------------------------------------------------------------------------------ model
class WanVAE(nn.Module):
    """`encode(videos in [-1,1]) -> normalised latents`, `decode(latents) -> videos` (Wan's mean/std inside).

    Videos are [B, 3, 1+4k, H, W] with H, W multiples of 8; latents [B, 16, 1+k, H/8, W/8]. Both directions run
    chunk by chunk through a feature cache, `chunk` latent frames at a time (1, as Wan: the least memory; more
    is the same result, faster on a GPU, with memory growing with the chunk)."""

    def __init__(self, cfg: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg) if cfg.has_encoder else None
        # after the encoder (on the moments); before the decoder
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1) if cfg.has_encoder else None
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, 1/std) as [1, C, 1, 1, 1] fp32 tensors. Wan multiplies by 1/std and divides by it."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, inv_std

    def _check(self, x: Tensor, channels: int, what: str, frames_rule: bool, chunk: int):
        cfg = self.config
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive number of latent frames, got {chunk!r}")
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, F, H, W], got {list(x.shape)}")
        s, f = cfg.temporal_stride, x.shape[2]
        if frames_rule and (f - 1) % s:
            raise ValueError(f"{what} has {f} frames; the Wan VAE needs 1 + {s}k frames (1, {1 + s}, "
                             f"{1 + 2 * s}, ..., 81)")
        if frames_rule and (x.shape[3] % cfg.spatial_stride or x.shape[4] % cfg.spatial_stride):
            raise ValueError(f"{what} is {x.shape[3]}x{x.shape[4]}; height and width must be multiples of "
                             f"{cfg.spatial_stride}")

    @torch.no_grad()
    def encode(self, videos: Tensor, *, chunk: int = 1) -> Tensor:
        """Videos [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent means [B, z, 1+k, H/8, W/8] (fp32).
        Wan uses the posterior mean (no sampling)."""
        if self.encoder is None:
            raise ValueError("this Wan VAE was loaded without encoder weights: encode is unavailable")
        self._check(videos, 3, "videos", True, chunk)
        x = videos.to(self.dtype)
        step = self.config.temporal_stride * chunk
        starts = [0, 1, *range(1 + step, x.shape[2], step)]  # frame 0 alone, then `chunk` latent frames a call
        cache: Cache = {}
        parts = [self.encoder(x[:, :, a:b], cache) for a, b in zip(starts, [*starts[1:], x.shape[2]]) if b > a]
        del cache
        mu = self.conv1(torch.cat(parts, dim=2))[:, :self.config.z_dim].float()
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    @torch.no_grad()
    def decode(self, latents: Tensor, *, chunk: int = 1, clamp: bool = True) -> Tensor:
        """Normalised latents [B, z, T, h, w] -> videos [B, 3, 1 + 4(T-1), 8h, 8w] (fp32), clamped to [-1, 1]
        unless `clamp=False`. The video is written into one preallocated tensor, chunk by chunk."""
        self._check(latents, self.config.z_dim, "latents", False, chunk)
        mean, inv_std = self._stats(latents)
        z = self.conv2((latents.float() / inv_std + mean).to(self.dtype))
        b, _, t, h, w = z.shape
        s, up = self.config.temporal_stride, self.config.spatial_stride
        out = torch.empty(b, 3, 1 + s * (t - 1), h * up, w * up, dtype=torch.float32, device=z.device)
        cache: Cache = {}
        pos = 0
        for i in range(0, t, chunk):
            y = self.decoder(z[:, :, i:i + chunk], cache)
            out[:, :, pos:pos + y.shape[2]] = y
            pos += y.shape[2]
            del y
        del cache
        return out.clamp_(-1.0, 1.0) if clamp else out
