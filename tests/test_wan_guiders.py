"""Every guider on a tiny random-weight Wan DiT: two steps of Wan's own sampling (its σ grid, its integer
timesteps, flow UniPC) through `sample`, with context-only conditioning, and each guider's step checked by value
against its formula written out by hand, with perturbed networks built by hand (blocks replaced by the identity,
self-attention replaced by its values, queries replaced by their frame's mean) rather than through skip plans."""
import copy
import math

import pytest
import torch
from torch import nn

import s2g.guidance as G
from s2g.guidance.base import Step, flat_dot
from s2g.models import WanConfig, WanDiT
from s2g.sampling import DiscreteTimesteps, GuidedDenoiser, sample, wan_sigmas, wan_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SHIFT, W = 2, 5.0, 5.0  # two steps; Wan's T2V shift and the paper's λ on Wan
ROWS = [11, 12]  # the images' keys (their seeds): S² draws each image's masks from its own
SIGMAS, TIMESTEPS = wan_sigmas(STEPS, SHIFT), wan_timesteps(STEPS, SHIFT)
TOL = 2e-5  # guided estimate against its formula by hand (fp32, values ~1-10)


def tiny_wan(num_layers=6, seed=0, dim=32):
    torch.manual_seed(seed)
    model = WanDiT(WanConfig(dim=dim, num_layers=num_layers, num_heads=2, ffn_dim=48, in_dim=4, out_dim=4,
                             text_dim=8, freq_dim=16, text_len=8)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # Wan's init zeroes the head: randomise so every block matters
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / math.sqrt(p[0].numel()) if p.ndim >= 2 else 1 + 0.2 * r)
    return model


MODEL = tiny_wan()
WEAK = tiny_wan(num_layers=2, seed=1, dim=32)  # Autoguidance's weaker Wan: fewer blocks, other weights


def fed(net):
    """As a Wan pipeline runs it: the network sees Wan's integer timesteps, the solver the float σ."""
    return DiscreteTimesteps(net, SIGMAS, TIMESTEPS)


def inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 4, 6, generator=g)  # [B, C, F, H, W]: 3 latent frames of 4x6 -> 18 tokens
    cond = {"context": torch.randn(2, 5, 8, generator=g)}  # no pooled text: Wan has none
    uncond = {"context": torch.randn(2, 6, 8, generator=g)}  # a negative prompt, as Wan's default
    return x, cond, uncond


X, COND, UNCOND = inputs()
S0 = Step(0, STEPS, float(SIGMAS[0]), float(SIGMAS[1]))
S1 = Step(1, STEPS, float(SIGMAS[1]), float(SIGMAS[2]))


def run(guider, share_prefix=True, sampler="unipc"):
    return sample(fed(MODEL), X, SIGMAS, guider, COND, UNCOND, sampler=sampler, rows=ROWS, progress=False,
                  share_prefix=share_prefix)


CFG_OUT = run(G.CFG(W))


def estimate(guider, step=S0, x=X):
    """The guider's estimate at `step`, through the guided denoiser (batched sweep), after a fresh reset."""
    guider.reset(MODEL.num_blocks, rows=ROWS)
    guided = GuidedDenoiser(fed(MODEL), guider, COND, UNCOND)
    with torch.no_grad():
        if step.index == 1:  # advance the guider's state (APG momentum, S² generators) through step 0
            guided(x, S0)
        return guided(x, step), guided


def v(net, cond, step=S0, x=X):
    """One plain network call, at Wan's integer timestep for the step."""
    t = TIMESTEPS[step.index].double() / 1000
    with torch.no_grad():
        return net(x, t.expand(x.shape[0]).float(), **cond)


def x0_of(step, vel, x=X):
    return x - step.sigma * vel


class IdentityBlock(nn.Module):
    def forward(self, tokens, *args, **kwargs):
        return tokens


def without_blocks(blocks):
    """A copy of the model whose `blocks` are nn.Identity-like modules (the manual skip)."""
    m = copy.deepcopy(MODEL)
    for b in blocks:
        m.blocks[b] = IdentityBlock()
    return m


def identity_attention(blocks):
    """A copy whose self-attention in `blocks` attends each token to itself only: output W_o·v."""
    m = copy.deepcopy(MODEL)
    for b in blocks:
        sa = m.blocks[b].self_attn
        sa.attend = lambda q, k, v, sa=sa: sa.o(v.flatten(2))
    return m


class FrameMeanQueries(nn.Module):
    """The query projection followed by the mean over each frame's tokens (SEG's infinite blur)."""

    def __init__(self, q, frames):
        super().__init__()
        self.q, self.frames = q, frames

    def forward(self, x):
        q = self.q(x)
        B, L, D = q.shape
        per = q.reshape(B, self.frames, L // self.frames, D)
        return per.mean(2, keepdim=True).expand_as(per).reshape(B, L, D)


def mean_queries(blocks, frames=3):
    m = copy.deepcopy(MODEL)
    for b in blocks:
        m.blocks[b].self_attn.q = FrameMeanQueries(m.blocks[b].self_attn.q, frames)
    return m


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol


def differs_from_cfg(out, tol=1e-3):
    return torch.isfinite(out).all() and (out - CFG_OUT).abs().max().item() > tol


# ---------------------------------------------------------------------------------------------------------------
def test_cfg_is_the_hand_formula_and_samples():
    est, guided = estimate(G.CFG(W))
    vc, vu = v(MODEL, COND), v(MODEL, UNCOND)
    assert close(est.x0, x0_of(S0, vu + W * (vc - vu)))
    assert guided.nfe == 2 and guided.block_rows == 2 * 2 * MODEL.num_blocks  # cond + uncond rows, batch 2
    assert CFG_OUT.shape == X.shape and torch.isfinite(CFG_OUT).all() and (CFG_OUT - X).abs().max() > 0.1
    cond_only = run(G.Conditional())
    assert (cond_only - CFG_OUT).abs().max() > 1e-2


def test_cfg_zero_star_is_wans_official_zero_init():
    """The official Wan code (WeichenFan/CFG-Zero-star models/wan/wan_pipeline.py, T2V_infer.py) zeroes the
    velocity on steps i <= zero_steps with zero_steps = 1: the first two steps. Here zero_init_steps counts as
    diffusers' K (steps i < K), so Wan's setting is zero_init_steps = 2 (the SD3 yaml's default 1 is diffusers')."""
    wan = G.CFGZeroStar(scale=W, zero_init_steps=2)
    out = run(wan)
    assert (out - X).abs().max() <= 1e-6  # both steps zero: v = 0, the sample stays put while σ drops
    guided = GuidedDenoiser(fed(MODEL), wan, COND, UNCOND)
    wan.reset(MODEL.num_blocks)
    assert guided(X, S0) == (X, X) and guided(X, S1) == (X, X) and guided.nfe == 0  # no network call either
    # From step 2 on (and on step 1 with zero_init_steps = 1): s* = <v_c, v_u>/|v_u|² over the whole video.
    est, guided = estimate(G.CFGZeroStar(scale=W, zero_init_steps=1), step=S1)
    vc, vu = v(MODEL, COND, S1), v(MODEL, UNCOND, S1)
    s = flat_dot(vc, vu) / (flat_dot(vu, vu) + 1e-8)
    assert s.shape == (2, 1, 1, 1, 1) and (s - 1).abs().max() > 1e-3
    assert close(est.x0, x0_of(S1, s * vu + W * (vc - s * vu)))
    assert differs_from_cfg(run(G.CFGZeroStar(scale=W, zero_init_steps=1)))


def test_apg_projects_and_clips_over_the_whole_video():
    vc, vu = v(MODEL, COND), v(MODEL, UNCOND)
    dc, du = x0_of(S0, vc), x0_of(S0, vu)
    # No clip, no momentum, η = 1: the parallel part kept, APG is CFG on D.
    est, _ = estimate(G.APG(scale=W, momentum=0.0, norm_threshold=0.0, eta=1.0))
    assert close(est.x0, du + W * (dc - du))
    # η = 0: only the part of D_c - D_u orthogonal to D_c per sample (the whole video), clipped to the threshold.
    diff_norm = flat_dot(dc - du, dc - du).sqrt().flatten()
    threshold = 0.5 * diff_norm.min().item()
    est, _ = estimate(G.APG(scale=W, momentum=0.0, norm_threshold=threshold, eta=0.0))
    upd = (est.x0 - dc) / (W - 1)
    cos = flat_dot(upd, dc).flatten() / (flat_dot(upd, upd).sqrt() * flat_dot(dc, dc).sqrt()).flatten()
    assert cos.abs().max() < 1e-4
    per_frame = (upd * dc).sum((1, 3, 4))  # not orthogonal frame by frame: the projection is per video
    assert per_frame.abs().max() > 1e-3
    assert (flat_dot(upd, upd).sqrt().flatten() <= threshold * (1 + 1e-5)).all()
    assert differs_from_cfg(run(G.APG(scale=W)))


def test_cfgpp_guides_d_and_renoises_with_the_unconditional_eps():
    est, _ = estimate(G.CFGPlusPlus(0.6))
    vc, vu = v(MODEL, COND), v(MODEL, UNCOND)
    du, dc = x0_of(S0, vu), x0_of(S0, vc)
    assert close(est.x0, du + 0.6 * (dc - du)) and close(est.eps, X + (1 - S0.sigma) * vu)
    assert differs_from_cfg(run(G.CFGPlusPlus(0.6)))


@pytest.mark.parametrize("layers", [[2], [3, 4]])
def test_slg_stg_skip_plan_equals_blocks_replaced_by_the_identity(layers):
    """SLG / STG-R with Wan block indices: strict window start·N < i < stop·N, so with start 0 only step 1 of 2
    skips (step 0 is CFG)."""
    slg = G.SkipLayerGuidance(scale=W, skip_scale=2.0, layers=layers, start=0.0, stop=1.0)
    est0, _ = estimate(slg)
    vc, vu = v(MODEL, COND), v(MODEL, UNCOND)
    assert close(est0.x0, x0_of(S0, vu + W * (vc - vu)))
    est, guided = estimate(slg, step=S1)
    vc, vu = v(MODEL, COND, S1), v(MODEL, UNCOND, S1)
    vs = v(without_blocks(layers), COND, S1)
    assert (vs - vc).abs().max() > 1e-2
    assert close(est.x0, x0_of(S1, vu + W * (vc - vu) + 2.0 * (vc - vs)))
    out = run(slg)
    assert differs_from_cfg(out) and close(out, run(slg, share_prefix=False), 1e-4)
    with pytest.raises(ValueError, match="out of range"):
        run(G.SkipLayerGuidance(layers=[6]))


def test_pag_identity_attention_equals_a_self_attention_replaced_by_its_values():
    pag = G.PerturbedAttentionGuidance(scale=W, perturbed_scale=2.0, layers=[1, 4], start=0.0, stop=1.0)
    est, _ = estimate(pag, step=S1)  # diffusers' window, strict: int(0·2) < i < int(1·2) -> step 1
    vc, vu = v(MODEL, COND, S1), v(MODEL, UNCOND, S1)
    vp = v(identity_attention([1, 4]), COND, S1)
    assert (vp - vc).abs().max() > 1e-2
    assert close(est.x0, x0_of(S1, vu + W * (vc - vu) + 2.0 * (vc - vp)))
    out = run(pag)
    assert differs_from_cfg(out) and close(out, run(pag, share_prefix=False), 1e-4)


def test_seg_blurs_each_frames_queries():
    """Infinite blur: every query is its frame's mean (by hand: the query projection, then the per-frame mean).
    A vanishing blur leaves the queries alone: SEG is CFG."""
    seg = G.SmoothedEnergyGuidance(scale=W, seg_scale=2.0, layers=[2], start=0.0, stop=1.0)
    est, _ = estimate(seg, step=S1)
    vc, vu = v(MODEL, COND, S1), v(MODEL, UNCOND, S1)
    vm = v(mean_queries([2]), COND, S1)
    assert (vm - vc).abs().max() > 1e-3
    assert close(est.x0, x0_of(S1, vu + W * (vc - vu) + 2.0 * (vc - vm)))
    whole_video_mean = copy.deepcopy(MODEL)
    whole_video_mean.blocks[2].self_attn.q = FrameMeanQueries(whole_video_mean.blocks[2].self_attn.q, 1)
    assert (v(whole_video_mean, COND, S1) - vm).abs().max() > 1e-4  # per frame, not over the whole video
    sharp = G.SmoothedEnergyGuidance(scale=W, seg_scale=2.0, layers=[2], blur_sigma=1e-3, start=0.0, stop=1.0)
    assert close(run(sharp), CFG_OUT, 1e-4)
    assert differs_from_cfg(run(seg))


def test_tcfg_keeps_the_top_singular_direction_of_the_whole_video():
    est, _ = estimate(G.TCFG(scale=W))
    vc, vu = v(MODEL, COND).double(), v(MODEL, UNCOND).double()
    want = []
    for b in range(2):  # the 2 x N matrix per sample, its top right-singular vector by SVD
        m = torch.stack([vc[b].flatten(), vu[b].flatten()])
        r1 = torch.linalg.svd(m, full_matrices=False).Vh[0]
        u = (vu[b].flatten() @ r1) * r1
        want.append((u + W * (vc[b].flatten() - u)).reshape(vc[b].shape))
    assert close(est.x0, x0_of(S0, torch.stack(want).float()))
    est1, _ = estimate(G.TCFG(scale=1.0))
    assert close(est1.x0, x0_of(S0, vc.float()))  # w = 1: the conditional prediction
    assert differs_from_cfg(run(G.TCFG(scale=W)))


def test_fdg_splits_each_frame_and_never_mixes_frames():
    """The pyramid runs per frame on [B, C, F, H, W] (the guider handled only images before): equal scales
    give CFG exactly (the pyramid is linear and exactly inverted); a change in one frame of v_c changes only
    that frame of the result."""
    est, _ = estimate(G.FDG(scales=[W, W]))
    vc, vu = v(MODEL, COND), v(MODEL, UNCOND)
    assert close(est.x0, x0_of(S0, vu + W * (vc - vu)))
    fdg = G.FDG(scales=[10.0, 5.0])
    a = fdg.guide(X, S0, [], [vc, vu]).x0
    bumped = vc.clone()
    bumped[:, :, 1] += torch.randn(bumped[:, :, 1].shape, generator=torch.Generator().manual_seed(0))
    b = fdg.guide(X, S0, [], [bumped, vu]).x0
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and torch.equal(a[:, :, 2], b[:, :, 2])
    assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 0.1
    per_frame = torch.stack([fdg.guide(X[:, :, f], S0, [], [vc[:, :, f], vu[:, :, f]]).x0 for f in range(3)], 2)
    assert close(a, per_frame, 1e-6)  # each frame is the image guider on that frame
    damped = G.FDG(scales=[10.0, 5.0], parallel_weights=0.5)
    assert differs_from_cfg(run(fdg)) and differs_from_cfg(run(damped))
    assert (run(damped) - run(fdg)).abs().max() > 1e-3


def test_autoguidance_with_a_weak_wan():
    ag = G.AutoGuidance(scale=2.0, weak=fed(WEAK))
    est, guided = estimate(ag)
    vc, vw = v(MODEL, COND), v(WEAK, COND)
    assert close(est.x0, x0_of(S0, vw + 2.0 * (vc - vw)))
    assert guided.block_rows == 2 * MODEL.num_blocks and guided.other_block_rows == 2 * WEAK.num_blocks
    out = run(ag)
    assert differs_from_cfg(out)


def _masks(guider):
    """The masks the guider draws at its first step, replayed from a fresh copy with the same seed and keys."""
    twin = copy.deepcopy(guider)
    twin.reset(MODEL.num_blocks, rows=ROWS)
    return [twin.sample_mask() for _ in range(twin.num_subnetworks)]


@pytest.mark.parametrize("n", [1, 4])
def test_s2_and_naive_s2_equal_the_formula_with_blocks_replaced_by_the_identity(n):
    """S² (N = 1) and naive S² (N = 4): drop_ratio 0.1 of 6 blocks is one block per sub-network, never block 0,
    one mask per image (per row key); D = CFG - ω·mean_i(D̂_i - D_c), the sub-networks built by hand."""
    s2 = G.S2Guidance(scale=W, omega=0.25, num_subnetworks=n, interval=(0.0, 1.0), seed=3)
    masks = _masks(s2)
    est, guided = estimate(s2)
    vc, vu = v(MODEL, COND), v(MODEL, UNCOND)
    subs = []
    for mask in masks:  # a tuple: one block set per image
        assert isinstance(mask, tuple) and len(mask) == 2 and all(len(m) == 1 and 0 not in m for m in mask)
        subs.append(torch.cat([v(without_blocks(m), {"context": COND["context"][b:b + 1]}, x=X[b:b + 1])
                               for b, m in enumerate(mask)]))
    v_sub = torch.stack(subs).mean(0)
    assert (v_sub - vc).abs().max() > 1e-2
    assert close(est.x0, x0_of(S0, vu + W * (vc - vu) - 0.25 * (v_sub - vc)))
    # Each sub-network row forks at its first dropped block: fewer block rows than full extra passes.
    assert 4 * MODEL.num_blocks < guided.block_rows < (4 + 2 * n) * MODEL.num_blocks
    out = run(s2)
    assert differs_from_cfg(out, 1e-4) and close(out, run(s2, share_prefix=False), 1e-4)


def test_s2_with_omega_zero_is_cfg_exactly():
    for sampler in ("unipc", "euler"):
        cfg = run(G.CFG(W), sampler=sampler)
        s2 = run(G.S2Guidance(scale=W, omega=0.0, interval=(0.0, 1.0)), sampler=sampler)
        assert torch.equal(cfg, s2)
    assert torch.equal(run(G.S2Guidance(scale=W, omega=0.0)), CFG_OUT)


def test_s2_default_window_on_wans_50_steps():
    """The central 80% as step fractions on 50 steps: int(0.1·50) <= i < int(0.9·50), steps 5-44 (40 steps)."""
    s2 = G.S2Guidance(scale=W, omega=0.25)
    sig = wan_sigmas(50, SHIFT).tolist()
    active = [i for i in range(50) if s2.active(Step(i, 50, sig[i], sig[i + 1]))]
    assert active == list(range(5, 45))
