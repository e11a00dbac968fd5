"""Wan 2.1 DiT parity with diffusers' WanTransformer3DModel (random weights, tiny configs keeping every structural
feature), loaded from both checkpoint layouts (single files, shards + index); skip plans against the same blocks
replaced by the identity in diffusers; PAG / SEG perturbations; the batched sweep; guiders through the sampler;
the inferred configuration; errors."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import s2g.guidance as G
from s2g.models import WanConfig, WanDiT, load_mmdit, load_wan
from s2g.models.checkpoint import WAN_DIFFUSERS_BLOCK, WAN_DIFFUSERS_TOP, infer_wan_config
from s2g.models.sweep import IDENTITY_ATTENTION, SKIP, block_rows, smoothed_attention
from s2g.models.wan import CONFIGS, rope_table, sinusoidal_embedding
from s2g.sampling import sample, uniform_sigmas

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 2e-5  # measured up to 1.1e-5 on outputs ~4-6: our (Wan's) float64 time features against diffusers' fp32 ones

# name -> (diffusers kwargs, heads given to the loader, latent (F, H, W) sizes)
CASES = {
    # head_dim 32: RoPE chunks 12 / 10 / 10 (frames get the rest), non-square latents, 1-3 latent frames.
    "base": (dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                  out_channels=4, text_dim=24, freq_dim=32, ffn_dim=96, num_layers=3), 2,
             [(1, 6, 10), (2, 6, 10), (3, 10, 6)]),
    # Temporal patch 2, no cross-attention norm, out_channels != in_channels, head_dim 16 (chunks 8 / 4 / 4).
    "t2": (dict(patch_size=(2, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                out_channels=6, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=False), 4,
           [(2, 4, 8), (6, 6, 4)]),
    # Wan's head size 128: the head count is inferred (dim / 128) when not given.
    "h128": (dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=4,
                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2), None, [(2, 4, 6)]),
}


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (zero / unit inits, e.g. the norms, would make parity vacuous), outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.named_parameters():
            r = torch.randn(t.shape, generator=g)
            if "scale_shift_table" in name or "modulation" in name:
                t.copy_(0.5 * r)
            elif t.ndim >= 2:
                t.copy_(r / math.sqrt(t[0].numel()))
            elif name.endswith("bias"):
                t.copy_(0.1 * r)
            else:  # qk-norm and norm3 weights
                t.copy_(1 + 0.2 * r)
    return module.eval()


def diffusers_model(case: str, seed: int = 0) -> WanTransformer3DModel:
    return randomize(WanTransformer3DModel(**CASES[case][0]), seed)


def inputs(case: str, size, batch: int = 2, text: int = 7, seed: int = 1):
    kwargs = CASES[case][0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, kwargs["in_channels"], *size, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05  # a different sigma per sample
    context = torch.randn(batch, text, kwargs["text_dim"], generator=g)
    return x, sigma, context


def ref_call(ref, x, sigma, context):
    with torch.no_grad():
        return ref(x, 1000 * sigma, context).sample


def assert_parity(ours: WanDiT, ref: WanTransformer3DModel, case: str):
    for size in CASES[case][2]:
        x, sigma, context = inputs(case, size)
        want = ref_call(ref, x, sigma, context)
        with torch.no_grad():
            got = ours(x, sigma, context)
        assert got.shape == want.shape == (2, CASES[case][0]["out_channels"], *size)
        assert want.abs().max() > 0.3 and want.std() > 0.1, "degenerate reference output"
        err = (got - want).abs().max().item()
        assert err <= TOL, f"{case} {size}: max |diff| {err:.2e}"


def to_original(sd: dict) -> dict:
    """diffusers -> original names, written out from the loader's tables (checked against diffusers' converter)."""
    out = {}
    for key, t in sd.items():
        parts = key.split(".", 2)
        prefix, rest, table = (parts[:2], parts[2], WAN_DIFFUSERS_BLOCK) if parts[0] == "blocks" else \
            ([], key, WAN_DIFFUSERS_TOP)
        src = next(s for s in table if rest == s or rest.startswith(s + "."))
        out[".".join([*prefix, table[src] + rest[len(src):]])] = t
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param, diffusers_model(request.param)


def test_parity_from_diffusers_layout_file(case, tmp_path):
    name, ref = case
    save_file(ref.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    for source in (tmp_path / "diffusion_pytorch_model.safetensors", tmp_path):  # the file, or its folder
        assert_parity(load_wan(source, heads=CASES[name][1], text_len=None), ref, name)


def test_parity_from_original_layout_shards(case, tmp_path):
    """Original names under ComfyUI's `model.diffusion_model.` prefix, split over two shards with an index; the
    same tensors must also be exactly what diffusers' own converter maps back to the diffusers model."""
    name, ref = case
    original = to_original(ref.state_dict())
    keys = sorted(original)
    shards = {"m-00001-of-00002.safetensors": keys[::2], "m-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for file, names in shards.items():
        save_file({f"model.diffusion_model.{k}": original[k].clone() for k in names}, tmp_path / file)
        weight_map.update({f"model.diffusion_model.{k}": file for k in names})
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"PK\x03\x04 never read")  # as in Wan's folder
    for source in (index, tmp_path):
        assert_parity(load_wan(source, heads=CASES[name][1], text_len=None), ref, name)

    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    converted = single_file_utils.convert_wan_transformer_to_diffusers(dict(original))
    want = ref.state_dict()
    assert set(converted) == set(want)
    assert all(torch.equal(converted[k], want[k]) for k in want)


def test_our_module_names_are_the_original_layout():
    """Independent of our tables: a random WanDiT's own state dict, through diffusers' converter, loads strictly
    into diffusers and gives the same velocity."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    kwargs = CASES["base"][0]
    ours = randomize(WanDiT(WanConfig(dim=64, num_layers=3, num_heads=2, ffn_dim=96, in_dim=4, out_dim=4,
                                      text_dim=24, freq_dim=32, text_len=None)), seed=5)
    ref = WanTransformer3DModel(**kwargs).eval()
    ref.load_state_dict(single_file_utils.convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
    assert_parity(ours, ref, "base")


def test_config_is_read_off_the_tensors():
    cfg = load_wan(diffusers_model("t2").state_dict(), heads=4, text_len=77).config
    assert cfg == WanConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=48, in_dim=4, out_dim=6, text_dim=24,
                            freq_dim=32, patch_size=(2, 2, 2), text_len=77, qk_norm=True, cross_attn_norm=False)
    cfg = load_wan(diffusers_model("h128").state_dict()).config
    assert (cfg.num_heads, cfg.text_len, cfg.cross_attn_norm, cfg.patch_size) == (1, 512, True, (1, 2, 2))
    # The released configurations, from shapes alone (meta tensors: no memory); 15 + 27 tensors per block.
    for preset, layers in (("t2v_1.3b", 30), ("t2v_14b", 40)):
        with torch.device("meta"):
            sd = WanDiT(preset).state_dict()
        assert len(sd) == 15 + 27 * layers and infer_wan_config(sd) == CONFIGS[preset]
        params = sum(t.numel() for t in sd.values())
    assert params == 14_288_491_584  # Wan2.1-T2V-14B's parameter count (1.3B: 1,418,996,800)


def test_text_is_zero_padded_to_text_len_as_wan():
    """Wan pads every context to text_len rows of zeros and attends to their embeddings (no mask); diffusers'
    transformer takes the context as given, so it gets the padded context."""
    ref = diffusers_model("base")
    x, sigma, context = inputs("base", (2, 6, 10), text=7)
    padded = torch.cat([context, torch.zeros(2, 9, 24)], dim=1)
    with torch.no_grad():
        got = load_wan(ref.state_dict(), heads=2, text_len=16)(x, sigma, context)
        unpadded = load_wan(ref.state_dict(), heads=2, text_len=None)(x, sigma, context)
    assert (got - ref_call(ref, x, sigma, padded)).abs().max() <= TOL
    assert (got - unpadded).abs().max() > 1e-2


class IdentityBlock(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_skip_plans_equal_identity_blocks_in_diffusers():
    ref = diffusers_model("base", seed=2)
    ours = load_wan(ref.state_dict(), heads=2, text_len=None)
    x, sigma, context = inputs("base", (2, 6, 10))
    with torch.no_grad():
        plain = ours(x, sigma, context)
        for skip in ([1], [0, 2], range(3)):
            blocks = list(ref.blocks)
            for i in skip:
                ref.blocks[i] = IdentityBlock()
            want = ref_call(ref, x, sigma, context)
            ref.blocks = torch.nn.ModuleList(blocks)
            got = ours(x, sigma, context, skip=set(skip))
            assert (got - want).abs().max() <= TOL, f"skip {list(skip)}"
            assert (got - plain).abs().max() > 1e-2
        assert (ours(x, sigma, context, skip={1: SKIP}) - ours(x, sigma, context, skip=[1])).abs().max() == 0


class IdentityAttention:
    """diffusers processor: each video token attends only to itself (the attention output is its value)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return attn.to_out[0](attn.to_v(hidden_states))


def test_identity_attention_equals_an_identity_self_attention_processor():
    ref = diffusers_model("base", seed=3)
    ours = load_wan(ref.state_dict(), heads=2, text_len=None)
    x, sigma, context = inputs("base", (3, 6, 10))
    ref.blocks[1].attn1.set_processor(IdentityAttention())
    want = ref_call(ref, x, sigma, context)
    with torch.no_grad():
        got = ours(x, sigma, context, skip={1: IDENTITY_ATTENTION})
        assert (got - want).abs().max() <= TOL
        assert (got - ours(x, sigma, context)).abs().max() > 1e-2


@pytest.mark.parametrize("sigma_blur", [0.8, 2.0, math.inf])
def test_smoothed_attention_blurs_each_frame_like_diffusers_seg(sigma_blur):
    """Our SEG on a video: the self-attention queries (before the qk-norm) blurred over each frame's square
    token grid by diffusers' own SEG blur. One frame: diffusers' SEG hook itself; more frames: its blur applied
    per frame by a hook on `to_q`. diffusers' blur swaps its branches, so its threshold is set to choose."""
    from diffusers.hooks.smoothed_energy_guidance_utils import (SmoothedEnergyGuidanceConfig,
                                                               _apply_smoothed_energy_guidance_hook,
                                                               _gaussian_blur_2d)
    layer, threshold = 1, (0.0 if math.isfinite(sigma_blur) else math.inf)
    ref_sigma = sigma_blur if math.isfinite(sigma_blur) else 2.0
    taps = math.ceil(6 * ref_sigma) + 1 - math.ceil(6 * ref_sigma) % 2
    for frames in (1, 3):
        ref = diffusers_model("base", seed=4)
        ours = load_wan(ref.state_dict(), heads=2, text_len=None)
        x, sigma, context = inputs("base", (frames, 16, 16))
        if frames == 1:
            _apply_smoothed_energy_guidance_hook(ref, SmoothedEnergyGuidanceConfig([layer]), ref_sigma)
            for hook in ref.blocks[layer].attn1.to_q._diffusers_hook.hooks.values():
                hook.blur_threshold_inf = threshold
        else:
            def blur(module, args, q):
                per_frame = q.reshape(-1, 64, q.shape[-1]).clone()
                return _gaussian_blur_2d(per_frame, taps, ref_sigma, threshold).reshape(q.shape)
            ref.blocks[layer].attn1.to_q.register_forward_hook(blur)
        want = ref_call(ref, x, sigma, context)
        with torch.no_grad():
            got = ours(x, sigma, context, skip={layer: smoothed_attention(sigma_blur)})
            assert (got - want).abs().max() <= TOL, f"{frames} frames"
            assert (got - ours(x, sigma, context)).abs().max() > 1e-2


def test_forward_shared_equals_separate_passes_and_shares_the_prefix():
    ref = diffusers_model("base", seed=6)
    model = load_wan(ref.state_dict(), heads=2, text_len=None)
    x, sigma, cond = inputs("base", (2, 6, 10), seed=7)
    uncond = torch.zeros_like(cond)
    xs, sigs, ctx = torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond])
    plans = [frozenset(), frozenset(), frozenset({1}), {2: IDENTITY_ATTENTION}, {1: smoothed_attention(1.0)},
             frozenset({1, 2})]
    which = [0, 1, 0, 0, 0, 1]  # cond, uncond, S² sub-network, PAG row, SEG row, uncond sub-network
    rows = []
    hooks = [b.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0])) for b in model.blocks]
    with torch.no_grad():
        shared = model.forward_shared(xs, sigs, skips=plans, inputs=which, context=ctx)
        n_shared = sum(rows)
        separate = [model(x, sigma, [cond, uncond][k], skip=p) for p, k in zip(plans, which)]
    for h in hooks:
        h.remove()
    for p, a, b in zip(plans, shared, separate):
        assert (a - b).abs().max() <= 1e-5, f"plan {p}"
    assert len({round(v.sum().item(), 3) for v in separate}) == len(plans)  # every variant differs
    assert (shared[0] - ref_call(ref, x, sigma, cond)).abs().max() <= TOL
    B = x.shape[0]
    # Block 0: cond and uncond slabs together; block 1: + the SEG row; block 2: cond history with and
    # without block 1, its PAG row, the SEG row's history, the uncond row.
    assert n_shared == block_rows(plans, which, B, 3) == B * (2 + 3 + 5) < B * (3 * 6 - 4)


@pytest.mark.parametrize("make", [
    lambda: G.S2Guidance(scale=5.0, omega=0.25, drop_ratio=0.34, interval=(0.0, 1.0), seed=1),
    lambda: G.SkipLayerGuidance(scale=5.0, skip_scale=2.0, layers=[1], start=0.0, stop=1.0),
    lambda: G.PerturbedAttentionGuidance(scale=5.0, layers=[1, 2], start=0.0, stop=1.0),
    lambda: G.SmoothedEnergyGuidance(scale=5.0, layers=[2], blur_sigma=1.0, start=0.0, stop=1.0),
])
def test_guiders_sample_a_random_wan(make):
    """Two steps through `sample`: the batched sweep equals separate passes, and the guider is not CFG."""
    model = load_wan(diffusers_model("base", seed=8).state_dict(), heads=2, text_len=None)
    x, _, context = inputs("base", (2, 6, 10), seed=9)
    cond, uncond = {"context": context}, {"context": torch.zeros_like(context)}
    with torch.no_grad():
        a = sample(model, x, uniform_sigmas(2), make(), cond, uncond, progress=False)
        b = sample(model, x, uniform_sigmas(2), make(), cond, uncond, progress=False, share_prefix=False)
        c = sample(model, x, uniform_sigmas(2), G.CFG(5.0), cond, uncond, progress=False)
    assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-4 and (a - c).abs().max() > 1e-3


def test_embeddings_match_the_reference_formulas():
    emb = diffusers.models.embeddings
    t = torch.tensor([0.0, 1.5, 987.38, 1000.0])
    want = emb.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert (sinusoidal_embedding(t, 256) - want).abs().max() < 2e-4  # fp32 angles at t ~ 1000
    # RoPE: diffusers' cos/sin tables for the same grid (its pairs repeat-interleaved).
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    cos, sin = WanRotaryPosEmbed(32, (1, 2, 2), 1024)(torch.zeros(1, 4, 3, 10, 6))
    table = rope_table((3, 5, 3), 32)
    assert torch.allclose(table.real, cos[0, :, 0, 0::2].float(), atol=1e-6)
    assert torch.allclose(table.imag, sin[0, :, 0, 0::2].float(), atol=1e-6)


def test_half_precision_keeps_the_fp32_parts_and_stays_close():
    ref = diffusers_model("base")
    model32 = load_wan(ref.state_dict(), heads=2, text_len=None)
    model = load_wan(ref.state_dict(), heads=2, text_len=None, dtype=torch.bfloat16)
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    assert dtypes["blocks.0.self_attn.q.weight"] == dtypes["patch_embedding.weight"] == torch.bfloat16
    for k in ("time_embedding.0.weight", "time_projection.1.weight", "blocks.2.modulation", "blocks.1.norm3.weight",
              "head.head.weight", "head.modulation"):
        assert dtypes[k] == torch.float32, k
    x, sigma, context = inputs("base", (2, 6, 10))
    with torch.no_grad():
        want = model32(x, sigma, context, skip=[1])
        got = model(x, sigma, context, skip=[1])
        # Cast wholesale (not through the loader) it still runs: the fp32 parts cast their own inputs.
        cast = WanDiT(model32.config).to(torch.bfloat16)
        assert cast(x, sigma, context).dtype == torch.float32
    assert got.dtype == torch.float32
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1.5e-2, f"bf16: relative error {rel:.2e}"  # measured 4.9e-3 (diffusers cast to bf16: 9e-3)


def test_fresh_model_has_wans_init_and_trains():
    torch.manual_seed(0)
    model = WanDiT(WanConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, in_dim=4, out_dim=4, text_dim=8,
                             freq_dim=16, patch_size=(2, 2, 2), text_len=None))
    x, ctx, sigma = torch.randn(2, 4, 4, 6, 8), torch.randn(2, 5, 8), torch.tensor([0.1, 0.7])
    out = model(x, sigma, ctx)
    assert torch.equal(out, torch.zeros_like(out))  # zero output weight and bias
    assert model.time_projection[1].weight.abs().sum() > 0  # not adaLN-zero: Wan inits it like every linear
    model.head.head.weight.data.normal_()
    model(x, sigma, ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_wrong_checkpoints_and_inputs_give_one_line_errors(tmp_path):
    ref = diffusers_model("base")
    sd = ref.state_dict()
    cases = [
        (lambda: load_wan({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2),
                           "pos_embed.proj.weight": torch.zeros(2, 4, 2, 2)}), "looks like an SD3/SD3.5 MMDiT"),
        (lambda: load_mmdit(sd), "looks like a Wan DiT: load it with load_wan"),
        (lambda: load_wan({**sd, "blocks.0.attn2.add_k_proj.weight": torch.zeros(2, 2)}), "image-to-video"),
        (lambda: load_wan({"encoder.down.0.weight": torch.zeros(1)}), "not a Wan DiT checkpoint"),
        (lambda: load_wan(sd), "dim 64 is not a multiple of 128"),
        (lambda: load_wan({k: v for k, v in sd.items() if k != "blocks.1.ffn.net.2.bias"}, heads=2),
         "missing 1 tensors: blocks.1.ffn.2.bias"),
    ]
    pth = tmp_path / "wan.pth"
    pth.write_bytes(b"PK\x03\x04")
    cases.append((lambda: load_wan(pth), "pickle checkpoints are never loaded"))
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

    model = load_wan(sd, heads=2, text_len=16)
    x, sigma, context = inputs("base", (2, 6, 10))
    bad = [
        (dict(x=torch.randn(2, 4, 6, 10)), "x must be a latent video [B, C, F, H, W]"),
        (dict(x=torch.randn(2, 3, 2, 6, 10)), "latent has 3 channels, the model expects 4"),
        (dict(x=torch.randn(2, 4, 2, 7, 10)), "latent size 2x7x10 (F x H x W) is not a multiple of the patch"),
        (dict(context=torch.randn(2, 7, 25)), "context must be [2, L, 24]"),
        (dict(context=torch.randn(2, 17, 24)), "context has 17 rows, more than the model's text_len 16"),
        (dict(sigma=torch.rand(3)), "sigma must be a scalar or [2]"),
        (dict(skip=[3]), "skip indices [3] outside the 3 blocks"),
    ]
    for change, message in bad:
        args = {**dict(x=x, sigma=sigma, context=context), **change}
        with pytest.raises(ValueError) as e:
            model(**args)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="unknown Wan config"):
        WanDiT("t2v_7b")
    with pytest.raises(ValueError, match="patch_size must be 3 positive ints"):
        WanConfig(patch_size=(2, 2))
    assert torch.allclose(model(x, 0.5, context), model(x, torch.full((2,), 0.5), context))
