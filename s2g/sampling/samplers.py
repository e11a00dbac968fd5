"""Samplers over a guided denoiser (k-diffusion style: plain functions; guidance lives in the denoiser).

Every step consumes the guider's estimate (x̂0, ε̂). Euler is x' = (1-σ')·x̂0 + σ'·ε̂, which is x + (σ'-σ)·v for
the usual guiders and CFG++'s renoising for CFG++.
"""
from __future__ import annotations

import math

from tqdm.auto import trange

from ..guidance.base import Step


def _steps(sigmas, progress: bool, desc: str):
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    for i in trange(n, disable=not progress, desc=desc, leave=False):
        yield Step(i, n, sig[i], sig[i + 1])


def sample_euler(guided, x, sigmas, *, progress: bool = True):
    for step in _steps(sigmas, progress, "euler"):
        x0, eps = guided(x, step)
        x = (1 - step.sigma_next) * x0 + step.sigma_next * eps
    return x


def sample_dpmpp_2m(guided, x, sigmas, *, progress: bool = True):
    """DPM-Solver++(2M) as k-diffusion and the sd3.5 reference run it on SD3: multistep on x̂0 with
    t = -log σ. Its first-order step (σ'/σ)·x + (1-σ'/σ)·x̂0 is exactly Euler for rectified flow."""
    prev_x0, prev_sigma = None, None
    for step in _steps(sigmas, progress, "dpmpp_2m"):
        x0, eps = guided(x, step)
        s, s_next = step.sigma, step.sigma_next
        if s_next == 0:
            x = x0
        else:
            x_hat = (1 - s) * x0 + s * eps  # the point the estimate is consistent with (x itself for most guiders)
            x0_d = x0
            if prev_x0 is not None:
                r = math.log(prev_sigma / s) / math.log(s / s_next)
                x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = (s_next / s) * x_hat + (1 - s_next / s) * x0_d
        prev_x0, prev_sigma = x0, s
    return x


def sample_heun(guided, x, sigmas, *, progress: bool = True):
    """Heun's second-order method (EDM): an Euler step, a second guided evaluation at its end, and the step
    redone with the mean of both directions; the last step (to σ = 0) stays Euler. Two evaluations per step,
    so stateful guiders (APG momentum) advance twice per step, as the APG paper notes for 2nd-order samplers."""
    for step in _steps(sigmas, progress, "heun"):
        x0, eps = guided(x, step)
        s, s_next = step.sigma, step.sigma_next
        x_hat = (1 - s) * x0 + s * eps  # the point the estimate is consistent with (x itself for most guiders)
        x_next = (1 - s_next) * x0 + s_next * eps
        if s_next > 0:
            x0_2, eps_2 = guided(x_next, Step(step.index, step.num_steps, s_next, s_next))
            x_next = x_hat + (s_next - s) * ((eps - x0) + (eps_2 - x0_2)) / 2
        x = x_next
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}
