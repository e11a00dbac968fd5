"""The embedded tiny text-to-video model: its training loop (loss goes down, resume is exact, exports load), the
loader's refusals, the video pipeline's determinism, and animated grids."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from s2g.guidance import CFG, S2Guidance
from s2g.tiny_video import load_tiny_video
from s2g.video import load_gif, save_gif, video_grid

ROOT = Path(__file__).resolve().parent.parent


def _train_module():
    spec = importlib.util.spec_from_file_location("train_tiny_video", ROOT / "scripts" / "train_tiny_video.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cfg(**over):
    cfg = OmegaConf.load(ROOT / "configs" / "train_tiny_video.yaml")
    cfg.pop("hydra")
    cfg.model = {"dim": 32, "num_layers": 2, "num_heads": 1, "ffn_dim": 64, "freq_dim": 32, "patch_size": [2, 4, 4],
                 "time_channel": True}
    cfg.text = {"dim": 16, "depth": 1, "heads": 1, "max_len": 16, "pooled_dim": 16}
    cfg.num_frames, cfg.frame_size, cfg.batch_size, cfg.warmup, cfg.lr = 4, 16, 4, 1, 2e-3
    cfg.probe_every, cfg.threads = 0, 1
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with exports at 2 and 4 (shared by the loader tests below)."""
    out = tmp_path_factory.mktemp("tv")
    _train_module().train(_cfg(steps=4, checkpoint_every=100, export_every=2, log_every=1), out)
    return out


def test_short_run_logs_and_exports(trained):
    exports = sorted(p.name for p in (trained / "exports").iterdir())
    assert exports == ["tiny_video_000002.safetensors", "tiny_video_000004.safetensors"]
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    a = load_file(str(trained / "exports" / "tiny_video_000002.safetensors"))
    b = load_file(str(trained / "tiny_video.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # step 2's EMA, not the final one
    assert any(k.startswith("model.diffusion_model.blocks.1.self_attn.q.") for k in b)  # Wan's own names


def test_few_steps_lower_the_loss(tmp_path):
    _train_module().train(_cfg(steps=30, lr=3e-3, warmup=1, checkpoint_every=1000, log_every=10), tmp_path)
    log = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1] < 0.7 * log[0]


def test_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, stop, resume, 2 more (weights, EMA, Adam moments, batches, noise)."""
    tt = _train_module()
    kw = dict(steps=4, checkpoint_every=100, log_every=1)
    for d in "abc":
        (tmp_path / d).mkdir()
    tt.train(_cfg(**kw), tmp_path / "a")
    tt.train(_cfg(**kw, stop_at=2), tmp_path / "b")
    tt.train(_cfg(**kw, resume=str(tmp_path / "b" / "train_state.safetensors")), tmp_path / "c")
    a, b, c = (load_file(str(tmp_path / d / "tiny_video.safetensors")) for d in "abc")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c" / "tiny_video.safetensors"), "pt") as f:
        meta = f.metadata()
    commands = json.loads(meta["commands"])
    assert meta["steps"] == "4" and len(commands) == 2 and "(stopped at step 2)" in commands[0]


def test_probe_reads_motion_of_rendered_clips():
    """The training probe's centroid reading, fed the true clip instead of the network: every direction moves
    its own way by 10.5-17.5 px."""
    tt = _train_module()
    cfg = _cfg(num_frames=8, frame_size=32)
    from s2g.data.clips import render_prompts

    class Oracle(torch.nn.Module):  # returns the rendered clip of the prompt, whatever the input
        config = OmegaConf.create({"in_dim": 3})  # RGB only: the probe calls it as it is

        def forward(self, x, sigma, ctx):
            return self.clip.expand(x.shape[0], -1, -1, -1, -1)

    class Text:
        def encode(self, prompts):
            oracle.clip = render_prompts(prompts[:1], seed=3).videos.permute(0, 2, 1, 3, 4) * 2 - 1
            return {"context": torch.zeros(len(prompts), 1, 1)}

    oracle = Oracle()
    moved = tt.probe(oracle, Text(), cfg)
    assert set(moved) == {"left", "right", "up", "down"}
    assert all(10 <= v <= 18 for v in moved.values()), moved


def test_loader_samples_deterministically_and_s2_at_omega_0_is_cfg(trained):
    pipe = load_tiny_video(trained / "tiny_video.safetensors", weak_checkpoint=None)
    assert pipe.latent_shape == (3, 4, 16, 16) and pipe.num_frames == 4
    prompts = ["a red circle moving left", "a blue square moving up and a yellow triangle moving left"]
    v = pipe(prompts, CFG(scale=4.0), seed=1, steps=3)
    assert v.shape == (2, 4, 3, 16, 16) and 0 <= v.min() and v.max() <= 1
    assert torch.equal(v, pipe(prompts, CFG(scale=4.0), seed=1, steps=3))
    # batch 1 differs from batch 2 only by float rounding (matmul blocking), as for images
    torch.testing.assert_close(v, pipe(prompts, CFG(scale=4.0), seed=1, steps=3, batch_size=1), atol=1e-5, rtol=0)
    s2 = pipe(prompts, S2Guidance(scale=4.0, omega=0.0, seed=0), seed=1, steps=3)
    assert torch.equal(v, s2)
    assert not torch.equal(v, pipe(prompts, S2Guidance(scale=4.0, omega=1.0, seed=0), seed=1, steps=3))


@pytest.mark.parametrize("prompt, message", [
    ("a red circle moving sideways", "unknown motion"),
    ("a red circle moving", "unknown motion"),
    ("a red circle left of a blue square", "is an image prompt"),
])
def test_prompts_outside_the_grammar_are_refused(trained, prompt, message):
    pipe = load_tiny_video(trained / "tiny_video.safetensors", weak_checkpoint=None)
    with pytest.raises(ValueError, match=message):
        pipe([prompt], CFG(scale=4.0), steps=2)


def test_loader_refuses_other_frame_counts_and_image_models(trained):
    with pytest.raises(ValueError, match="trained on 4 frames"):
        load_tiny_video(trained / "tiny_video.safetensors", weak_checkpoint=None, num_frames=8)
    with pytest.raises(ValueError, match="not a tiny text-to-video file"):
        load_tiny_video(ROOT / "s2g" / "assets" / "tiny.safetensors", weak_checkpoint=None)
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        load_tiny_video(trained / "missing.safetensors", weak_checkpoint=None)


def test_video_grid_and_gif_round_trip(tmp_path):
    videos = torch.rand(6, 3, 3, 8, 8)
    frames = video_grid(videos, rows=2, cols=3, pad=2, scale=2)
    assert frames.shape == (3, 3, 2 + 2 * 18, 2 + 3 * 18)
    # tile (row 1, col 2) of frame 2 is clip 5's frame 2, upscaled 2x
    torch.testing.assert_close(frames[2, :, 20:36:2, 38:54:2], videos[5, 2])
    from s2g.data.clips import render_prompts
    clips = render_prompts(["a red circle moving left", "a blue square falling"], seed=0).videos
    frames = video_grid(clips, rows=1, cols=2, scale=3)
    path = save_gif(frames, tmp_path / "grid.gif")
    back = load_gif(path)
    assert back.shape == frames.shape  # 8 frames, whole
    err = (back - frames).abs()
    assert err.mean() < 0.01 and err.max() < 0.1, (err.mean(), err.max())  # GIF's 256-colour palette
    with pytest.raises(FileExistsError):
        save_gif(frames, path)


def test_time_channel_is_each_frames_time_and_the_conversion_keeps_the_function(tmp_path):
    """TimeChannel appends 2t/(F-1) - 1 per frame; a state trained without it, given the channel by
    experiments/tiny_video/add_time_channel.py, computes exactly what it did and resumes training."""
    from s2g.tiny_video import TimeChannel

    x = torch.zeros(2, 3, 4, 8, 8)
    t = TimeChannel.with_time(x)[:, 3]
    assert t.shape == (2, 4, 8, 8) and torch.allclose(t[1, :, 5, 2], torch.tensor([-1, -1 / 3, 1 / 3, 1]), atol=1e-7)
    tt = _train_module()
    for d in "ac":
        (tmp_path / d).mkdir()
    tt.train(_cfg(steps=2, checkpoint_every=2, export_every=0, **{"model.time_channel": False}), tmp_path / "a")
    spec = importlib.util.spec_from_file_location("atc", ROOT / "experiments" / "tiny_video" / "add_time_channel.py")
    atc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atc)
    assert atc.add_time_channel(tmp_path / "a" / "train_state.safetensors", tmp_path / "b.safetensors") == 2
    with pytest.raises(FileExistsError):
        atc.add_time_channel(tmp_path / "a" / "train_state.safetensors", tmp_path / "b.safetensors")
    old, new = (tt.build(_cfg(**{"model.time_channel": flag}))[0] for flag in (False, True))
    old.load_state_dict({k[4:]: v for k, v in load_file(str(tmp_path / "a" / "train_state.safetensors")).items()
                         if k.startswith("dit.")})
    new.load_state_dict({k[4:]: v for k, v in load_file(str(tmp_path / "b.safetensors")).items()
                         if k.startswith("dit.")})
    assert new.config.in_dim == 4 and isinstance(tt.network(new), TimeChannel)
    x, ctx = torch.randn(2, 3, 4, 16, 16), torch.randn(2, 5, 16)
    assert torch.equal(tt.network(new)(x, torch.tensor([0.3, 0.9]), ctx), old(x, torch.tensor([0.3, 0.9]), ctx))
    tt.train(_cfg(steps=3, checkpoint_every=100, export_every=0, resume=str(tmp_path / "b.safetensors")),
             tmp_path / "c")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c" / "tiny_video.safetensors"), "pt") as f:
        assert f.metadata()["time_channel"] == "ramp"
        assert f.get_slice("model.diffusion_model.patch_embedding.weight").get_shape()[1] == 4
    pipe = load_tiny_video(tmp_path / "c" / "tiny_video.safetensors", weak_checkpoint=None)
    assert isinstance(pipe.denoiser.net, TimeChannel)


def test_separate_words_moves_only_the_two_rows_to_the_distance(tmp_path):
    """experiments/tiny_video/separate_words.py: the two words' embeddings (weights and EMA) end `distance` apart
    around their old mean, along their old difference; every other tensor is kept; bad words are refused."""
    tt = _train_module()
    (tmp_path / "a").mkdir()
    tt.train(_cfg(steps=2, checkpoint_every=2, export_every=0), tmp_path / "a")
    spec = importlib.util.spec_from_file_location("sw", ROOT / "experiments" / "tiny_video" / "separate_words.py")
    sw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sw)
    old_path, new_path = tmp_path / "a" / "train_state.safetensors", tmp_path / "b.safetensors"
    with pytest.raises(ValueError, match="not a word"):
        sw.separate_words(old_path, new_path, "left", "sideways", 0.6)
    step, before, after = sw.separate_words(old_path, new_path, "left", "right", 0.6)
    assert step == 2 and abs(after - 0.6) < 1e-5 and before < 0.5
    with pytest.raises(FileExistsError):
        sw.separate_words(old_path, new_path, "left", "right", 0.6)
    old, new = load_file(str(old_path)), load_file(str(new_path))
    from s2g.data.clips import WORDS
    from s2g.models.tiny_text import SPECIALS
    i, j = len(SPECIALS) + WORDS.index("left"), len(SPECIALS) + WORDS.index("right")
    for prefix in ("text", "ema_text"):
        o, n = old[f"{prefix}.tok_embed.weight"], new[f"{prefix}.tok_embed.weight"]
        assert torch.allclose((n[i] + n[j]) / 2, (o[i] + o[j]) / 2, atol=1e-6)
        assert abs((n[i] - n[j]).norm().item() - 0.6) < 1e-5
        assert torch.cosine_similarity(n[i] - n[j], o[i] - o[j], 0) > 0.9999
        keep = [r for r in range(o.shape[0]) if r not in (i, j)]
        assert torch.equal(n[keep], o[keep])
    assert all(torch.equal(old[k], new[k]) for k in old if "tok_embed" not in k)
    from safetensors import safe_open
    with safe_open(str(new_path), "pt") as f:
        assert "separate_words.py --words left right" in f.metadata()["commands"]


def test_shipped_model_moves_objects_the_named_way():
    """The embedded model, built from configs/model/tiny_video.yaml at its CFG scale: each prompt of an opposite
    pair is sampled from the same 6 noises, so a model blind to the direction word (one motion per noise, whatever
    the word) gets at most 6 of the pair's 12 clips right. The step-6000 state of the run, before it used
    left/right, got exactly 6 and 6 of 12 on left/right here; the shipped model must get 10 of 12 on both axes."""
    from hydra import compose, initialize_config_dir

    from s2g.config import build_model
    from s2g.eval.video import score_clips

    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("evaluate", overrides=["model=tiny_video"])
    pipe, _ = build_model(cfg.model)
    torch.set_num_threads(1)
    guider, n = CFG(scale=float(cfg.model.guidance_defaults.cfg.scale)), 6
    right = {}
    for prompt in ("a red circle moving up", "a red circle moving down", "a white square moving left",
                   "a white square moving right"):
        rows = score_clips(pipe([prompt] * n, guider, seed=0, steps=20), [prompt] * n)
        right[prompt.split()[-1]] = sum(bool(r["direction"]) for r in rows)
    assert right["up"] + right["down"] >= 10 and right["left"] + right["right"] >= 10, right
