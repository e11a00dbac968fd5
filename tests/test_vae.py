"""SD3 VAE parity with diffusers' AutoencoderKL (random weights, tiny config), both layouts, bad inputs.

Tolerance: max |diff| <= 1e-5 in fp32 (observed ~1e-6)."""
import pytest
import torch
from safetensors.torch import save_file

from s2g.models import load_vae
from s2g.models.vae import VAE, VAEConfig, diffusers_to_original

diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(2)

SCALE, SHIFT, TOL = 1.5305, 0.0609, 1e-5


def diffusers_vae(widths=(32, 64, 64), quant_conv=False, seed=0):
    torch.manual_seed(seed)
    n = len(widths)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=widths, layers_per_block=2,
        latent_channels=16, norm_num_groups=32, use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
        scaling_factor=SCALE, shift_factor=SHIFT,
    ).eval()
    with torch.no_grad():  # randomise every tensor, norms included (defaults 1/0 would hide swapped norms)
        for name, p in ref.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def ref():
    return diffusers_vae()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 24) * 2 - 1  # non-square, batch 2


def ref_encode(ref, x):
    with torch.no_grad():
        return (ref.encode(x).latent_dist.mean - SHIFT) * SCALE


def ref_decode(ref, z):
    with torch.no_grad():
        return ref.decode(z / SCALE + SHIFT).sample


def check_parity(vae, ref, images):
    z_ref = ref_encode(ref, images)
    z = vae.encode(images)
    assert z.shape == (2, 16, 8, 6)
    assert (z - z_ref).abs().max() <= TOL
    x_ref = ref_decode(ref, z_ref)
    assert x_ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert (vae.decode(z_ref) - x_ref).abs().max() <= TOL


def test_diffusers_layout_file(ref, images, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(ref.state_dict(), str(path))
    vae = load_vae(path)
    assert vae.config.block_out_channels == (32, 64, 64) and vae.config.layers_per_block == 2
    check_parity(vae, ref, images)
    # a diffusers `vae/` folder works too
    check_parity(load_vae(tmp_path), ref, images)


def test_original_layout_single_file(ref, images, tmp_path):
    sd = ref.state_dict()
    orig = diffusers_to_original(sd)
    # cross-check our reverse mapping against diffusers' own forward conversion
    back = diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint(orig, ref.config)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in orig and orig["decoder.mid.attn_1.q.weight"].ndim == 4
    # full SD3 single-file checkpoint: VAE under first_stage_model. next to other parts
    full = {f"first_stage_model.{k}": v.contiguous() for k, v in orig.items()}
    full["model.diffusion_model.x_embedder.proj.bias"] = torch.zeros(4)
    save_file(full, str(tmp_path / "sd3.safetensors"))
    check_parity(load_vae(tmp_path / "sd3.safetensors"), ref, images)
    # standalone original file: bare keys
    check_parity(load_vae(orig), ref, images)


def test_sampling_matches_diffusers_and_is_seeded(ref, images):
    vae = load_vae(ref.state_dict())
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        z_ref = (dist.sample(generator=torch.Generator().manual_seed(5)) - SHIFT) * SCALE
    z = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, z_ref, atol=TOL, rtol=TOL)  # std = exp(logvar/2) magnifies rounding
    assert (z - vae.encode(images)).abs().max() > 1e-3  # sampling actually adds noise
    assert torch.equal(z, vae.encode(images, sample=True, generator=torch.Generator().manual_seed(5)))


def test_decode_only_file(ref, images):
    orig = {k: v for k, v in diffusers_to_original(ref.state_dict()).items() if k.startswith("decoder.")}
    vae = load_vae(orig)
    z = ref_encode(ref, images)
    assert (vae.decode(z) - ref_decode(ref, z)).abs().max() <= TOL
    with pytest.raises(ValueError, match="without encoder"):
        vae.encode(images)


def test_fp16_load_dtype(ref):
    vae = load_vae(ref.state_dict(), dtype=torch.float16)
    assert vae.dtype == torch.float16 and vae.decode(torch.zeros(1, 16, 4, 4)).dtype == torch.float16


def test_full_size_layout_matches_diffusers():
    """The released config (128,256,512,512), built on the meta device: same keys and shapes after renaming."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            use_quant_conv=False, use_post_quant_conv=False)
        ours = VAE(VAEConfig())
    orig = diffusers_to_original(ref.state_dict())
    mine = ours.state_dict()
    assert set(orig) == set(mine) and all(orig[k].shape == mine[k].shape for k in mine)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


# --- bad input -------------------------------------------------------------------------------------------------

def test_corrupt_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="safetensors"):
        load_vae(path)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing.safetensors")
    pickle = tmp_path / "vae.ckpt"
    pickle.write_bytes(b"PK\x03\x04 a torch.save zip")
    with pytest.raises(ValueError, match="pickle"):
        load_vae(pickle)  # refused before anything is unpickled


def test_wrong_architecture(ref):
    with pytest.raises(ValueError, match="no VAE weights"):
        load_vae({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 16, 2, 2)})
    sdxl_like = diffusers_vae(quant_conv=True).state_dict()
    with pytest.raises(ValueError, match="quant_conv"):
        load_vae(sdxl_like)


def test_missing_and_misshapen_keys(ref):
    orig = diffusers_to_original(ref.state_dict())
    broken = {k: v for k, v in orig.items() if k != "decoder.mid.attn_1.k.weight"}
    with pytest.raises(ValueError, match="missing 1 tensors: decoder.mid.attn_1.k.weight"):
        load_vae(broken)
    extra = dict(orig, **{"decoder.mid.attn_2.q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected 1 tensors: .*attn_2"):
        load_vae(extra)
    bad = dict(orig, **{"decoder.conv_out.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="tensor decoder.conv_out.bias has shape"):
        load_vae(bad)
