"""Exact ground truth: an isotropic Gaussian mixture with one component per class, and its closed-form
rectified-flow denoiser.

Rectified flow noises x0 as x_σ = a·x0 + σ·ε with a = 1 - σ. Given component k, x_σ ~ N(a·μ_k, S·I) with
S = a²s² + σ² (every component has the same std s), so the posterior over components is a softmax of
-‖x - a·μ_k‖²/(2S) + log π_k and

    E[x0 | x_σ] = (a·s²/S)·x + (σ²/S)·Σ_k r_k(x)·μ_k,     v = (x - E[x0 | x_σ]) / σ

Everything is computed in float64 with log-sum-exp, so it stays exact at σ → 0 and far from the modes.
A class-conditional quantity uses only that class's components; the null label (= number of
classes) means the unconditional, class-balanced mixture.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    """Equal-weight isotropic mixture: `means` [K, d], component k belongs to class k (K classes)."""

    def __init__(self, means, std: float = 1.0):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a finite number > 0, got {std}")
        self.std = float(std)
        self.num_classes, self.dim = self.means.shape

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _check_labels(self, label: Tensor, batch: int) -> Tensor:
        label = torch.as_tensor(label).long().reshape(-1)
        if label.shape[0] != batch:
            raise ValueError(f"need one label per sample: {label.shape[0]} labels for {batch} samples")
        if label.min() < 0 or label.max() > self.null_label:
            raise ValueError(f"labels must lie in [0, {self.null_label}] ({self.null_label} = unconditional)")
        return label

    def _allowed(self, label: Tensor) -> Tensor:
        """[B, K] mask of the components each label may use (all of them for the null label)."""
        k = torch.arange(self.num_classes)
        return (k[None] == label[:, None]) | (label[:, None] == self.null_label)

    # -- the noisy marginal and its denoiser -------------------------------------------------------------------
    def denoise(self, x: Tensor, sigma, label: Tensor) -> Tensor:
        """E[x0 | x_σ = x, class], float64. `sigma` is a float or a [B] tensor in [0, 1]."""
        x = x.double().reshape(-1, self.dim)
        label = self._check_labels(label, x.shape[0])
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)
        a = 1 - s
        var = a**2 * self.std**2 + s**2                                  # S, [B, 1]
        logits = -((x[:, None, :] - a[:, None] * self.means[None]) ** 2).sum(-1) / (2 * var)  # [B, K]
        logits = logits.masked_fill(~self._allowed(label), -math.inf)
        resp = torch.softmax(logits, dim=1)                               # log-sum-exp inside
        return (a * self.std**2 / var) * x + (s**2 / var) * (resp @ self.means)

    def velocity(self, x: Tensor, sigma, label: Tensor) -> Tensor:
        """v = E[ε - x0 | x_σ] = (x - E[x0 | x_σ]) / σ, float64 (σ > 0)."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        if (s <= 0).any():
            raise ValueError("the velocity is undefined at σ = 0 (the sampler never evaluates there)")
        return (x.double().reshape(-1, self.dim) - self.denoise(x, sigma, label)) / s

    # -- the clean distribution ---------------------------------------------------------------------------------
    def sample(self, n: int, label: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact draws of x0 given the class (or of the unconditional mixture for the null label)."""
        if label == self.null_label:
            comp = torch.randint(self.num_classes, (n,), generator=generator)
        else:
            self._check_labels(torch.tensor([label]), 1)
            comp = torch.full((n,), int(label))
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.std * eps

    def component_log_prob(self, x: Tensor) -> Tensor:
        """[B, K]: log N(x; μ_k, s²I)."""
        x = x.double().reshape(-1, self.dim)
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        return -0.5 * sq / self.std**2 - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi))

    def log_prob(self, x: Tensor, label: Tensor) -> Tensor:
        """log p(x | class) (log p(x) for the null label), float64 [B]."""
        lp = self.component_log_prob(x)
        label = self._check_labels(label, lp.shape[0])
        allowed = self._allowed(label)
        lp = lp.masked_fill(~allowed, -math.inf)
        return torch.logsumexp(lp, dim=1) - allowed.sum(1).double().log()

    def classify(self, x: Tensor) -> Tensor:
        """argmax_c p(c | x): with equal priors and one component per class, the most likely component."""
        return self.component_log_prob(x).argmax(1)

    def outward(self) -> Tensor:
        """[K, d] unit vectors from the global mean to each mode (the direction CFG pushes a mode)."""
        u = self.means - self.means.mean(0)
        return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mixture(dim: int, std: float = 1.0, offset: float = 4.0) -> GaussianMixture:
    """The paper's toys: 1-D modes at ∓offset, 2-D modes at (±offset, ±offset), one class each."""
    if dim == 1:
        return GaussianMixture([[-offset], [offset]], std)
    if dim == 2:
        return GaussianMixture([[-offset, -offset], [-offset, offset], [offset, -offset], [offset, offset]], std)
    raise ValueError(f"dim must be 1 or 2, got {dim}")


class ExactDenoiser:
    """The closed-form velocity behind the Denoiser seam: `denoiser(x, sigma, *, skip, label) -> v`.

    It has no blocks (`num_blocks = 0`), so it runs every guider that needs only conditional/unconditional
    predictions (CFG, CFG++, APG, CFG-Zero*, the λ = 1 floor) — what each rule does to a perfect model. Guiders
    that drop blocks cannot run on it and say so. Computes in float64, returns the input dtype.
    """

    num_blocks = 0

    def __init__(self, gmm: GaussianMixture):
        self.gmm = gmm

    def __call__(self, x: Tensor, sigma: Tensor, *, skip=frozenset(), label: Tensor) -> Tensor:
        if skip:
            raise ValueError("the exact denoiser has no blocks to skip")
        return self.gmm.velocity(x, sigma, label).to(x.dtype).reshape(x.shape)
