"""Tangential-damping CFG (TCFG, Kwon et al., CVPR 2025, arXiv 2503.18137).

Per sample, stack the flattened conditional and unconditional predictions as a 2 x N matrix and keep only the
part of the unconditional prediction along its first right-singular vector (the direction both share most):
u' = <u, r1>·r1; then P = u' + w·(c - u'). The rank-2 SVD is read off the 2 x 2 Gram matrix (its top
eigenvector a gives r1 ∝ Mᵀa), in float64. The rule is not affine, so its space matters: `space="v"` (the
default: the network's own output, what diffusers' TangentialClassifierFreeGuidance sees on SD3) or `"eps"` (the
paper's SD models predict noise; at σ = 1 every ε̂ equals x, so that step is guided on v). Defaults are
diffusers' (w = 7.5, everywhere); outside the σ interval the conditional prediction alone.
"""
import torch

from .base import COND, UNCOND, Guider, check_scale, estimate_from_velocity, noise

SPACES = ("eps", "v")


def tangential_damping(c: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """u' + w·(c - u') with u' the projection of u on the top right-singular vector of [c; u] (per sample)."""
    m = torch.stack([c.flatten(1), u.flatten(1)], 1).double()  # (B, 2, N)
    _, vecs = torch.linalg.eigh(m @ m.transpose(1, 2))  # ascending eigenvalues: the last column is the top one
    r1 = torch.nn.functional.normalize((m.transpose(1, 2) @ vecs[:, :, -1:]).squeeze(-1), dim=1)
    u_flat = m[:, 1]
    damped = ((u_flat * r1).sum(1, keepdim=True) * r1).reshape(u.shape).to(u.dtype)
    return damped + scale * (c - damped)


class TCFG(Guider):
    def __init__(self, scale: float = 7.5, space: str = "v", interval=(0.0, 1.0)):
        super().__init__(interval)
        self.scale = check_scale("scale", scale)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space

    def guided_passes(self, step):
        return [COND, UNCOND]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond = velocities[:2]
        if self.space == "v":
            return estimate_from_velocity(x, step.sigma, tangential_damping(v_cond, v_uncond, self.scale))
        # ε-space: guide ε, then the velocity that gives it at this (x, σ): v = (ε - x)/(1 - σ).
        s = step.sigma
        if s >= 1:  # at σ = 1, ε = x whatever v is: guide v there (ε's rule has nothing to act on)
            return estimate_from_velocity(x, s, tangential_damping(v_cond, v_uncond, self.scale))
        eps = tangential_damping(noise(x, s, v_cond), noise(x, s, v_uncond), self.scale)
        return estimate_from_velocity(x, s, (eps - x) / (1 - s))
