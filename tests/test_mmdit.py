"""MMDiT parity with diffusers' SD3Transformer2DModel (random weights, tiny configs keeping every structural
feature), loaded from both checkpoint layouts; shared-prefix skip variants; dtypes; forward errors."""
import math

import pytest
import torch
from safetensors.torch import save_file

from s2g.models import MMDiT, load_mmdit
from s2g.models.checkpoint import diffusers_to_original
from s2g.models.mmdit import MMDiTConfig, sincos_pos_embed_2d, timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_thread")


# name -> (diffusers kwargs, latent H x W, heads to pass to the loader or None, skip sets)
CASES = {
    # MMDiT-X: qk-norm, dual attention in the first blocks, head_dim 16, non-square latent off-centre in the table.
    "mmditx": (dict(num_layers=4, num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4,
                    joint_attention_dim=40, pooled_projection_dim=24, pos_embed_max_size=12,
                    dual_attention_layers=(0, 1), qk_norm="rms_norm"), (10, 14), None, [[1], [0, 3]]),
    # SD3-medium structure: no qk-norm, head_dim 64 so heads are inferred as hidden/64.
    "sd3": (dict(num_layers=3, num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
                 joint_attention_dim=72, pooled_projection_dim=32, pos_embed_max_size=8), (12, 8), None, [[2]]),
    # The embedded pixel-space shape: 3 channels, 10 blocks, 4 heads of 16 (heads not visible without qk-norm).
    "pixel": (dict(num_layers=10, num_attention_heads=4, attention_head_dim=16, in_channels=3, out_channels=3,
                   joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=8), (16, 12), 4, [[3, 7]]),
}


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (adaLN / output zero-inits would make parity vacuous), scaled to keep outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            r = torch.randn(t.shape, generator=g)
            if "pos_embed" in name and t.ndim == 3:
                t.copy_(0.5 * r)
            elif t.ndim >= 2:
                t.copy_(r / math.sqrt(t[0].numel()))
            elif name.endswith("bias"):
                t.copy_(0.1 * r)
            else:  # RMS qk-norm weights
                t.copy_(1 + 0.2 * r)
    return module.eval()


def diffusers_model(case: str, seed: int = 0) -> SD3Transformer2DModel:
    kwargs = CASES[case][0]
    hidden = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    return randomize(SD3Transformer2DModel(sample_size=16, patch_size=2, caption_projection_dim=hidden, **kwargs), seed)


def inputs(case: str, batch: int = 2, seed: int = 1):
    kwargs, (H, W), _, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, kwargs["in_channels"], H, W, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05  # a different sigma per sample
    context = torch.randn(batch, 7, kwargs["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, kwargs["pooled_projection_dim"], generator=g)
    return x, sigma, context, pooled


def assert_parity(ours: MMDiT, ref: SD3Transformer2DModel, case: str):
    x, sigma, context, pooled = inputs(case)
    with torch.no_grad():
        for skip in [None, *CASES[case][3]]:
            want = ref(x, context, pooled, timestep=1000 * sigma, skip_layers=skip).sample
            got = ours(x, sigma, context, pooled, skip=skip)
            assert want.abs().max() > 0.3 and want.std() > 0.1, "degenerate reference output"
            err = (got - want).abs().max().item()
            assert err <= 1e-5, f"{case} skip={skip}: max |diff| {err:.2e}"
        # Skipping must change the output (otherwise the skip comparison above proves nothing).
        skipped = ours(x, sigma, context, pooled, skip=CASES[case][3][0])
        assert (skipped - ours(x, sigma, context, pooled)).abs().max() > 1e-2


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param, diffusers_model(request.param)


def test_parity_from_diffusers_layout_file(case, tmp_path):
    name, ref = case
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(ref.state_dict(), path)
    assert_parity(load_mmdit(path, heads=CASES[name][2]), ref, name)


def test_parity_from_original_layout_file(case, tmp_path):
    """Our reverse mapping writes the single-file layout (prefixed, next to VAE and text-encoder tensors); it must
    also be exactly what diffusers' own converter maps back to the diffusers model."""
    name, ref = case
    original = diffusers_to_original(ref.state_dict())
    full = {f"model.diffusion_model.{k}": v.clone() for k, v in original.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    full["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    save_file(full, tmp_path / "sd3_single_file.safetensors")
    assert_parity(load_mmdit(tmp_path / "sd3_single_file.safetensors", heads=CASES[name][2]), ref, name)

    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in original.items()})
    want = ref.state_dict()
    assert set(converted) == set(want)
    for k in want:
        assert torch.equal(converted[k], want[k]), k


def test_our_module_names_are_the_original_layout():
    """Independent of our converter: a randomly initialised MMDiT's own state dict, run through diffusers'
    converter, loads strictly into diffusers and gives the same velocity."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    kwargs = CASES["mmditx"][0]
    ours = randomize(MMDiT(MMDiTConfig(
        depth=4, hidden=48, heads=3, in_channels=4, out_channels=4, context_dim=40, pooled_dim=24,
        pos_embed_max_size=12, qk_norm=True, dual_attention_blocks=(0, 1))), seed=5)
    ref = SD3Transformer2DModel(sample_size=16, patch_size=2, caption_projection_dim=48, **kwargs).eval()
    converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()})
    ref.load_state_dict(converted, strict=True)
    assert_parity(ours, ref, "mmditx")


def test_denoiser_seam_keywords_and_blocks():
    ref = diffusers_model("sd3")
    model = load_mmdit(ref.state_dict())
    x, sigma, context, pooled = inputs("sd3")
    assert model.num_blocks == 3 and model.blocks is model.joint_blocks
    assert isinstance(model.blocks, torch.nn.ModuleList)
    with torch.no_grad():
        a = model(x, sigma, skip=frozenset({2}), **{"context": context, "pooled": pooled})
        b = ref(x, context, pooled, timestep=1000 * sigma, skip_layers=[2]).sample
        assert (a - b).abs().max() <= 1e-5
        # Skipping every block leaves the embedded tokens untouched: velocity = final layer of the embeddings.
        tokens, _, c, (h, w) = model._embed(x, sigma, context, pooled)
        assert torch.equal(model(x, sigma, context, pooled, skip=range(3)), model._head(tokens, c, h, w))
        # A python float sigma is broadcast to the batch.
        assert torch.allclose(model(x, 0.5, context, pooled), model(x, torch.full((2,), 0.5), context, pooled))


def test_forward_shared_equals_separate_passes_and_shares_the_prefix():
    model = load_mmdit(diffusers_model("pixel", seed=3).state_dict(), heads=4)
    x, sigma, context, pooled = inputs("pixel", batch=2, seed=4)
    skips = [frozenset(), frozenset({5, 7}), frozenset({5, 7}), frozenset({2}), frozenset({9})]
    rows = []
    hooks = [b.register_forward_pre_hook(lambda m, args: rows.append(args[1].shape[0])) for b in model.blocks]
    with torch.no_grad():
        shared = model.forward_shared(x, sigma, context, pooled, skips)
        n_shared = sum(rows)
        rows.clear()
        separate = [model(x, sigma, context, pooled, skip=s) for s in skips]
    for h in hooks:
        h.remove()
    for s, a, b in zip(skips, shared, separate):
        assert (a - b).abs().max() <= 1e-5, f"skip {set(s)}"
    assert (shared[1] - shared[0]).abs().max() > 1e-2
    # Block i processes one batch per distinct history (set of skipped blocks before i) among variants running it.
    B = x.shape[0]
    want = sum(B * len({frozenset(j for j in s if j < i) for s in skips if i not in s}) for i in range(10))
    assert n_shared == want == 40 and sum(rows) == B * sum(10 - len(s) for s in skips) == 88


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_close_to_fp32(dtype, tol):
    ref = diffusers_model("mmditx")
    model32 = load_mmdit(ref.state_dict())
    model = load_mmdit(ref.state_dict(), dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters()) and model.pos_embed.dtype == dtype
    x, sigma, context, pooled = inputs("mmditx")
    with torch.no_grad():
        want = model32(x, sigma, context, pooled, skip=[1])
        got = model(x, sigma, context, pooled, skip=[1])
    assert got.dtype == torch.float32  # the velocity comes back in x's dtype
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < tol, f"{dtype}: relative error {rel:.2e}"


def test_embeddings_match_the_reference_formulas():
    emb = diffusers.models.embeddings
    t = torch.tensor([0.0, 1.5, 987.38, 1000.0])
    want = emb.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert torch.allclose(timestep_embedding(t), want, atol=1e-6, rtol=0)
    # Plain 2-D sin-cos table (column in the first half, row in the second); diffusers with base_size = grid.
    want = emb.get_2d_sincos_pos_embed(48, 6, base_size=6, interpolation_scale=1.0, output_type="pt")
    assert torch.allclose(sincos_pos_embed_2d(48, 6), want.float(), atol=1e-6, rtol=0)


def test_fresh_model_is_zero_initialised_and_trainable():
    """The embedded tiny model trains this class from scratch: adaLN-Zero / zero output init (DiT)."""
    torch.manual_seed(0)
    cfg = MMDiTConfig(depth=3, hidden=32, heads=2, in_channels=3, out_channels=3, context_dim=8, pooled_dim=8,
                      pos_embed_max_size=4, qk_norm=True, dual_attention_blocks=(0,))
    model = MMDiT(cfg)
    x, ctx, pooled = torch.randn(2, 3, 8, 6), torch.randn(2, 5, 8), torch.randn(2, 8)
    out = model(x, torch.tensor([0.1, 0.7]), ctx, pooled)
    assert torch.equal(out, torch.zeros_like(out))
    model.final_layer.linear.weight.data.normal_()
    loss = model(x, torch.tensor([0.1, 0.7]), ctx, pooled).square().mean()
    loss.backward()
    assert model.final_layer.adaLN_modulation[1].weight.grad.abs().sum() > 0
    assert model.pos_embed.requires_grad is False and "pos_embed" in model.state_dict()


def test_forward_errors_are_one_line():
    model = load_mmdit(diffusers_model("mmditx").state_dict())  # patch 2, table 12x12 patches, 4 channels
    ctx, pooled = torch.randn(1, 3, 40), torch.randn(1, 24)
    cases = [
        (dict(x=torch.randn(1, 4, 11, 8)), "latent size 11x8 is not a multiple of the patch size 2"),
        (dict(x=torch.randn(1, 4, 26, 8)), "latent size 26x8 (13x4 patches) exceeds the position table 12x12"),
        (dict(x=torch.randn(1, 3, 8, 8)), "latent has 3 channels, the model expects 4"),
        (dict(context=torch.randn(1, 3, 41)), "context must be [1, L, 40]"),
        (dict(pooled=torch.randn(1, 23)), "pooled must be [1, 24]"),
        (dict(skip=[4]), "skip indices [4] outside the 4 blocks"),
    ]
    for change, message in cases:
        args = {**dict(x=torch.randn(1, 4, 8, 8), sigma=torch.tensor([0.5]), context=ctx, pooled=pooled), **change}
        with pytest.raises(ValueError) as e:
            model(**args)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert model(torch.randn(1, 4, 24, 24), torch.tensor([0.5]), ctx, pooled).shape == (1, 4, 24, 24)
