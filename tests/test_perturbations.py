"""The perturbation seam (skip / identity attention / smoothed attention) and the guiders built on it: PAG and SEG
forwards against diffusers' SD3Transformer2DModel with its PAG processor / SEG hook (random weights), perturbed rows
in the batched sweep, PAG / SEG / TCFG / FDG combinations against diffusers' guiders, bad input."""
import math

import pytest
import torch

import s2g.guidance as G
from s2g.guidance.base import Step
from s2g.models import load_mmdit
from s2g.models.mmdit import gaussian_blur_tokens
from s2g.models.sweep import IDENTITY_ATTENTION, SKIP, Perturbation, block_rows, smoothed_attention
from s2g.sampling import GuidedDenoiser, sample, uniform_sigmas
from test_mmdit import diffusers_model, inputs
from test_sweep import _mmdit, _mmdit_inputs, _toy, _toy_inputs

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


# ------------------------------------------------------------------------------------ forwards vs diffusers
def test_identity_attention_equals_diffusers_pag_joint_processor():
    """diffusers' SD3 PAG processor runs [original; perturbed] halves of a doubled batch; in the perturbed half
    each image token attends to itself and to the text tokens only. The "sd3" case has no qk-norm (the processor
    ignores norm_q / norm_k, so it only matches SD3-medium-like models)."""
    from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

    ref = diffusers_model("sd3")
    ours = load_mmdit(ref.state_dict())
    x, sigma, context, pooled = inputs("sd3")
    layer = 1
    ref.transformer_blocks[layer].attn.set_processor(PAGJointAttnProcessor2_0())
    with torch.no_grad():
        want = ref(torch.cat([x, x]), torch.cat([context, context]), torch.cat([pooled, pooled]),
                   timestep=1000 * torch.cat([sigma, sigma])).sample
        plain = ours(x, sigma, context, pooled)
        got = ours(x, sigma, context, pooled, skip={layer: IDENTITY_ATTENTION})
    assert (plain - want[:2]).abs().max() <= 1e-5
    assert (got - want[2:]).abs().max() <= 1e-5 and _rel(got, want[2:]) <= 1e-5
    assert (got - plain).abs().max() > 1e-2  # the perturbation does something


def _seg_hooked(ref, layer, sigma, blur):
    """diffusers' SEG hook on `layer`'s image queries (to_q). Its finite / infinite branches are swapped
    (a diffusers 0.42 bug): threshold 0 makes it blur at `sigma`, a finite sigma gives the mean."""
    from diffusers.hooks.smoothed_energy_guidance_utils import (SmoothedEnergyGuidanceConfig,
                                                               _apply_smoothed_energy_guidance_hook)
    _apply_smoothed_energy_guidance_hook(ref, SmoothedEnergyGuidanceConfig([layer]), sigma)
    if blur:
        for m in ref.transformer_blocks[layer].modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None:
                for hook in registry.hooks.values():
                    hook.blur_threshold_inf = 0.0
    return ref


@pytest.mark.parametrize("ours_sigma,ref_sigma,blur", [(1.5, 1.5, True), (0.7, 0.7, True),
                                                      (math.inf, 2.0, False), (1e5, 2.0, False)])
def test_smoothed_attention_equals_diffusers_seg_hook(ours_sigma, ref_sigma, blur):
    """On a square 8x8 token grid (diffusers assumes one): our blur (or mean, for σ > 9999) of the image queries,
    before the qk-norm, in an MMDiT-X block (qk-norm, dual attention: both attentions' image queries) and in an
    SD3 block."""
    for case, layer in (("mmditx", 1), ("sd3", 2)):
        ref = diffusers_model(case)
        ours = load_mmdit(ref.state_dict(), heads=3 if case == "mmditx" else None)
        x, sigma, context, pooled = inputs(case)
        x = torch.randn(2, x.shape[1], 16, 16, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            plain = ours(x, sigma, context, pooled)
            got = ours(x, sigma, context, pooled, skip={layer: smoothed_attention(ours_sigma)})
            want = _seg_hooked(ref, layer, ref_sigma, blur)(x, context, pooled, timestep=1000 * sigma).sample
        assert (got - want).abs().max() <= 1e-5 and _rel(got, want) <= 1e-5, case
        assert (got - plain).abs().max() > 1e-2


def test_blur_on_a_non_square_grid_is_separable_and_keeps_the_mean_of_a_constant():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6 * 4, 3, 5, generator=g)
    out = gaussian_blur_tokens(q, (6, 4), 0.8)
    # The same blur, one axis at a time, written independently (reflect padding, 1-D Gaussian taps).
    def blur_axis(t, dim, n):
        k = min(math.ceil(6 * 0.8) + 1 - math.ceil(6 * 0.8) % 2, n + 1 - n % 2)
        taps = torch.exp(-0.5 * (torch.arange(k) - (k - 1) / 2) ** 2 / 0.8 ** 2)
        taps = taps / taps.sum()
        idx = torch.arange(n)[:, None] + torch.arange(k)[None] - k // 2
        idx = idx.abs()
        idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)
        return (t.index_select(dim, idx.flatten()).unflatten(dim, (n, k)) * taps.reshape(
            [k if d == dim + 1 else 1 for d in range(t.ndim + 1)])).sum(dim + 1)
    grid = q.reshape(2, 6, 4, 15)
    want = blur_axis(blur_axis(grid, 1, 6), 2, 4).reshape(q.shape)
    assert torch.allclose(out, want, atol=1e-6)
    const = torch.ones(1, 24, 1, 2)
    assert torch.allclose(gaussian_blur_tokens(const, (6, 4), 3.0), const)


# ------------------------------------------------------------------------------------- the batched sweep
def test_perturbed_rows_in_one_sweep_equal_separate_passes_and_fork_at_their_block():
    model = _mmdit()
    x, cond, _ = _mmdit_inputs()
    sig = torch.tensor([0.7, 0.4])
    plans = [frozenset(), {3: IDENTITY_ATTENTION}, {3: smoothed_attention(1.0)}, {3: SKIP, 5: IDENTITY_ATTENTION},
             frozenset({3}), {1: smoothed_attention(math.inf), 6: SKIP}]
    log = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: log.append((i, a[1].shape[0])))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        shared = model.forward_shared(x, sig, skips=plans, **cond)
        calls = list(log)  # the sweep's block calls only
        n_shared = sum(r for _, r in calls)
        separate = [model(x, sig, skip=p, **cond) for p in plans]
    for h in hooks:
        h.remove()
    for p, a, b in zip(plans, shared, separate):
        assert (a - b).abs().max() <= 1e-5, f"plan {p}"
    assert len({round(v.sum().item(), 4) for v in separate}) == len(plans)  # every plan changes the output
    # Block 0: one history, one slab of B rows. Block 1: the plain call and the blurred row's own call. Block 3:
    # plain rows (two histories), the PAG row and the SEG row; the skipping rows run nothing.
    B = 2
    assert calls[:3] == [(0, B), (1, B), (1, B)] and [r for i, r in calls if i == 3] == [2 * B, B, B]
    # Distinct (history, action) per block, counted by hand: 1, 2, 2, 4, 5, 6, 5, 6 groups.
    assert n_shared == block_rows(plans, [0] * len(plans), B, model.num_blocks) == B * 31
    assert sum(B * model.num_blocks for _ in plans) - B * 3 == B * 45  # separate passes (3 skipped blocks in all)


@pytest.mark.parametrize("make", [lambda: G.PerturbedAttentionGuidance(scale=3, layers=[2, 5], start=0, stop=1),
                                  lambda: G.SmoothedEnergyGuidance(scale=3, layers=[4], blur_sigma=1.0)])
def test_pag_and_seg_sampling_batched_equals_separate_passes(make):
    model = _mmdit()
    x, cond, uncond = _mmdit_inputs()
    sigmas = uniform_sigmas(4)
    with torch.no_grad():
        a = sample(model, x, sigmas, make(), cond, uncond, progress=False)
        b = sample(model, x, sigmas, make(), cond, uncond, progress=False, share_prefix=False)
        c = sample(model, x, sigmas, G.CFG(3), cond, uncond, progress=False)
    assert (a - b).abs().max() <= 1e-5 and (a - c).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- bad input
def test_toy_mlp_refuses_attention_perturbations_before_any_step():
    model = _toy()
    x, cond, uncond = _toy_inputs()
    with pytest.raises(ValueError, match="cannot do identity_attention"):
        model(x, torch.full((3,), 0.5), skip={1: IDENTITY_ATTENTION}, **cond)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    for guider in (G.PerturbedAttentionGuidance(layers=[1]), G.SmoothedEnergyGuidance(layers=[1])):
        with pytest.raises(ValueError, match="ToyMLP cannot do") as err:
            sample(model, x, uniform_sigmas(3), guider, cond, uncond, progress=False)
        assert "\n" not in str(err.value)
    assert not calls
    # Skips still work on the toy, as plans or sets.
    s = torch.full((3,), 0.5)
    assert torch.equal(model(x, s, skip={2: SKIP}, **cond), model(x, s, skip=frozenset({2}), **cond))


@pytest.mark.parametrize("make,match", [
    (lambda: smoothed_attention(0.0), "sigma > 0"),
    (lambda: smoothed_attention(-1.0), "sigma > 0"),
    (lambda: G.SmoothedEnergyGuidance(blur_sigma=0), "sigma > 0"),
    (lambda: Perturbation("dropout"), "unknown perturbation"),
    (lambda: G.PerturbedAttentionGuidance(layers=[]), "layers"),
    (lambda: G.PerturbedAttentionGuidance(start=0.5, stop=0.1), "start"),
    (lambda: G.TCFG(space="x0"), "space"),
    (lambda: G.FDG(scales=[5, 3], parallel_weights=[1.0]), "parallel_weights"),
    (lambda: G.PerturbedAttentionGuidance(layers=[8]).reset(8), "out of range"),
    (lambda: _mmdit()(*_mmdit_inputs()[:1], torch.ones(2), skip={8: IDENTITY_ATTENTION}, **_mmdit_inputs()[1]),
     "outside the 8 blocks"),
])
def test_bad_input_is_one_line(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------ combinations vs diffusers' guiders
def _drive(ours, ref, n, shape=(2, 3, 8, 8), ptb=True, tol=1e-9):
    """Our estimate's velocity vs diffusers' guider output at every step of an n-step run, same predictions."""
    x = torch.randn(shape, dtype=torch.float64)
    ours.reset(8)
    active = []
    for i in range(n):
        step = Step(i, n, 1 - i / n, 1 - (i + 1) / n)
        vc, vu, vp = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
        ref.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(1000 * step.sigma))
        passes = ours.passes(step)
        by_pass = [vc if p == G.COND else vu if p == G.UNCOND else vp for p in passes]
        est = ours.combine(x, step, passes, by_pass)
        want = ref.forward(vc, vu, vp).pred if ptb else ref.forward(vc, vu).pred
        torch.testing.assert_close((x - est.x0) / step.sigma, want, rtol=tol, atol=tol)
        active.append(len(passes) == 3)
    return active


def test_pag_and_seg_combination_and_step_window_equal_diffusers():
    dg = pytest.importorskip("diffusers.guiders")
    active = _drive(G.PerturbedAttentionGuidance(), dg.PerturbedAttentionGuidance(perturbed_guidance_layers=[1]), 28)
    assert [i for i, a in enumerate(active) if a] == [1, 2, 3, 4]  # int(0.28) < i < int(5.6)
    active = _drive(G.SmoothedEnergyGuidance(), dg.SmoothedEnergyGuidance(seg_guidance_layers=[1]), 10)
    assert [i for i, a in enumerate(active) if a] == list(range(1, 10))  # 0 < i < 10
    pag = G.PerturbedAttentionGuidance(scale=4, perturbed_scale=1.5, start=0.2, stop=0.9)
    _drive(pag, dg.PerturbedAttentionGuidance(guidance_scale=4, perturbed_guidance_scale=1.5,
                                              perturbed_guidance_start=0.2, perturbed_guidance_stop=0.9,
                                              perturbed_guidance_layers=[1]), 12)


def test_tcfg_equals_diffusers_on_v():
    dg = pytest.importorskip("diffusers.guiders")
    # diffusers takes the SVD in float32 (we use float64): agreement to float32 rounding of the projection.
    _drive(G.TCFG(scale=5.0), dg.TangentialClassifierFreeGuidance(guidance_scale=5.0), 6, ptb=False, tol=5e-5)


def test_tcfg_damps_the_tangential_part_of_the_uncond_prediction():
    """Independent check: c ∥ u leaves CFG unchanged. For u = c/2 + ε·e with e ⟂ c, |e| = |c|, the top singular
    direction is ∝ c + (c/2 + ε·e)/2 (to first order in ε), so u's projection keeps 0.2·ε·e of its ε·e and the
    guided result's e-part is -0.4·ε·e, against CFG's -2·ε·e."""
    from s2g.guidance.tcfg import tangential_damping
    c = torch.randn(1, 400, dtype=torch.float64)
    assert torch.allclose(tangential_damping(c, 0.5 * c, 3.0), 0.5 * c + 3.0 * (c - 0.5 * c))
    e = torch.randn(1, 400, dtype=torch.float64)
    e = e - (e * c).sum() / (c * c).sum() * c
    e = e * c.norm() / e.norm()
    eps = 1e-3
    out = tangential_damping(c, 0.5 * c + eps * e, 3.0)
    along_e = ((out * e).sum() / (e * e).sum()).item()
    assert along_e == pytest.approx(-0.4 * eps, rel=1e-2)
    assert ((out * c).sum() / (c * c).sum()).item() == pytest.approx(2.0, abs=1e-5)


def test_tcfg_eps_space_guides_the_noise_prediction():
    from s2g.guidance.tcfg import tangential_damping
    x, vc, vu = (torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    step = Step(3, 10, 0.6, 0.5)
    est = G.TCFG(scale=4.0, space="eps").combine(x, step, [G.COND, G.UNCOND], [vc, vu])
    want = tangential_damping(x + 0.4 * vc, x + 0.4 * vu, 4.0)
    torch.testing.assert_close(est.eps, want)


def test_fdg_equals_diffusers():
    pytest.importorskip("kornia")  # diffusers' FDG builds its pyramid with kornia
    dg = pytest.importorskip("diffusers.guiders")
    for scales, weights in (([10.0, 5.0], None), ([7.0, 4.0, 2.0], [0.5, 1.0, 0.2])):
        ref = dg.FrequencyDecoupledGuidance(guidance_scales=scales, parallel_weights=weights)
        _drive(G.FDG(scales=scales, parallel_weights=weights), ref, 4, shape=(2, 3, 16, 16), ptb=False)


def test_fdg_pyramid_is_exact_and_equal_scales_are_cfg():
    """Independent of kornia: the pyramid rebuilds its input, and one scale on every level is plain CFG (the
    pyramid is linear), in D, v or ε alike."""
    from s2g.guidance.fdg import laplacian_pyramid, rebuild
    x, vc, vu = (torch.randn(2, 3, 16, 16, dtype=torch.float64) for _ in range(3))
    pyr = laplacian_pyramid(vc, 3)
    assert [p.shape[-1] for p in pyr] == [16, 8, 4] and torch.allclose(rebuild(pyr), vc)
    step = Step(3, 10, 0.6, 0.5)
    fdg = G.FDG(scales=[4.0, 4.0, 4.0]).combine(x, step, [G.COND, G.UNCOND], [vc, vu])
    cfg = G.CFG(4.0).combine(x, step, [G.COND, G.UNCOND], [vc, vu])
    torch.testing.assert_close(fdg.x0, cfg.x0)
    assert not torch.allclose(G.FDG().combine(x, step, [G.COND, G.UNCOND], [vc, vu]).x0, cfg.x0)
