"""Rectified-flow sampling: σ schedules, samplers, and the loop that runs a guider over a denoiser."""
from __future__ import annotations

import torch

from ..guidance.base import Guider
from .guided import GuidedDenoiser
from .samplers import SAMPLERS, sample_dpmpp_2m, sample_euler, sample_heun, sample_unipc
from .schedules import DiscreteTimesteps, sd3_sigmas, shift_sigma, uniform_sigmas, wan_sigmas, wan_timesteps


@torch.no_grad()
def sample(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, guider: Guider, cond: dict,
           uncond: dict | None = None, *, sampler: str = "euler", progress: bool = True,
           share_prefix: bool = True, rows=None) -> torch.Tensor:
    """Integrate from `noise` (at σ = sigmas[0], normally 1) to σ = 0 and return the final sample.

    `denoiser(x, sigma, *, skip=..., **cond) -> velocity`; `cond` / `uncond` are dicts of batched tensors.
    The guider is reset first (state, mask RNG), so the same inputs always give the same output. `rows`: one
    integer key per row of `noise` (its image's own seed): guiders that draw randomness per image (S² masks)
    seed it from the key, so a row's output does not depend on the other rows of its batch.
    `share_prefix`: run a step's passes through one network as one batched sweep over its blocks, cond and
    uncond rows together and sub-network rows forking at their first skipped block (needs
    `denoiser.forward_shared`; equal to separate passes up to float rounding).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if rows is not None and len(rows) != noise.shape[0]:
        raise ValueError(f"{len(rows)} row keys for a batch of {noise.shape[0]}")
    guider.reset(getattr(denoiser, "num_blocks", None), rows=None if rows is None else [int(r) for r in rows])
    guided = GuidedDenoiser(denoiser, guider, cond, uncond, share_prefix)
    return SAMPLERS[sampler](guided, noise, sigmas, progress=progress)


__all__ = ["sample", "sd3_sigmas", "shift_sigma", "uniform_sigmas", "GuidedDenoiser", "SAMPLERS",
           "sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_unipc", "wan_sigmas", "wan_timesteps",
           "DiscreteTimesteps"]
