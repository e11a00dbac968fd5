"""Controls for S²: guiders that ask whether a gain is S²'s own, not randomness, a stronger CFG, or one fixed
skipped block (used by the toy and by experiments/claims). Built on S2Guidance / CFG so that no guidance formula is written twice.
The other controls need no code: ω < 0 is
`S2Guidance(..., allow_negative_omega=True)` and one fixed dropped block is
`SkipLayerGuidance(scale=λ, skip_scale=ω, layers=[b], start=0, stop=1, interval=...)`, whose rule
D_cfg + ω·(D_c - D̂_c) is S² with a mask that never changes.
"""
from __future__ import annotations

import torch

from .base import (CFGOutsideInterval, as_generator, cfg_velocity, check_interval_unit, estimate_from_velocity,
                   flat_dot)
from .cfg import CFG
from .s2 import S2Guidance


class PlaceboS2(S2Guidance):
    """S² with each sub-network deviation D̂ - D_c replaced by zero-mean noise of the same per-sample norm.

    If this does as well as S², S²'s gain is injected randomness, not information in the sub-network. (In 1-D
    the noise is a random sign.) The sub-network passes still run, so the norms are the real ones.
    """

    def reset(self, num_blocks=None, rows=None):
        super().reset(num_blocks, rows)
        self._placebo_generator = as_generator(self.seed + 1_000_003)  # apart from the mask RNG

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond, v_subs = velocities[0], velocities[1], velocities[2:]
        fake = []
        for v_sub in v_subs:
            dev = v_sub - v_cond
            z = torch.randn(dev.shape, generator=self._placebo_generator).to(dev)
            fake.append(v_cond + z * (flat_dot(dev, dev) / flat_dot(z, z).clamp_min(1e-30)).sqrt())
        return super().guide(x, step, passes, [v_cond, v_uncond, *fake])


class KappaProbe(S2Guidance):
    """S², unchanged, that also measures how much of its correction lies along the CFG direction:

        κ = Σ⟨D̂ - D_c, D_c - D_u⟩ / Σ‖D_c - D_u‖²   (sums over samples and guided steps).

    Projecting the correction on Δ = D_c - D_u gives D ≈ D_u + (λ - ω·κ)·Δ, so `effective_scale` λ_eff = λ - ω·κ
    is the CFG scale that S² amounts to along Δ. The sums are over D-space differences, which are -σ times
    the velocity differences. They run over every sampling run (batch) the probe guides until `clear()`:
    the sampler's `reset` at each batch reseeds the masks but keeps the sums.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clear()

    def clear(self) -> None:
        self._num, self._den = 0.0, 0.0

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond, v_subs = velocities[0], velocities[1], velocities[2:]
        if v_subs:
            delta = (v_cond - v_uncond).double()
            dev = (torch.stack(list(v_subs)).mean(0) - v_cond).double()
            w = step.sigma**2
            self._num += w * float(flat_dot(dev, delta).sum())
            self._den += w * float(flat_dot(delta, delta).sum())
        return super().guide(x, step, passes, velocities)

    @property
    def kappa(self) -> float:
        return self._num / self._den if self._den > 0 else 0.0

    @property
    def effective_scale(self) -> float:
        return self.scale - self.omega * self.kappa


class IntervalCFG(CFGOutsideInterval, CFG):
    """CFG at `inner_scale` inside the σ interval and at `scale` outside: the matched-strength control for S²
    (inner_scale = λ_eff from KappaProbe, same interval as S²)."""

    def __init__(self, scale: float, inner_scale: float, interval=(0.1, 0.9), interval_unit: str = "steps"):
        super().__init__(scale=scale, interval=interval)
        self.interval_unit = check_interval_unit(interval_unit)
        if not inner_scale == inner_scale:  # NaN
            raise ValueError("inner_scale must be a number")
        self.inner_scale = float(inner_scale)

    def guide(self, x, step, passes, velocities):
        return estimate_from_velocity(x, step.sigma, cfg_velocity(velocities[0], velocities[1], self.inner_scale))
