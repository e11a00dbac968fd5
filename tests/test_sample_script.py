"""scripts/sample.py end to end on the embedded model (subprocesses, a few steps): outputs, determinism, the
side-by-side mode, Autoguidance's weak model, and clean failures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, name, *args):
    out = tmp_path / name
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # also without `pip -e`
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "scripts/sample.py", f"hydra.run.dir={out}", "progress=false", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return proc, out


def test_s2_grid_config_seed_revision(tmp_path):
    p, out = run(tmp_path, "a", "guidance=s2", "steps=4", "samples_per_prompt=2",
                 "prompt=[a red circle,a blue square]", "seed=7", "guidance.omega=0.5")
    assert p.returncode == 0, p.stderr
    png = out / "samples.png"
    record = json.loads((out / "run.json").read_text())
    assert record["seed"] == 7 and len(record["git_revision"]) >= 7
    assert "omega=0.5" in record["guiders"]["s2"] and "seed=7" in record["guiders"]["s2"]  # mask RNG <- run seed
    resolved = (out / "config.yaml").read_text()
    assert "omega: 0.5" in resolved and "steps: 4" in resolved
    # 2 rows x 2 tiles of 32 px x upscale 3, 2 px padding, plus the prompt labels' margin on the left
    w, h = Image.open(png).size
    assert h == 2 * (96 + 2) + 2 and w > 2 * (96 + 2) + 2
    # never overwrite: a second run into the same dir fails cleanly and leaves the grid alone
    before = png.read_bytes()
    p2, _ = run(tmp_path, "a", "steps=1", "samples_per_prompt=1", "prompt=a red circle")
    assert p2.returncode != 0 and "never overwritten" in p2.stderr and png.read_bytes() == before


def test_compare_columns_autoguidance_and_wandb(tmp_path):
    p, out = run(tmp_path, "cmp", "compare=[cfg,s2,autoguidance]", "steps=3", "samples_per_prompt=1",
                 "prompt=a yellow triangle", "guidance.scale=4", "logger=wandb", "logger.mode=offline")
    assert p.returncode == 0, p.stderr
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # grid + config logged (offline)
    record = json.loads((out / "run.json").read_text())
    assert list(record["guiders"]) == ["cfg", "s2", "autoguidance"]
    assert "scale=4" in record["guiders"]["cfg"] and "weak=set" in record["guiders"]["autoguidance"]
    w, h = Image.open(out / "samples.png").size
    assert h == 16 + 96 + 4 and w > 3 * (96 + 2)  # one row, three columns, header line


@pytest.mark.parametrize("args, message", [
    (["prompt=a red dog"], "unknown word(s) 'dog'"),
    (["compare=[cfg,nonsense]"], "no guidance config 'nonsense'"),
])
def test_bad_input_fails_with_one_line(tmp_path, args, message):
    p, out = run(tmp_path, "bad", "steps=2", *args)
    assert p.returncode != 0
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], p.stderr
    if "dog" in message:
        assert "knows: a and left right of above below red green blue yellow purple white circle" in lines[0]
    assert not (out / "samples.png").exists()


def test_model_guidance_defaults_apply_unless_the_command_line_sets_them(tmp_path):
    """configs/model/tiny.yaml carries the model's own val-selected settings (guidance_defaults); the command line
    wins, and the guidance config's own values (the paper's SD3 λ 7.5) stay for keys the model does not name."""
    from omegaconf import OmegaConf

    scale = OmegaConf.load(ROOT / "configs" / "model" / "tiny.yaml").guidance_defaults.cfg.scale
    common = ["guidance=cfg", "steps=2", "samples_per_prompt=1", "prompt=a red circle"]
    p, out = run(tmp_path, "dflt", *common)
    assert p.returncode == 0, p.stderr
    guider = json.loads((out / "run.json").read_text())["guiders"]["cfg"]
    assert "model config's guidance_defaults" in p.stdout and f"scale={scale}" in guider
    p, out = run(tmp_path, "cli", *common, "guidance.scale=2.5")
    assert p.returncode == 0, p.stderr
    guider = json.loads((out / "run.json").read_text())["guiders"]["cfg"]
    assert "model config's guidance_defaults" not in p.stdout and "scale=2.5" in guider


# ------------------------------------------------------------------------------------------------------- video

@pytest.fixture(scope="module")
def tiny_video_checkpoint(tmp_path_factory):
    """A 4-step toy training run of the tiny video model (4 frames of 16x16), as tests/test_tiny_video.py's."""
    from test_tiny_video import _cfg, _train_module

    out = tmp_path_factory.mktemp("tv_sample")
    _train_module().train(_cfg(steps=4, checkpoint_every=100, log_every=100), out)
    return out / "tiny_video.safetensors"


def test_tiny_video_writes_an_animated_grid_and_a_frame_strip(tmp_path, tiny_video_checkpoint):
    from s2g.video import load_gif

    model = ["model=tiny_video", f"model.checkpoint={tiny_video_checkpoint}"]
    p, out = run(tmp_path, "v", *model, "guidance=s2", "steps=3", "samples_per_prompt=3")
    assert p.returncode == 0, p.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["video"] == "gif" and record["fps"] == 4 and record["samples_per_prompt"] == 3
    assert [Path(f).name for f in record["files"]] == ["samples.gif", "samples.png"]
    own = OmegaConf.load(ROOT / "configs" / "model" / "tiny_video.yaml").guidance_defaults.s2.scale
    assert f"scale={float(own)}" in record["guiders"]["s2"]  # configs/model/tiny_video.yaml's own guidance_defaults
    frames = load_gif(out / "samples.gif")
    # 5 default prompts (rows) x 3 samples (columns) of 16 px tiles x upscale 3, 2 px padding; 4 frames
    assert frames.shape == (4, 3, 5 * (48 + 2) + 2, 3 * (48 + 2) + 2)
    assert not torch.equal(frames[0], frames[-1])  # it moves (or at least changes)
    w, h = Image.open(out / "samples.png").size  # the label strip on top, prompts on the left
    assert h == 16 + 5 * (48 + 2) + 2 and w > 3 * 3 * (48 + 2)  # 3 samples x 3 frames
    # never overwritten: the same dir again fails before sampling and leaves both files alone
    before = {f: (out / f).read_bytes() for f in ("samples.gif", "samples.png", "run.json")}
    (out / "samples.png").rename(out / "kept.png")  # the GIF alone is enough to refuse
    p2, _ = run(tmp_path, "v", *model, "steps=1", "hydra.output_subdir=null")  # .hydra/ alone would refuse it
    assert p2.returncode == 2 and "samples.gif exists" in p2.stderr and "never overwritten" in p2.stderr
    (out / "kept.png").rename(out / "samples.png")
    assert {f: (out / f).read_bytes() for f in before} == before

    p, out = run(tmp_path, "cmp", *model, "compare=[cfg,s2]", "steps=3", "samples_per_prompt=2",
                 "prompt=[a red circle moving left,a blue square falling]", "logger=wandb", "logger.mode=offline")
    assert p.returncode == 0, p.stderr
    frames = load_gif(out / "samples.gif")
    assert frames.shape == (4, 3, 4 * (48 + 2) + 2, 2 * (48 + 2) + 2)  # (prompt, sample) rows x guiders
    assert list(json.loads((out / "run.json").read_text())["guiders"]) == ["cfg", "s2"]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # strip and GIF, offline


@pytest.mark.parametrize("args, message", [
    (["prompt=a red circle moving sideways"], "unknown motion 'moving sideways'"),
    (["prompt=a red circle left of a blue square"], "is an image prompt"),
    (["model.num_frames=8"], "trained on 4 frames"),
    (["video=webm"], "video must be auto, gif or mp4"),
])
def test_tiny_video_bad_input_is_one_line(tmp_path, tiny_video_checkpoint, args, message):
    p, out = run(tmp_path, "bad", "model=tiny_video", f"model.checkpoint={tiny_video_checkpoint}", "steps=2", *args)
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
    assert not (out / "samples.gif").exists() and not (out / "samples.png").exists()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(tests/test_wan_pipeline.py as a module, its random-weight tiny Wan files in the released layouts)."""
    for name in ("av", "diffusers", "transformers", "sentencepiece"):
        pytest.importorskip(name)
    import test_wan_pipeline as twp

    return twp, twp.parts.__wrapped__(tmp_path_factory)  # the same builder as its `parts` fixture


def test_wan_writes_an_mp4_per_video_and_a_frame_strip(tmp_path, wan):
    """The Wan config on the random-weight tiny Wan of tests/test_wan_pipeline.py: one MP4 per (prompt, sample),
    read back with PyAV, and the PNG of first, middle and last frames."""
    import av

    from s2g.video import load_mp4

    twp, parts = wan
    files = [f"model.{k}={v}" for k, v in parts.files.items()]
    shape = [f"model.num_frames={twp.FRAMES}", f"model.height={twp.H}", f"model.width={twp.W}", "model.device=cpu"]
    p, out = run(tmp_path, "wan", "model=wan21_t2v_1_3b", *files, *shape, "steps=2", "samples_per_prompt=2",
                 f"prompt=[{twp.PROMPTS[0]},{twp.PROMPTS[1]}]")
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    names = ["samples_00_00.mp4", "samples_00_01.mp4", "samples_01_00.mp4", "samples_01_01.mp4", "samples.png"]
    assert record["video"] == "mp4" and record["fps"] == 16 and [Path(f).name for f in record["files"]] == names
    for name in names[:-1]:
        with av.open(str(out / name)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and (stream.width, stream.height) == (twp.W, twp.H)
            assert stream.average_rate == 16
        assert load_mp4(out / name).shape == (twp.FRAMES, 3, twp.H, twp.W)
    assert not torch.equal(load_mp4(out / names[0]), load_mp4(out / names[1]))  # two samples, two noises
    w, h = Image.open(out / "samples.png").size
    assert h == 16 + 4 * (twp.H + 2) + 2 and w > 3 * (twp.W + 2)  # one row per video, 3 frames

    p, out = run(tmp_path, "wan_cmp", "model=wan21_t2v_1_3b", *files, *shape, "steps=2", "compare=[cfg,s2]",
                 f"prompt={twp.PROMPTS[0]}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in out.glob("*.mp4")) == ["samples_cfg_00_00.mp4", "samples_s2_00_00.mp4"]
