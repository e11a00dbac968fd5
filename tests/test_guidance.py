"""Each guider's combination rule against an independent formula, on random tensors."""
import math

import pytest
import torch

import s2g.guidance as G
from s2g.guidance.base import COND, UNCOND, Pass, Step

torch.manual_seed(0)
SHAPE = (4, 3, 5, 6)


def rand(*shape):
    return torch.randn(*(shape or SHAPE), dtype=torch.float64)


def to_d(x, s, v):
    return x - s * v


def to_eps(x, s, v):
    return x + (1 - s) * v


STEP = Step(index=5, num_steps=20, sigma=0.6, sigma_next=0.55)


def run(guider, velocities_by_pass, x, step=STEP, num_blocks=8):
    guider.reset(num_blocks)
    passes = guider.passes(step)
    vs = [velocities_by_pass(p) for p in passes]
    return passes, vs, guider.combine(x, step, passes, vs)


def test_cfg_in_d_v_and_eps_forms_agree():
    x, vc, vu, s, w = rand(), rand(), rand(), STEP.sigma, 5.5
    _, _, est = run(G.CFG(scale=w), lambda p: vc if p.cond else vu, x)
    d_expect = to_d(x, s, vu) + w * (to_d(x, s, vc) - to_d(x, s, vu))
    eps_expect = to_eps(x, s, vu) + w * (to_eps(x, s, vc) - to_eps(x, s, vu))
    torch.testing.assert_close(est.x0, d_expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.eps, eps_expect, rtol=0, atol=1e-12)


def test_linear_guiders_are_euler_consistent():
    # For every affine rule, the estimate must lie on the line through x: (1-σ)x̂0 + σε̂ = x.
    x, s = rand(), STEP.sigma
    vs = {}
    for guider in [G.CFG(3.0), G.AutoGuidance(2.0, weak=object()), G.SkipLayerGuidance(layers=[2], start=0, stop=1),
                   G.S2Guidance(omega=0.7, interval=(0, 1)), G.APG(5.0), G.CFGZeroStar(4.0, zero_init_steps=0)]:
        _, _, est = run(guider, lambda p: vs.setdefault(p, rand()), x)
        torch.testing.assert_close((1 - s) * est.x0 + s * est.eps, x, rtol=0, atol=1e-10)


def test_cfgpp_renoises_with_uncond_and_equals_euler_cfg_with_w_eff():
    x, vc, vu, lam = rand(), rand(), rand(), 0.6
    s, s2 = STEP.sigma, STEP.sigma_next
    _, _, est = run(G.CFGPlusPlus(scale=lam), lambda p: vc if p.cond else vu, x)
    d_lam = to_d(x, s, vu) + lam * (to_d(x, s, vc) - to_d(x, s, vu))
    torch.testing.assert_close(est.x0, d_lam, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.eps, to_eps(x, s, vu), rtol=0, atol=1e-12)
    x_next = (1 - s2) * est.x0 + s2 * est.eps
    w_eff = lam * s * (1 - s2) / (s - s2)
    euler_cfg = x + (s2 - s) * (vu + w_eff * (vc - vu))
    torch.testing.assert_close(x_next, euler_cfg, rtol=0, atol=1e-10)


def apg_reference(dc, du, buf, w, beta, r, eta):
    """APG Algorithm 1 written out sample by sample with plain loops."""
    out, new_buf = torch.empty_like(dc), torch.empty_like(dc)
    for b in range(dc.shape[0]):
        delta = dc[b] - du[b]
        m = delta + (beta * buf[b] if buf is not None else 0)
        new_buf[b] = m
        n = m.norm()
        m = m * min(1.0, r / n.item())
        par = (m * dc[b]).sum() / (dc[b] * dc[b]).sum() * dc[b]
        out[b] = dc[b] + (w - 1) * ((m - par) + eta * par)
    return out, new_buf


def test_apg_matches_paper_algorithm_in_d_space_with_momentum_over_steps():
    x, w, beta, r, eta = rand(), 4.0, -0.5, 3.0, 0.3
    apg = G.APG(scale=w, momentum=beta, norm_threshold=r, eta=eta)
    apg.reset()
    buf = None
    for i, s in enumerate([0.8, 0.6, 0.4]):
        step = Step(i, 3, s, s - 0.2)
        vc, vu = rand(), rand()
        est = apg.combine(x, step, apg.passes(step), [vc, vu])
        expect, buf = apg_reference(to_d(x, s, vc), to_d(x, s, vu), buf, w, beta, r, eta)
        torch.testing.assert_close(est.x0, expect, rtol=1e-10, atol=1e-10)
    # Applied on velocities instead, the same rule gives a different answer (APG is not parametrisation-free).
    vc, vu = rand(), rand()
    on_v, _ = apg_reference(vc, vu, None, w, 0.0, r, eta)
    apg = G.APG(scale=w, momentum=0.0, norm_threshold=r, eta=eta)
    est = apg.combine(x, STEP, apg.passes(STEP), [vc, vu])
    assert not torch.allclose(est.x0, to_d(x, STEP.sigma, on_v), atol=1e-3)


def test_cfg_zero_star_matches_diffusers_including_zero_init_count():
    diffusers_guiders = pytest.importorskip("diffusers.guiders")
    w, k, n = 4.0, 2, 6
    ours = G.CFGZeroStar(scale=w, zero_init_steps=k)
    ref = diffusers_guiders.ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=k)
    ours.reset()
    x = rand().float()
    for i in range(n):
        step = Step(i, n, 1 - i / n, 1 - (i + 1) / n)
        vc, vu = torch.randn(SHAPE), torch.randn(SHAPE)
        ref.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(1000 * step.sigma))
        v_ref = ref.forward(vc, vu).pred
        passes = ours.passes(step)
        assert len(passes) == (0 if i < k else 2)  # zero-init steps need no network evaluation
        est = ours.combine(x, step, passes, [vc, vu][: len(passes)])
        v_ours = (x - est.x0) / step.sigma
        torch.testing.assert_close(v_ours, v_ref, rtol=1e-5, atol=1e-5)
        if i < k:
            assert torch.equal(est.x0, x) and torch.equal(est.eps, x)


def test_autoguidance_uses_the_weak_model_on_the_conditional_input():
    weak = object()
    x, vc, vw, w = rand(), rand(), rand(), 2.3
    passes, _, est = run(G.AutoGuidance(scale=w, weak=weak), lambda p: vw if p.denoiser is weak else vc, x)
    assert passes == [COND, Pass(cond=True, denoiser=weak)]
    d_w, d_c = to_d(x, STEP.sigma, vw), to_d(x, STEP.sigma, vc)
    torch.testing.assert_close(est.x0, d_w + w * (d_c - d_w), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="weak denoiser"):
        G.AutoGuidance(2.0).passes(STEP)


def test_slg_formula_and_strict_step_window():
    x, vc, vu, vs_, w, s = rand(), rand(), rand(), rand(), 4.0, 2.8
    slg = G.SkipLayerGuidance(scale=w, skip_scale=s, layers=[7, 8, 9], start=0.01, stop=0.2)
    pick = lambda p: vs_ if p.skip else (vc if p.cond else vu)
    passes, _, est = run(slg, pick, x, step=Step(3, 28, 0.9, 0.88), num_blocks=24)
    assert passes[2] == Pass(cond=True, skip=frozenset({7, 8, 9}))
    dc, du, ds = (to_d(x, 0.9, v) for v in (vc, vu, vs_))
    torch.testing.assert_close(est.x0, du + w * (dc - du) + s * (dc - ds), rtol=0, atol=1e-12)
    # 28 steps: active on 1..5 (0.28 < i < 5.6), plain CFG at steps 0 and 6.
    active = [i for i in range(28) if len(slg.passes(Step(i, 28, 0.5, 0.4))) == 3]
    assert active == [1, 2, 3, 4, 5]
    _, _, est = run(slg, pick, x, step=Step(6, 28, 0.9, 0.88), num_blocks=24)
    torch.testing.assert_close(est.x0, du + w * (dc - du), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3])
def test_s2_difference_form_and_naive_average(n):
    x, vc, vu, lam, om = rand(), rand(), rand(), 7.5, 0.25
    subs = {}
    s2 = G.S2Guidance(scale=lam, omega=om, num_subnetworks=n, interval=(0, 1), seed=1)
    passes, vs, est = run(s2, lambda p: vc if not p.skip and p.cond else vu if not p.cond
                          else subs.setdefault(len(subs), rand()), x)
    assert len(passes) == 2 + n and all(p.cond and p.skip for p in passes[2:])
    s = STEP.sigma
    dc, du = to_d(x, s, vc), to_d(x, s, vu)
    d_hat = [to_d(x, s, v) for v in vs[2:]]
    expect = du + lam * (dc - du) - om * sum(dh - dc for dh in d_hat) / n
    torch.testing.assert_close(est.x0, expect, rtol=0, atol=1e-11)


def test_s2_appendix_form_is_the_literal_shrink():
    x, vc, vu, vh, lam, om = rand(), rand(), rand(), rand(), 3.0, 0.25
    s2 = G.S2Guidance(scale=lam, omega=om, interval=(0, 1), form="appendix")
    _, _, est = run(s2, lambda p: vh if p.skip else (vc if p.cond else vu), x)
    s = STEP.sigma
    dc, du, dh = to_d(x, s, vc), to_d(x, s, vu), to_d(x, s, vh)
    torch.testing.assert_close(est.x0, du + lam * (dc - du) - om * dh, rtol=0, atol=1e-11)


def test_s2_outside_interval_is_plain_cfg():
    x, vc, vu = rand(), rand(), rand()
    s2 = G.S2Guidance(scale=5.0, omega=1.0, interval=(0.1, 0.5), interval_unit="sigma")
    passes, _, est = run(s2, lambda p: vc if p.cond else vu, x)  # σ = 0.6
    assert passes == [COND, UNCOND]
    _, _, cfg = run(G.CFG(5.0), lambda p: vc if p.cond else vu, x)
    assert torch.equal(est.x0, cfg.x0) and torch.equal(est.eps, cfg.eps)


@pytest.mark.parametrize("num_blocks,ratio,expected", [(24, 0.1, 2), (10, 0.1, 1), (8, 0.05, 1), (24, 0.3, 7),
                                                      (38, 0.1, 4), (12, 0.125, 2)])
def test_s2_masks_count_and_protection(num_blocks, ratio, expected):
    s2 = G.S2Guidance(drop_ratio=ratio, protected_blocks=[0, 1], seed=3)
    s2.reset(num_blocks)
    masks = [s2.sample_mask() for _ in range(300)]
    assert all(len(m) == expected for m in masks)
    assert not any(m & {0, 1} for m in masks)
    assert set().union(*masks) == set(range(2, num_blocks))  # every unprotected block gets dropped sometimes


def test_s2_masks_reproducible_from_seed_and_reset():
    a, b = G.S2Guidance(seed=7), G.S2Guidance(seed=7)
    a.reset(24), b.reset(24)
    first = [a.sample_mask() for _ in range(20)]
    assert first == [b.sample_mask() for _ in range(20)]
    a.reset(24)
    assert [a.sample_mask() for _ in range(20)] == first
    c = G.S2Guidance(seed=8)
    c.reset(24)
    assert [c.sample_mask() for _ in range(20)] != first


@pytest.mark.parametrize("make,match", [
    (lambda: G.S2Guidance(drop_ratio=0.0), "drop_ratio"),
    (lambda: G.S2Guidance(drop_ratio=1.0), "drop_ratio"),
    (lambda: G.S2Guidance(num_subnetworks=0), "num_subnetworks"),
    (lambda: G.S2Guidance(omega=-0.1), "omega"),
    (lambda: G.S2Guidance(scale=-1), "scale"),
    (lambda: G.CFG(scale=float("nan")), "scale"),
    (lambda: G.S2Guidance(interval=(0.2, 1.5)), "interval"),
    (lambda: G.S2Guidance(interval=(0.9, 0.1)), "reversed"),
    (lambda: G.CFG(interval=(0.5,)), "pair"),
    (lambda: G.S2Guidance(protected_blocks=[0, 1, 2, 3], num_blocks=4), "leave none"),
    (lambda: G.S2Guidance(drop_ratio=0.9, protected_blocks=[0, 1, 2], num_blocks=10), "only 7"),
    (lambda: G.S2Guidance(form="mean"), "form"),
    (lambda: G.APG(momentum=1.0), "momentum"),
    (lambda: G.CFGZeroStar(zero_init_steps=-1), "zero_init_steps"),
    (lambda: G.SkipLayerGuidance(start=0.5, stop=0.2), "start"),
    (lambda: G.SkipLayerGuidance(layers=[]), "layers"),
    (lambda: G.from_spec({"_target_": "s2g.guidance.S3"}), "unknown guider 's2g.guidance.S3'"),
    (lambda: G.from_spec({"_target_": "s2g.guidance.base.Step"}), "must name a Guider class"),
])
def test_invalid_configuration_fails_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_negative_omega_only_by_explicit_opt_in():
    s2 = G.S2Guidance(omega=-0.5, allow_negative_omega=True)
    assert s2.omega == -0.5


def test_every_guidance_yaml_instantiates():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    configs = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.stem for p in (configs / "guidance").glob("*.yaml"))
    assert {"cfg", "cfgpp", "apg", "cfg_zero_star", "autoguidance", "slg", "s2", "naive_s2", "none"} <= set(names)
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        for name in names:
            cfg = compose(overrides=[f"+guidance={name}", "+seed=11"])
            guider = instantiate(cfg.guidance)
            assert isinstance(guider, G.Guider)
            again = G.from_spec(OmegaConf.to_container(cfg.guidance, resolve=True))  # the scripts' way: the same
            assert type(again) is type(guider) and vars(again) == vars(guider)
        naive = instantiate(compose(overrides=["+guidance=naive_s2", "+seed=11"]).guidance)
    assert (naive.num_subnetworks, naive.omega, naive.seed, naive.interval) == (4, 0.25, 11, (0.1, 0.9))


def test_s2_window_active_steps_on_sd3_schedule_under_each_reading():
    """The paper's "central 80%" on SD3's 28-step, shift-3 schedule: 23 steps (2-24) read as step fractions
    (diffusers' rule int(0.1·28) <= i < int(0.9·28)), 20 read as σ ∈ [0.1, 0.9]. The step reading is the one
    the paper's cost table (x1.41 = 79/56 passes) implies, and the default."""
    from s2g.sampling import sd3_sigmas

    sig = sd3_sigmas(28, 3.0).tolist()
    steps = [Step(i, 28, sig[i], sig[i + 1]) for i in range(28)]
    by_steps = [s.index for s in steps if G.S2Guidance().active(s)]
    by_sigma = [s.index for s in steps if G.S2Guidance(interval_unit="sigma").active(s)]
    assert by_steps == list(range(2, 25)) and len(by_steps) == 23
    assert len(by_sigma) == 20 and by_sigma == [i for i in range(28) if 0.1 <= sig[i] <= 0.9]
    assert (56 + len(by_steps)) / 56 == pytest.approx(237.6 / 168.4, abs=0.002)
    # the whole run is [0, 1] in either unit
    assert all(G.S2Guidance(interval=(0.0, 1.0)).active(s) for s in steps)
    with pytest.raises(ValueError, match="interval_unit"):
        G.S2Guidance(interval_unit="percent")


def test_s2_masks_per_row_depend_on_the_row_key_not_the_batch():
    s2 = G.S2Guidance(seed=3, drop_ratio=0.25)
    s2.reset(8, rows=[11, 12, 13])
    batch = [s2.sample_mask() for _ in range(5)]
    assert all(isinstance(m, tuple) and len(m) == 3 for m in batch)
    assert len({m[0] for m in batch} | {m[1] for m in batch}) > 2  # rows and steps differ
    for r, key in enumerate([11, 12, 13]):
        s2.reset(8, rows=[key])
        alone = [s2.sample_mask() for _ in range(5)]
        assert alone == [m[r] for m in batch]  # one row alone is a plain frozenset, the same sets
    s2.reset(8, rows=[12, 11])
    assert [s2.sample_mask() for _ in range(5)] == [(m[1], m[0]) for m in batch]


def test_kappa_probe_sums_over_every_batch():
    """The sampler resets the guider at each batch: κ's sums must run over both batches, not the last."""
    from conftest import TinyBlockNet
    from s2g.guidance.controls import KappaProbe
    from s2g.sampling import sample, uniform_sigmas

    net = TinyBlockNet().eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 0, 1])),
               (torch.randn(3, 3, generator=g), torch.tensor([1, 1, 0]))]
    both, parts = KappaProbe(scale=3.0, omega=1.0, seed=0), []
    for x, label in batches:
        cond, uncond = {"label": label}, {"label": torch.full_like(label, 2)}
        sample(net, x, uniform_sigmas(8), both, cond, uncond, progress=False)
        parts.append(KappaProbe(scale=3.0, omega=1.0, seed=0))
        sample(net, x, uniform_sigmas(8), parts[-1], cond, uncond, progress=False)
    assert parts[0]._den > 0 and parts[1]._den > 0
    assert both._num == pytest.approx(parts[0]._num + parts[1]._num, rel=1e-12)
    assert both._den == pytest.approx(parts[0]._den + parts[1]._den, rel=1e-12)
    assert both.kappa != pytest.approx(parts[1].kappa)  # the old behaviour: the last batch only
    both.clear()
    assert both.kappa == 0.0


def test_adding_a_guider_is_one_module_and_one_yaml(tmp_path, monkeypatch):
    """What s2g/guidance/README.md says: a Guider subclass in a module and a yaml naming it, nothing registered."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from s2g.config import guider_factory

    (tmp_path / "my_guidance.py").write_text(
        "from s2g.guidance.cfg import CFG\n\nclass HalfCFG(CFG):\n    def __init__(self, scale=2.0, interval=(0.0, 1.0)):\n"
        "        super().__init__(scale / 2, interval)\n")
    (tmp_path / "guidance").mkdir()
    (tmp_path / "guidance" / "half.yaml").write_text("_target_: my_guidance.HalfCFG\nscale: 3.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose("evaluate", overrides=["guidance=half", f"hydra.searchpath=[file://{tmp_path}]"])
    guider = guider_factory(cfg.guidance)(0)
    assert type(guider).__name__ == "HalfCFG" and guider.scale == 1.5
