"""Wan 2.1's sampling: its σ grid and integer timesteps (against Wan's construction and diffusers), the flow UniPC
sampler against diffusers' UniPCMultistepScheduler on a fixed analytic denoiser, the timestep table that feeds the
network Wan's integers, and every sampler on Wan-shaped [B, C, F, H, W] latents."""
import math

import pytest
import torch

import s2g.guidance as G
from s2g.models import WanConfig, WanDiT
from s2g.sampling import (SAMPLERS, DiscreteTimesteps, GuidedDenoiser, sample, sample_euler, sd3_sigmas,
                          uniform_sigmas, wan_sigmas, wan_timesteps)

pytestmark = pytest.mark.usefixtures("one_thread")

np = pytest.importorskip("numpy")

GRIDS = [(50, 5.0), (50, 3.0), (40, 12.0), (20, 8.0), (7, 1.0), (2, 5.0), (1, 5.0)]


def wan_reference_grid(steps: int, shift: float):
    """Wan's FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py, shift=1 at init, the real shift given
    to set_timesteps), restated with numpy: the fp32 1000-entry training table, its ends, the float64 sampling
    grid, the shift, int64 timesteps, fp32 sigmas with a final 0."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    table = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    sig = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    timesteps = torch.from_numpy(sig * 1000).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sig, [0]]).astype(np.float32))
    return sigmas, timesteps


@pytest.mark.parametrize("steps,shift", GRIDS)
def test_wan_grid_and_timesteps_are_wans_bit_for_bit(steps, shift):
    want_sigmas, want_t = wan_reference_grid(steps, shift)
    sigmas, t = wan_sigmas(steps, shift), wan_timesteps(steps, shift)
    assert sigmas.dtype == torch.float32 and t.dtype == torch.int64
    assert sigmas.shape == (steps + 1,) and t.shape == (steps,) and sigmas[-1] == 0
    assert torch.equal(sigmas, want_sigmas) and torch.equal(t, want_t)


def test_wan_grid_known_values():
    s, t = wan_sigmas(), wan_timesteps()  # the T2V defaults: 50 steps, shift 5
    assert t[0] == 999 and t[-1] == 92 and len(set(t.tolist())) == 50
    assert abs(s[0].item() - 0.99979985) < 1e-7 and abs(s[-2].item() - 0.09250686) < 1e-7
    with pytest.raises(ValueError, match="steps"):
        wan_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        wan_timesteps(10, 0.0)


def diffusers_unipc(steps: int, shift: float, wan_grid: bool = True):
    """diffusers' UniPC as Wan's pipeline there configures it (flow prediction, flow sigmas, all else default:
    order 2, bh2, predict_x0, lower_order_final, final σ 0), given Wan's unshifted grid or left on its own."""
    from diffusers import UniPCMultistepScheduler
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                  flow_shift=shift)
    if wan_grid:
        sigma_max = float(torch.tensor(1 - 1 / 1000, dtype=torch.float32))
        sch.set_timesteps(sigmas=np.linspace(sigma_max, 0, steps + 1)[:-1])
    else:
        sch.set_timesteps(steps)
    return sch


@pytest.mark.parametrize("steps,shift", GRIDS)
def test_diffusers_unipc_given_wans_grid_has_its_sigmas_and_timesteps(steps, shift):
    pytest.importorskip("diffusers")
    sch = diffusers_unipc(steps, shift)
    assert torch.equal(sch.sigmas, wan_sigmas(steps, shift)) and torch.equal(sch.timesteps, wan_timesteps(steps, shift))


def test_diffusers_default_flow_grid_is_not_wans():
    pytest.importorskip("diffusers")
    sch = diffusers_unipc(50, 5.0, wan_grid=False)
    gap = (sch.sigmas - wan_sigmas(50, 5.0)).abs().max().item()
    assert 4e-3 < gap < 5e-3  # measured 4.27e-3
    assert (sch.timesteps - wan_timesteps(50, 5.0)).abs().max() == 4


class Analytic:
    """A fixed denoiser: the exact velocity for Gaussian data N(mu, 0.5²) per coordinate, mu per label, plus a
    smooth non-linear term so the trajectory is not a closed form. Works on any shape [B, ...]."""

    num_blocks = 0

    def __init__(self):
        self.sigmas_seen = []

    def __call__(self, x, sigma, *, label=None, skip=None):
        self.sigmas_seen.append(sigma.clone())
        s = sigma.double().reshape(-1, *([1] * (x.ndim - 1)))
        mu = 0.5 if label is None else (0.5 + label.double()).reshape(-1, *([1] * (x.ndim - 1)))
        xd, a = x.double(), 1 - s
        x0 = mu + a * 0.25 / (a * a * 0.25 + s * s) * (xd - a * mu) + 0.1 * torch.sin(3 * xd) * s
        return ((xd - x0) / s).float()


def latents(seed=0, batch=2):
    return torch.randn(batch, 4, 3, 6, 10, generator=torch.Generator().manual_seed(seed))  # [B, C, F, H, W]


def run_diffusers(sch, den, x, velocity=None):
    """The diffusers loop: the model output at each step (the denoiser at the float σ, or `velocity(x, σ, t)`),
    then scheduler.step."""
    for i, t in enumerate(sch.timesteps):
        sig = sch.sigmas[i].expand(x.shape[0])
        v = den(x, sig) if velocity is None else velocity(x, sig, t)
        x = sch.step(v, t, x, return_dict=False)[0]
    return x


TRAJ_TOL = 1e-5  # measured up to 1.3e-6 over 50 steps on values up to ~2.6 (float64 vs fp32 solver coefficients)


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (20, 3.0), (7, 8.0), (2, 5.0), (1, 5.0)])
def test_unipc_trajectory_matches_diffusers(steps, shift):
    pytest.importorskip("diffusers")
    x = latents()
    want = run_diffusers(diffusers_unipc(steps, shift), Analytic(), x)
    got = sample(Analytic(), x, wan_sigmas(steps, shift), G.Conditional(), {}, sampler="unipc", progress=False)
    assert got.shape == x.shape and want.abs().max() > 0.5
    assert (got - want).abs().max() <= TRAJ_TOL


def test_unipc_with_cfg_matches_diffusers_on_the_cfg_velocity():
    """The guided path: CFG's estimate through the sampler equals diffusers stepping on v_u + w·(v_c - v_u)."""
    pytest.importorskip("diffusers")
    x = latents(1)
    den = Analytic()
    cond, uncond = {"label": torch.tensor([0, 1])}, {"label": torch.tensor([2, 2])}

    def v_cfg(x, sig, t):
        vu, vc = den(x, sig, **uncond), den(x, sig, **cond)
        return vu + 5.0 * (vc - vu)

    want = run_diffusers(diffusers_unipc(30, 5.0), den, x, v_cfg)
    got = sample(den, x, wan_sigmas(30, 5.0), G.CFG(5.0), cond, uncond, sampler="unipc", progress=False)
    assert (got - want).abs().max() <= 5 * TRAJ_TOL  # ×5: the scale amplifies rounding


def test_unipc_first_step_is_euler_and_the_last_returns_x0():
    den, x = Analytic(), latents(2)
    sig = wan_sigmas(1, 5.0)  # one step: order 1 all the way to σ = 0
    one = sample(den, x, sig, G.Conditional(), {}, sampler="unipc", progress=False)
    x0 = x - sig[0] * den(x, sig[:1].expand(2))
    assert torch.equal(one, x0)
    # A first-order step is Euler on the estimate, CFG++'s renoising included.
    two = wan_sigmas(2, 5.0)
    cond, uncond = {"label": torch.tensor([0, 1])}, {"label": torch.tensor([2, 2])}
    for guider in (G.CFG(4.0), G.CFGPlusPlus(0.6)):
        guided = GuidedDenoiser(den, guider, cond, uncond)
        est = guided(x, G.Step(0, 1, float(two[0]), float(two[1])))
        euler = (1 - two[1]) * est.x0 + two[1] * est.eps
        sampled = SAMPLERS["unipc"](guided, x, two[:2], progress=False)  # the first step alone
        assert (sampled - euler).abs().max() <= 1e-6


def test_unipc_converges_faster_than_euler():
    """Unguided on Gaussian data (exact velocity), on Wan's grid unshifted (shifted, its last σ is large and
    the final jump to x̂0 dominates every sampler's error): the sample's std approaches the data's 0.5 faster."""
    def std_err(sampler, steps):
        noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0))

        def gauss(x, sigma, **kw):
            t = sigma[:, None].double()
            a, xd = 1 - t, x.double()
            x0 = 2.0 + a * 0.25 / (a * a * 0.25 + t * t) * (xd - a * 2.0)
            return ((xd - x0) / t).float()

        out = sample(gauss, noise, wan_sigmas(steps, 1.0), G.Conditional(), {}, sampler=sampler, progress=False)
        return abs(out.std().item() - 0.5)

    for steps in (8, 12, 16):  # measured ratios 0.05, 0.15, 0.19
        assert std_err("unipc", steps) < 0.25 * std_err("euler", steps), steps


def test_unipc_reads_sigma_one_as_diffusers_nudged_grid():
    """σ_0 = 1 (diffusers' own grid, and SD3's) has λ = -inf: the solver reads it as 1 - 1e-6, as diffusers
    nudges it, and the run stays finite and matches."""
    pytest.importorskip("diffusers")
    sch = diffusers_unipc(12, 5.0, wan_grid=False)
    assert abs(sch.sigmas[0].item() - (1 - 1e-6)) < 1e-7
    x = latents(3)
    want = run_diffusers(sch, Analytic(), x)
    ours = sch.sigmas.clone()
    ours[0] = 1.0
    got = sample(Analytic(), x, ours, G.Conditional(), {}, sampler="unipc", progress=False)
    assert torch.isfinite(got).all() and (got - want).abs().max() <= TRAJ_TOL
    assert torch.isfinite(sample(Analytic(), x, sd3_sigmas(10), G.Conditional(), {}, sampler="unipc",
                                 progress=False)).all()


def test_discrete_timesteps_feed_wans_integers_and_the_solver_keeps_the_float_sigmas():
    """Wan's loop: the DiT gets the integer t, the solver steps on the float σ. Through the table, our run
    equals diffusers' with the model called at t (as WanPipeline calls it)."""
    pytest.importorskip("diffusers")
    steps, shift = 20, 5.0
    sigmas, t = wan_sigmas(steps, shift), wan_timesteps(steps, shift)
    den = Analytic()
    fed = DiscreteTimesteps(den, sigmas, t)
    x = latents(4)
    got = sample(fed, x, sigmas, G.Conditional(), {}, sampler="unipc", progress=False)
    seen = torch.stack([s[0] for s in den.sigmas_seen])
    assert torch.equal((seen.double() * 1000).round().long(), t)  # the network saw t/1000 ...
    assert ((seen.double() * 1000) - t).abs().max() < 1e-4       # ... within fp32 rounding
    assert (seen - sigmas[:-1]).abs().max() > 1e-4                # ... not the solver's σ
    want = run_diffusers(diffusers_unipc(steps, shift), den, x,
                         lambda x, sig, tt: den(x, torch.full_like(sig, tt.item() / 1000)))
    assert (got - want).abs().max() <= TRAJ_TOL
    plain = sample(Analytic(), x, sigmas, G.Conditional(), {}, sampler="unipc", progress=False)
    assert (got - plain).abs().max() > 1e-4  # the integers matter


def test_discrete_timesteps_pass_the_network_through_and_refuse_off_grid_sigmas():
    model = tiny_wan()
    sigmas, t = wan_sigmas(4), wan_timesteps(4)
    fed = DiscreteTimesteps(model, sigmas, t)
    assert fed.num_blocks == 3 and fed.config is model.config and fed.perturbations == model.perturbations
    x, ctx = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 5, 8)
    with torch.no_grad():
        a = fed(x, sigmas[1:2], context=ctx)
        b = model(x, t[1:2].double() / 1000, context=ctx)
        (c,) = fed.forward_shared(x, sigmas[1:2], context=ctx, skips=[frozenset({1})])
        d = model(x, t[1:2].double() / 1000, context=ctx, skip={1})
    assert torch.equal(a, b) and torch.equal(c, d)
    with pytest.raises(ValueError, match="not on this timestep table's grid"):
        fed.network_sigma(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="timesteps for a grid"):
        DiscreteTimesteps(model, sigmas, t[:2])


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    model = WanDiT(WanConfig(dim=32, num_layers=3, num_heads=2, ffn_dim=48, in_dim=4, out_dim=4, text_dim=8,
                             freq_dim=16, text_len=None)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # Wan's init zeroes the head: randomise so the output moves
            p.copy_(torch.randn(p.shape) / math.sqrt(p[0].numel()) if p.ndim >= 2 else 1 + 0.1 * torch.randn(p.shape))
    return model


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_on_wan_latents(sampler):
    """[B, C, F, H, W] latents through a tiny WanDiT, CFG, Wan's grid: finite, moved, and Euler equals a
    hand-written x + (σ' - σ)·v loop."""
    model = tiny_wan()
    x = torch.randn(2, 4, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    ctx = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(6))
    cond, uncond = {"context": ctx}, {"context": torch.zeros_like(ctx)}
    sigmas = wan_sigmas(4, 5.0)
    out = sample(model, x, sigmas, G.CFG(5.0), cond, uncond, sampler=sampler, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all() and (out - x).abs().max() > 0.1
    if sampler == "euler":
        y = x
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                sig = s.expand(2)
                vc, vu = model(y, sig, ctx), model(y, sig, torch.zeros_like(ctx))
                y = y + (s_next - s) * (vu + 5.0 * (vc - vu))
        assert (out - y).abs().max() <= 5e-5  # two ways of writing the step (measured 1.2e-5 on values ~6)
