"""The shared algebra of every guider.

Rectified flow: x_σ = (1-σ)·x0 + σ·ε and the network predicts the velocity v = ε - x0. At a fixed (x, σ) the
denoised estimate D = x - σ·v and the noise estimate ε = x + (1-σ)·v are affine maps of v, so any guidance rule
can be written on whichever of the three its paper uses. A guider turns the step's predictions into one
`Estimate` (x̂0, ε̂); the sampler then steps x' = (1-σ')·x̂0 + σ'·ε̂ and never needs to know which guider ran.

A guider only *requests* predictions (`Pass`es); the sampler decides how to batch and run them.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..models.sweep import SKIP, Perturbation


@dataclass(frozen=True)
class Pass:
    """One prediction a guider needs at a step.

    cond: conditional (True) or unconditional/negative (False) input.
    skip: indices of blocks that run as identity (S² sub-networks, SLG): one frozenset for every row, or a
        tuple of frozensets, one per row of the batch (S² masks drawn per image).
    denoiser: another network (Autoguidance's weak model); None means the sampler's main denoiser.
    perturb: (block, Perturbation) pairs for the other perturbations (PAG's identity attention, SEG's blur).
    """

    cond: bool = True
    skip: frozenset = frozenset()
    denoiser: Callable | None = None
    perturb: frozenset = frozenset()

    @property
    def plan(self):
        """What the denoiser's `skip=` gets: the skip set itself when nothing else is perturbed (so skip-only
        passes reach the network exactly as before), else a {block: Perturbation} plan."""
        if not self.perturb:
            return self.skip
        return {**{b: SKIP for b in self.skip}, **dict(self.perturb)}

    @property
    def perturbed(self) -> bool:
        return bool(self.skip or self.perturb)


def perturbed_pass(blocks, perturbation: Perturbation) -> Pass:
    """The conditional pass with `perturbation` at every block in `blocks`."""
    return Pass(cond=True, perturb=frozenset((int(b), perturbation) for b in blocks))


COND = Pass(cond=True)
UNCOND = Pass(cond=False)


@dataclass(frozen=True)
class Step:
    """Where the sampler is: step `index` of `num_steps`, going from `sigma` to `sigma_next`."""

    index: int
    num_steps: int
    sigma: float
    sigma_next: float


class Estimate(NamedTuple):
    """The step's guided estimate: denoised x̂0 and noise ε̂ (both shaped like x)."""

    x0: Tensor
    eps: Tensor


def _bcast(sigma, x: Tensor):
    """σ as a scalar or as a [B] tensor broadcast against x."""
    if isinstance(sigma, Tensor) and sigma.ndim == 1:
        return sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma


def denoised(x: Tensor, sigma, v: Tensor) -> Tensor:
    """D = x - σ·v."""
    return x - _bcast(sigma, x) * v


def noise(x: Tensor, sigma, v: Tensor) -> Tensor:
    """ε = x + (1-σ)·v."""
    return x + (1 - _bcast(sigma, x)) * v


def velocity_from_denoised(x: Tensor, sigma, d: Tensor) -> Tensor:
    """v = (x - D)/σ (σ > 0)."""
    return (x - d) / _bcast(sigma, x)


def estimate_from_velocity(x: Tensor, sigma, v: Tensor) -> Estimate:
    return Estimate(denoised(x, sigma, v), noise(x, sigma, v))


def estimate_from_denoised(x: Tensor, sigma, d: Tensor) -> Estimate:
    """The estimate whose Euler step uses the same v that D implies: ε = (x - (1-σ)·D)/σ."""
    s = _bcast(sigma, x)
    return Estimate(d, (x - (1 - s) * d) / s)


def check_scale(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_interval(interval: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be a pair [lo, hi], got {interval!r}") from None
    if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
        raise ValueError(f"interval must lie in [0, 1] (σ or step fractions), got [{lo}, {hi}]")
    if lo > hi:
        raise ValueError(f"interval is reversed: [{lo}, {hi}] (expected [lo, hi] with lo <= hi)")
    return lo, hi


INTERVAL_UNITS = ("sigma", "steps")


def check_interval_unit(unit: str) -> str:
    if unit not in INTERVAL_UNITS:
        raise ValueError(f"interval_unit must be one of {INTERVAL_UNITS}, got {unit!r}")
    return unit


def in_step_window(step: "Step", lo: float, hi: float) -> bool:
    """Step `index` of N lies in the window [lo, hi) of step fractions, by diffusers' rule for its guiders'
    start/stop (diffusers/guiders/classifier_free_guidance.py): int(lo·N) <= index < int(hi·N)."""
    n = step.num_steps
    return int(lo * n) <= step.index < int(hi * n)


def check_layers(layers) -> frozenset:
    """Fixed block indices (SLG, PAG, SEG): a non-empty set of indices >= 0 (the upper bound is checked at reset)."""
    out = frozenset(int(i) for i in layers)
    if not out or min(out) < 0:
        raise ValueError(f"layers must be a non-empty list of block indices >= 0, got {list(layers)}")
    return out


def check_window(start: float, stop: float) -> tuple[float, float]:
    """A step window as fractions of the steps (the SD3 pipelines' skip_layer_guidance_start/stop)."""
    if not 0.0 <= start <= stop <= 1.0:
        raise ValueError(f"need 0 <= start <= stop <= 1 (fractions of the steps), got start={start}, stop={stop}")
    return float(start), float(stop)


class Guider:
    """Base class: a σ interval, the passes to request, and the combination rule.

    Subclasses implement `guided_passes` / `guide` (the rule inside the interval). Outside the interval the
    guider falls back to `fallback_passes` / `fallback` — the conditional prediction unless the method's paper
    says otherwise (S² and SLG fall back to plain CFG).
    """

    def __init__(self, interval: Sequence[float] = (0.0, 1.0), interval_unit: str = "sigma"):
        self.interval = check_interval(interval)
        self.interval_unit = check_interval_unit(interval_unit)

    # -- life cycle -------------------------------------------------------------------------------------------
    def reset(self, num_blocks: int | None = None, rows: Sequence[int] | None = None) -> None:
        """Called by the sampler at the start of every sampling run (clears state, reseeds RNGs). `rows`: one
        integer key per batch row (the image's own seed), for guiders that draw randomness per image."""

    def active(self, step: Step) -> bool:
        """Inside `interval`: σ ∈ [lo, hi] (interval_unit "sigma"), or the step's fraction of the run in
        [lo, hi) (interval_unit "steps", see `in_step_window`)."""
        lo, hi = self.interval
        if self.interval_unit == "steps":
            return in_step_window(step, lo, hi)
        return lo <= step.sigma <= hi

    def perturbations(self) -> frozenset:
        """Kinds of block perturbation beyond skipping that this guider's passes may ask for (the sampler checks
        the denoiser can do them before the first step)."""
        return frozenset()

    # -- what to run ------------------------------------------------------------------------------------------
    def passes(self, step: Step) -> list[Pass]:
        return self.guided_passes(step) if self.active(step) else self.fallback_passes(step)

    def combine(self, x: Tensor, step: Step, passes: Sequence[Pass], velocities: Sequence[Tensor]) -> Estimate:
        """Combine the velocities predicted for `passes` (same order) into the step's estimate."""
        if self.active(step):
            return self.guide(x, step, passes, velocities)
        return self.fallback(x, step, passes, velocities)

    # -- to override ------------------------------------------------------------------------------------------
    def guided_passes(self, step: Step) -> list[Pass]:
        raise NotImplementedError

    def guide(self, x: Tensor, step: Step, passes, velocities) -> Estimate:
        raise NotImplementedError

    def fallback_passes(self, step: Step) -> list[Pass]:
        return [COND]

    def fallback(self, x: Tensor, step: Step, passes, velocities) -> Estimate:
        return estimate_from_velocity(x, step.sigma, velocities[0])

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """v_u + w·(v_c - v_u): the same rule in D, v or ε, since the weights sum to 1."""
    return v_uncond + scale * (v_cond - v_uncond)


class CFGOutsideInterval:
    """Mixin for methods whose paper falls back to plain CFG (at `self.scale`) outside their window."""

    def fallback_passes(self, step: Step) -> list[Pass]:
        return [COND, UNCOND]

    def fallback(self, x: Tensor, step: Step, passes, velocities) -> Estimate:
        return estimate_from_velocity(x, step.sigma, cfg_velocity(velocities[0], velocities[1], self.scale))


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample <a, b> over all non-batch dims, kept broadcastable against a."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def row_seed(seed: int, key: int) -> int:
    """A 63-bit seed that is a pure function of a guider's seed and a row's key (its image's own seed)."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{int(key)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def as_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g
