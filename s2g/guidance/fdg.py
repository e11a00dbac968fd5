"""Frequency-decoupled guidance (FDG, Sadat et al. 2025, arXiv 2506.19713).

Split the conditional and unconditional predictions into a Laplacian pyramid (levels from the finest detail to
the coarsest average) and apply CFG per level with its own scale, then rebuild: high scales for details, low for
the layout and colours. Optional `parallel_weights` damp each level's CFG shift along the conditional level
(APG-style projection, float64). A video [B, C, F, H, W] gets the pyramid of each frame (a spatial split, as the
method is defined for images; frames are never mixed), and the projection is taken per sample over the whole
video, as for an image. The pyramid is kornia's (5x5 binomial blur, reflect borders, bilinear
resampling with align_corners=False), as diffusers' FrequencyDecoupledGuidance uses it; defaults are diffusers'
(scales [10, 5] from fine to coarse, parallel weights 1, everywhere). With parallel weights 1 every level is an
affine rule with weights summing to 1 and the pyramid is linear and exactly invertible, so the result is the same
on D, v or ε; the projection is done on v, the network's output (what diffusers does on SD3).
"""
import math

import torch
import torch.nn.functional as F

from .base import COND, UNCOND, Guider, check_scale, estimate_from_velocity

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """`fn` on images [B, C, H, W] as given; on videos [B, C, F, H, W] on every frame, the frames folded into the
    batch (the pyramid is spatial: frames are never mixed)."""
    if x.ndim == 4:
        return fn(x)
    if x.ndim != 5:
        raise ValueError(f"FDG needs images [B, C, H, W] or videos [B, C, F, H, W], got shape {list(x.shape)}")
    B, _, T = x.shape[:3]
    return fn(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (B, T)).transpose(1, 2)


def _down(x):
    return _per_frame(lambda y: F.interpolate(_blur(y), size=(y.shape[-2] // 2, y.shape[-1] // 2), mode="bilinear",
                                              align_corners=False), x)


def _up(x):
    return _per_frame(lambda y: _blur(F.interpolate(y, size=(2 * y.shape[-2], 2 * y.shape[-1]), mode="bilinear",
                                                    align_corners=False)), x)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[detail_0, ..., detail_{L-2}, coarse]; `rebuild` inverts it exactly."""
    h, w = x.shape[-2:]
    if h % (1 << (levels - 1)) or w % (1 << (levels - 1)):
        raise ValueError(f"FDG with {levels} levels needs sides divisible by {1 << (levels - 1)}, got {h}x{w}")
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [g - _up(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


def rebuild(pyramid: list[torch.Tensor]) -> torch.Tensor:
    out = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        out = _up(out) + level
    return out


def _damp_parallel(shift: torch.Tensor, along: torch.Tensor, weight: float) -> torch.Tensor:
    """weight·shift∥ + shift⊥, the parallel part taken along `along` per sample (float64)."""
    s, a = shift.double(), along.double()
    a = a / a.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (a.ndim - 1)))
    par = (s * a).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1))) * a
    return (weight * par + (s - par)).to(shift.dtype)


class FDG(Guider):
    def __init__(self, scales=(10.0, 5.0), parallel_weights=None, interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scales = [check_scale("scales[i]", float(w)) for w in scales]
        if not self.scales:
            raise ValueError("scales must list one guidance scale per pyramid level (finest first)")
        weights = [1.0] * len(self.scales) if parallel_weights is None else parallel_weights
        if isinstance(weights, (int, float)):
            weights = [float(weights)] * len(self.scales)
        if len(weights) != len(self.scales) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"parallel_weights must be one finite number per level ({len(self.scales)}), "
                             f"got {parallel_weights}")
        self.parallel_weights = [float(w) for w in weights]

    def guided_passes(self, step):
        return [COND, UNCOND]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond = velocities[:2]
        levels = len(self.scales)
        guided = []
        for c, u, w, pw in zip(laplacian_pyramid(v_cond, levels), laplacian_pyramid(v_uncond, levels),
                               self.scales, self.parallel_weights):
            shift = c - u if pw == 1.0 else _damp_parallel(c - u, c, pw)
            guided.append(u + w * shift)
        return estimate_from_velocity(x, step.sigma, rebuild(guided))
