"""Statistics for the evaluation harness: Fréchet distance, k-NN precision/recall, and cluster-bootstrap intervals.

Everything takes numpy arrays or torch tensors (converted to float64 numpy) and is deterministic for a given seed.

* Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, the FID formula):
  FD = |μ_a - μ_b|² + Tr(C_a + C_b - 2 (C_a C_b)^{1/2}).
* Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019, arXiv 1904.06991), k-NN manifolds.
* Intervals by a bootstrap over clusters (prompts): the seeds of one prompt are correlated, so resampling images
  independently would make every interval too narrow. Percentile intervals for means; for other statistics
  (the FD) the replicates are first recentred on the estimate, see `bootstrap_statistic`.
* k-NN precision/recall cannot be bootstrapped (duplicated rows shrink the radii); their intervals come from a
  delete-half jackknife over prompts instead, which never duplicates a row, see `half_sample_interval`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch

# Pairwise-distance chunks hold at most this many float64 entries (128 MiB), whatever the set sizes.
_CHUNK_ENTRIES = 1 << 24


def _as_array(x, name: str, ndim: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (divides by N-1) of features [N, D], in float64."""
    feats = _as_array(feats, "feats", ndim=2)
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {feats.shape[0]}")
    return feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix by its eigendecomposition; round-off negatives are clipped to 0."""
    eigvals, eigvecs = np.linalg.eigh((cov + cov.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """FD = |μ1 - μ2|² + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^{1/2}).

    Method: C1 C2 = S (S C2) and S C2 S = (S C2) S with S = C1^{1/2} have the same eigenvalues, so
    Tr((C1 C2)^{1/2}) = Σ √λ_i(S C2 S). S C2 S is symmetric PSD, hence `eigvalsh` applies and its tiny negative
    round-off eigenvalues are clipped to 0. This stays real and finite for singular covariances (fewer samples than
    dimensions), where scipy's general `sqrtm` of the non-symmetric C1 C2 can return complex parts or NaN.
    """
    mu1, mu2 = _as_array(mu1, "mu1", ndim=1), _as_array(mu2, "mu2", ndim=1)
    cov1, cov2 = _as_array(cov1, "cov1", ndim=2), _as_array(cov2, "cov2", ndim=2)
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}")
    sqrt1 = _psd_sqrt(cov1)
    middle = sqrt1 @ cov2 @ sqrt1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eigvals, 0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt
    return float(max(fd, 0.0))  # a true FD is ≥ 0; only round-off goes below


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to features a [N, D] and b [M, D]; see `frechet_from_stats`."""
    return frechet_from_stats(*gaussian_stats(a), *gaussian_stats(b))


# ---------------------------------------------------------------------------------------------------------------
# Precision and recall


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(x), len(y)] by |x|² - 2 x·y + |y|², clamped at 0 against round-off."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ y.T + (y * y).sum(1)[None]
    return d.clamp_min_(0)


def _rows_per_chunk(width: int, batch_size: int | None) -> int:
    return batch_size if batch_size is not None else max(1, _CHUNK_ENTRIES // max(width, 1))


def knn_radii(feats, k: int = 3, batch_size: int | None = None) -> np.ndarray:
    """Squared distance from each sample [N, D] to its k-th nearest neighbour among the others (itself excluded)."""
    x = torch.from_numpy(_as_array(feats, "feats", ndim=2))
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} samples, got {k}")
    rows = _rows_per_chunk(x.shape[0], batch_size)
    # Each row's own distance (0) is its smallest, so the (k+1)-th smallest is the k-th neighbour; duplicates of a
    # point count as neighbours, as in the paper's code.
    radii = [torch.kthvalue(_sq_dists(x[i:i + rows], x), k + 1, dim=1).values for i in range(0, x.shape[0], rows)]
    return torch.cat(radii).numpy()


def precision_recall(real, fake, k: int = 3, batch_size: int | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), Euclidean distances between features.

    The real manifold is the union of balls B(r, d_k(r)) around the real samples, d_k(r) the distance to r's k-th
    nearest other real sample; likewise for the fake manifold. Then
        precision = fraction of fake samples inside the real manifold (fidelity),
        recall    = fraction of real samples inside the fake manifold (coverage),
    "inside" meaning distance ≤ radius. Distances are computed in row chunks (`batch_size` rows at a time, by
    default sized to ~128 MiB), so 10k × 10k sets fit in memory.
    """
    real_arr, fake_arr = _as_array(real, "real", ndim=2), _as_array(fake, "fake", ndim=2)
    if real_arr.shape[1] != fake_arr.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real_arr.shape}, fake {fake_arr.shape}")
    real_radii = torch.from_numpy(knn_radii(real_arr, k, batch_size))
    fake_radii = torch.from_numpy(knn_radii(fake_arr, k, batch_size))
    real_t, fake_t = torch.from_numpy(real_arr), torch.from_numpy(fake_arr)
    fake_in_real = torch.zeros(len(fake_t), dtype=torch.bool)
    real_in_fake = torch.zeros(len(real_t), dtype=torch.bool)
    rows = _rows_per_chunk(len(real_t), batch_size)
    # One pass over the fake × real distances serves both directions.
    for i in range(0, len(fake_t), rows):
        d = _sq_dists(fake_t[i:i + rows], real_t)
        fake_in_real[i:i + rows] = (d <= real_radii[None]).any(1)
        real_in_fake |= (d <= fake_radii[i:i + rows, None]).any(0)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap intervals


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval [lo, hi] at `level`, over n items in n_clusters clusters."""
    mean: float
    lo: float
    hi: float
    n: int
    n_clusters: int | None = None
    level: float = 0.95
    p_value: float | None = None  # set by paired_difference only
    se: float | None = None  # set by half_sample_interval only (its interval is mean ± z·se)

    def __str__(self) -> str:
        text = f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"
        return text if self.p_value is None else f"{text} p={self.p_value:.3g}"

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items()
                if not (key in ("p_value", "se") and value is None)}


class _Clusters:
    """Cluster labels as contiguous row ranges, so that a resample of clusters gathers its rows without a loop."""

    def __init__(self, clusters, n: int):
        if clusters is None:
            labels = np.arange(n)  # each item its own cluster: the iid bootstrap
        else:
            labels = np.asarray(clusters.detach().cpu().numpy() if isinstance(clusters, torch.Tensor) else clusters)
            if labels.shape != (n,):
                raise ValueError(f"clusters must have shape ({n},), got {labels.shape}")
        _, inverse = np.unique(labels, return_inverse=True)
        self.order = np.argsort(inverse, kind="stable")  # rows grouped by cluster
        self.counts = np.bincount(inverse)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.inverse = inverse
        self.size = len(self.counts)

    def draw(self, rng: np.random.Generator, n_boot: int) -> np.ndarray:
        """[n_boot, n_clusters] cluster ids drawn with replacement."""
        if self.size < 2:
            raise ValueError("the bootstrap needs at least 2 clusters")
        return rng.integers(0, self.size, size=(n_boot, self.size))

    def rows(self, picked: np.ndarray) -> np.ndarray:
        """Row indices of all items of the clusters `picked` [C] (repeats included), in one vectorised gather."""
        lengths = self.counts[picked]
        ends = np.cumsum(lengths)
        # Within the output, position j of cluster c's run maps to order[starts[c] + j].
        offsets = np.repeat(self.starts[picked] - (ends - lengths), lengths)
        return self.order[offsets + np.arange(ends[-1])]


def _check_level(level: float, n_boot: int):
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")


def _aligned(arrays, who: str) -> tuple[list[np.ndarray], int]:
    """numpy copies of `arrays`, checked to share their first dimension (their rows are resampled together)."""
    if not arrays:
        raise ValueError(f"{who} needs at least one array")
    arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays must share their first dimension, got {[len(a) for a in arrays]}")
    return arrays, n


def _percentile_interval(point: float, boot: np.ndarray, n: int, n_clusters: int, level: float) -> Interval:
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(point), float(lo), float(hi), n, n_clusters, level)


def bootstrap_mean(values, clusters=None, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of per-image `values` [n] with a percentile interval from a cluster bootstrap.

    `clusters` [n] holds each image's prompt id: a replicate draws as many prompts as there are, with replacement,
    keeps all images of each drawn prompt, and takes the mean over those images (Σ sums / Σ counts, so prompts with
    more images weigh more, as in the point estimate). clusters=None resamples images independently.
    """
    _check_level(level, n_boot)
    values = _as_array(values, "values", ndim=1)
    groups = _Clusters(clusters, len(values))
    sums = np.bincount(groups.inverse, weights=values, minlength=groups.size)
    picked = groups.draw(np.random.default_rng(seed), n_boot)
    boot = sums[picked].sum(1) / groups.counts[picked].sum(1)
    return _percentile_interval(values.mean(), boot, len(values), groups.size, level)


def paired_difference(a, b, clusters=None, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """mean(a - b) for two methods scored on the SAME aligned (prompt, seed) items, with a cluster-bootstrap interval.

    Pairing cancels what the items share (prompt difficulty, the noise seed), so this interval is far narrower than
    comparing two separate intervals. `p_value` is two-sided, from a sign-flip permutation test over clusters: under
    H0 "a and b are exchangeable", each prompt's summed difference is equally likely to have either sign, so
    p = (1 + #{|Σ± s_c| ≥ |Σ s_c|}) / (1 + n_boot) over n_boot random sign vectors.
    """
    a, b = _as_array(a, "a", ndim=1), _as_array(b, "b", ndim=1)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be aligned, got shapes {a.shape} and {b.shape}")
    interval = bootstrap_mean(a - b, clusters, n_boot, level, seed)
    groups = _Clusters(clusters, len(a))
    sums = np.bincount(groups.inverse, weights=a - b, minlength=groups.size)
    signs = np.random.default_rng([seed, 1]).choice([-1.0, 1.0], size=(n_boot, groups.size))
    observed = abs(sums.sum())
    # The relative tolerance keeps exact ties (e.g. all-zero differences) counted despite summation order.
    extreme = np.abs(signs @ sums) >= observed * (1 - 1e-12)
    p_value = (1 + int(extreme.sum())) / (1 + n_boot)
    return replace(interval, p_value=p_value)


def bootstrap_statistic(fn: Callable[..., float], *arrays, clusters=None, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0, recenter: bool = True) -> Interval:
    """fn(*arrays) with an interval from a cluster bootstrap of the rows that all arrays share.

    Each replicate draws clusters with replacement and calls fn on the same resampled rows of every array, so
    aligned arrays stay paired: fn = lambda g: frechet_from_stats(*gaussian_stats(g), mu_ref, cov_ref) gives the FD
    interval against a fixed reference; fn = lambda g1, g2: fd_to_ref(g1) - fd_to_ref(g2) a paired FD difference.
    Uses the same draws as `bootstrap_mean` for the same seed.

    recenter: a resample with replacement holds only ~63% distinct rows, and the FD's finite-sample bias grows as the
    distinct rows shrink (it is linear in 1/n; Chong & Forsyth, CVPR 2020): at D = 64, n = 1000 the replicates sit
    ~1.1 above the estimate, so the plain percentile interval does not even contain it; a paired FD difference
    shifts too whenever the two covariances differ. Recentring subtracts that bootstrap bias (mean θ* - θ̂) from the
    replicates before taking percentiles, so the interval is the sampling spread of the estimate *at this n* around
    θ̂ (measured at D = 16, n = 200: it covered E[FD at n] in 96 of 100 draws, the plain interval in 8). It does
    not remove the FD's own bias: compare FDs at equal n (or report the floor measured between two sets of real
    images).
    For a mean the bootstrap bias is ~0, and recentring changes nothing that matters. recenter=False gives the
    plain percentile interval. k-NN precision/recall should not be bootstrapped like this at all: duplicated rows
    sit at distance 0 from each other and shrink the k-NN radii.
    """
    _check_level(level, n_boot)
    arrays, n = _aligned(arrays, "bootstrap_statistic")
    groups = _Clusters(clusters, n)
    picked = groups.draw(np.random.default_rng(seed), n_boot)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        rows = groups.rows(picked[i])
        boot[i] = fn(*(a[rows] for a in arrays))
    point = fn(*arrays)
    if recenter:
        boot = boot - (boot.mean() - point)
    return _percentile_interval(point, boot, n, groups.size, level)


def half_sample_interval(fn: Callable[..., float | tuple], *arrays, clusters, level: float = 0.95,
                         n_halves: int = 100, seed: int = 0,
                         bounds: tuple[float, float] | None = None) -> Interval | list[Interval]:
    """fn(*arrays) with a normal interval mean ± z·se, se from the delete-half jackknife over clusters.

    Each of `n_halves` replicates keeps a random half of the clusters (all rows of a kept prompt, in every array,
    e.g. generated and reference features, so aligned arrays stay paired) and calls fn on them; with d clusters
    deleted and r kept, se² = r/d · var(θ_s) (Shao & Wu 1989, the delete-d jackknife: it holds for non-smooth
    statistics, where the delete-one jackknife does not). No row is ever duplicated, so it serves statistics that
    a bootstrap's duplicates break, such as k-NN precision/recall. On Gaussian sets with prompt-correlated rows
    its se came out 0.9-1.4× the spread over independent draws (tests/test_eval_stats.py); the delete-one
    jackknife's 1.5-1.7× (too wide), a bootstrap of the indicators with the k-NN manifolds held fixed 0.75×.
    fn may return a tuple of statistics; then a list of Intervals comes back, one per statistic. `bounds`: the
    statistic's range (e.g. (0, 1) for a rate); the interval is cut to it, the se is kept as measured.
    """
    _check_level(level, 1)
    if n_halves < 2:
        raise ValueError(f"n_halves must be ≥ 2, got {n_halves}")
    arrays, n = _aligned(arrays, "half_sample_interval")
    groups = _Clusters(clusters, n)
    if groups.size < 4:
        raise ValueError("the delete-half jackknife needs at least 4 clusters")
    deleted = groups.size // 2
    kept = groups.size - deleted
    rng = np.random.default_rng(seed)
    full = np.asarray(fn(*arrays), dtype=float)
    reps = []
    for _ in range(n_halves):
        rows = np.isin(groups.inverse, rng.permutation(groups.size)[:kept])
        reps.append(np.atleast_1d(np.asarray(fn(*(a[rows] for a in arrays)), dtype=float)))
    se = np.sqrt(kept / deleted * np.var(np.stack(reps), axis=0, ddof=1))
    z = NormalDist().inv_cdf((1 + level) / 2)
    lo_bound, hi_bound = bounds if bounds is not None else (-np.inf, np.inf)
    out = [Interval(float(p), float(max(p - z * s, lo_bound)), float(min(p + z * s, hi_bound)), n, groups.size,
                    level, se=float(s))
           for p, s in zip(np.atleast_1d(full), se)]
    return out if full.ndim else out[0]
