"""scripts/evaluate.py on a video model: the second evaluation kind (s2g/eval/kinds.py). Per-clip rows with the
video evaluator's dimensions, means with intervals overall and per family, the Fréchet video distance analog with
its floor, torchrun at 2 ranks equal to one process, paired comparisons, multirun + gather, and the bad inputs
that stop before any sampling. The model is a tiny video checkpoint trained here for 4 steps (as test_tiny_video's
`trained` fixture), so the numbers are those of an untrained model: the plumbing is what is tested."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_tiny_video import _cfg, _train_module  # noqa: E402  (the toy-size training run)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tv_eval")
    _train_module().train(_cfg(steps=4, checkpoint_every=100, log_every=100), out)
    return out / "tiny_video.safetensors"  # 4 frames of 16x16


def _evaluate(*args, torchrun: int = 0, env: dict | None = None, progress: bool = False):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    cmd = [sys.executable, "scripts/evaluate.py"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "scripts/evaluate.py"]
    flags = [a for a in args if a.startswith("-")]
    args = [a for a in args if not a.startswith("-")]
    return subprocess.run([*cmd, *flags, f"progress={str(progress).lower()}", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)


def tiny(checkpoint):
    return ["model=tiny_video", f"model.checkpoint={checkpoint}", "prompts=video_val", "num_prompts=20",
            "seeds=[0,1]", "steps=3", "batch_size=4", "bootstrap.n=200", "bootstrap.fd_n=20", "bootstrap.pr_halves=20"]


def _rows(run):
    with open(run / "per_clip.csv", newline="") as f:
        return list(csv.DictReader(f))


FAMILIES = ("direction", "pair", "falling", "bouncing", "static")


def test_video_run_torchrun_equals_one_process_and_pairs(checkpoint, tmp_path):
    one = _evaluate(*tiny(checkpoint), "guidance=s2", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    run = tmp_path / "one"
    assert {p.name for p in run.iterdir()} == {"metrics.json", "per_clip.csv", "features.safetensors", "samples.gif",
                                               "samples.png", "config.yaml", "run.json"}
    m = json.loads((run / "metrics.json").read_text())
    assert m["kind"] == "video" and m["n_clips"] == 40 and m["video_metrics"] is True
    assert (m["num_frames"], m["frame_size"]) == (4, [16, 16]) and m["prompts"] == "video_val"
    a = m["adherence"]
    from s2g.eval.video import ATTRIBUTES
    for key in set(ATTRIBUTES) - {"multiple_objects"}:  # every dimension, with its interval over prompts
        iv = a["overall"][key]
        applies = 19 if key == "direction" else 20  # not to "standing still"
        assert 0 <= iv["lo"] <= iv["mean"] <= iv["hi"] <= 1 and iv["n_clusters"] == applies, (key, iv)
    assert set(a["families"]) == set(FAMILIES) | {"physics"}  # the first 20 val prompts hold every family
    assert "direction" not in a["families"]["static"] and "multiple_objects" in a["families"]["pair"]
    assert a["families"]["physics"]["n_clips"] == a["families"]["falling"]["n_clips"] * 2 == 4  # 1 prompt x 2 seeds
    f = m["fidelity"]
    assert f["feature_dim"] == 128 + 18 * 4 and f["n_generated"] == f["n_reference"] == 40
    assert f["frechet"]["lo"] <= f["frechet"]["mean"] <= f["frechet"]["hi"] and f["frechet_floor"] > 0
    assert f["frechet"]["mean"] > f["frechet_floor"]  # an untrained model is far from the renders
    assert set(f["blocks"]) == {"appearance", "motion"} and all(b["floor"] > 0 for b in f["blocks"].values())
    assert m["cost"]["nfe_per_clip"] > 3 * 2
    rows = _rows(run)
    assert len(rows) == 40 and {r["family"] for r in rows} == set(FAMILIES)
    assert all(len(json.loads(r["counts"])) == 4 for r in rows)  # per frame
    assert all(r["direction"] == "" for r in rows if r["family"] == "static")  # does not apply: empty
    from s2g.eval.report import load_run, rescore_fidelity
    assert rescore_fidelity(load_run(run)) == f  # the saved features and the renders reproduce the metrics
    from PIL import Image
    with Image.open(run / "samples.gif") as im:
        assert im.n_frames == 4 and im.is_animated

    two = _evaluate(*tiny(checkpoint), "guidance=s2", f"hydra.run.dir={tmp_path / 'two'}", torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and _rows(run) == _rows(tmp_path / "two")
    for key in ("adherence", "fidelity"):
        assert m[key] == m2[key]
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(run / "features.safetensors"))["features"],
                       load_file(str(tmp_path / "two" / "features.safetensors"))["features"])
    assert (run / "samples.gif").read_bytes() == (tmp_path / "two" / "samples.gif").read_bytes()

    # paired: S² at ω = 0 is CFG on the same clips, so every difference is exactly 0
    cfg = _evaluate(*tiny(checkpoint), "guidance=cfg", f"hydra.run.dir={tmp_path / 'cfg'}", "logger=wandb",
                    "logger.mode=offline")
    s2_0 = _evaluate(*tiny(checkpoint), "guidance=s2", "guidance.omega=0", f"hydra.run.dir={tmp_path / 's2_0'}")
    assert cfg.returncode == 0 and s2_0.returncode == 0, cfg.stderr[-2000:] + s2_0.stderr[-2000:]
    assert list((tmp_path / "cfg" / "wandb").glob("offline-run-*/run-*.wandb"))  # metrics, strip and GIF, offline
    pr = _evaluate(f"pair=[{tmp_path / 's2_0'},{tmp_path / 'cfg'}]")
    assert pr.returncode == 0, pr.stderr[-2000:]
    assert "motion_smoothness" in pr.stdout and "40 paired clips" in pr.stdout
    res = json.loads((tmp_path / "s2_0" / "paired_vs_cfg.json").read_text())
    assert res["n_pairs"] == 40
    for key in ("all", "direction", "motion_smoothness", "dynamic_degree", "count_stable", "temporal_flickering"):
        assert res[key]["mean"] == res[key]["lo"] == res[key]["hi"] == 0.0, key
    assert abs(res["frechet"]["mean"]) < 1e-9 and abs(res["frechet"]["lo"]) < 1e-9
    assert all(res[k][e] == 0.0 for k in ("precision", "recall") for e in ("mean", "lo", "hi"))
    # and S² at ω = 1 against CFG: a real paired difference with an interval around it
    res = _pair_json(tmp_path, "one", "cfg")
    assert res["all"]["lo"] <= res["all"]["mean"] <= res["all"]["hi"] and res["frechet"]["mean"] != 0


def _pair_json(tmp_path, a, b):
    p = _evaluate(f"pair=[{tmp_path / a},{tmp_path / b}]")
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads((tmp_path / a / f"paired_vs_{b}.json").read_text())


def test_video_multirun_and_gather(checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    p = _evaluate("-m", *tiny(checkpoint), "guidance=cfg,s2", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").exists())
    assert [json.loads((d / "metrics.json").read_text())["guidance"] for d in runs] == ["cfg", "s2"]
    g = _evaluate(f"gather={sweep}", f"baseline={runs[0].name}")
    assert g.returncode == 0, g.stderr[-3000:]
    table = (sweep / "summary.md").read_text()
    assert "motion smoothness" in table and "Δ direction" in table and "s/clip" in table
    assert "guidance=s2" in table and (sweep / "summary.png").stat().st_size > 0
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "d_motion_smoothness" in rows[1] and rows[0]["n_clips"] == "40"


def test_a_sweep_of_two_kinds_is_not_gathered_and_runs_of_two_kinds_are_not_paired(checkpoint, tmp_path):
    sweep = tmp_path / "mixed"
    video = _evaluate(*tiny(checkpoint), "guidance=cfg", f"hydra.run.dir={sweep / 'video'}")
    image = _evaluate("prompts=val", "num_prompts=8", "seeds=[0]", "steps=2", "batch_size=4", "bootstrap.n=50",
                      "bootstrap.fd_n=10", "guidance=cfg", f"hydra.run.dir={sweep / 'image'}")
    assert video.returncode == 0 and image.returncode == 0, video.stderr[-2000:] + image.stderr[-2000:]
    g = _evaluate(f"gather={sweep}")
    assert g.returncode == 2 and "more than one kind" in g.stderr and g.stderr.strip().count("\n") == 0
    assert not (sweep / "summary.md").exists()
    p = _evaluate(f"pair=[{sweep / 'video'},{sweep / 'image'}]")
    assert p.returncode == 2 and "runs of one kind" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("case", ["video_set_to_image_model", "image_set_to_video_model", "bad_motion_in_file",
                                  "frame_count", "image_prompt_in_video_file"])
def test_bad_video_input_is_one_line_exit_2_before_sampling(checkpoint, tmp_path, case):
    f = tmp_path / "prompts.txt"
    lines = ["a red circle moving left", "a blue square falling", "a green triangle standing still"]
    if case == "bad_motion_in_file":
        f.write_text("\n".join(lines + ["a red circle moving sideways"]) + "\n")  # the last line is wrong
    elif case == "image_prompt_in_video_file":
        f.write_text("\n".join(lines + ["a red circle left of a blue square"]) + "\n")
    model = ["model=tiny_video", f"model.checkpoint={checkpoint}"]
    args, message = {
        "video_set_to_image_model": (["prompts=video_test"], "prompts=video_test is a video prompt set, but this "
                                                             "model makes images"),
        "image_set_to_video_model": ([*model, "prompts=val"], "prompts=val is an image prompt set, but this model "
                                                              "makes videos: use prompts=video_test or video_val"),
        "bad_motion_in_file": ([*model, f"prompts={f}"], "unknown motion 'moving sideways'"),
        "image_prompt_in_video_file": ([*model, f"prompts={f}"], "is an image prompt"),
        "frame_count": ([*model, "model.num_frames=8", "prompts=video_val"], "trained on 4 frames"),
    }[case]
    size = [] if "file" in case else ["num_prompts=4"]  # a file: every line
    p = _evaluate(*args, *size, "steps=2", f"hydra.run.dir={tmp_path / 'run'}", progress=True)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ") and message in p.stderr, p.stderr
    assert "%|" not in p.stderr  # no progress bar was started: nothing was sampled
    assert not (tmp_path / "run").exists()


def test_library_video_kind_on_rendered_clips_scores_one_and_reaches_the_floor(tmp_path):
    """A 'pipeline' that returns the rendered clip of each prompt: every applicable dimension is 1 on every family
    and the Fréchet distance to renders of the same items is at its sampling floor."""
    from s2g.data.clips import clip_for_prompt, render_clips, video_prompt_set
    from s2g.eval import work_items
    from s2g.eval.harness import item_seed
    from s2g.eval.run import evaluate, write_run
    from s2g.guidance import CFG
    from s2g.video import TextToVideo

    class Renders(TextToVideo):
        def __call__(self, prompts, guider, *, noise=None, **kw):
            keys = [int(n.flatten()[0].abs().mul(1e6)) for n in noise]  # a layout per item (its noise)
            return render_clips([clip_for_prompt(p, np.random.default_rng(k)) for p, k in zip(prompts, keys)])

    pipe = Renders(None, None, (3, 8, 32, 32))
    items = work_items(video_prompt_set("test", 60), [0])
    res = evaluate(pipe, lambda seed: CFG(scale=1.0), items, batch_size=16, steps=1, progress=False,
                   prompt_set="video_test", bootstrap={"n": 100, "fd_n": 10, "pr_halves": 10})
    o = res["metrics"]["adherence"]["overall"]
    assert o["all"]["mean"] >= 0.95 and o["direction"]["mean"] >= 0.95 and o["motion_smoothness"]["mean"] >= 0.95
    f = res["metrics"]["fidelity"]
    assert f["frechet"]["mean"] < 2.5 * f["frechet_floor"], (f["frechet"]["mean"], f["frechet_floor"])
    assert item_seed(0, items[0].prompt) != item_seed(1, items[0].prompt)
    record = write_run(tmp_path / "run", res, config="{}\n", overrides=["prompts=video_test"])
    assert record["command"] == "python scripts/evaluate.py prompts=video_test"
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_run(tmp_path / "run", res, config="{}\n", overrides=[])


def test_wan_with_free_text_prompts_saves_mp4s_and_no_metrics(tmp_path_factory, tmp_path):
    """A latent video model (the random-weight tiny Wan of tests/test_wan_pipeline.py) on prompts outside the clip
    grammar: the metrics are off (the evaluator reads square pixel-space clips), every clip is saved as MP4 under
    images/, and the rows, the GIF grid and the frame strip are written as for the embedded model."""
    for name in ("av", "diffusers", "transformers", "sentencepiece"):
        pytest.importorskip(name)
    import test_wan_pipeline as twp

    from s2g.video import load_mp4

    parts = twp.parts.__wrapped__(tmp_path_factory)
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(twp.PROMPTS) + "\n")
    model = ["model=wan21_t2v_1_3b", *[f"model.{k}={v}" for k, v in parts.files.items()],
             f"model.num_frames={twp.FRAMES}", f"model.height={twp.H}", f"model.width={twp.W}", "model.device=cpu"]
    p = _evaluate(*model, f"prompts={f}", "seeds=[0]", "steps=2", "batch_size=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["kind"] == "video" and m["video_metrics"] is False and "adherence" not in m and m["n_clips"] == 2
    assert (m["num_frames"], m["frame_size"]) == (twp.FRAMES, [twp.H, twp.W])
    clips = sorted((run / "images").glob("*.mp4"))
    assert [c.name for c in clips] == ["seed0_00000.mp4", "seed0_00001.mp4"]
    assert load_mp4(clips[0]).shape == (twp.FRAMES, 3, twp.H, twp.W)
    assert [r["prompt"] for r in _rows(run)] == twp.PROMPTS and (run / "samples.gif").is_file()
    bad = _evaluate(*model, "scene_metrics=true", f"prompts={f}", "seeds=[0]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "unknown shape 'fox'" in bad.stderr and not (tmp_path / "bad").exists()
