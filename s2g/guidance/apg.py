"""Adaptive Projected Guidance (Sadat et al., ICLR 2025), applied to denoised predictions as the paper does.

Δ = D_c - D_u goes through reverse momentum, an L2 norm clip and a split into the parts parallel and orthogonal
to D_c; D = D_c + (w-1)·(Δ⊥ + η·Δ∥). Not invariant to the parametrisation, hence D-space (not v) on purpose.
"""
import math

import torch

from .base import COND, UNCOND, Guider, check_scale, denoised, estimate_from_denoised, flat_dot


class APG(Guider):
    def __init__(self, scale: float = 7.0, momentum: float = -0.5, norm_threshold: float = 15.0,
                 eta: float = 0.0, interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scale = check_scale("scale", scale)
        if not math.isfinite(momentum) or abs(momentum) >= 1:
            raise ValueError(f"momentum must satisfy |momentum| < 1, got {momentum}")
        self.momentum = float(momentum)
        self.norm_threshold = check_scale("norm_threshold", norm_threshold)  # 0 disables the clip
        self.eta = check_scale("eta", eta)
        self._buffer = None

    def reset(self, num_blocks=None, rows=None):
        self._buffer = None

    def guided_passes(self, step):
        return [COND, UNCOND]

    def guide(self, x, step, passes, velocities):
        d_cond, d_uncond = (denoised(x, step.sigma, v) for v in velocities[:2])
        diff = d_cond - d_uncond
        if self.momentum != 0:
            self._buffer = diff if self._buffer is None else diff + self.momentum * self._buffer
            diff = self._buffer
        if self.norm_threshold > 0:
            norm = flat_dot(diff, diff).sqrt()
            diff = diff * torch.clamp(self.norm_threshold / norm.clamp_min(1e-12), max=1.0)
        # Projection in float64: D_c and Δ are nearly parallel late in sampling, where float32 cancels badly.
        d64, diff64 = d_cond.double(), diff.double()
        parallel = flat_dot(diff64, d64) / flat_dot(d64, d64).clamp_min(1e-30) * d64
        update = (diff64 - parallel) + self.eta * parallel
        guided = d_cond + (self.scale - 1) * update.to(d_cond.dtype)
        return estimate_from_denoised(x, step.sigma, guided)
