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


def _log_snr(sigma: float) -> float:
    """λ = log((1-σ)/σ), +inf at σ = 0."""
    return math.inf if sigma == 0 else math.log(1 - sigma) - math.log(sigma)


def _unipc_base(x, m0, s, s_next, h):
    """The first-order (DDIM / Euler) part of a UniPC step in data prediction: (σ'/σ)·x - (1-σ')·(e^-h - 1)·x̂0."""
    return x * (s_next / s) - m0 * ((1 - s_next) * math.expm1(-h))


def sample_unipc(guided, x, sigmas, *, progress: bool = True):
    """Wan 2.1's sampler: multistep UniPC (Zhao et al., NeurIPS 2023) for flow matching, as Wan's
    FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py) and diffusers' UniPCMultistepScheduler with
    `prediction_type="flow_prediction"`, `use_flow_sigmas=True` run it: data prediction (x̂0), solver order 2,
    B(h) = e^-h - 1 ("bh2"), in λ = log((1-σ)/σ).

    One guided evaluation per step. The predictor steps from σ_i to σ_i+1 with x̂0_i (and x̂0_i-1 from step 1
    on, ρ = 1/2); from step 1 on the corrector (UniC) first redoes the previous step with the new x̂0_i, with no
    extra evaluation. Orders: 1 at the first step (warm-up) and at the last one (`lower_order_final`), 2 in
    between; the last step lands on σ = 0 and returns x̂0 exactly. A first-order step is exactly Euler on the
    estimate, (1-σ')·x̂0 + σ'·ε̂; as in dpmpp_2m the step starts from the point the estimate is consistent
    with, (1-σ)·x̂0 + σ·ε̂ (x itself for most guiders; CFG++'s renoising otherwise). A σ of 1 is read as
    1 - 1e-6 by the solver (λ is -inf there), as diffusers nudges its grid; Wan's grid starts below 1.
    """
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    sol = [min(s, 1 - 1e-6) for s in sig]  # the solver's σ
    lam = [_log_snr(s) for s in sol]
    x0s: list = []  # the last two data predictions, oldest first
    last, last_order = None, 0
    for step in _steps(sigmas, progress, "unipc"):
        i = step.index
        x0, eps = guided(x, step)
        x_hat = (1 - step.sigma) * x0 + step.sigma * eps
        if last is None:
            start = x_hat
        else:  # UniC: the step σ_i-1 -> σ_i again, with x̂0_i as well
            h = lam[i] - lam[i - 1]
            base = _unipc_base(last, x0s[-1], sol[i - 1], sol[i], h)
            if last_order == 1:
                corr = (x0 - x0s[-1]) * 0.5
            else:  # ρ solves [[1, 1], [r, 1]]·ρ = b, b_k from the φ_k(h) recursion (bh2)
                hh = -h
                b_h = math.expm1(hh)
                phi_1 = b_h / hh - 1
                phi_2 = phi_1 / hh - 0.5
                b1, b2 = phi_1 / b_h, 2 * phi_2 / b_h
                r = (lam[i - 2] - lam[i - 1]) / h
                rho_d = (b1 - b2) / (1 - r)
                corr = (x0s[-2] - x0s[-1]) * (rho_d / r) + (x0 - x0s[-1]) * (b1 - rho_d)
            corrected = base - corr * ((1 - sol[i]) * math.expm1(-h))
            start = corrected + (x_hat - x)  # the guider's own offset from x, if any, is kept
        x0s = (x0s + [x0])[-2:]
        order = min(2, n - i, i + 1)
        last, last_order = start, order
        h = lam[i + 1] - lam[i]
        x = _unipc_base(start, x0, sol[i], sol[i + 1], h)
        if order == 2:
            r = (lam[i - 1] - lam[i]) / h
            x = x - (x0s[0] - x0) * ((1 - sol[i + 1]) * math.expm1(-h) * 0.5 / r)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "unipc": sample_unipc}
