"""CFG++ (Chung et al., ICLR 2025): guide the denoised estimate with a small λ, renoise with the *unconditional* ε.

In rectified-flow Euler form x' = (1-σ')·D_λ + σ'·ε_u, which equals Euler-CFG with the per-step scale
w_eff = λ·σ(1-σ')/(σ-σ') (substitute ε_u = x + (1-σ)·v_u and compare with x + (σ'-σ)·v_cfg). Expressed as an estimate (x̂0 = D_λ, ε̂ = ε_u) it needs no
sampler of its own.
"""
from .base import COND, UNCOND, Estimate, Guider, check_scale, denoised, noise


class CFGPlusPlus(Guider):
    def __init__(self, scale: float = 0.6, interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scale = check_scale("scale", scale)  # λ; the paper uses λ ∈ [0, 1]

    def guided_passes(self, step):
        return [COND, UNCOND]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond = velocities[:2]
        d_cond, d_uncond = denoised(x, step.sigma, v_cond), denoised(x, step.sigma, v_uncond)
        return Estimate(d_uncond + self.scale * (d_cond - d_uncond), noise(x, step.sigma, v_uncond))
