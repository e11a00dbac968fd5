"""Noise schedules (σ ∈ [0, 1], σ = 1 is pure noise)."""
import torch


def shift_sigma(sigma, shift: float):
    """SD3's resolution shift: σ' = s·σ / (1 + (s-1)·σ), spending more steps at high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sd3_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """`steps + 1` σ values from 1 down to 0, as diffusers' FlowMatchEulerDiscreteScheduler and the sd3.5 code.

    Timesteps are spaced linearly between 1000 and 1000·shift(1/1000) and then shifted, so the smallest
    non-zero σ is shifted twice (0.008929 for 28 steps at shift 3) — kept for parity with both references.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma_min = shift_sigma(1.0 / 1000, shift)
    t = torch.linspace(1.0, sigma_min, int(steps), dtype=torch.float64)
    sigmas = shift_sigma(t, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def uniform_sigmas(steps: int) -> torch.Tensor:
    """σ evenly spaced from 1 to 0 (the toy experiments' grid)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, int(steps) + 1)
