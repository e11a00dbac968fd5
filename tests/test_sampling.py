"""The σ schedule, the samplers and the guided loop."""
import math

import pytest
import torch

import s2g.guidance as G
from s2g.sampling import GuidedDenoiser, sample, sample_euler, sd3_sigmas, uniform_sigmas
from s2g.guidance.base import Step


@pytest.mark.parametrize("steps,shift", [(28, 3.0), (50, 1.0), (4, 3.0), (40, 3.0), (1, 3.0)])
def test_sd3_sigmas_match_diffusers(steps, shift):
    scheduling = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    sch = scheduling.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift)
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    torch.testing.assert_close(ours, sch.sigmas.float(), rtol=0, atol=1e-6)


def test_sd3_sigmas_known_values():
    s = sd3_sigmas(28, 3.0)
    assert s[0] == 1.0 and abs(s[1].item() - 0.98738) < 1e-5 and abs(s[-2].item() - 0.008929) < 1e-6


def _run(net, guider, labels, seed=0, sampler="euler", steps=12):
    cond, uncond = labels
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    return sample(net, noise, uniform_sigmas(steps), guider, cond, uncond, sampler=sampler, progress=False)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_s2_with_omega_zero_is_bit_identical_to_cfg(net, labels, sampler):
    cfg = _run(net, G.CFG(scale=4.0), labels, sampler=sampler)
    s2 = _run(net, G.S2Guidance(scale=4.0, omega=0.0, interval=(0, 1)), labels, sampler=sampler)
    assert torch.equal(cfg, s2)
    moved = _run(net, G.S2Guidance(scale=4.0, omega=0.5, interval=(0, 1)), labels, sampler=sampler)
    assert (moved - cfg).abs().max() > 1e-3  # and ω > 0 really does something on this network


def test_same_seed_same_output_and_masks_do_not_touch_noise_rng(net, labels):
    a = _run(net, G.S2Guidance(scale=3.0, omega=1.0, interval=(0, 1), seed=5), labels, seed=1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = _run(net, G.S2Guidance(scale=3.0, omega=1.0, interval=(0, 1), seed=5), labels, seed=1)
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())  # neither the masks nor the loop draw from the global RNG
    c = _run(net, G.S2Guidance(scale=3.0, omega=1.0, interval=(0, 1), seed=6), labels, seed=1)
    assert not torch.equal(a, c)  # the mask seed matters...
    d = _run(net, G.S2Guidance(scale=3.0, omega=1.0, interval=(0, 1), seed=5), labels, seed=2)
    assert not torch.equal(a, d)  # ...independently of the noise seed


class Counting:
    def __init__(self, net):
        self.net, self.calls = net, []

    @property
    def num_blocks(self):
        return self.net.num_blocks

    def __call__(self, x, sigma, *, skip=frozenset(), **cond):
        self.calls.append((x.shape[0], frozenset(skip)))
        return self.net(x, sigma, skip=skip, **cond)


def test_passes_are_batched_and_naive_s2_averages_the_requested_masks(net, labels):
    cond, uncond = labels
    counting = Counting(net)
    s2 = G.S2Guidance(scale=3.0, omega=0.8, num_subnetworks=3, interval=(0, 1), seed=2)
    guided = GuidedDenoiser(counting, s2, cond, uncond)
    s2.reset(net.num_blocks)
    x = torch.randn(5, 3)
    step = Step(0, 10, 0.7, 0.6)
    torch.manual_seed(0)
    passes = s2.passes(step)
    s2.reset(net.num_blocks)
    est = guided(x, step)
    # cond+uncond in one batch of 10; each distinct mask one batch-5 call
    assert counting.calls[0] == (10, frozenset())
    assert [c[1] for c in counting.calls[1:]] == list(dict.fromkeys(p.skip for p in passes[2:]))
    sig = torch.full((5,), 0.7)
    vc, vu = net(x, sig, **cond), net(x, sig, **uncond)
    v_hat = torch.stack([net(x, sig, skip=p.skip, **cond) for p in passes[2:]]).mean(0)
    v = vu + 3.0 * (vc - vu) - 0.8 * (v_hat - vc)
    torch.testing.assert_close(est.x0, x - 0.7 * v, rtol=1e-5, atol=1e-5)


def test_cfg_runs_one_network_call_per_step(net, labels):
    counting = Counting(net)
    cond, uncond = labels
    sample(counting, torch.randn(5, 3), uniform_sigmas(7), G.CFG(2.0), cond, uncond, progress=False)
    assert counting.calls == [(10, frozenset())] * 7


def test_non_finite_prediction_names_the_step(labels):
    class Exploding:
        num_blocks = 1

        def __call__(self, x, sigma, **kw):
            return x / (sigma[:, None] >= 0.5).float() * 0  # 0 while σ >= 0.5, then nan

    with pytest.raises(FloatingPointError, match=r"step 6 \(σ=0.4000\)"):
        sample(Exploding(), torch.randn(5, 3), uniform_sigmas(10), G.CFG(2.0), *labels, progress=False)


def test_unknown_sampler_and_missing_uncond(net, labels):
    with pytest.raises(ValueError, match="unknown sampler 'heunn'"):
        _run(net, G.CFG(), labels, sampler="heunn")
    with pytest.raises(ValueError, match="needs an unconditional input"):
        sample(net, torch.randn(5, 3), uniform_sigmas(3), G.CFG(2.0), labels[0], None, progress=False)


class GaussianData:
    """Exact velocity for data x0 ~ N(mu, s²) per coordinate: E[x0|x_σ] = mu + a·s²/(a²s²+σ²)·(x - a·mu)."""

    num_blocks = 0

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma, **cond):
        t = sigma[:, None].double()
        a, x = 1 - t, x.double()
        x0 = self.mu + a * self.s**2 / (a * a * self.s**2 + t * t) * (x - a * self.mu)
        return ((x - x0) / t).to(torch.float32)


def _moments(sampler, steps, shift=None, n=40_000):
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    sigmas = uniform_sigmas(steps) if shift is None else sd3_sigmas(steps, shift)
    out = sample(GaussianData(2.0, 0.5), noise, sigmas, G.Conditional(), {}, sampler=sampler, progress=False)
    return out.mean().item(), out.std().item()


def test_unguided_euler_reproduces_gaussian_data_moments():
    mean, std = _moments("euler", 400, 3.0)
    assert abs(mean - 2.0) < 0.01 and abs(std - 0.5) < 0.01
    _, coarse = _moments("euler", 8, 3.0)
    assert abs(coarse - 0.5) > 0.05  # the test can fail: few Euler steps visibly shrink the variance


def test_dpmpp_2m_converges_faster_than_euler():
    # On a uniform σ grid. (SD3's grid ends with a tiny double-shifted σ_min; there the 2M extrapolation of the
    # last step over-shoots at low step counts, in the reference implementation as here.)
    for steps in (8, 16, 32):
        err_euler = abs(_moments("euler", steps)[1] - 0.5)
        err_dpm = abs(_moments("dpmpp_2m", steps)[1] - 0.5)
        assert err_dpm < 0.5 * err_euler, (steps, err_dpm, err_euler)


def _random_mmdit():
    from s2g.models.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(depth=6, hidden=32, heads=2, patch=2, in_channels=4, out_channels=4, context_dim=8,
                              pooled_dim=8, pos_embed_max_size=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # the training init zeroes the adaLN: randomise so every block matters
    return model


@pytest.mark.parametrize("guider", [G.S2Guidance(scale=4.0, omega=0.5, num_subnetworks=2, drop_ratio=0.34,
                                                 interval=(0, 1), seed=1),
                                    G.SkipLayerGuidance(scale=3.0, skip_scale=2.0, layers=[3], start=0, stop=1)])
def test_prefix_sharing_equals_separate_passes(guider):
    model = _random_mmdit()
    noise = torch.randn(3, 4, 6, 4, generator=torch.Generator().manual_seed(0))
    cond = {"context": torch.randn(3, 5, 8), "pooled": torch.randn(3, 8)}
    uncond = {"context": torch.zeros(3, 5, 8), "pooled": torch.zeros(3, 8)}
    outs = {}
    for share in (True, False):
        guider.reset(model.num_blocks)
        guided = GuidedDenoiser(model, guider, cond, uncond, share_prefix=share)
        with torch.no_grad():
            outs[share] = sample_euler(guided, noise, uniform_sigmas(6), progress=False)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)  # float rounding, amplified by w
    assert (outs[True] - noise).abs().max() > 0.1


def test_heun_converges_faster_than_euler_and_matches_a_fine_euler():
    for steps in (8, 16):
        err_euler = abs(_moments("euler", steps)[1] - 0.5)
        err_heun = abs(_moments("heun", steps)[1] - 0.5)
        assert err_heun < 0.25 * err_euler, (steps, err_heun, err_euler)
    mean, std = _moments("heun", 32)
    assert abs(mean - 2.0) < 0.01 and abs(std - 0.5) < 0.01


def test_heun_with_cfg_equals_a_hand_written_heun_on_the_guided_velocity(net, labels):
    cond, uncond = labels
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    sigmas = uniform_sigmas(5)
    out = sample(net, noise, sigmas, G.CFG(3.0), cond, uncond, sampler="heun", progress=False)

    def v(x, s):
        sig = torch.full((5,), s)
        vc, vu = net(x, sig, **cond), net(x, sig, **uncond)
        return vu + 3.0 * (vc - vu)

    x = noise
    with torch.no_grad():
        for s, s2 in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            d = v(x, s)
            x_e = x + (s2 - s) * d
            x = x_e if s2 == 0 else x + (s2 - s) * (d + v(x_e, s2)) / 2
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
