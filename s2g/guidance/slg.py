"""Skip-layer guidance (Stability SD3.5; STG-R has the same algebra).

D = D_u + w·(D_c - D_u) + s·(D_c - D_c,skip), where D_c,skip is the conditional pass with fixed blocks run as
identity. Active on steps start·N < i < stop·N (strict, as the SD3 pipeline) and inside `interval` (σ, or step
fractions with interval_unit="steps", as S²'s window); plain CFG elsewhere. Weights sum to 1, so the rule is the same on D or v.
"""
from .base import (COND, UNCOND, CFGOutsideInterval, Guider, Pass, cfg_velocity, check_layers, check_scale,
                   check_window, estimate_from_velocity)


class SkipLayerGuidance(CFGOutsideInterval, Guider):
    def __init__(self, scale: float = 4.0, skip_scale: float = 2.8, layers=(7, 8, 9), start: float = 0.01,
                 stop: float = 0.2, interval=(0.0, 1.0), interval_unit: str = "sigma"):
        super().__init__(interval, interval_unit)
        self.scale = check_scale("scale", scale)
        self.skip_scale = check_scale("skip_scale", skip_scale)
        self.layers = check_layers(layers)
        self.start, self.stop = check_window(start, stop)

    def reset(self, num_blocks=None, rows=None):
        if num_blocks is not None and max(self.layers) >= num_blocks:
            raise ValueError(f"layers {sorted(self.layers)} out of range for a model with {num_blocks} blocks")

    def active(self, step):
        n = step.num_steps
        return super().active(step) and self.start * n < step.index < self.stop * n

    def guided_passes(self, step):
        return [COND, UNCOND, Pass(cond=True, skip=self.layers)]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond, v_skip = velocities[:3]
        v = cfg_velocity(v_cond, v_uncond, self.scale) + self.skip_scale * (v_cond - v_skip)
        return estimate_from_velocity(x, step.sigma, v)
