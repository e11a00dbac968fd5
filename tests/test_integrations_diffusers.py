"""s2g on diffusers (s2g/integrations/diffusers.py), on tiny random models of each family:
- DiffusersDenoiser: its skip equals SD3's native `skip_layers=` bit for bit, a manual identity replacement of the
  blocks in Wan, Flux and Qwen-Image bit for bit; PAG / SEG equal s2g's own MMDiT and Wan; hooks leave the model exactly as
  it was; every s2g guider runs on it and matches the same guider on the converted s2g model;
- StochasticSelfGuidance (S² as a diffusers guider): in the SD3 and Wan modular pipelines it equals s2g's native
  S² on the converted weights with the same masks (Wan also with its own UniPC); it runs in Qwen-Image's; config round trip; both prepare_inputs forms;
- one-line errors; the diffusers layer-skip bug the README documents; a CFG / S² grid written through diffusers.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

import s2g.guidance as G
from s2g.models import load_mmdit, load_wan
from s2g.models.sweep import IDENTITY_ATTENTION, SKIP, smoothed_attention
from s2g.sampling import sample, sd3_sigmas

diffusers = pytest.importorskip("diffusers")
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,  # noqa: E402
                       QwenImageTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel)

from s2g.integrations import diffusers as integ  # noqa: E402
from s2g.integrations.diffusers import DiffusersDenoiser, StochasticSelfGuidance, transformer_blocks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SD3_TOL = 1e-5  # our MMDiT vs diffusers per call (tests/test_mmdit.py); measured ~1e-6
WAN_TOL = 2e-5  # our Wan vs diffusers per call (tests/test_wan.py): float64 vs fp32 time features


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (zero inits would make parity vacuous), scaled to keep outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        buffers = [(n, b) for n, b in module.named_buffers() if "pos_embed" in n]  # SD3's table; not Wan's RoPE
        for name, t in [*module.named_parameters(), *buffers]:
            r = torch.randn(t.shape, generator=g)
            if ("pos_embed" in name and t.ndim == 3) or "scale_shift_table" in name:
                t.copy_(0.5 * r)
            elif t.ndim >= 2:
                t.copy_(r / math.sqrt(t[0].numel()))
            elif name.endswith("bias"):
                t.copy_(0.1 * r)
            else:  # norm weights
                t.copy_(1 + 0.2 * r)
    return module.eval()


# SD3.5-medium structure (MMDiT-X: dual attention in the first blocks, qk-norm), 4 blocks; latents 4 x 8 x 8.
def sd3_model(seed=0, layers=4):
    return randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, num_attention_heads=3,
        attention_head_dim=16, caption_projection_dim=48, joint_attention_dim=40, pooled_projection_dim=24,
        pos_embed_max_size=12, dual_attention_layers=(0, 1), qk_norm="rms_norm"), seed)


def sd3_inputs(batch=2, seed=1, size=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    cond = {"context": torch.randn(batch, 7, 40, generator=g), "pooled": torch.randn(batch, 24, generator=g)}
    uncond = {"context": torch.zeros(batch, 7, 40), "pooled": torch.zeros(batch, 24)}
    return x, sigma, cond, uncond


def wan_model(seed=0):
    return randomize(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                           in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=96,
                                           num_layers=4), seed)


def wan_inputs(batch=2, seed=1, size=(2, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    return x, sigma, {"context": torch.randn(batch, 5, 24, generator=g)}, {"context": torch.zeros(batch, 5, 24)}


# Flux structure: 2 double-stream + 3 single-stream blocks, no guidance embedding (FLUX.1-schnell), and one with.
def flux_model(seed=0, guidance_embeds=False):
    return randomize(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=12, guidance_embeds=guidance_embeds,
                                            axes_dims_rope=(4, 6, 6)), seed)


def flux_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 6, 8, generator=g)  # 4 channels, packed 2x2 -> 16
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    cond = {"context": torch.randn(batch, 5, 32, generator=g), "pooled": torch.randn(batch, 12, generator=g)}
    return x, sigma, cond, {"context": torch.zeros(batch, 5, 32), "pooled": torch.zeros(batch, 12)}


# Qwen-Image structure: 3 double-stream blocks over [text; image], a text padding mask.
def qwen_model(seed=0):
    return randomize(QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                                 axes_dims_rope=(4, 6, 6)), seed)


def qwen_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 6, 8, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[-1, 3:] = False  # the last prompt is 3 tokens, padded to 5
    cond = {"context": torch.randn(batch, 5, 24, generator=g), "context_mask": mask}
    return x, sigma, cond, {"context": torch.zeros(batch, 5, 24), "context_mask": mask}


@pytest.fixture(scope="module")
def sd3():
    ref = sd3_model()
    return ref, load_mmdit(ref.state_dict())


@pytest.fixture(scope="module")
def wan():
    ref = wan_model()
    return ref, load_wan(ref.state_dict(), heads=2, text_len=None)


class Identity(torch.nn.Module):
    """A block replaced by hand: its inputs back, in the block's own output order."""

    def __init__(self, encoder_first: bool):
        super().__init__()
        self.encoder_first = encoder_first

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return (encoder_hidden_states, hidden_states) if self.encoder_first else hidden_states


def hooks_left(model) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__ or m._forward_hooks]


# ------------------------------------------------------------------------------------------------ import


def test_import_s2g_never_imports_diffusers():
    code = "import sys, s2g, s2g.integrations, s2g.guidance, s2g.sampling; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ denoiser


def test_sd3_skip_equals_native_skip_layers_bit_for_bit(sd3):
    ref, _ = sd3
    den = DiffusersDenoiser(ref)
    x, sigma, cond, _ = sd3_inputs()
    assert den.num_blocks == 4
    with torch.no_grad():
        for skip in (None, [1], [0, 3], [3], [1, 2, 3]):  # 3 is the last block (context_pre_only)
            want = ref(x, cond["context"], cond["pooled"], timestep=1000 * sigma, skip_layers=skip).sample
            got = den(x, sigma, skip=None if skip is None else frozenset(skip), **cond)
            assert torch.equal(got, want), skip
        assert not torch.equal(den(x, sigma, skip={1}, **cond), den(x, sigma, **cond))
    assert hooks_left(ref) == []


def test_hooks_come_off_exactly_also_after_an_error(sd3):
    ref, _ = sd3
    den = DiffusersDenoiser(ref)
    x, sigma, cond, _ = sd3_inputs()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        plain = ref(x, cond["context"], cond["pooled"], timestep=1000 * sigma).sample
        den(x, sigma, skip={1: IDENTITY_ATTENTION, 2: smoothed_attention(1.0), 3: SKIP}, **cond)
        with pytest.raises(RuntimeError):  # a wrong context width fails inside the forward, hooks on
            den(x, sigma, skip={1, 2}, context=torch.randn(2, 7, 41), pooled=cond["pooled"])
        assert hooks_left(ref) == []
        assert torch.equal(ref(x, cond["context"], cond["pooled"], timestep=1000 * sigma).sample, plain)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert all(type(b).forward is b.forward.__func__ for b in transformer_blocks(ref))


class Untouched:
    """An attention processor that neither calls `to_q` nor torch's sdpa (as a flash-attention backend would not)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


def test_pag_and_seg_that_cannot_act_stop_with_one_line():
    ref = sd3_model()
    den = DiffusersDenoiser(ref)
    x, sigma, cond, _ = sd3_inputs()
    ref.transformer_blocks[2].attn.set_processor(Untouched())
    with torch.no_grad():
        den(x, sigma, skip={1: IDENTITY_ATTENTION}, **cond)  # other blocks are fine
        for plan in ({2: IDENTITY_ATTENTION}, {2: smoothed_attention(1.0)}):
            with pytest.raises(RuntimeError, match="on block 2 of SD3Transformer2DModel never acted: it needs the "
                                                   "native attention backend") as e:
                den(x, sigma, skip=plan, **cond)
            assert "\n" not in str(e.value)
    assert hooks_left(ref) == []


def test_block_output_orders_are_the_blocks_own():
    """Our table of output orders against each block's actual forward (hidden and encoder of different lengths),
    and against diffusers' block registry."""
    from diffusers.hooks._helpers import TransformerBlockRegistry
    for model in (sd3_model(), flux_model(), wan_model(), qwen_model()):
        for block in {type(b): b for b in transformer_blocks(model)}.values():
            hidden_at, encoder_at = integ._BLOCK_OUTPUTS[type(block).__name__]
            meta = TransformerBlockRegistry.get(type(block))
            assert (meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) == (hidden_at, encoder_at)
    wan_block = wan_model().blocks[0]
    h = torch.randn(1, 6, 64)
    rope = (torch.ones(1, 6, 1, 32), torch.zeros(1, 6, 1, 32))
    assert wan_block(h, torch.randn(1, 3, 64), torch.randn(1, 6, 64), rope).shape == h.shape
    block = sd3_model().transformer_blocks[0]
    enc, hid = block(hidden_states=torch.randn(1, 6, 48), encoder_hidden_states=torch.randn(1, 3, 48),
                     temb=torch.randn(1, 48))
    assert (enc.shape[1], hid.shape[1]) == (3, 6)


def test_wan_skip_equals_identity_blocks_bit_for_bit(wan):
    ref, _ = wan
    den = DiffusersDenoiser(ref)
    x, sigma, cond, _ = wan_inputs()
    with torch.no_grad():
        for skip in ([1], [0, 3], [3]):
            blocks = list(ref.blocks)
            for i in skip:
                ref.blocks[i] = Identity(encoder_first=False)
            want = ref(x, 1000 * sigma, cond["context"]).sample
            ref.blocks = torch.nn.ModuleList(blocks)
            assert torch.equal(den(x, sigma, skip=set(skip), **cond), want), skip
    assert hooks_left(ref) == []


def test_flux_double_and_single_blocks_are_one_list_and_skip_like_identities():
    ref = flux_model()
    den = DiffusersDenoiser(ref)
    assert den.num_blocks == 5 and transformer_blocks(ref)[2] is ref.single_transformer_blocks[0]
    x, sigma, cond, _ = flux_inputs()
    tokens = integ.pack_flux_latents(x)
    assert torch.equal(integ.unpack_flux_latents(tokens, 6, 8), x)
    ids = integ.flux_image_ids(3, 4)
    kwargs = dict(encoder_hidden_states=cond["context"], pooled_projections=cond["pooled"], timestep=sigma,
                  img_ids=ids, txt_ids=torch.zeros(5, 3))
    with torch.no_grad():
        assert torch.equal(den(x, sigma, **cond), integ.unpack_flux_latents(ref(tokens, **kwargs).sample, 6, 8))
        for skip in ([1], [0, 3], [1, 2, 4]):
            double, single = list(ref.transformer_blocks), list(ref.single_transformer_blocks)
            for i in skip:
                stack, j = (ref.transformer_blocks, i) if i < 2 else (ref.single_transformer_blocks, i - 2)
                stack[j] = Identity(encoder_first=True)
            want = integ.unpack_flux_latents(ref(tokens, **kwargs).sample, 6, 8)
            ref.transformer_blocks, ref.single_transformer_blocks = map(torch.nn.ModuleList, (double, single))
            got = den(x, sigma, skip=set(skip), **cond)
            assert torch.equal(got, want), skip
            assert not torch.equal(got, den(x, sigma, **cond))
        # PAG and SEG on both kinds of block run and change the prediction.
        for plan in ({1: IDENTITY_ATTENTION}, {3: IDENTITY_ATTENTION}, {0: smoothed_attention(1.0)},
                     {4: smoothed_attention(math.inf)}):
            out = den(x, sigma, skip=plan, **cond)
            assert torch.isfinite(out).all() and (out - den(x, sigma, **cond)).abs().max() > 1e-3, plan
    assert hooks_left(ref) == []


def test_qwen_image_skips_like_identities_and_takes_a_guider():
    ref = qwen_model()
    den = DiffusersDenoiser(ref)
    x, sigma, cond, uncond = qwen_inputs()
    kwargs = dict(encoder_hidden_states=cond["context"], encoder_hidden_states_mask=cond["context_mask"],
                  timestep=sigma, img_shapes=[[(1, 3, 4)]] * 2)
    with torch.no_grad():
        for skip in (None, [1], [0, 2]):
            blocks = list(ref.transformer_blocks)
            for i in skip or []:
                ref.transformer_blocks[i] = Identity(encoder_first=True)
            want = integ.unpack_flux_latents(ref(integ.pack_flux_latents(x), **kwargs).sample, 6, 8)
            ref.transformer_blocks = torch.nn.ModuleList(blocks)
            assert torch.equal(den(x, sigma, skip=None if skip is None else set(skip), **cond), want), skip
        plain = den(x, sigma, **cond)
        for plan in ({1: IDENTITY_ATTENTION}, {2: smoothed_attention(1.0)}):  # PAG keeps the padding mask
            out = den(x, sigma, skip=plan, **cond)
            assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-2, plan
        s2 = sample(den, x, sd3_sigmas(3), GUIDERS["s2"](), cond, uncond, progress=False)
        assert torch.isfinite(s2).all()
    # Its modular pipeline takes the guider (dict form); at ω = 0 it is ClassifierFreeGuidance bit for bit.
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage import QwenImageCoreDenoiseStep
    outs = []
    for guider in (ClassifierFreeGuidance(guidance_scale=4.0), StochasticSelfGuidance(guidance_scale=4.0, s2_scale=0),
                   StochasticSelfGuidance(guidance_scale=4.0, s2_scale=0.5, drop_ratio=0.34)):
        pipe = QwenImageCoreDenoiseStep().init_pipeline()
        pipe.update_components(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), guider=guider)
        with torch.no_grad():
            outs.append(pipe(prompt_embeds=cond["context"][:1], prompt_embeds_mask=cond["context_mask"][:1],
                             negative_prompt_embeds=uncond["context"][:1],
                             negative_prompt_embeds_mask=cond["context_mask"][:1], height=48, width=64,
                             num_inference_steps=4, generator=torch.Generator().manual_seed(0), output="latents"))
    assert torch.equal(outs[0], outs[1]) and (outs[2] - outs[0]).abs().max() > 1e-3
    assert hooks_left(ref) == []


def test_flux_dev_needs_its_guidance_scale():
    ref = flux_model(guidance_embeds=True)
    x, sigma, cond, _ = flux_inputs()
    with pytest.raises(ValueError, match="guidance=3.5"):
        DiffusersDenoiser(ref)(x, sigma, **cond)
    with torch.no_grad():
        a = DiffusersDenoiser(ref, guidance=3.5)(x, sigma, **cond)
        b = DiffusersDenoiser(ref, guidance=1.0)(x, sigma, **cond)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("plan", [{1: IDENTITY_ATTENTION}, {0: IDENTITY_ATTENTION}, {3: IDENTITY_ATTENTION},
                                  {1: smoothed_attention(1.0)}, {0: smoothed_attention(1e9)},
                                  {3: smoothed_attention(0.7)}])
def test_sd3_pag_and_seg_equal_our_mmdit(sd3, plan):
    """Blocks 0-1 have MMDiT-X's second (image-only) attention, 3 is the last (context_pre_only) block."""
    ref, ours = sd3
    x, sigma, cond, _ = sd3_inputs(size=(8, 10))
    den = DiffusersDenoiser(ref)
    with torch.no_grad():
        got, want = den(x, sigma, skip=plan, **cond), ours(x, sigma, skip=plan, **cond)
        assert (got - want).abs().max() <= SD3_TOL
        assert (got - den(x, sigma, **cond)).abs().max() > 1e-2


@pytest.mark.parametrize("plan", [{1: IDENTITY_ATTENTION}, {2: smoothed_attention(0.8)},
                                  {0: smoothed_attention(math.inf)}])
def test_wan_pag_and_seg_equal_our_wan(wan, plan):
    ref, ours = wan
    x, sigma, cond, _ = wan_inputs(size=(2, 8, 8))
    den = DiffusersDenoiser(ref)
    with torch.no_grad():
        got, want = den(x, sigma, skip=plan, **cond), ours(x, sigma, skip=plan, **cond)
        assert (got - want).abs().max() <= WAN_TOL
        assert (got - den(x, sigma, **cond)).abs().max() > 1e-2


GUIDERS = {
    "cfg": lambda: G.CFG(4.0),
    "cfgpp": lambda: G.CFGPlusPlus(0.6),
    "apg": lambda: G.APG(4.0, norm_threshold=2.0),
    "cfg_zero_star": lambda: G.CFGZeroStar(4.0),
    "tcfg": lambda: G.TCFG(4.0),
    "fdg": lambda: G.FDG(),
    "slg": lambda: G.SkipLayerGuidance(4.0, 2.0, layers=[2], start=0.0, stop=1.0),
    "pag": lambda: G.PerturbedAttentionGuidance(4.0, 2.0, layers=[1], start=0.0, stop=1.0),
    "seg": lambda: G.SmoothedEnergyGuidance(4.0, 2.0, blur_sigma=1.0, layers=[1], start=0.0, stop=1.0),
    "s2": lambda: G.S2Guidance(4.0, 0.5, drop_ratio=0.25, interval=(0.0, 1.0), seed=3),
    "naive_s2": lambda: G.S2Guidance(4.0, 0.5, num_subnetworks=3, drop_ratio=0.25, interval=(0.0, 1.0), seed=3),
}


@pytest.mark.parametrize("name", list(GUIDERS))
def test_every_s2g_guider_runs_on_a_diffusers_sd3_unchanged(sd3, name):
    """Three Euler steps through `sample`: DiffusersDenoiser (one call per pass) against our MMDiT on the same
    weights (its batched sweep), with per-image mask keys."""
    ref, ours = sd3
    x, _, cond, uncond = sd3_inputs(seed=5)
    with torch.no_grad():
        got = sample(DiffusersDenoiser(ref), x, sd3_sigmas(3), GUIDERS[name](), cond, uncond, progress=False,
                     rows=[11, 12])
        want = sample(ours, x, sd3_sigmas(3), GUIDERS[name](), cond, uncond, progress=False, rows=[11, 12])
    assert (got - want).abs().max() <= 4 * SD3_TOL, name


def test_autoguidance_with_a_diffusers_weak_model(sd3):
    ref, ours = sd3
    weak = sd3_model(seed=9, layers=2)
    x, _, cond, uncond = sd3_inputs(seed=5)
    with torch.no_grad():
        got = sample(DiffusersDenoiser(ref), x, sd3_sigmas(2), G.AutoGuidance(2.0, weak=DiffusersDenoiser(weak)),
                     cond, uncond, progress=False)
        want = sample(ours, x, sd3_sigmas(2), G.AutoGuidance(2.0, weak=load_mmdit(weak.state_dict())), cond,
                      uncond, progress=False)
    assert (got - want).abs().max() <= 4 * SD3_TOL


@pytest.mark.parametrize("name", ["s2", "naive_s2", "pag", "seg"])
def test_guiders_on_wan_match_our_wan(wan, name):
    ref, ours = wan
    x, _, cond, uncond = wan_inputs(seed=6)
    with torch.no_grad():
        got = sample(DiffusersDenoiser(ref), x, sd3_sigmas(3), GUIDERS[name](), cond, uncond, progress=False)
        want = sample(ours, x, sd3_sigmas(3), GUIDERS[name](), cond, uncond, progress=False)
    assert (got - want).abs().max() <= 4 * WAN_TOL, name


def test_s2_runs_on_flux_end_to_end():
    ref = flux_model(seed=2)
    x, _, cond, uncond = flux_inputs(seed=3)
    with torch.no_grad():
        s2 = sample(DiffusersDenoiser(ref), x, sd3_sigmas(3), GUIDERS["s2"](), cond, uncond, progress=False)
        cfg = sample(DiffusersDenoiser(ref), x, sd3_sigmas(3), G.CFG(4.0), cond, uncond, progress=False)
    assert torch.isfinite(s2).all() and (s2 - cfg).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ the guider


class Recorder:
    """Wraps S2Guidance.sample_mask / StochasticSelfGuidance._draw to record the masks each step draws."""

    @staticmethod
    def native(guider):
        masks, draw = [], guider.sample_mask
        guider.sample_mask = lambda: masks.append(draw()) or masks[-1]
        return masks

    @staticmethod
    def diffusers(guider):
        masks, draw = [], guider._draw
        guider._draw = lambda d: (draw(d), masks.append(tuple(guider.masks)))[0]
        return masks


def sd3_modular(ref, guider):
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import \
        StableDiffusion3T2ICoreDenoiseStep
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), guider=guider)
    return pipe


def run_sd3_modular(pipe, x, cond, uncond, steps):
    return pipe(prompt_embeds=cond["context"], pooled_prompt_embeds=cond["pooled"],
                negative_prompt_embeds=uncond["context"], negative_pooled_prompt_embeds=uncond["pooled"],
                height=8 * x.shape[-2], width=8 * x.shape[-1], num_inference_steps=steps, latents=x.clone(),
                output="latents")


@pytest.mark.parametrize("form,subnetworks,unit", [("difference", 1, "steps"), ("appendix", 1, "steps"),
                                                   ("difference", 2, "sigma")])
def test_s2_guider_in_the_sd3_modular_pipeline_equals_native_s2(sd3, form, subnetworks, unit):
    """The paper's central 80% window (steps 0-4 of 6 as step fractions; σ in [0.1, 0.9] as σ), same masks."""
    ref, ours = sd3
    x, _, cond, uncond = sd3_inputs(batch=1, seed=7)
    steps = 6
    kw = dict(drop_ratio=0.25, seed=5, num_subnetworks=subnetworks, form=form, interval_unit=unit)
    guider = StochasticSelfGuidance(guidance_scale=4.0, s2_scale=0.5, s2_start=0.1, s2_stop=0.9, **kw)
    drawn = Recorder.diffusers(guider)
    pipe = sd3_modular(ref, guider)
    with torch.no_grad():
        got = run_sd3_modular(pipe, x, cond, uncond, steps)
        native = G.S2Guidance(4.0, 0.5, interval=(0.1, 0.9), **kw)
        masks = Recorder.native(native)
        want = sample(ours, x, sd3_sigmas(steps), native, cond, uncond, progress=False)
    assert torch.allclose(pipe.scheduler.sigmas, sd3_sigmas(steps))
    assert drawn == [tuple(ms) for ms in zip(*[iter(masks)] * subnetworks)]
    assert len(drawn) == (5 if unit == "steps" else sum(0.1 <= s <= 0.9 for s in sd3_sigmas(steps)[:-1].tolist()))
    assert all(0 not in m and len(m) == 1 for ms in drawn for m in ms)
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{form}: max |diff| {err:.2e}"
    with torch.no_grad():  # ... and the same guider through DiffusersDenoiser and s2g's sampler
        assert (sample(DiffusersDenoiser(ref), x, sd3_sigmas(steps), G.S2Guidance(4.0, 0.5, interval=(0.1, 0.9), **kw),
                       cond, uncond, progress=False) - want).abs().max() <= 1e-5
    assert hooks_left(ref) == []


def test_s2_guider_at_omega_zero_is_cfg_bit_for_bit(sd3):
    ref, _ = sd3
    x, _, cond, uncond = sd3_inputs(batch=1, seed=8)
    from diffusers.guiders import ClassifierFreeGuidance
    with torch.no_grad():
        a = run_sd3_modular(sd3_modular(ref, StochasticSelfGuidance(guidance_scale=4.0, s2_scale=0.0)), x, cond,
                            uncond, 4)
        b = run_sd3_modular(sd3_modular(ref, ClassifierFreeGuidance(guidance_scale=4.0)), x, cond, uncond, 4)
        c = run_sd3_modular(sd3_modular(ref, StochasticSelfGuidance(guidance_scale=4.0)), x, cond, uncond, 4)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4


def wan_pipeline(ref, guider, scheduler):
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep
    pipe = WanCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=ref, scheduler=scheduler, guider=guider)
    return pipe


def wan_modular(ref, guider):
    return wan_pipeline(ref, guider, FlowMatchEulerDiscreteScheduler(shift=3.0))


def test_s2_guider_in_the_wan_modular_pipeline_equals_native_s2(wan):
    """Wan's modular pipeline calls the block-state form, prepare_inputs_from_block_state."""
    ref, ours = wan
    x, _, cond, uncond = wan_inputs(batch=1, seed=9)
    steps = 5
    kw = dict(drop_ratio=0.25, seed=2)
    for form in ("difference", "appendix"):
        guider = StochasticSelfGuidance(guidance_scale=5.0, s2_scale=0.5, form=form, **kw)
        drawn = Recorder.diffusers(guider)
        pipe = wan_modular(ref, guider)
        with torch.no_grad():
            got = pipe(prompt_embeds=cond["context"], negative_prompt_embeds=uncond["context"],
                       num_frames=4 * (x.shape[2] - 1) + 1, height=8 * x.shape[3], width=8 * x.shape[4],
                       num_inference_steps=steps, latents=x.clone(), output="latents")
            native = G.S2Guidance(5.0, 0.5, interval=(0.1, 0.9), form=form, **kw)
            masks = Recorder.native(native)
            want = sample(ours, x, sd3_sigmas(steps), native, cond, uncond, progress=False)
        assert torch.allclose(pipe.scheduler.sigmas, sd3_sigmas(steps))
        assert drawn == [(m,) for m in masks] and len(drawn) == 4  # int(0.5) <= i < int(4.5): steps 0-3
        err = (got - want).abs().max().item()
        assert err <= 4 * WAN_TOL, f"{form}: max |diff| {err:.2e}"
    assert hooks_left(ref) == []


def test_s2_guider_with_wans_own_unipc_and_integer_timesteps_equals_native_s2(wan):
    """Wan's sampling as its pipelines configure it: diffusers' flow UniPC on Wan's grid, the DiT fed the integer
    timesteps; natively s2g's `sample_unipc` on `wan_sigmas`, our Wan behind `DiscreteTimesteps`."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    from s2g.sampling import DiscreteTimesteps, wan_sigmas, wan_timesteps
    ref, ours = wan
    x, _, cond, uncond = wan_inputs(batch=1, seed=10)
    steps, shift = 6, 5.0
    guider = StochasticSelfGuidance(guidance_scale=5.0, s2_scale=0.5, drop_ratio=0.25, seed=4)
    drawn = Recorder.diffusers(guider)
    pipe = wan_pipeline(ref, guider, UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift))
    sigma_max = float(torch.tensor(1 - 1 / 1000, dtype=torch.float32))
    with torch.no_grad():
        got = pipe(prompt_embeds=cond["context"], negative_prompt_embeds=uncond["context"], num_frames=5,
                   height=32, width=48, sigmas=np.linspace(sigma_max, 0, steps + 1)[:-1],
                   num_inference_steps=steps, latents=x.clone(), output="latents")
        sigmas = wan_sigmas(steps, shift)
        native = G.S2Guidance(5.0, 0.5, drop_ratio=0.25, seed=4)
        masks = Recorder.native(native)
        want = sample(DiscreteTimesteps(ours, sigmas, wan_timesteps(steps, shift)), x, sigmas, native, cond, uncond,
                      sampler="unipc", progress=False)
    assert torch.equal(pipe.scheduler.timesteps, wan_timesteps(steps, shift))
    assert drawn == [(m,) for m in masks] and len(drawn) == 5  # int(0.6) <= i < int(5.4): steps 0-4
    err = (got - want).abs().max().item()
    assert err <= 4 * WAN_TOL, f"max |diff| {err:.2e}"


def test_s2_guider_on_flux_in_a_diffusers_style_loop():
    """Flux's modular pipeline takes no guider in diffusers 0.42.1: drive the guider as the modular loops do
    (set_state, prepare_inputs, prepare_models / cleanup_models per batch, __call__) on FlowMatchEuler."""
    ref = flux_model(seed=4)
    x, _, cond, uncond = flux_inputs(batch=1, seed=5)
    steps, kw = 4, dict(drop_ratio=0.2, seed=7, s2_start=0.0, s2_stop=1.0)
    guider = StochasticSelfGuidance(guidance_scale=4.0, s2_scale=0.5, **kw)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents = x.clone()
    H, W = x.shape[-2:]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=steps, timestep=t)
            batches = guider.prepare_inputs({"hidden_states": (latents, latents),
                                             "encoder_hidden_states": (cond["context"], uncond["context"]),
                                             "pooled_projections": (cond["pooled"], uncond["pooled"])})
            for b in batches:
                guider.prepare_models(ref)
                b.noise_pred = integ.unpack_flux_latents(ref(
                    integ.pack_flux_latents(b.hidden_states), encoder_hidden_states=b.encoder_hidden_states,
                    pooled_projections=b.pooled_projections, timestep=t.expand(1) / 1000,
                    img_ids=integ.flux_image_ids(H // 2, W // 2), txt_ids=torch.zeros(5, 3)).sample, H, W)
                guider.cleanup_models(ref)
            assert len(batches) == 3
            latents = scheduler.step(guider(batches).pred, t, latents).prev_sample
        want = sample(DiffusersDenoiser(ref), x, sd3_sigmas(steps), G.S2Guidance(4.0, 0.5, interval=(0.0, 1.0), **{
            k: v for k, v in kw.items() if k in ("drop_ratio", "seed")}), cond, uncond, progress=False)
    assert (latents - want).abs().max() <= 1e-5
    assert hooks_left(ref) == []


def test_guider_hooks_of_a_failed_batch_come_off_at_the_next_step():
    ref = sd3_model(layers=4)
    guider = StochasticSelfGuidance(s2_start=0.0, drop_ratio=0.5, seed=1)
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999.0))
    guider.prepare_inputs({"hidden_states": torch.zeros(1)})
    for _ in range(3):
        guider.prepare_models(ref)  # cond, uncond, then the sub-network: its two blocks hooked
    assert len(hooks_left(ref)) == 2 and all(0 not in m for m in guider.masks)
    guider.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(900.0))  # its forward raised: no cleanup
    assert hooks_left(ref) == []


def test_guider_config_round_trip_and_new(tmp_path):
    guider = StochasticSelfGuidance(guidance_scale=5.0, s2_scale=0.3, num_subnetworks=2, drop_ratio=0.2,
                                    protected_blocks=[0, 1], s2_start=0.2, s2_stop=0.8, interval_unit="sigma",
                                    form="appendix", seed=11)
    guider.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "guider_config.json").read_text())
    assert saved["_class_name"] == "StochasticSelfGuidance" and saved["protected_blocks"] == [0, 1]
    loaded = StochasticSelfGuidance.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(guider.config)
    assert (loaded.form, loaded.interval_unit, loaded.protected_blocks) == ("appendix", "sigma", [0, 1])
    assert guider.new(seed=3).config.seed == 3 and guider.new().config.s2_scale == 0.3


def test_guider_windows_and_both_prepare_inputs_forms():
    from diffusers.modular_pipelines.modular_pipeline import BlockState
    guider = StochasticSelfGuidance(num_subnetworks=2)  # steps window [0.1, 0.9): of 28, steps 2-24
    active = []
    for i in range(28):
        guider.set_state(step=i, num_inference_steps=28, timestep=torch.tensor(500.0))
        active.append(guider.num_conditions == 4)
    assert [i for i, a in enumerate(active) if a] == list(range(2, 25))
    sig = StochasticSelfGuidance(interval_unit="sigma")
    sig.set_state(step=0, num_inference_steps=28, timestep=torch.tensor(950.0))
    assert sig.num_conditions == 2
    sig.set_state(step=1, num_inference_steps=28, timestep=torch.tensor(900.0))
    assert sig.num_conditions == 3
    # Both forms: cond, uncond, then the sub-network batches on the conditional inputs.
    guider.set_state(step=5, num_inference_steps=28, timestep=torch.tensor(500.0))
    c, u = torch.ones(1, 2), torch.zeros(1, 2)
    batches = guider.prepare_inputs({"encoder_hidden_states": (c, u)})
    state = BlockState(prompt_embeds=c, negative_prompt_embeds=u, latents=torch.randn(1, 2))
    batches2 = guider.prepare_inputs_from_block_state(state, {"encoder_hidden_states": ("prompt_embeds",
                                                                                       "negative_prompt_embeds")})
    for bs in (batches, batches2):
        assert [b.__guidance_identifier__ for b in bs] == ["pred_cond", "pred_uncond", "pred_cond_skip_0",
                                                           "pred_cond_skip_1"]
        assert [b.encoder_hidden_states.sum().item() for b in bs] == [2, 0, 2, 2]


def test_errors_are_one_line():
    with pytest.raises(TypeError, match="supported diffusers transformers: SD3Transformer2DModel, "
                                        "FluxTransformer2DModel, WanTransformer3DModel, "
                                        "QwenImageTransformer2DModel") as e:
        DiffusersDenoiser(torch.nn.Linear(2, 2))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"protected_blocks \[4\] out of range: valid block indices are 0..3") as e:
        StochasticSelfGuidance(protected_blocks=[0, 4], num_blocks=4)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"valid range: 0 < drop_ratio < 0.875") as e:
        StochasticSelfGuidance(drop_ratio=0.9, num_blocks=4)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"drop_ratio must be in the range \(0, 1\)"):
        StochasticSelfGuidance(drop_ratio=1.0)
    # Found at the first sub-network batch when the guider was not told the block count.
    ref = sd3_model(layers=2)
    guider = StochasticSelfGuidance(protected_blocks=[0, 1], s2_start=0.0)
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999.0))
    guider.prepare_inputs({"hidden_states": torch.zeros(1)})
    guider.prepare_models(ref), guider.prepare_models(ref)
    with pytest.raises(ValueError, match="drops 1 of 2 blocks, but only 0 are not protected"):
        guider.prepare_models(ref)
    # The denoiser: a block out of range, a wrong conditioning key.
    x, sigma, cond, _ = sd3_inputs()
    with pytest.raises(ValueError, match=r"outside the 2 blocks \[0, 2\)"):
        DiffusersDenoiser(ref)(x, sigma, skip={2}, **cond)
    with pytest.raises(ValueError, match="takes the conditioning context, pooled; missing"):
        DiffusersDenoiser(ref)(x, sigma, context=cond["context"])


def test_a_diffusers_without_the_guider_api_gets_one_line():
    import types
    old = types.SimpleNamespace(__version__="0.30.0")
    with pytest.raises(ImportError, match=r"needs diffusers' guider API .* installed: diffusers 0.30.0") as e:
        integ.require_guider_api(old)
    assert "\n" not in str(e.value)
    assert integ.require_guider_api() is diffusers.guiders.BaseGuidance
    # The module itself on such a diffusers: it imports, the denoiser works, the guider is one line away.
    code = ("import sys; sys.modules['diffusers.guiders'] = None\n"
            "import s2g.integrations.diffusers as m\n"
            "assert m.DiffusersDenoiser and m.SUPPORTED\n"
            "try:\n    from s2g.integrations.diffusers import StochasticSelfGuidance\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.startswith("StochasticSelfGuidance needs diffusers' guider API") and out.count("\n") == 1


@pytest.mark.skipif(diffusers.__version__ != "0.42.1", reason="documents the behaviour of diffusers 0.42.1")
def test_diffusers_layer_skip_hook_breaks_sd3_and_flux_as_the_readme_says():
    """The README's three-line reproduction, run as written; and the same hook on Flux swaps the streams."""
    from pathlib import Path

    from diffusers.hooks import LayerSkipConfig, apply_layer_skip
    readme = (Path(integ.__file__).parent / "README.md").read_text()
    code = next(b for b in readme.split("```python\n")[1:] if "apply_layer_skip" in b).split("```")[0]
    assert len([line for line in code.splitlines() if line and not line.startswith("#")]) == 3
    with pytest.raises(RuntimeError, match=r"shape '\[1, 4, 4, 2, 2, 4\]' is invalid for input of size 80"):
        exec(code, {})
    ref = flux_model()
    x, sigma, cond, _ = flux_inputs()
    apply_layer_skip(ref, LayerSkipConfig(indices=[1], fqn="transformer_blocks"))
    with torch.no_grad():
        out = ref(integ.pack_flux_latents(x), encoder_hidden_states=cond["context"], pooled_projections=cond["pooled"],
                  timestep=sigma, img_ids=integ.flux_image_ids(3, 4), txt_ids=torch.zeros(5, 3)).sample
    assert out.shape[1] == cond["context"].shape[1] != 12  # the text stream's 5 tokens, not the 12 image tokens
    ref = wan_model()  # one stream: skipped correctly
    x, sigma, cond, _ = wan_inputs()
    with torch.no_grad():
        want = DiffusersDenoiser(ref)(x, sigma, skip={1}, **cond)
        apply_layer_skip(ref, LayerSkipConfig(indices=[1], fqn="blocks"))
        assert torch.equal(ref(x, 1000 * sigma, cond["context"]).sample, want)


# ------------------------------------------------------------------------------------------------ grid


def test_writes_a_cfg_and_s2_grid_through_diffusers(tmp_path):
    """A random-weight SD3 in diffusers' modular pipeline, with CFG and with S², decoded by a random diffusers VAE:
    one PNG, a row per guider."""
    from diffusers import AutoencoderKL
    from diffusers.guiders import ClassifierFreeGuidance
    from PIL import Image

    from s2g.pipeline import image_grid, save_png
    ref = sd3_model(seed=3)
    vae = randomize(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4), 4)
    x, _, cond, uncond = sd3_inputs(batch=3, seed=10)
    rows = []
    with torch.no_grad():
        for guider in (ClassifierFreeGuidance(guidance_scale=4.0), StochasticSelfGuidance(guidance_scale=4.0)):
            latents = run_sd3_modular(sd3_modular(ref, guider), x, cond, uncond, 4)
            rows.append(vae.decode(latents).sample)
    images = ((torch.cat(rows) + 1) / 2).clamp(0, 1)
    assert images.shape == (6, 3, 16, 16) and (rows[0] - rows[1]).abs().max() > 1e-3
    path = tmp_path / "cfg_vs_s2.png"
    save_png(image_grid(images, 2, 3, scale=4), path, row_labels=["CFG", "S2"], tile=64)
    with Image.open(path) as img:
        assert img.size[0] > 3 * 64 and img.size[1] > 2 * 64
