"""SD3 end to end on a tiny random model written in the released single-file layout.

- parity: our TextToImage + CFG vs diffusers' StableDiffusion3Pipeline built from the same components (same initial
  latents, fp32): final latents and decoded images, with and without T5;
- scripts/sample.py model=sd3_medium on that file, as a user runs it (subprocess), against the in-process result;
- bad input: one line naming the config key, non-zero exit.

The single file holds the MMDiT (MMDiT-X structure: qk-norm, a dual-attention block) under model.diffusion_model.,
the VAE under first_stage_model. and CLIP-L/G + T5 under text_encoders.*.transformer.; the layout renaming
(diffusers -> original) is cross-checked against diffusers' own converters in test_mmdit.py / test_vae.py.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from s2g.guidance import CFG
from s2g.models.checkpoint import diffusers_to_original as mmdit_to_original
from s2g.models.vae import diffusers_to_original as vae_to_original
from s2g.sd3 import load_sd3

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
from test_text import CORPUS, clip_config, randomize, write_clip_tokenizer  # noqa: E402  (tiny CLIP/T5 builders)

ROOT = Path(__file__).resolve().parent.parent
T5_LEN = 24
H, W = 48, 80  # non-square: latent 6 x 10, 3 x 5 patches of a 16 x 16 position table
PROMPTS = ["a photo of an astronaut riding a horse on mars", "the quick brown fox"]  # no "!" (see test_text)
STEPS, SCALE = 6, 5.0
REL_TOL = 1e-5  # max |ours - diffusers| / max |diffusers|; measured 3.4e-7 (only summation order differs)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_(module, seed):
    """Every tensor random with O(1) activations (zero-init adaLN/outputs would make parity vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            r = torch.randn(t.shape, generator=g)
            if t.ndim >= 2:
                t.copy_((0.5 if "pos_embed" in name else 1 / math.sqrt(t[0].numel())) * r)
            elif "norm" in name and name.endswith("weight") or name.endswith(("norm_q.weight", "norm_k.weight")):
                t.copy_(1 + 0.1 * r)
            else:
                t.copy_(0.1 * r)
    return module.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The diffusers components (the oracle) and the tokenizer files."""
    d = tmp_path_factory.mktemp("sd3_tok")
    vocab_size = write_clip_tokenizer(d)
    import sentencepiece as spm
    (d / "corpus.txt").write_text("\n".join(CORPUS.split(" i'm ")) * 20)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)

    torch.manual_seed(0)
    clip_l = randomize(transformers.CLIPTextModelWithProjection(clip_config(vocab_size, "quick_gelu", width=64)))
    with torch.no_grad():  # what the SD3 single file implies: CLIP-L pooled is unprojected
        clip_l.text_projection = torch.nn.Linear(64, 64, bias=False)
        clip_l.text_projection.weight.copy_(torch.eye(64))
    clip_g = randomize(transformers.CLIPTextModelWithProjection(clip_config(vocab_size, "gelu", width=128)))
    t5 = randomize(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=60, d_model=256, d_kv=16, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128)), scale=0.1)
    transformer = _random_(diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=256, caption_projection_dim=64, pooled_projection_dim=64 + 48,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)), seed=1)
    vae = _random_(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609), seed=2)
    with torch.no_grad():  # GroupNorm weights/biases: keep the decoder's output O(1) and non-trivial
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return types.SimpleNamespace(tok=d, clip_l=clip_l, clip_g=clip_g, t5=t5, transformer=transformer, vae=vae)


def single_file(p, *, text=True, t5=True) -> dict:
    """The released single-file layout (model.diffusion_model. / first_stage_model. / text_encoders.*)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in mmdit_to_original(p.transformer.state_dict()).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae_to_original(p.vae.state_dict()).items()})
    if text:  # SD3's clip_l has no text_projection
        sd.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in p.clip_l.state_dict().items()
                   if k != "text_projection.weight"})
        sd.update({f"text_encoders.clip_g.transformer.{k}": v for k, v in p.clip_g.state_dict().items()})
    if t5:
        sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in p.t5.state_dict().items()
                   if k != "encoder.embed_tokens.weight"})  # tied to shared.weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3_files")
    save_file(single_file(parts), str(d / "sd3_full.safetensors"))
    return d


def tok_args(p, t5=True):
    args = dict(clip_vocab=p.tok / "vocab.json", clip_merges=p.tok / "merges.txt")
    return {**args, "t5_spiece": p.tok / "spiece.model"} if t5 else args


@pytest.fixture(scope="module")
def oracle(parts):
    tok = transformers.CLIPTokenizer.from_pretrained(parts.tok, model_max_length=77)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=parts.transformer, vae=parts.vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        text_encoder=parts.clip_l, tokenizer=tok,
        text_encoder_2=parts.clip_g,
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(parts.tok, model_max_length=77, pad_token="!"),
        text_encoder_3=parts.t5, tokenizer_3=transformers.T5Tokenizer.from_pretrained(parts.tok, extra_ids=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_oracle(oracle, latents, output_type, t5=True):
    saved = oracle.text_encoder_3, oracle.tokenizer_3
    if not t5:  # diffusers' no-T5 mode: zeros (B, max_sequence_length, joint_attention_dim)
        oracle.text_encoder_3 = oracle.tokenizer_3 = None
    try:
        with torch.no_grad():
            return oracle(prompt=PROMPTS, negative_prompt="", guidance_scale=SCALE, num_inference_steps=STEPS,
                          height=H, width=W, latents=latents.clone(), max_sequence_length=T5_LEN,
                          output_type=output_type).images
    finally:
        oracle.text_encoder_3, oracle.tokenizer_3 = saved


def initial_latents():
    return torch.randn(len(PROMPTS), 16, H // 8, W // 8, generator=torch.Generator().manual_seed(7))


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_final_latents_match_diffusers(parts, files, oracle, t5):
    pipe = load_sd3(files / "sd3_full.safetensors", **tok_args(parts, t5), t5=None if t5 else False,
                    t5_length=T5_LEN, image_size=[H, W], dtype="float32", device="cpu")
    assert pipe.latent_shape == (16, H // 8, W // 8)
    noise = initial_latents()
    ref = run_oracle(oracle, noise, "latent", t5=t5)
    ours = dataclasses.replace(pipe, decode=lambda z: z)(PROMPTS, CFG(scale=SCALE), steps=STEPS, shift=3.0,
                                                         noise=noise)
    assert ref.abs().max() > 1 and (ref - noise).abs().max() > 1  # the model moved the latents by O(1)
    err = rel_err(ours, ref)
    print(f"final latents ({'with' if t5 else 'without'} T5): max |diff| / max |ref| = {err:.2e}")
    assert err <= REL_TOL
    # the conditioning matters: another guidance scale ends elsewhere
    other = dataclasses.replace(pipe, decode=lambda z: z)(PROMPTS, CFG(scale=2.0), steps=STEPS, noise=noise)
    assert rel_err(other, ref) > 1e-2


def test_decoded_images_match_diffusers(parts, files, oracle):
    pipe = load_sd3(files / "sd3_full.safetensors", **tok_args(parts), t5_length=T5_LEN, image_size=[H, W],
                    device="cpu")
    noise = initial_latents()
    ref = run_oracle(oracle, noise, "pt")  # (x / 2 + 0.5).clamp(0, 1) of the VAE decode
    ours = pipe(PROMPTS, CFG(scale=SCALE), steps=STEPS, shift=3.0, noise=noise)
    assert ours.shape == ref.shape == (2, 3, H, W) and ours.dtype == torch.float32
    assert 0.05 < ref.std() and 0 < ref.mean() < 1  # neither a flat nor a saturated image
    err = (ours - ref).abs().max().item()
    print(f"decoded images: max |diff| = {err:.2e}")
    assert err <= 1e-5  # measured 2e-6


def test_separate_files_equal_single_file(parts, files, tmp_path):
    """clip_l / clip_g / t5 / vae as separate files next to an MMDiT-only checkpoint give the same pipeline."""
    full = single_file(parts)
    groups = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
              "t5": "text_encoders.t5xxl.transformer.", "vae": "first_stage_model."}
    for key, prefix in groups.items():
        save_file({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)},
                  str(tmp_path / f"{key}.safetensors"))
    save_file({k: v for k, v in full.items() if k.startswith("model.")}, str(tmp_path / "mmdit.safetensors"))
    split = load_sd3(tmp_path / "mmdit.safetensors", **{k: tmp_path / f"{k}.safetensors" for k in groups},
                     **tok_args(parts), t5_length=T5_LEN, image_size=32, device="cpu")
    whole = load_sd3(files / "sd3_full.safetensors", **tok_args(parts), t5_length=T5_LEN, image_size=32,
                     device="cpu")
    a, b = split.text_encoder.encode(PROMPTS), whole.text_encoder.encode(PROMPTS)
    assert a.keys() == {"context", "pooled"} and a["context"].shape == (2, 77 + T5_LEN, 256)
    assert all(torch.equal(a[k], b[k]) for k in a) and a["context"][:, 77:].abs().max() > 0  # T5 is used
    z = initial_latents()[:, :, :4, :4]
    assert torch.equal(split.decode(z), whole.decode(z))


def test_weak_checkpoint_for_autoguidance(parts, files, tmp_path):
    """A weak MMDiT identical to the main one makes autoguidance D_w + w(D - D_w) = D: the conditional sampler."""
    from s2g.guidance import AutoGuidance, Conditional

    full = files / "sd3_full.safetensors"
    kw = dict(**tok_args(parts), t5_length=T5_LEN, image_size=[H, W], device="cpu")
    pipe = load_sd3(full, weak_checkpoint=full, **kw)
    assert pipe.weak.num_blocks == 3
    noise, ident = initial_latents(), dict(decode=lambda z: z)
    auto = dataclasses.replace(pipe, **ident)(PROMPTS, AutoGuidance(scale=3.0), steps=3, noise=noise)
    plain = dataclasses.replace(pipe, **ident)(PROMPTS, Conditional(), steps=3, noise=noise)
    assert (auto - plain).abs().max() <= 1e-5 * plain.abs().max()
    other = _random_(diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=64, pooled_projection_dim=112,
        pos_embed_max_size=16), seed=5)
    _save(tmp_path / "weak.safetensors", other.state_dict())
    with pytest.raises(ValueError, match=r"^model\.weak_checkpoint: .* \(16, 128, 112\), the main one \(16, 256"):
        load_sd3(full, weak_checkpoint=tmp_path / "weak.safetensors", **kw)


def test_bfloat16_runs_close_to_fp32(parts, files):
    """dtype=bfloat16: MMDiT and T5 in bf16, VAE in fp32, the Euler step in fp32 (as diffusers)."""
    kw = dict(**tok_args(parts), t5_length=T5_LEN, image_size=[H, W], device="cpu")
    bf = load_sd3(files / "sd3_full.safetensors", dtype="bfloat16", **kw)
    assert bf.denoiser.net.pos_embed.dtype == torch.bfloat16 and bf.decode.vae.dtype == torch.float32
    assert bf.text_encoder.conditioner.t5.encoder.final_layer_norm.weight.dtype == torch.bfloat16
    noise = initial_latents()
    ident = dict(decode=lambda z: z)
    z_bf = dataclasses.replace(bf, **ident)(PROMPTS, CFG(scale=SCALE), steps=STEPS, noise=noise)
    z_32 = dataclasses.replace(load_sd3(files / "sd3_full.safetensors", dtype="float32", **kw), **ident)(
        PROMPTS, CFG(scale=SCALE), steps=STEPS, noise=noise)
    assert z_bf.dtype == torch.float32 and 0 < rel_err(z_bf, z_32) < 0.1


# ------------------------------------------------------------------------------------------- scripts/sample.py

def sample_cmd(parts, full, *extra):
    return [sys.executable, str(ROOT / "scripts" / "sample.py"), "model=sd3_medium", f"model.checkpoint={full}",
            f"model.clip_vocab={parts.tok / 'vocab.json'}", f"model.clip_merges={parts.tok / 'merges.txt'}",
            f"model.t5_spiece={parts.tok / 'spiece.model'}", f"model.t5_length={T5_LEN}",
            f"model.image_size=[{H},{W}]", "steps=3", "progress=false", *extra]  # grid: the model's defaults


def run_script(cmd):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_sample_script_on_single_file(parts, files, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from PIL import Image

    prompt = "a cat left of a dog"
    res = run_script(sample_cmd(parts, files / "sd3_full.safetensors", f"prompt={prompt}", "guidance=s2",
                                "seed=3", f"hydra.run.dir={tmp_path / 'run'}"))
    assert res.returncode == 0, res.stderr[-2000:]
    png = np.asarray(Image.open(tmp_path / "run" / "samples.png").convert("RGB"))
    pad = 2  # the grid's border; the row label sits to the left of the tile
    assert png.shape[0] == H + 2 * pad and png.shape[1] >= W + 2 * pad
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "run.json").exists()

    # the same run in-process: the tile in the PNG is this image
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        guider = instantiate(compose(config_name="config", overrides=["guidance=s2", "seed=3"]).guidance)
    pipe = load_sd3(files / "sd3_full.safetensors", **tok_args(parts), t5_length=T5_LEN, image_size=[H, W])
    want = (pipe([prompt], guider, seed=3, steps=3)[0] * 255).round().byte().permute(1, 2, 0).numpy()
    assert want.std() > 5
    tiles = [png[pad:pad + H, x:x + W].astype(int) for x in range(png.shape[1] - W + 1)]
    assert min(np.abs(t - want).max() for t in tiles) <= 1  # uint8 rounding


def test_sample_script_missing_file_is_one_line(parts, files, tmp_path):
    missing = tmp_path / "nowhere" / "vocab.json"
    res = run_script(sample_cmd(parts, files / "sd3_full.safetensors", f"model.clip_vocab={missing}",
                                f"hydra.run.dir={tmp_path / 'run'}"))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: model.clip_vocab: file not found: {missing}"], res.stderr[-2000:]
    assert not (tmp_path / "run" / "samples.png").exists()


def test_evaluate_script_on_sd3(parts, files, tmp_path):
    """scripts/evaluate.py on an SD3 config: free-text prompts, so no scene metrics; every image saved as PNG,
    equal to the in-process image from the same (prompt, seed) noise; cost per image reported."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from PIL import Image

    from s2g.eval.harness import item_noise

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "model=sd3_medium",
           f"model.checkpoint={files / 'sd3_full.safetensors'}", f"model.clip_vocab={parts.tok / 'vocab.json'}",
           f"model.clip_merges={parts.tok / 'merges.txt'}", f"model.t5_spiece={parts.tok / 'spiece.model'}",
           f"model.t5_length={T5_LEN}", f"model.image_size=[{H},{W}]", "steps=2", "progress=false", "seeds=[4]",
           f"prompts={tmp_path / 'prompts.txt'}", "guidance=cfg", "guidance.scale=5", "batch_size=2",
           f"hydra.run.dir={tmp_path / 'run'}"]
    res = run_script(cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["scene_metrics"] is False and "adherence" not in m and m["n_images"] == 2
    assert m["cost"]["nfe_per_image"] == 4 and m["cost"]["seconds_per_image"] > 0
    pipe = load_sd3(files / "sd3_full.safetensors", **tok_args(parts), t5_length=T5_LEN, image_size=[H, W])
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        guider = instantiate(compose(config_name="evaluate", overrides=["guidance=cfg", "guidance.scale=5"]).guidance)
    for i, prompt in enumerate(PROMPTS):
        png = np.asarray(Image.open(tmp_path / "run" / "images" / f"seed4_{i:05d}.png").convert("RGB")).astype(int)
        noise = item_noise(pipe.latent_shape, 4, prompt)[None]
        want = (pipe([prompt], guider, noise=noise, steps=2)[0] * 255).round().byte().permute(1, 2, 0).numpy()
        assert png.shape == (H, W, 3) and want.std() > 5 and np.abs(png - want).max() <= 1


# ------------------------------------------------------------------------------------------------- bad input

def test_loader_errors_name_the_config_key(parts, files, tmp_path):
    full, tok = files / "sd3_full.safetensors", tok_args(parts)
    kw = dict(t5_length=T5_LEN, image_size=32, device="cpu")
    cases = [
        (dict(checkpoint="???", **tok), ValueError, r"^model\.checkpoint: not set"),
        (dict(checkpoint=tmp_path / "x.safetensors", **tok), FileNotFoundError,
         r"^model\.checkpoint: file not found: .*x\.safetensors$"),
        (dict(checkpoint=full, **{**tok, "clip_merges": None}), ValueError, r"^model\.clip_merges: not set"),
        (dict(checkpoint=full, **tok, t5=tmp_path / "t5.safetensors"), FileNotFoundError, r"^model\.t5: file"),
        (dict(checkpoint=full, **{**tok, "t5_spiece": None}), ValueError,
         r"^model\.t5_spiece: not set, but T5 weights are given.*model\.t5=false"),
        (dict(checkpoint=full, **tok, image_size=[40, 80]), ValueError, r"not a positive multiple of 16"),
        (dict(checkpoint=full, **tok, image_size=272), ValueError, r"exceeds the position table .* 256 px"),
        (dict(checkpoint=full, **tok, image_size="big"), ValueError, r"image_size must be an int or"),
        (dict(checkpoint=full, **tok, dtype="float64"), ValueError, r"dtype 'float64' not understood"),
        (dict(checkpoint=full, **tok, vae=tmp_path), FileNotFoundError,  # a folder is allowed (diffusers vae/)
         r"^model\.vae: no \.safetensors file in directory"),
        (dict(checkpoint=full, **tok, clip_l=_save(tmp_path / "bad.pt", {"a": torch.zeros(1)})), ValueError,
         r"^model\.clip_l: .*bad\.pt: pickle checkpoints are never loaded"),
        (dict(checkpoint=parts.tok / "vocab.json", **tok), ValueError, r"^model\.checkpoint: .*vocab\.json: not a "),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as info:
            load_sd3(**{**kw, **args})
        assert "\n" not in str(info.value)
    assert load_sd3(full, **tok, **{**kw, "image_size": 256}).latent_shape == (16, 32, 32)  # the largest size fits

    # parts the checkpoint lacks: the error names the key to set
    sd = single_file(parts, text=False, t5=False)
    save_file({k: v for k, v in sd.items() if k.startswith("model.")}, str(tmp_path / "mmdit_only.safetensors"))
    with pytest.raises(ValueError, match=r"^model\.vae: not set, and mmdit_only\.safetensors holds no VAE"):
        load_sd3(tmp_path / "mmdit_only.safetensors", **tok, **kw)
    save_file(sd, str(tmp_path / "no_text.safetensors"))
    with pytest.raises(ValueError, match=r"^model\.clip_l: not set, .* no CLIP-L .*text_encoders\.clip_l"):
        load_sd3(tmp_path / "no_text.safetensors", **tok, **kw)
    # CLIP-G of another width: the pooled vector no longer fits the MMDiT
    with pytest.raises(ValueError, match=r"pooled vector of 128, the MMDiT expects 112"):
        load_sd3(full, **tok, clip_g=_save(tmp_path / "g.safetensors", {
            k: v for k, v in parts.clip_l.state_dict().items()}), **kw)


def _save(path, sd):
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(parts, files):
    kw = dict(**tok_args(parts), t5_length=T5_LEN, image_size=[H, W])
    noise = initial_latents()
    out = {dev: load_sd3(files / "sd3_full.safetensors", dtype="float32", device=dev, **kw)(
        PROMPTS, CFG(scale=SCALE), steps=STEPS, noise=noise) for dev in ("cpu", "cuda")}
    assert out["cuda"].device.type == "cpu"
    assert (out["cuda"] - out["cpu"]).abs().max() <= 1e-3
    bf = load_sd3(files / "sd3_full.safetensors", device="cuda", **kw)  # auto: bfloat16 on CUDA
    assert bf.denoiser.net.pos_embed.dtype == torch.bfloat16
    assert (bf(PROMPTS, CFG(scale=SCALE), steps=STEPS, noise=noise) - out["cpu"]).abs().max() < 0.1
