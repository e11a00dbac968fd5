"""S²-Guidance (Chen et al., arXiv 2508.12880): stochastic self-guidance with block-dropped sub-networks.

Each guided step also runs the conditional prediction through a sub-network — the same model with a random
~10% of its blocks run as identity (never a protected "key" block; the first block by default) — and steers
away from it (Algorithm 1, "difference" form):

    D = D_u + λ·(D_c - D_u) - ω·mean_i(D̂_i - D_c),   i = 1..N masks, drawn fresh every step.

N = 1 is S²; N > 1 is naive S². The weights sum to 1, so this is computed on velocities. The paper's appendix
writes the last term as -ω·mean(D̂) (weights sum to 1-ω, a global shrink of x̂0): `form="appendix"` applies
exactly that, on D, for comparison only.

Where: the paper applies S² in "the central 80%" of the denoising process and plain CFG elsewhere, without
saying whether in σ or in steps. The default reads it as step fractions, `interval=(0.1, 0.9)` with
`interval_unit="steps"`: with SD3's 28 steps that is steps 2-24 (23 steps), which is what the paper's cost table
implies (168.4 -> 237.6 TFLOPs, x1.41 = (56 + 23)/56 passes with a full-cost sub-network pass). The σ reading,
σ ∈ [0.1, 0.9] (`interval_unit="sigma"`), covers only 20 of those 28 steps at shift 3.

Masks: each image draws its own, from a generator seeded by (`seed`, the image's key) that the sampler hands
to `reset(..., rows=keys)`; so an image's masks, like its noise, do not depend on the batch it is sampled in.
Without keys (a bare `sample()` call) one generator draws one mask per step for the whole batch. The mask
generators never touch the noise generator, and ω = 0 requests no sub-network pass, so it reproduces CFG
exactly.
"""
import math

import torch

from .base import (COND, UNCOND, CFGOutsideInterval, Guider, Pass, as_generator, cfg_velocity, check_scale,
                   denoised, estimate_from_denoised, estimate_from_velocity, row_seed)

FORMS = ("difference", "appendix")


def num_dropped(drop_ratio: float, num_blocks: int) -> int:
    """round(drop_ratio · #blocks), half up, and at least one block."""
    return max(1, math.floor(drop_ratio * num_blocks + 0.5))


class S2Guidance(CFGOutsideInterval, Guider):
    def __init__(self, scale: float = 7.5, omega: float = 0.25, num_subnetworks: int = 1, drop_ratio: float = 0.1,
                 protected_blocks=(0,), interval=(0.1, 0.9), interval_unit: str = "steps", seed: int = 0,
                 form: str = "difference", num_blocks: int | None = None, allow_negative_omega: bool = False):
        super().__init__(interval, interval_unit)
        self.scale = check_scale("scale", scale)
        if not math.isfinite(omega) or (omega < 0 and not allow_negative_omega):
            raise ValueError(f"omega must be >= 0, got {omega} (negative ω is only for the sign-flip control: "
                             "set allow_negative_omega=true)")
        self.omega = float(omega)
        if int(num_subnetworks) != num_subnetworks or num_subnetworks < 1:
            raise ValueError(f"num_subnetworks must be an integer >= 1, got {num_subnetworks}")
        self.num_subnetworks = int(num_subnetworks)
        if not 0.0 < drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must be in (0, 1), got {drop_ratio}")
        self.drop_ratio = float(drop_ratio)
        self.protected_blocks = frozenset(int(b) for b in protected_blocks)
        if any(b < 0 for b in self.protected_blocks):
            raise ValueError(f"protected_blocks must be block indices >= 0, got {sorted(self.protected_blocks)}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.seed = int(seed)
        self.num_blocks = None
        self._droppable = None
        self._generators = None
        if num_blocks is not None:
            self.reset(num_blocks)

    def reset(self, num_blocks=None, rows=None):
        if num_blocks is not None:
            droppable = [b for b in range(num_blocks) if b not in self.protected_blocks]
            if not droppable:
                raise ValueError(f"protected_blocks {sorted(self.protected_blocks)} leave none of the "
                                 f"{num_blocks} blocks to drop")
            k = num_dropped(self.drop_ratio, num_blocks)
            if k > len(droppable):
                raise ValueError(f"drop_ratio {self.drop_ratio} drops {k} of {num_blocks} blocks but only "
                                 f"{len(droppable)} are not protected")
            self.num_blocks, self._droppable = num_blocks, torch.tensor(droppable)
        if self._droppable is None:
            raise ValueError("S2Guidance needs the model's number of blocks: reset(num_blocks) before sampling")
        if rows is None:
            self._generators = [as_generator(self.seed)]
        else:
            self._generators = [as_generator(row_seed(self.seed, key)) for key in rows]

    def _draw(self, generator) -> frozenset:
        k = num_dropped(self.drop_ratio, self.num_blocks)
        order = torch.randperm(len(self._droppable), generator=generator)
        return frozenset(self._droppable[order[:k]].tolist())

    def sample_mask(self):
        """One sub-network: a uniformly random set of round(drop_ratio·#blocks) unprotected blocks to skip, for
        the whole batch (a frozenset), or one per row (a tuple of frozensets) when the rows have keys."""
        masks = tuple(self._draw(g) for g in self._generators)
        return masks[0] if len(masks) == 1 else masks

    def guided_passes(self, step):
        if self.omega == 0:
            return [COND, UNCOND]
        return [COND, UNCOND] + [Pass(cond=True, skip=self.sample_mask()) for _ in range(self.num_subnetworks)]

    def guide(self, x, step, passes, velocities):
        v_cond, v_uncond, v_subs = velocities[0], velocities[1], velocities[2:]
        v_cfg = cfg_velocity(v_cond, v_uncond, self.scale)
        if not v_subs:
            return estimate_from_velocity(x, step.sigma, v_cfg)
        v_sub = torch.stack(list(v_subs)).mean(0)
        if self.form == "difference":
            return estimate_from_velocity(x, step.sigma, v_cfg - self.omega * (v_sub - v_cond))
        # Appendix reading: D_cfg - ω·mean(D̂), literally, in D-space.
        d = denoised(x, step.sigma, v_cfg) - self.omega * denoised(x, step.sigma, v_sub)
        return estimate_from_denoised(x, step.sigma, d)
