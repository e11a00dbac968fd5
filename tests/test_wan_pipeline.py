"""Wan 2.1 end to end on a tiny random model in the released layouts (s2g/wan.py, configs/model/wan21_t2v_*.yaml).

- parity: our TextToVideo + CFG + Wan's flow UniPC against diffusers' WanPipeline built from the same components
  (same initial latents, same negative prompt, fp32; diffusers' scheduler given Wan's σ grid, which its default
  grid is not): final latents and decoded videos, with Wan's default negative prompt and with "";
- the model configs: composed as sample.py composes them (sampler unipc, Wan's guider defaults), built by
  s2g.config.build_model on the tiny files;
- MP4 output: a random-weight video written with save_mp4 and read back with PyAV; the frame strip;
- bad input: one line naming the config key, before any weights are read where no weights are needed.

The DiT is stored as the repackaged single files store it (Wan's own names under `model.diffusion_model.`), the VAE
and umT5 in the diffusers / transformers layouts; test_wan.py, test_wan_vae.py and test_umt5.py check every layout
of each part on its own.
"""
import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from s2g.guidance import CFG, AutoGuidance, Conditional, S2Guidance
from s2g.models.text import WAN_NEGATIVE_PROMPT
from s2g.video import TextToVideo, load_mp4, save_frame_strip, save_mp4, strip_indices
from s2g.wan import load_wan21

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
spm = pytest.importorskip("sentencepiece")
np = pytest.importorskip("numpy")
from test_wan import randomize as randomize_dit, to_original  # noqa: E402  (tiny-model builders)
from test_wan_vae import randomize as randomize_vae  # noqa: E402
from test_umt5 import CORPUS, randomize as randomize_umt5  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
FRAMES, H, W = 9, 32, 48  # latents 3 x 4 x 6: the VAE's caches and first-chunk rules, non-square
PROMPTS = ["a red fox runs through the snow in slow motion", "two cats play with a ball of yarn"]
STEPS, SHIFT, SCALE = 5, 5.0, 5.0
VOCAB, TEXT_DIM = 128, 32
REL_TOL = 1e-5  # max |ours - diffusers| / max |diffusers| on the final latents; measured: see the report printed


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The diffusers / transformers components (the oracle) and their files in the released layouts."""
    d = tmp_path_factory.mktemp("wan_pipe")
    (d / "corpus.txt").write_text("\n".join([CORPUS + " " + " ".join(PROMPTS)] * 20))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=VOCAB,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   character_coverage=1.0)
    torch.manual_seed(0)
    umt5 = randomize_umt5(transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=VOCAB, d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)))
    # head size 128, as both released models (the loader infers the head count from it); 16 latent channels
    transformer = randomize_dit(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6), seed=1)
    vae = randomize_vae(diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True]), seed=2)  # Wan's latent mean / std: diffusers' defaults
    dit_file, vae_file, text_file = d / "wan_t2v_tiny.safetensors", d / "vae.safetensors", d / "umt5.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in to_original(transformer.state_dict()).items()},
              str(dit_file))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_file))
    save_file({k: v.contiguous() for k, v in umt5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(text_file))
    return types.SimpleNamespace(dir=d, spiece=d / "spiece.model", umt5=umt5, transformer=transformer, vae=vae,
                                 files=dict(checkpoint=dit_file, vae=vae_file, text_encoder=text_file,
                                            tokenizer=d / "spiece.model"))


def load(parts, **kw):
    return load_wan21(**{**parts.files, **dict(num_frames=FRAMES, height=H, width=W, dtype="float32",
                                               device="cpu"), **kw})


class WanGridUniPC(diffusers.UniPCMultistepScheduler):
    """diffusers' flow UniPC on Wan's σ grid (its own default grid lies up to 4e-3 away from Wan's at shift 5)."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        sigma_max = float(torch.tensor(1 - 1 / 1000, dtype=torch.float32))
        super().set_timesteps(sigmas=np.linspace(sigma_max, 0, num_inference_steps + 1)[:-1], device=device)


@pytest.fixture(scope="module")
def oracle(parts):
    scheduler = WanGridUniPC(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                             flow_shift=SHIFT)
    pipe = diffusers.WanPipeline(tokenizer=transformers.T5Tokenizer.from_pretrained(parts.dir, extra_ids=0),
                                 text_encoder=parts.umt5, transformer=parts.transformer, vae=parts.vae,
                                 scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_oracle(oracle, latents, output_type, negative_prompt=WAN_NEGATIVE_PROMPT):
    with torch.no_grad():
        return oracle(prompt=PROMPTS, negative_prompt=negative_prompt, height=H, width=W, num_frames=FRAMES,
                      num_inference_steps=STEPS, guidance_scale=SCALE, latents=latents.clone(),
                      output_type=output_type, max_sequence_length=512).frames


def initial_latents():
    return torch.randn(len(PROMPTS), 16, 1 + (FRAMES - 1) // 4, H // 8, W // 8,
                       generator=torch.Generator().manual_seed(7))


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def final_latents(pipe, guider, noise, **kw):
    return dataclasses.replace(pipe, decode=lambda z: z)(PROMPTS, guider, steps=STEPS, shift=SHIFT, sampler="unipc",
                                                         noise=noise, **kw)


# ------------------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("negative", [None, ""], ids=["wan_negative", "empty_negative"])
def test_final_latents_match_diffusers(parts, oracle, negative):
    """Wan's default negative prompt (our default, given to diffusers explicitly) and "" (diffusers' default)."""
    pipe = load(parts, negative_prompt=negative)
    assert isinstance(pipe, TextToVideo) and pipe.latent_shape == (16, 3, H // 8, W // 8) and pipe.num_frames == 3
    assert pipe.negative_prompt == (WAN_NEGATIVE_PROMPT if negative is None else "")
    noise = initial_latents()
    ref = run_oracle(oracle, noise, "latent", negative_prompt=WAN_NEGATIVE_PROMPT if negative is None else None)
    ours = final_latents(pipe, CFG(scale=SCALE), noise)
    assert ref.shape == ours.shape == noise.shape
    assert (ref - noise).abs().max() > 1  # the model moved the latents by O(1)
    err = rel_err(ours, ref)
    print(f"final latents ({'Wan negative' if negative is None else 'empty negative'}): "
          f"max |diff| / max |ref| = {err:.2e} (max |ref| {ref.abs().max():.2f})")
    assert err <= REL_TOL
    # the negative prompt matters: the other one ends elsewhere
    other = run_oracle(oracle, noise, "latent", negative_prompt="" if negative is None else WAN_NEGATIVE_PROMPT)
    assert rel_err(other, ref) > 1e-2


def test_decoded_videos_match_diffusers(parts, oracle):
    pipe = load(parts)
    noise = initial_latents()
    ref = run_oracle(oracle, noise, "pt")  # (x / 2 + 0.5).clamp(0, 1) of the VAE decode, [B, F, 3, H, W]
    ours = pipe(PROMPTS, CFG(scale=SCALE), steps=STEPS, shift=SHIFT, sampler="unipc", noise=noise)
    assert ours.shape == ref.shape == (2, FRAMES, 3, H, W) and ours.dtype == torch.float32
    assert 0.05 < ref.std() and 0 < ref.mean() < 1 and ((ref > 0) & (ref < 1)).float().mean() > 0.5
    err = (ours - ref).abs().max().item()
    print(f"decoded videos: max |diff| = {err:.2e}")
    assert err <= 1e-4


def test_network_sees_wans_integer_timesteps(parts):
    """The solver steps on Wan's float σ; the DiT is asked at t/1000 for Wan's truncated integers t, for every
    step count the pipeline is called with (the table follows the grid of the run)."""
    from s2g.sampling import wan_sigmas, wan_timesteps

    pipe = load(parts)
    seen = []
    net = pipe.denoiser.net.net  # GridTimesteps -> OnDevice -> WanDiT
    hook = net.register_forward_pre_hook(lambda m, args: seen.append(args[1].reshape(-1)[0].item()))
    try:
        for steps in (3, 4):
            seen.clear()
            dataclasses.replace(pipe, decode=lambda z: z)(PROMPTS[:1], Conditional(), steps=steps, shift=SHIFT,
                                                          sampler="unipc", noise=initial_latents()[:1])
            t = wan_timesteps(steps, SHIFT)
            assert len(seen) == steps
            assert [round(s * 1000) for s in seen] == t.tolist()
            assert max(abs(s * 1000 - ti) for s, ti in zip(seen, t.tolist())) < 1e-3
            assert max(abs(s - g) for s, g in zip(seen, wan_sigmas(steps, SHIFT).tolist())) > 1e-4
    finally:
        hook.remove()


def test_s2_with_omega_zero_is_cfg_and_autoguidance_with_itself_is_conditional(parts):
    noise = initial_latents()
    pipe = load(parts, weak_checkpoint=parts.files["checkpoint"])
    cfg = final_latents(pipe, CFG(scale=SCALE), noise)
    s2 = final_latents(pipe, S2Guidance(scale=SCALE, omega=0.0, seed=0), noise)
    assert torch.equal(s2, cfg) or (s2 - cfg).abs().max() <= 1e-6 * cfg.abs().max()
    s2_on = final_latents(pipe, S2Guidance(scale=SCALE, omega=0.25, drop_ratio=0.34, seed=0), noise)
    assert rel_err(s2_on, cfg) > 1e-4  # a sub-network drops a block of the 3
    auto = final_latents(pipe, AutoGuidance(scale=3.0), noise)
    plain = final_latents(pipe, Conditional(), noise)
    assert (auto - plain).abs().max() <= 1e-5 * plain.abs().max()


# ------------------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("name,blocks,size", [("wan21_t2v_1_3b", 30, (480, 832)), ("wan21_t2v_14b", 40, (720, 1280))])
def test_model_configs(parts, name, blocks, size):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from s2g.config import apply_guidance_defaults, build_model
    from s2g.guidance import from_spec

    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=[f"model={name}", "guidance=s2"])
        euler = compose("config", overrides=[f"model={name}", "sampler=euler"])
        guiders = {g: compose("config", overrides=[f"model={name}", f"guidance={g}"]).guidance
                   for g in ("cfg_zero_star", "slg", "cfg")}
    assert (cfg.sampler.name, cfg.steps, cfg.shift) == ("unipc", 50, 5.0) and euler.sampler.name == "euler"
    m = cfg.model
    assert (m.num_frames, m.height, m.width, m.negative_prompt, m.fps) == (81, *size, None, 16)
    assert apply_guidance_defaults(m, "s2", cfg.guidance, []) == {"scale": 5.0, "omega": 0.25}
    assert apply_guidance_defaults(m, "s2", cfg.guidance, ["guidance.scale=7"]) == {"omega": 0.25}
    assert apply_guidance_defaults(m, "cfg_zero_star", guiders["cfg_zero_star"], [])["zero_init_steps"] == 2
    apply_guidance_defaults(m, "slg", guiders["slg"], [])
    slg = from_spec(OmegaConf.to_container(guiders["slg"], resolve=True))
    assert all(0 < b < blocks for b in slg.layers) and slg.scale == 5.0
    # build_model on the tiny files, as sample.py does
    for key, value in {**parts.files, "num_frames": FRAMES, "height": H, "width": W, "device": "cpu"}.items():
        OmegaConf.update(m, key, str(value) if isinstance(value, Path) else value)
    pipe, extras = build_model(m)
    assert isinstance(pipe, TextToVideo) and pipe.negative_prompt == WAN_NEGATIVE_PROMPT and pipe.fps == 16
    assert pipe.latent_shape == (16, 3, H // 8, W // 8) and set(extras) == {"grid", "default_prompts",
                                                                            "guidance_defaults"}


# ---------------------------------------------------------------------------------------------------- MP4 / PNG

def test_mp4_of_a_random_weight_video_reads_back(parts, tmp_path):
    av = pytest.importorskip("av")
    pipe = load(parts)
    video = pipe(PROMPTS[:1], CFG(scale=SCALE), steps=2, shift=SHIFT, sampler="unipc")[0]  # [F, 3, H, W]
    path = save_mp4(video, tmp_path / "video.mp4", fps=pipe.fps)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (W, H)
        assert stream.average_rate == 16 and stream.frames == FRAMES
    back = load_mp4(path)
    assert back.shape == video.shape
    err = (back - video).abs().mean().item()
    print(f"MP4 round trip (crf 18, yuv420p): mean |diff| = {err:.3f}")
    assert err < 0.12 and err < (back - video.flip(0)).abs().mean()  # random weights: noisy frames
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_mp4(video, path)


def test_mp4_pixels_of_a_smooth_clip(tmp_path):
    """A smooth moving gradient comes back within a few levels (the chroma subsampling costs little here)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    frames = torch.stack([torch.stack([(x + 0.05 * t) % 1, y, 0.5 * (x + y)]) for t in range(5)])
    back = load_mp4(save_mp4(frames, tmp_path / "grad.mp4", fps=8))
    assert back.shape == (5, 3, 32, 48) and (back - frames).abs().mean() < 0.03
    with pytest.raises(ValueError, match="even"):
        save_mp4(frames[..., :47], tmp_path / "odd.mp4")
    assert not (tmp_path / "odd.mp4").exists() and not list(tmp_path.glob(".*partial"))


def test_frame_strip(tmp_path):
    from PIL import Image

    videos = torch.rand(2, FRAMES, 3, H, W)
    assert strip_indices(81) == [0, 40, 80] and strip_indices(9) == [0, 4, 8] and strip_indices(1) == [0]
    path = save_frame_strip(videos, tmp_path / "strip.png", row_labels=PROMPTS)
    with Image.open(path) as im:
        assert im.height == 16 + 2 * (H + 2) + 2 and im.width > 3 * (W + 2)  # label strip + 2 rows x 3 frames
    plain = save_frame_strip(videos[0], tmp_path / "one.png")
    with Image.open(plain) as im:
        assert im.size == (3 * (W + 2) + 2, H + 4 + 16)
    with pytest.raises(FileExistsError):
        save_frame_strip(videos, path)


# ---------------------------------------------------------------------------------------------------- bad input

def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_released_clip_shapes():
    from s2g.wan import _clip_shape

    assert _clip_shape(81, 480, 832) == (21, 60, 104)  # 21 x 30 x 52 = 32,760 tokens after the 2x2 patches
    assert _clip_shape(81, 720, 1280) == (21, 90, 160) and _clip_shape(1, 16, 16) == (1, 2, 2)


def test_bad_clip_shape_fails_before_reading_weights(parts, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")  # never read: the shape checks come first
    files = dict(checkpoint=junk, vae=junk, text_encoder=junk, tokenizer=junk)
    for kw, pattern in [(dict(num_frames=80), r"^model\.num_frames=80: .*1 \+ 4k.*try 77 or 81"),
                        (dict(num_frames=0), r"^model\.num_frames=0"),
                        (dict(height=488), r"^model\.height=488: not a positive multiple of 16"),
                        (dict(width=840), r"^model\.width=840: not a positive multiple of 16")]:
        with pytest.raises(ValueError, match=pattern) as e:
            load_wan21(**files, **{**dict(num_frames=FRAMES, height=H, width=W), **kw})
        one_line(e)


def test_missing_files_name_the_key(parts, tmp_path):
    for key in ("checkpoint", "vae", "text_encoder", "tokenizer"):
        with pytest.raises(ValueError, match=rf"^model\.{key}: not set; give") as e:
            load(parts, **{key: None})
        one_line(e)
        with pytest.raises(FileNotFoundError, match=rf"^model\.{key}: file not found") as e:
            load(parts, **{key: tmp_path / "missing.safetensors"})
        one_line(e)
    with pytest.raises(ValueError, match=r"^model\.tokenizer: not set"):
        load(parts, tokenizer="???")  # Hydra's mandatory value, had a config left it unset
    with pytest.raises(FileNotFoundError, match=r"^model\.tokenizer: no spiece\.model in"):
        load(parts, tokenizer=tmp_path)
    assert load(parts, tokenizer=parts.dir).text_encoder.conditioner.tokenizer is not None  # its folder is fine


def test_pickles_are_refused(parts, tmp_path):
    for key, name in [("checkpoint", "wan2.1_t2v.pth"), ("vae", "Wan2.1_VAE.pth"),
                      ("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth"), ("checkpoint", "model.ckpt")]:
        (tmp_path / name).write_bytes(b"PK\x03\x04 a torch.save zip, never unpickled")
        with pytest.raises(ValueError, match=rf"^model\.{key}: .*pickle.*weights_only=True") as e:
            load(parts, **{key: tmp_path / name})
        one_line(e)


def test_sd3_files_and_wan_files_swapped(parts, tmp_path):
    sd3 = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=8)
    save_file({k: v.contiguous() for k, v in sd3.state_dict().items()}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(ValueError, match=r"^model\.checkpoint: sd3\.safetensors is an SD3/SD3\.5 MMDiT, not a Wan "
                                         r"2\.1 DiT: sample it with model=sd3_medium") as e:
        load(parts, checkpoint=tmp_path / "sd3.safetensors")
    one_line(e)
    with pytest.raises(ValueError, match=r"^model\.weak_checkpoint: .* is an SD3/SD3\.5 MMDiT"):
        load(parts, weak_checkpoint=tmp_path / "sd3.safetensors")
    # the reverse: a Wan DiT given to the SD3 config stops with one line that says it is a Wan DiT
    from s2g.sd3 import load_sd3

    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(ValueError, match=r"^model\.checkpoint: .*not an SD3/SD3\.5 MMDiT.*Wan DiT") as e:
        load_sd3(parts.files["checkpoint"], clip_vocab=tmp_path / "vocab.json", clip_merges=tmp_path / "merges.txt",
                 device="cpu")
    one_line(e)
    # a Wan VAE / umT5 in the wrong slot
    with pytest.raises(ValueError, match=r"^model\.vae: .*not a Wan 2\.1 VAE"):
        load(parts, vae=parts.files["text_encoder"])
    with pytest.raises(ValueError, match=r"^model\.text_encoder: .*not a umT5 encoder"):
        load(parts, text_encoder=parts.files["vae"])
    with pytest.raises(ValueError, match=r"^model\.negative_prompt must be a string"):
        load(parts, negative_prompt=3)


def test_sample_script_exits_2_with_one_line(parts, tmp_path):
    """scripts/sample.py on the Wan config with the tokenizer left unset: the user's error, not a bug."""
    import os

    files = [f"model.{k}={v}" for k, v in parts.files.items() if k != "tokenizer"]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), "model=wan21_t2v_1_3b", *files,
                        f"hydra.run.dir={tmp_path / 'run'}", "progress=false"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: model.tokenizer: not set; give the umT5 tokenizer")
    assert "Traceback" not in r.stderr


def test_a_diffusers_repo_folder_fills_the_parts(parts, oracle, tmp_path):
    """model.checkpoint=<a Wan-AI/Wan2.1-T2V-*-Diffusers folder>: transformer/, vae/, text_encoder/ and the
    tokenizer come from it (as diffusers' save_pretrained writes them); another pipeline's folder is refused."""
    import json

    oracle.save_pretrained(tmp_path / "repo")
    if not (tmp_path / "repo" / "tokenizer" / "spiece.model").is_file():  # a fast tokenizer saves no spiece.model
        import shutil
        shutil.copy(parts.spiece, tmp_path / "repo" / "tokenizer" / "spiece.model")
    repo = load_wan21(tmp_path / "repo", num_frames=FRAMES, height=H, width=W, dtype="float32", device="cpu")
    noise = initial_latents()
    a, b = final_latents(repo, CFG(scale=SCALE), noise), final_latents(load(parts), CFG(scale=SCALE), noise)
    assert torch.equal(a, b)
    index = json.loads((tmp_path / "repo" / "model_index.json").read_text())
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match=r"^model\.checkpoint: .* is a diffusers StableDiffusion3Pipeline folder, "
                                         r"not a Wan 2\.1 one: sample it with model=sd3_medium"):
        load_wan21(tmp_path / "sd3", num_frames=FRAMES, height=H, width=W)
