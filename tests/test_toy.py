"""The Gaussian-mixture toy: exact ground truth against Monte Carlo and closed forms, metrics against analytic
values, the controls against the guidance algebra, a briefly trained MLP against the truth, and the whole
scripts/toy.py pipeline at a tiny budget."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erfinv
from scipy.stats import wasserstein_distance

from s2g.guidance import CFG, Conditional, S2Guidance, SkipLayerGuidance
from s2g_toy import experiment as E
from s2g.guidance.controls import IntervalCFG, KappaProbe, PlaceboS2
from s2g_toy.metrics import sample_metrics, sliced_w1, w1_to_normal_mixture
from s2g_toy.mixture import ExactDenoiser, GaussianMixture, mixture
from s2g_toy.model import ToyMLP, load, save, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- exact ground truth -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("sigma", [0.3, 0.6, 0.9])
def test_exact_denoiser_matches_monte_carlo(dim, sigma):
    """E[x0 | x_σ = x] by self-normalised importance sampling over exact x0 draws vs the closed form."""
    gmm = mixture(dim)
    g = torch.Generator().manual_seed(0)
    for label in [0, gmm.num_classes - 1, gmm.null_label]:
        # four typical noisy points of this label (where importance sampling from the prior has mass)
        x = (1 - sigma) * gmm.sample(4, label, g) + sigma * torch.randn(4, dim, generator=g, dtype=torch.float64)
        x0 = gmm.sample(400_000, label, g)
        # log N(x; (1-σ)x0, σ²I), up to a constant
        logw = -((x[:, None, :] - (1 - sigma) * x0[None]) ** 2).sum(-1) / (2 * sigma**2)
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        ess = 1 / (w**2).sum(1)
        se = (w @ (x0**2) - mc**2).clamp_min(0).sum(1).sqrt() / ess.sqrt()
        exact = gmm.denoise(x, sigma, torch.full((4,), label))
        assert ess.min() > 200
        assert ((exact - mc).norm(dim=1) < 5 * se + 1e-3).all(), (label, exact, mc, se)
        # velocity is the same estimate in another parametrisation: v = (x - D)/σ
        v = gmm.velocity(x, sigma, torch.full((4,), label))
        torch.testing.assert_close(v, (x - exact) / sigma)


def test_exact_denoiser_limits_and_dtype():
    gmm = mixture(1)
    x = torch.tensor([[2.0], [-30.0]], dtype=torch.float64)
    # σ = 1: x carries no information; the denoiser returns the (class) prior mean
    torch.testing.assert_close(gmm.denoise(x, 1.0, torch.tensor([1, 2])), torch.tensor([[4.0], [0.0]],
                                                                                          dtype=torch.float64))
    # σ = 0: the identity; far in the tail the unconditional posterior picks the near mode without overflow
    torch.testing.assert_close(gmm.denoise(x, 0.0, torch.tensor([2, 2])), x)
    d = gmm.denoise(torch.tensor([[-300.0]]), 0.5, torch.tensor([2]))
    assert torch.isfinite(d).all() and abs(float(d) - (0.5 / 0.5 * -300 + 0.25 / 0.5 * -4)) < 1e-9  # S = a²+σ² = 0.5
    den = ExactDenoiser(gmm)
    out = den(torch.zeros(3, 1), torch.full((3,), 0.5), label=torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float32 and den.num_blocks == 0
    with pytest.raises(ValueError, match="no blocks"):
        den(torch.zeros(1, 1), torch.full((1,), 0.5), skip={1}, label=torch.tensor([0]))


def test_ground_truth_sampling_moments():
    g = torch.Generator().manual_seed(1)
    n = 200_000
    one = mixture(1, std=0.7, offset=3.0)
    for label, mean, var in [(0, -3.0, 0.49), (1, 3.0, 0.49), (2, 0.0, 9.0 + 0.49)]:
        x = one.sample(n, label, g)[:, 0]
        assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n)
        assert abs(float(x.var()) / var - 1) < 0.015
    two = mixture(2)
    x = two.sample(n, 3, g)
    torch.testing.assert_close(x.mean(0), torch.tensor([4.0, 4.0], dtype=torch.float64), atol=0.015, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), torch.eye(2, dtype=torch.float64), atol=0.015, rtol=0)
    xu = two.sample(n, two.null_label, g)
    torch.testing.assert_close(torch.cov(xu.T), torch.diag(torch.tensor([17.0, 17.0], dtype=torch.float64)),
                               atol=0.25, rtol=0)


def test_log_prob_and_classify_against_closed_form():
    gmm = mixture(1)
    x = torch.tensor([[4.0], [0.3], [-1.0]], dtype=torch.float64)
    lp = gmm.log_prob(x, torch.tensor([1, 1, 2]))
    expect = [-0.5 * math.log(2 * math.pi), -0.5 * math.log(2 * math.pi) - 0.5 * 3.7**2,
              math.log(0.5 * math.exp(-0.5 * 3.0**2) + 0.5 * math.exp(-0.5 * 5.0**2)) - 0.5 * math.log(2 * math.pi)]
    torch.testing.assert_close(lp, torch.tensor(expect, dtype=torch.float64))
    assert gmm.classify(x).tolist() == [1, 1, 0]


def test_mixture_input_errors():
    with pytest.raises(ValueError, match="dim must be 1 or 2"):
        mixture(3)
    with pytest.raises(ValueError, match="std"):
        GaussianMixture([[0.0]], std=0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        mixture(1).denoise(torch.zeros(1, 1), 0.5, torch.tensor([5]))


@pytest.mark.parametrize("dim", [1, 2])
def test_exact_ode_is_the_floor_and_cfg_shifts_outward(dim):
    """Through the project's sampler: λ = 1 on the exact velocity transports noise onto each class (the
    discretisation floor), and CFG at λ = 3 moves each mode outward by about +1.06 per axis and narrows it
    (the exact-score guided ODE gives +1.06 at n = 50k: it does not sample the tilted target p(x|c)^λ p(x)^(1-λ),
    Bradley & Nakkiran, arXiv 2408.09000), with no wrong-class samples."""
    gmm = mixture(dim)
    world = E.World(dim, 0, gmm, None, None, ExactDenoiser(gmm))
    noise, labels = E.paired_noise(gmm, 4000, 0)
    _, cond, _, _ = E.evaluate(world, {"_target_": "s2g.guidance.Conditional"}, noise, labels, 128, exact=True)
    _, cfg, _, _ = E.evaluate(world, {"_target_": "s2g.guidance.CFG", "scale": 3.0}, noise, labels, 128,
                              exact=True)
    assert cond["w1"] < (0.04 if dim == 1 else 0.05) and abs(cond["std_ratio"] - 1) < 0.03
    per_axis = cfg["shift"] / math.sqrt(dim)
    assert abs(per_axis - 1.06) < 0.06, per_axis
    assert 0.58 < cfg["std_ratio"] < 0.68 and cfg["wrong_class"] == 0


# -- metrics ------------------------------------------------------------------------------------------------------
def test_w1_against_scipy_and_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(4.3, 0.8, 4000)
    ref = rng.normal(4.0, 1.0, 2_000_000)
    assert abs(w1_to_normal_mixture(x, [4.0], 1.0) - wasserstein_distance(x, ref)) < 0.004
    # a pure shift δ of exact quantiles: W1 = δ
    q = 4.25 + np.sqrt(2) * erfinv(2 * (np.arange(20000) + 0.5) / 20000 - 1)
    assert abs(w1_to_normal_mixture(q, [4.0], 1.0) - 0.25) < 2e-3
    # outliers count with their full distance: one sample of n at 100 adds ≈ (100 - 4)/n
    base = w1_to_normal_mixture(q, [4.0], 1.0)
    assert abs(w1_to_normal_mixture(np.append(q, 100.0), [4.0], 1.0) - base - 96 / 20001) < 2e-3


def test_sliced_w1_of_a_shift_is_two_over_pi():
    """Shift δ along x: projected shifts |δ cos θ| average 2δ/π over the half circle."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 2)) + np.array([4.5, 4.0])
    assert abs(sliced_w1(x, np.array([[4.0, 4.0]]), 1.0) - 0.5 * 2 / math.pi) < 0.02


def test_sample_metrics_on_ground_truth_and_on_a_shifted_copy():
    gmm = mixture(2)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([gmm.sample(5000, c, g) for c in range(4)]).numpy()
    labels = np.repeat(np.arange(4), 5000)
    m = sample_metrics(x, labels, gmm)
    assert m["w1"] < 0.03 and abs(m["shift"]) < 0.03 and abs(m["std_ratio"] - 1) < 0.02
    assert abs(m["loglik"] - (-math.log(2 * math.pi) - 1)) < 0.03 and m["wrong_class"] == 0
    out = gmm.outward().numpy()[labels]
    m2 = sample_metrics(x + 0.5 * out, labels, gmm)  # every mode pushed 0.5 outward
    assert abs(m2["shift"] - 0.5) < 0.03 and abs(m2["loglik"] - (m["loglik"] - 0.125)) < 0.03


# -- the network ---------------------------------------------------------------------------------------------------
def test_skip_runs_blocks_as_identity_and_weights_roundtrip(tmp_path):
    gmm = mixture(2)
    torch.manual_seed(0)
    model = train(ToyMLP(2, 4, width=16), gmm, iterations=20, batch_size=64, progress=False)
    for p in model.parameters():  # make every block matter (fc2 starts at zero)
        p.data.add_(0.05 * torch.randn(p.shape))
    x, s, lab = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 4])
    angles = s[:, None] * model.freqs
    e = model.sigma_embed(torch.cat([angles.sin(), angles.cos()], 1)) + model.label_embed(lab)
    h = model.stem(x) + e
    for i, block in enumerate(model.blocks):
        if i not in (2, 5):
            h = block(h, e)
    torch.testing.assert_close(model(x, s, skip=frozenset({2, 5}), label=lab), model.out(model.out_norm(h)))
    assert not torch.allclose(model(x, s, skip={2}, label=lab), model(x, s, label=lab))
    with pytest.raises(ValueError, match="out of range"):
        model(x, s, skip={8}, label=lab)
    save(model, tmp_path / "m.safetensors")
    torch.testing.assert_close(load(tmp_path / "m.safetensors")(x, s, label=lab), model(x, s, label=lab))
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def test_training_is_deterministic():
    gmm = mixture(1)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = train(ToyMLP(1, 2, width=16), gmm, iterations=15, batch_size=64, seed=3, progress=False)
        outs.append(m(torch.ones(2, 1), torch.full((2,), 0.4), label=torch.tensor([0, 2])))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_briefly_trained_mlp_samples_its_class():
    """150 iterations (a few seconds): conditional samples within W1 0.12 of each class (the untrained network
    is ~4 away; 1000 samples per class put the W1 noise floor near 0.04)."""
    gmm = mixture(1)
    torch.manual_seed(0)
    model = train(ToyMLP(1, 2, width=32), gmm, iterations=150, batch_size=256, seed=0, progress=False)
    noise, labels = E.paired_noise(gmm, 1000, 0)
    x = E.generate(model, Conditional(), noise, labels, gmm.null_label, 32)
    m = sample_metrics(x.double().numpy(), labels.numpy(), gmm)
    assert m["w1"] < 0.12 and m["wrong_class"] < 0.005, m


# -- controls against the guidance algebra -----------------------------------------------------------------------
class LinearDenoiser:
    """v = a·x + b(label); any skipped block turns the prediction into v_c + κ0·(v_c - v_u)."""

    num_blocks = 8

    def __init__(self, kappa0: float):
        self.kappa0 = kappa0

    def __call__(self, x, sigma, *, skip=frozenset(), label):
        b = torch.stack([torch.full_like(label, 1.0, dtype=x.dtype), (label.to(x.dtype) - 1.5)], 1)[:, : x.shape[1]]
        v_u = 0.7 * x - 0.2
        v_c = torch.where(label[:, None] == 4, v_u, v_u + b)
        if skip:
            return v_c + self.kappa0 * (v_c - (0.7 * x - 0.2))
        return v_c


def _run(den, guider, n=64, dim=2, steps=12):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, dim, generator=g)
    labels = torch.arange(n) % 4
    return E.generate(den, guider, noise, labels, 4, steps)


def test_kappa_probe_and_matched_cfg_reproduce_s2_along_the_cfg_direction():
    """If every sub-network deviation is κ0·(D_c - D_u), S² is exactly CFG at λ - ω·κ0 inside its interval."""
    den = LinearDenoiser(kappa0=0.3)
    probe = KappaProbe(scale=3.0, omega=2.0, seed=0)
    x_s2 = _run(den, probe)
    assert abs(probe.kappa - 0.3) < 1e-6 and abs(probe.effective_scale - 2.4) < 1e-6
    x_cfg = _run(den, IntervalCFG(scale=3.0, inner_scale=2.4, interval=(0.1, 0.9)))
    torch.testing.assert_close(x_s2, x_cfg)
    assert not torch.allclose(x_s2, _run(den, CFG(3.0)))


def test_placebo_keeps_the_norm_and_zero_omega_is_cfg():
    from s2g.guidance.base import Step

    den = LinearDenoiser(kappa0=0.5)
    placebo = PlaceboS2(scale=3.0, omega=1.0, seed=0)
    placebo.reset(8)
    x = torch.randn(16, 2)
    v_u = 0.7 * x - 0.2
    v_c = den(x, None, label=torch.zeros(16, dtype=torch.long))
    v_sub = v_c + 0.5 * (v_c - v_u)
    step = Step(3, 10, 0.5, 0.4)
    d_cfg = S2Guidance.guide(placebo, x, step, [], [v_c, v_u, v_c]).x0  # zero deviation: the CFG estimate
    d_real = S2Guidance.guide(placebo, x, step, [], [v_c, v_u, v_sub]).x0 - d_cfg
    d_fake = placebo.guide(x, step, [], [v_c, v_u, v_sub]).x0 - d_cfg
    torch.testing.assert_close(d_fake.norm(dim=1), d_real.norm(dim=1))  # same size per sample ...
    cos = (d_fake * d_real).sum(1) / (d_fake.norm(dim=1) * d_real.norm(dim=1))
    assert cos.min() < 0.5 and cos.max() > -1  # ... in random directions
    # ω = 0 requests no sub-network and is CFG exactly (same noise, same steps)
    torch.testing.assert_close(_run(den, S2Guidance(scale=3.0, omega=0.0)), _run(den, CFG(3.0)), rtol=0, atol=0)


def test_fixed_block_control_is_s2_with_a_mask_that_never_changes():
    """SkipLayerGuidance(layers=[b], start=0, stop=1) = S² whose only droppable block is b."""
    gmm = mixture(2)
    torch.manual_seed(0)
    model = train(ToyMLP(2, 4, width=16), gmm, iterations=20, batch_size=64, progress=False)
    s2 = S2Guidance(scale=2.0, omega=1.5, drop_ratio=0.1, protected_blocks=[0, 1, 2, 3, 5, 6, 7],
                    interval=(0.1, 0.9), interval_unit="sigma")
    slg = SkipLayerGuidance(scale=2.0, skip_scale=1.5, layers=[4], start=0.0, stop=1.0, interval=(0.1, 0.9))
    torch.testing.assert_close(_run(model, s2), _run(model, slg))


# -- the pipeline --------------------------------------------------------------------------------------------------
def _toy(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "toy.py"), *args, "progress=false"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_pipeline_end_to_end_tiny(tmp_path):
    run = tmp_path / "suite"
    r = _toy("toy=tiny", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ["metrics.csv", "metrics.md", "config.yaml", "git.txt", "fig3.png", "fig9.png", "fig10.png",
              "fig3_all_methods.png", "block_deviation.png", "samples_1d.npz", "samples_2d.npz"]:
        assert (run / f).is_file(), f
    assert len(list((run / "models").glob("*.safetensors"))) == 4
    rows = {(r["dim"], r["method"]): r for r in csv.DictReader(open(run / "metrics.csv"))}
    for dim in ("1", "2"):
        for name in ["conditional", "cfg", "autoguidance", "naive_s2", "s2", "cfgpp", "apg", "cfg_zero_star",
                     "exact_conditional", "exact_cfg"]:
            assert (dim, name) in rows
        # the exact λ = 1 row is close to the truth even at 8 Euler steps; exact CFG shifts outward
        assert float(rows[(dim, "exact_conditional")]["w1"]) < 0.35
        assert float(rows[(dim, "exact_cfg")]["shift"]) > 0.5
    # a sweep (one row per run and dimension) and its gather
    sweep = tmp_path / "sweep"
    r = _toy("-m", "toy=tiny", "toy.dims=[1]", "guidance=s2", "guidance.scale=3", "guidance.omega=0,2",
             f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((sweep / "models").glob("*.safetensors"))) == 2  # trained once, shared by the runs
    g = _toy(f"gather={sweep}", f"hydra.run.dir={tmp_path / 'gather'}")
    assert g.returncode == 0, g.stderr[-3000:]
    table = list(csv.DictReader(open(tmp_path / "gather" / "sweep.csv")))
    assert sorted(float(t["guidance.omega"]) for t in table) == [0.0, 2.0]
    assert (tmp_path / "gather" / "sweep.png").is_file()
    cfg_row = [t for t in table if float(t["guidance.omega"]) == 0][0]
    assert abs(float(cfg_row["w1"]) - float(rows[("1", "cfg")]["w1"])) < 1e-9  # ω = 0 is the suite's CFG


def test_script_errors_are_one_line(tmp_path):
    r = _toy(f"gather={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'g'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: no */row.csv under {tmp_path / 'nothing'} (is it a multirun dir of scripts/toy.py?)"]


def test_results_are_never_overwritten(tmp_path):
    from s2g_toy.figures import write_csv

    write_csv([{"a": 1}], tmp_path / "t.csv")
    with pytest.raises(FileExistsError):
        write_csv([{"a": 2}], tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a", "1"]
