"""Perturbed-attention guidance (PAG, Ahn et al. 2024, arXiv 2403.17377).

D = D_u + w·(D_c - D_u) + s·(D_c - D_c,ptb), where D_c,ptb is the conditional pass with the self-attention map
of chosen blocks replaced by the identity. In SD3's joint attention that means (as diffusers'
PAGJointAttnProcessor2_0) each image token attends to itself and to the text tokens; text tokens are unchanged.
Defaults are diffusers' PerturbedAttentionGuidance (w = 7.5, s = 2.8, active on steps int(start·N) < i <
int(stop·N)) with its SD3 PAG pipeline's layer (block 1); plain CFG elsewhere and outside the σ interval.
Weights sum to 1, so the rule is the same on D, v or ε.
"""
from ..models.sweep import IDENTITY_ATTENTION, Perturbation
from .base import (COND, UNCOND, CFGOutsideInterval, Guider, cfg_velocity, check_layers, check_scale, check_window,
                   estimate_from_velocity, perturbed_pass)


class PerturbedAttentionGuidance(CFGOutsideInterval, Guider):
    perturbation: Perturbation = IDENTITY_ATTENTION

    def __init__(self, scale: float = 7.5, perturbed_scale: float = 2.8, layers=(1,), start: float = 0.01,
                 stop: float = 0.2, interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scale = check_scale("scale", scale)
        self.perturbed_scale = check_scale("perturbed_scale", perturbed_scale)
        self.layers = check_layers(layers)
        self.start, self.stop = check_window(start, stop)

    def perturbations(self):
        return frozenset({self.perturbation.kind})

    def reset(self, num_blocks=None, rows=None):
        if num_blocks is not None and max(self.layers) >= num_blocks:
            raise ValueError(f"layers {sorted(self.layers)} out of range for a model with {num_blocks} blocks")

    def active(self, step):
        n = step.num_steps  # diffusers' window: int() of both ends, strict on both sides
        return super().active(step) and int(self.start * n) < step.index < int(self.stop * n)

    def guided_passes(self, step):
        return [COND, UNCOND, perturbed_pass(self.layers, self.perturbation)]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond, v_ptb = velocities[:3]
        v = cfg_velocity(v_cond, v_uncond, self.scale) + self.perturbed_scale * (v_cond - v_ptb)
        return estimate_from_velocity(x, step.sigma, v)
