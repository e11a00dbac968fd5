"""Wan 2.1 VAE parity with diffusers' AutoencoderKLWan (random weights, a tiny config with every structural part:
4 levels, 2 res blocks, two temporal resamplings, non-square frames), from both checkpoint layouts: normalised
encode, and the chunked causal decode over several frame counts 1 + 4k (so the feature caches and the first-frame
rules are used); chunk size and causality; the full-size configuration read off the diffusers layout; bad input."""
import math

import pytest
import torch
from safetensors.torch import save_file

from s2g.models import WanVAE, WanVAEConfig, load_wan_vae
from s2g.models.checkpoint import _wan_vae_original_layout, infer_wan_vae_config
from s2g.models.wan_vae import LATENTS_MEAN, LATENTS_STD

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # measured: encode 5e-7, decode up to 4e-6 (outputs ~1), fp32
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.7, 2.0, 1.1]
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=MEAN, latents_std=STD)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (unit gammas and zero biases would hide swapped or dropped ones), outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.named_parameters():
            r = torch.randn(t.shape, generator=g)
            if t.ndim >= 2:
                t.copy_(r / math.sqrt(t[0].numel()))
            elif name.endswith("bias"):
                t.copy_(0.1 * r)
            else:  # RMS-norm gammas
                t.copy_(1 + 0.2 * r)
    return module.eval()


@pytest.fixture(scope="module")
def ref():
    return randomize(AutoencoderKLWan(**TINY), 0)


@pytest.fixture(scope="module")
def ours(ref):
    return load_wan_vae(ref.state_dict(), latents_mean=MEAN, latents_std=STD)


def stats():
    return torch.tensor(MEAN).view(1, 4, 1, 1, 1), 1.0 / torch.tensor(STD).view(1, 4, 1, 1, 1)


def ref_encode(ref, x):
    mean, inv_std = stats()  # as Wan / diffusers' Wan pipelines normalise: (mu - mean) * (1 / std)
    with torch.no_grad():
        return (ref.encode(x).latent_dist.mode() - mean) * inv_std


def ref_decode(ref, z):
    mean, inv_std = stats()
    with torch.no_grad():
        return ref.decode(z / inv_std + mean).sample  # clamped to [-1, 1] inside


def video(frames, seed=1, size=(32, 48)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, frames, *size, generator=g) * 2 - 1


def latents(t, seed=2, size=(4, 6)):
    return torch.randn(2, 4, t, *size, generator=torch.Generator().manual_seed(seed))


def test_config_inferred(ours):
    assert ours.config == WanVAEConfig(dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                                       temporal_downsample=(False, True, True), z_dim=4, latents_mean=tuple(MEAN),
                                       latents_std=tuple(STD))


@pytest.mark.parametrize("frames", [1, 5, 13])
def test_encode_parity(ref, ours, frames):
    x = video(frames)
    want, got = ref_encode(ref, x), ours.encode(x)
    assert got.shape == (2, 4, 1 + (frames - 1) // 4, 4, 6)
    assert want.abs().max() > 0.5
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("t", [1, 2, 3, 4])  # 1, 5, 9, 13 frames
def test_chunked_decode_parity(ref, ours, t):
    z = latents(t)
    want, got = ref_decode(ref, z), ours.decode(z)
    assert got.shape == (2, 3, 1 + 4 * (t - 1), 32, 48)
    assert (ours.decode(z, clamp=False).abs() < 1).float().mean() > 0.9  # the clamp hides little
    assert (got - want).abs().max() <= TOL


def test_original_layout_file(ref, ours, tmp_path):
    """Our own state dict is in Wan's names: diffusers' converter takes it (strictly) and gives the same model;
    loaded back from a safetensors file, bare or under a prefix, it is the same VAE."""
    sd = ours.state_dict()
    assert "decoder.upsamples.3.time_conv.weight" in sd and "encoder.downsamples.5.time_conv.weight" in sd
    converted = AutoencoderKLWan(**TINY).eval()
    converted.load_state_dict(convert_wan_vae_to_diffusers(sd), strict=True)
    save_file({f"vae.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "wan_vae.safetensors"))
    again = load_wan_vae(tmp_path / "wan_vae.safetensors", latents_mean=MEAN, latents_std=STD)
    z, x = latents(3), video(9)
    assert torch.equal(again.decode(z), ours.decode(z))
    assert (again.encode(x) - ref_encode(converted, x)).abs().max() <= TOL
    assert (again.decode(z) - ref_decode(converted, z)).abs().max() <= TOL


def test_chunk_size_and_causality(ours):
    z, x = latents(4), video(13)
    full = ours.decode(z, clamp=False)
    assert (ours.decode(z, chunk=3, clamp=False) - full).abs().max() <= 1e-6
    assert (ours.decode(z[:, :, :2], clamp=False) - full[:, :, :5]).abs().max() <= 1e-6  # later latents: later frames
    enc = ours.encode(x)
    assert (ours.encode(x, chunk=2) - enc).abs().max() <= 1e-6
    assert (ours.encode(x[:, :, :5]) - enc[:, :, :2]).abs().max() <= 1e-6


def test_decoder_only_file(ref, ours):
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
    vae = load_wan_vae(sd, latents_mean=MEAN, latents_std=STD)
    z = latents(2)
    assert torch.equal(vae.decode(z), ours.decode(z))
    with pytest.raises(ValueError, match="without encoder"):
        vae.encode(video(5))


def test_full_size_config_from_diffusers_layout():
    with torch.device("meta"):
        sd = AutoencoderKLWan().state_dict()  # Wan 2.1's defaults
    orig = _wan_vae_original_layout(sd, "meta")
    assert infer_wan_vae_config(orig) == WanVAEConfig()
    assert WanVAEConfig().latents_mean == LATENTS_MEAN and WanVAEConfig().latents_std == LATENTS_STD
    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig())
    assert set(vae.state_dict()) == set(orig)
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531  # as the released Wan2.1_VAE


def test_bad_input(ours, tmp_path):
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        ours.encode(video(8))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(video(5, size=(32, 44)))
    with pytest.raises(ValueError, match=r"\[B, 4, F, H, W\]"):
        ours.decode(torch.zeros(1, 16, 2, 4, 4))
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"PK\x03\x04 not read")
    with pytest.raises(ValueError, match="weights_only=True") as err:
        load_wan_vae(tmp_path / "Wan2.1_VAE.pth")
    assert "\n" not in str(err.value)
    sd = AutoencoderKLWan(**TINY).state_dict()
    with pytest.raises(ValueError, match="latents_mean"):
        load_wan_vae(sd)  # 4 latent channels: Wan's 16 constants do not fit
    sd3 = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  latent_channels=4).state_dict()
    with pytest.raises(ValueError, match="load_vae"):
        load_wan_vae(sd3)
