"""CFG-Zero* (Fan et al., 2025), on velocities as published.

s* = <v_c, v_u>/‖v_u‖² per sample rescales the unconditional velocity; v = s*·v_u + w·(v_c - s*·v_u). The
first `zero_init_steps` steps output v = 0 (x̂0 = ε̂ = x: the sample stays put while σ drops) and need no network
evaluation. `zero_init_steps` counts like diffusers' `zero_init_steps` (steps i < K are zeroed); the official
repo's `zero_steps` equals K - 1.
"""
import torch

from .base import COND, UNCOND, Estimate, Guider, check_scale, estimate_from_velocity, flat_dot


class CFGZeroStar(Guider):
    def __init__(self, scale: float = 4.0, zero_init_steps: int = 1, use_optimized_scale: bool = True,
                 interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scale = check_scale("scale", scale)
        if int(zero_init_steps) != zero_init_steps or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an integer >= 0, got {zero_init_steps}")
        self.zero_init_steps = int(zero_init_steps)
        self.use_optimized_scale = bool(use_optimized_scale)

    def passes(self, step):
        return [] if step.index < self.zero_init_steps else super().passes(step)

    def combine(self, x, step, passes, velocities):
        if step.index < self.zero_init_steps:
            return Estimate(x, x)
        return super().combine(x, step, passes, velocities)

    def guided_passes(self, step):
        return [COND, UNCOND]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond = (v.float() for v in velocities[:2])
        s = 1.0
        if self.use_optimized_scale:
            s = flat_dot(v_cond, v_uncond) / (flat_dot(v_uncond, v_uncond) + 1e-8)
        v = s * v_uncond + self.scale * (v_cond - s * v_uncond)
        return estimate_from_velocity(x, step.sigma, v.to(velocities[0].dtype))
