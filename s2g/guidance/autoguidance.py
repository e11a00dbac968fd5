"""Autoguidance (Karras et al., NeurIPS 2024): guide the conditional model away from a weaker version of itself.

D = D_w + w·(D_c - D_w), with D_w the *weak* model (smaller and/or trained less) given the same condition. The
weak denoiser is supplied by the caller (scripts load it from the model config's `weak_checkpoint`).
"""
from .base import COND, Guider, Pass, cfg_velocity, check_scale, estimate_from_velocity


class AutoGuidance(Guider):
    needs_weak_model = True  # the pipeline hands it its weak denoiser (model.weak_checkpoint) when none is given

    def __init__(self, scale: float = 2.0, weak=None, interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scale = check_scale("scale", scale)
        self.weak = weak

    def guided_passes(self, step):
        if self.weak is None:
            raise ValueError("AutoGuidance needs a weak denoiser: construct it with weak=<model> "
                             "(scripts load it from model.weak_checkpoint)")
        return [COND, Pass(cond=True, denoiser=self.weak)]

    def guide(self, x, step, passes, velocities):
        v_cond, v_weak = velocities[:2]
        return estimate_from_velocity(x, step.sigma, cfg_velocity(v_cond, v_weak, self.scale))

    def __repr__(self):
        return f"AutoGuidance(scale={self.scale}, weak={'set' if self.weak is not None else None}, interval={self.interval})"
