"""Known answers for s2g.eval.stats: Fréchet distance, k-NN precision/recall, cluster-bootstrap and delete-half
jackknife intervals."""
import numpy as np
import pytest
import scipy.linalg
import torch

from s2g.eval.stats import (Interval, bootstrap_mean, bootstrap_statistic, frechet_distance, frechet_from_stats,
                            gaussian_stats, half_sample_interval, knn_radii, paired_difference, precision_recall)


# --- Fréchet distance -------------------------------------------------------------------------------------------

def test_frechet_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    # Diagonal covariances commute: FD = |Δμ|² + Σ(√a_i - √b_i)².
    expected = 0.25 + 4.0 + (1 - np.sqrt(2)) ** 2 + (2 - 1) ** 2
    assert frechet_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, abs=1e-12)

    rng = np.random.default_rng(0)
    a = mu_a + np.sqrt(var_a) * rng.standard_normal((200_000, 3))
    b = mu_b + np.sqrt(var_b) * rng.standard_normal((200_000, 3))
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.03)


def test_frechet_matches_scipy_sqrtm_for_full_covariances():
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    cov1, cov2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    reference = (np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
                 - 2 * np.trace(scipy.linalg.sqrtm(cov1 @ cov2)).real)
    assert frechet_from_stats(mu1, cov1, mu2, cov2) == pytest.approx(reference, rel=1e-9)


def test_frechet_zero_on_itself_symmetric_and_accepts_torch():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((300, 8)), 1.5 * rng.standard_normal((400, 8)) + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(frechet_distance(a, b), rel=1e-5)
    mu, cov = gaussian_stats(a)
    assert cov.shape == (8, 8) and np.allclose(cov, np.cov(a.T)) and np.allclose(mu, a.mean(0))


def test_frechet_finite_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((10, 64)), rng.standard_normal((12, 64))  # rank-deficient covariances
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0


# --- precision and recall ---------------------------------------------------------------------------------------

def brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # [fake, real]
    precision = np.mean([(cross[i] <= radii(real)).any() for i in range(len(fake))])
    recall = np.mean([(cross[:, j] <= radii(fake)).any() for j in range(len(real))])
    return precision, recall


def test_precision_recall_matches_brute_force_with_small_chunks():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((60, 5)), 0.7 * rng.standard_normal((45, 5)) + 0.8
    expected = brute_force_precision_recall(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where both can be wrong
    assert precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3) == pytest.approx(expected, abs=1e-12)
    radii = knn_radii(real, k=3)
    assert np.allclose(np.sqrt(radii), np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1), 1)[:, 3])


def test_precision_recall_identical_and_far_sets():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((200, 4))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_fake_on_half_of_the_modes():
    rng = np.random.default_rng(6)
    modes = 10.0 * np.eye(8)  # 8 well-separated clusters
    plane = np.linalg.qr(rng.standard_normal((8, 2)))[0].T  # each mode a 2-D blob, so 200 samples fill it well
    real = np.repeat(modes, 200, axis=0) + 0.3 * rng.standard_normal((1600, 2)) @ plane
    # Exactly the real samples of modes 0-3: all of them are real, and exactly half the reals are covered.
    assert precision_recall(real, real[:800]) == (1.0, 0.5)
    # An independent draw from modes 0-3: a few tail samples fall outside the k-NN balls.
    fake = np.repeat(modes[:4], 200, axis=0) + 0.3 * rng.standard_normal((800, 2)) @ plane
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.95
    assert 0.45 < recall <= 0.5


def test_precision_recall_ball_boundary_counts_as_inside():
    real = np.array([[0.0], [1.0], [2.0]])  # 1-NN radius 1 each
    fake = np.array([[3.0], [5.0], [6.0]])  # 1-NN radii 2, 1, 1
    # Precision: 3.0 lies exactly on the sphere around 2.0. Recall: 1.0 lies exactly on the sphere around 3.0.
    assert precision_recall(real, fake, k=1) == pytest.approx((1 / 3, 2 / 3))


def test_precision_recall_rejects_k_too_large():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((3, 2)), np.ones((5, 2)), k=3)


# --- bootstrap ----------------------------------------------------------------------------------------------------

def test_bootstrap_mean_covers_true_mean_about_95_percent():
    rng = np.random.default_rng(7)
    hits = 0
    for rep in range(200):
        values = rng.exponential(1.0, size=100)  # skewed, true mean 1
        interval = bootstrap_mean(values, n_boot=1000, seed=rep)
        hits += interval.lo <= 1.0 <= interval.hi
    assert 0.9 <= hits / 200 <= 0.99


def test_cluster_bootstrap_wider_than_iid_when_clusters_correlated():
    rng = np.random.default_rng(8)
    prompts = np.repeat(np.arange(50), 8)  # 50 prompts × 8 seeds
    values = rng.standard_normal(50)[prompts] + 0.3 * rng.standard_normal(400)  # prompt effect dominates
    clustered, iid = bootstrap_mean(values, prompts), bootstrap_mean(values)
    assert clustered.mean == iid.mean == pytest.approx(values.mean())
    assert (clustered.hi - clustered.lo) > 2 * (iid.hi - iid.lo)
    assert clustered.n == iid.n == 400 and clustered.n_clusters == 50 and iid.n_clusters == 400


def test_paired_difference_narrower_than_unpaired_and_significant():
    rng = np.random.default_rng(9)
    prompts = np.repeat(np.arange(40), 4)
    shared = 2.0 * rng.standard_normal(160)  # per-(prompt, seed) difficulty seen by both methods
    a = shared + 0.1 + 0.1 * rng.standard_normal(160)
    b = shared + 0.1 * rng.standard_normal(160)
    paired = paired_difference(a, b, prompts)
    ia, ib = bootstrap_mean(a, prompts), bootstrap_mean(b, prompts, seed=1)
    unpaired_width = np.hypot(ia.hi - ia.lo, ib.hi - ib.lo)
    assert (paired.hi - paired.lo) < 0.1 * unpaired_width
    assert paired.lo > 0 and paired.mean == pytest.approx(np.mean(a - b))
    assert paired.p_value < 0.01


def test_paired_p_value_under_the_null_is_not_often_small():
    rng = np.random.default_rng(10)
    prompts = np.repeat(np.arange(30), 3)
    small = 0
    for rep in range(100):
        shared = rng.standard_normal(90)
        a, b = shared + rng.standard_normal(90), shared + rng.standard_normal(90)
        small += paired_difference(a, b, prompts, n_boot=500, seed=rep).p_value < 0.05
    assert 1 <= small <= 12  # ≈ 5 expected
    assert paired_difference(np.ones(6), np.ones(6), [0, 0, 1, 1, 2, 2]).p_value == 1.0


def test_bootstrap_deterministic_for_a_seed_and_interval_format():
    rng = np.random.default_rng(11)
    values, prompts = rng.random(120), np.repeat(np.arange(30), 4)
    first, second = bootstrap_mean(values, prompts, seed=3), bootstrap_mean(values, prompts, seed=3)
    assert first == second and bootstrap_mean(values, prompts, seed=4) != first
    interval = Interval(0.7123, 0.6891, 0.7349, 400, 50)
    assert str(interval) == "0.712 [0.689, 0.735]"
    assert interval.as_dict() == {"mean": 0.7123, "lo": 0.6891, "hi": 0.7349, "n": 400, "n_clusters": 50,
                                  "level": 0.95}
    assert str(Interval(0.1, 0.05, 0.15, 10, p_value=0.0012)) == "0.100 [0.050, 0.150] p=0.0012"


def test_bootstrap_statistic_gathers_the_same_rows_as_bootstrap_mean():
    rng = np.random.default_rng(12)
    values = rng.random(90)
    prompts = rng.integers(0, 25, size=90)  # unequal, shuffled clusters exercise the gather
    generic = bootstrap_statistic(np.mean, values, clusters=prompts, n_boot=300, seed=5, recenter=False)
    direct = bootstrap_mean(values, prompts, n_boot=300, seed=5)
    assert generic.mean == pytest.approx(direct.mean)
    assert (generic.lo, generic.hi) == pytest.approx((direct.lo, direct.hi), abs=1e-12)


def test_bootstrap_statistic_frechet_interval_and_paired_difference():
    rng = np.random.default_rng(13)
    prompts = np.repeat(np.arange(40), 5)
    ref_mu, ref_cov = gaussian_stats(rng.standard_normal((2000, 4)))
    gen_a = rng.standard_normal((200, 4)) + 0.5
    gen_b = gen_a + 0.05 * rng.standard_normal((200, 4))  # method b: the same items, slightly perturbed

    def fd_to_ref(g):
        return frechet_from_stats(*gaussian_stats(g), ref_mu, ref_cov)

    fd = bootstrap_statistic(fd_to_ref, gen_a, clusters=prompts, n_boot=200)
    assert fd.mean == pytest.approx(fd_to_ref(gen_a)) and fd.lo < fd.mean < fd.hi
    assert 0.5 < fd.mean < 2.0  # |Δμ|² = 4 · 0.25 = 1 plus sampling error
    diff = bootstrap_statistic(lambda g1, g2: fd_to_ref(g1) - fd_to_ref(g2), gen_a, gen_b, clusters=prompts,
                               n_boot=200)
    assert (diff.hi - diff.lo) < 0.3 * (fd.hi - fd.lo)  # the shared resample cancels most of the spread
    assert diff.lo < diff.mean < diff.hi
    again = bootstrap_statistic(fd_to_ref, torch.from_numpy(gen_a), clusters=prompts, n_boot=200)
    assert again == fd


def test_recentred_frechet_interval_covers_the_expected_estimate():
    rng = np.random.default_rng(14)
    ref_mu, ref_cov = gaussian_stats(rng.standard_normal((20_000, 16)))

    def fd_to_ref(g):
        return frechet_from_stats(*gaussian_stats(g), ref_mu, ref_cov)

    def draw():
        return 1.2 * rng.standard_normal((200, 16)) + 0.1

    expected = np.mean([fd_to_ref(draw()) for _ in range(500)])  # E[FD] at n = 200, the interval's target
    gen = draw()
    plain = bootstrap_statistic(fd_to_ref, gen, n_boot=200, recenter=False)
    assert plain.lo > plain.mean  # duplicated rows inflate every replicate: the plain interval misses its estimate
    hits = sum(iv.lo <= expected <= iv.hi for iv in
               (bootstrap_statistic(fd_to_ref, draw(), n_boot=150, seed=rep) for rep in range(40)))
    assert hits >= 26  # ≈ 95% of 30; the plain percentile interval covers < 10% here


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        bootstrap_mean(np.ones(4), clusters=[0, 1, 2])
    with pytest.raises(ValueError, match="aligned"):
        paired_difference(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean(np.ones(4), level=95)
    with pytest.raises(ValueError, match="2 clusters"):
        bootstrap_mean(np.ones(4), clusters=[0, 0, 0, 0])


# --- delete-half jackknife --------------------------------------------------------------------------------------

def test_half_sample_interval_of_a_mean_is_the_standard_error():
    rng = np.random.default_rng(15)
    values = rng.standard_normal(400)
    iv = half_sample_interval(np.mean, values, clusters=None, n_halves=400)
    assert iv.mean == pytest.approx(values.mean())
    assert iv.se == pytest.approx(values.std(ddof=1) / 20, rel=0.15)  # r/d · var(half means) = s²/n for a mean
    assert (iv.hi - iv.mean) == pytest.approx(1.959964 * iv.se) and (iv.mean - iv.lo) == pytest.approx(1.959964 * iv.se)
    assert iv.as_dict()["se"] == iv.se and iv.n_clusters == 400
    assert half_sample_interval(np.mean, torch.from_numpy(values), clusters=None, n_halves=400) == iv  # seeded


def test_half_sample_interval_keeps_clusters_whole_and_arrays_aligned():
    prompts = np.repeat(np.arange(10), 3)
    a, b = np.arange(30.0), np.arange(30.0) * 2

    def check(x, y):
        present = set(prompts[x.astype(int)].tolist())
        assert all((prompts[x.astype(int)] == c).sum() == 3 for c in present)  # a prompt is kept whole or dropped
        np.testing.assert_array_equal(y, 2 * x)  # both arrays lose the same rows
        return len(present), float(x.mean())

    count, mean = half_sample_interval(check, a, b, clusters=prompts, n_halves=20)
    assert count.mean == 10 and count.se == 0.0 and count.lo == count.hi == 10  # every half keeps 5 of 10 prompts
    assert mean.mean == pytest.approx(14.5) and mean.lo < 14.5 < mean.hi
    cut = half_sample_interval(lambda x, y: float(x.mean()) / 29, a, b, clusters=prompts, n_halves=20,
                               bounds=(0, 0.51))  # a rate's interval stops at its range
    assert cut.hi == 0.51 and cut.lo == pytest.approx(mean.lo / 29) and cut.se == pytest.approx(mean.se / 29)


def test_half_sample_interval_matches_the_spread_of_precision_and_recall():
    """The reason it exists: k-NN precision/recall over prompt-correlated rows. Its se against the spread of the
    statistic over 40 independent draws (when written: 1.37 for P, 0.94 for R; the delete-one jackknife gave
    1.5-1.7×, too wide, and a bootstrap of the indicators with the manifolds held fixed 0.75×, too narrow)."""
    rng = np.random.default_rng(16)
    prompts = np.repeat(np.arange(100), 2)
    values, ses = [], []
    for _ in range(40):
        centre = rng.standard_normal((100, 1, 4))  # a prompt's images share its centre
        real = (centre + 0.5 * rng.standard_normal((100, 2, 4))).reshape(200, 4)
        fake = (0.8 * centre + 0.2 + 0.6 * rng.standard_normal((100, 2, 4))).reshape(200, 4)
        p, r = half_sample_interval(lambda f, g: precision_recall(g, f), fake, real, clusters=prompts, n_halves=40,
                                    seed=len(values))
        values.append((p.mean, r.mean))
        ses.append((p.se, r.se))
    ratio = np.mean(ses, axis=0) / np.std(values, axis=0, ddof=1)
    assert np.all((0.8 < ratio) & (ratio < 1.5)), ratio


def test_half_sample_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="4 clusters"):
        half_sample_interval(np.mean, np.ones(6), clusters=[0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="first dimension"):
        half_sample_interval(lambda x, y: 0.0, np.ones(6), np.ones(5), clusters=None)
    with pytest.raises(ValueError, match="level"):
        half_sample_interval(np.mean, np.ones(6), clusters=None, level=95)
