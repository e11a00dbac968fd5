"""Classifier-free guidance (Ho & Salimans), in the Imagen/diffusers form D = D_u + w·(D_c - D_u)."""
from .base import COND, UNCOND, Guider, cfg_velocity, check_scale, estimate_from_velocity


class CFG(Guider):
    """Outside `interval` the conditional prediction alone is used (guidance interval, Kynkäänniemi et al.)."""

    def __init__(self, scale: float = 7.0, interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scale = check_scale("scale", scale)

    def guided_passes(self, step):
        return [COND, UNCOND]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond = velocities[:2]
        return estimate_from_velocity(x, step.sigma, cfg_velocity(v_cond, v_uncond, self.scale))


class Conditional(Guider):
    """No guidance: the conditional prediction alone (the λ = 1 baseline, at one pass per step)."""

    def guided_passes(self, step):
        return [COND]

    def guide(self, x, step, passes, velocities):
        return estimate_from_velocity(x, step.sigma, velocities[0])
