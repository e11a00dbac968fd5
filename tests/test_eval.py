"""The evaluation harness: prompt sets, adherence rules, the shipped scene evaluator on renders and on edited
renders, the Fréchet floor, batch and rank invariance of the images, and scripts/evaluate.py end to end."""
import csv
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from s2g.data.scenes import RELATIONS, Scene, SceneObject, parse_prompt, render, sample_scenes, scene_for_prompt
from s2g.eval import (FAMILIES, Detection, SceneEvaluator, family, frechet_distance, grammar_prompts, prompt_set,
                      score)
from s2g.eval.adherence import relation_holds
from s2g.eval.harness import generate, reference_renders, shard, work_items

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluator():
    return SceneEvaluator.load()


# ------------------------------------------------------------------------------------------------ prompt sets

def test_prompt_sets_are_disjoint_balanced_and_fixed():
    test, val = prompt_set("test"), prompt_set("val")
    assert len(test) == len(set(test)) >= 1000 and len(val) == len(set(val)) >= 500
    assert not set(test) & set(val)
    assert prompt_set("test") == test  # a fixed seed: the same list every time
    assert sum(len(v) for v in grammar_prompts().values()) == 18 + 5 * 18 * 17
    head = Counter(family(p) for p in test[:300])
    assert head["single"] == 12 and all(55 <= head[f] <= 60 for f in FAMILIES[1:])  # any prefix is balanced
    assert prompt_set("val", 10) == val[:10]


def test_prompt_set_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_set("train")
    with pytest.raises(ValueError, match="has 1002 prompts"):
        prompt_set("test", 5000)
    f = tmp_path / "p.txt"
    f.write_text("# mine\na red circle\n\na blue square above a red circle\n")
    assert prompt_set(str(f)) == ["a red circle", "a blue square above a red circle"]


def test_scene_for_prompt_follows_the_prompt():
    rng = np.random.default_rng(0)
    for p in prompt_set("val", 120):
        s = scene_for_prompt(p, rng)
        objects, rel = parse_prompt(p)
        assert s.prompt == p and [(o.color, o.shape) for o in s.objects] == objects
        if rel in RELATIONS:
            assert relation_holds(rel, *s.objects)


# ------------------------------------------------------------------------------------------- adherence rules

def _det(color, shape, x, y, area=50):
    return Detection(color, shape, x, y, area, 1.0)


def test_score_fails_exactly_the_wrong_attribute():
    p = "a red circle left of a blue square"
    good = [_det("red", "circle", 0.2, 0.5), _det("blue", "square", 0.8, 0.5)]
    ok = {"count": 1, "color": 1, "shape": 1, "relation": 1, "found": 1, "flipped": 0, "all": 1}
    assert score(p, good) == ok
    wrong_color = [_det("green", "circle", 0.2, 0.5), good[1]]
    assert score(p, wrong_color) == {**ok, "color": 0, "relation": 0, "found": 0, "all": 0}
    wrong_shape = [_det("red", "triangle", 0.2, 0.5), good[1]]
    assert score(p, wrong_shape) == {**ok, "shape": 0, "relation": 0, "found": 0, "all": 0}
    swapped = [_det("red", "circle", 0.8, 0.5), _det("blue", "square", 0.2, 0.5)]
    assert score(p, swapped) == {**ok, "relation": 0, "flipped": 1, "all": 0}
    stacked = [_det("red", "circle", 0.5, 0.2), _det("blue", "square", 0.5, 0.8)]  # neither left nor right
    assert score(p, stacked) == {**ok, "relation": 0, "flipped": 0, "all": 0}
    extra = good + [_det("red", "circle", 0.5, 0.1, area=12)]
    r = score(p, extra)
    assert (r["count"], r["color"], r["shape"], r["all"]) == (0, 0, 0, 0) and r["relation"] == 1  # largest one
    diagonal = [_det("red", "circle", 0.2, 0.2), _det("blue", "square", 0.5, 0.8)]  # more below than right
    assert score(p, diagonal)["relation"] == 0 and score(p.replace("left of", "above"), diagonal)["relation"] == 1
    assert score("a red circle and a blue square", good)["relation"] is None
    assert score("a red circle", good[:1])["all"] == 1 and score("a red circle", [])["count"] == 0


def test_relation_rule_is_genevals():
    """A is <rel> B when the size-shrunk offset A - B points within ~60° of the axis (GenEval's rule)."""
    b = _det("blue", "square", 0.6, 0.6)
    a = lambda x, y, w=0.0: Detection("red", "circle", x, y, 50, 1.0, w, w)  # noqa: E731
    assert relation_holds("left of", a(0.2, 0.3), b) and relation_holds("above", a(0.2, 0.3), b)  # 37° off both
    assert relation_holds("left of", a(0.2, 0.1), b) and not relation_holds("left of", a(0.4, 0.0), b)  # 51°, 72°
    assert not relation_holds("right of", a(0.2, 0.3), b) and not relation_holds("below", a(0.2, 0.3), b)
    assert relation_holds("left of", a(0.5, 0.6), b)  # no extent: any offset along the axis counts
    wide = Detection("blue", "square", 0.6, 0.6, 50, 1.0, 0.3, 0.3)
    assert not relation_holds("left of", a(0.5, 0.6, w=0.3), wide)  # boxes 0.3 wide, 0.1 apart: too close
    assert relation_holds("left of", a(0.2, 0.6, w=0.3), wide)


# ---------------------------------------------------------------------------------------------- the evaluator

def test_real_renders_score_100_percent(evaluator):
    batch = sample_scenes(300, seed=777)  # a seed far from the evaluator's training and held-out seeds
    rows = [score(p, d) for p, d in zip(batch.prompts, evaluator.detect(batch.images))]
    for a in ("count", "color", "shape", "relation", "all"):
        vals = [r[a] for r in rows if r[a] is not None]
        assert np.mean(vals) >= 0.99, (a, np.mean(vals))


def _scene(a, b, rel):
    return Scene(f"a {a.color} {a.shape} {rel} a {b.color} {b.shape}", [a, b], rel)


@pytest.mark.parametrize("edit", ["color", "shape", "relation"])
def test_an_edited_render_fails_exactly_that_metric(evaluator, edit):
    """Render scenes, then the same scenes with one thing changed; score both against the original prompt."""
    rng = np.random.default_rng(3)
    prompts = [p for p in prompt_set("val") if family(p) == "left of"][:24]
    scenes = [scene_for_prompt(p, rng) for p in prompts]
    edited = []
    for s in scenes:
        a, b = s.objects
        if edit == "color":  # a colour that neither object has
            new = next(c for c in ("red", "green", "blue", "yellow", "purple", "white") if c not in (a.color, b.color))
            edited.append(Scene(s.prompt, [replace(a, color=new), b], s.relation))
        elif edit == "shape":
            new = next(sh for sh in ("circle", "square", "triangle") if sh not in (a.shape, b.shape))
            edited.append(Scene(s.prompt, [replace(a, shape=new), b], s.relation))
        else:  # mirror the layout: first object now right of the second
            edited.append(Scene(s.prompt, [replace(a, x=1 - a.x), replace(b, x=1 - b.x)], s.relation))
    orig = [score(s.prompt, d) for s, d in zip(scenes, evaluator.detect(render(scenes)))]
    bad = [score(s.prompt, d) for s, d in zip(edited, evaluator.detect(render(edited)))]
    assert all(r["all"] == 1 for r in orig)
    expect_fail = {"color": {"color", "relation", "found", "flipped", "all"},
                   "shape": {"shape", "relation", "found", "flipped", "all"}, "relation": {"relation", "all"}}[edit]
    for r in bad:
        assert {k for k, v in r.items() if v == 0} == expect_fail, r
        assert r["flipped"] == (edit == "relation")  # the mirrored layout is the opposite relation


def test_frechet_between_independent_renders_is_at_its_floor(evaluator):
    """Renders vs an independent set of renders of the same prompts: FD ≈ 0 up to the sampling floor (measured
    twice); the floor is far below the distance to renders whose every object became a circle."""
    items = work_items(prompt_set("val", 200), [0, 1])
    f = [evaluator.features(reference_renders(items, s)).numpy() for s in (0, 1, 2)]
    floor, again = frechet_distance(f[0], f[1]), frechet_distance(f[0], f[2])
    rng = np.random.default_rng(2)
    circles = [Scene(s.prompt, [replace(o, shape="circle") for o in s.objects], s.relation)
               for s in (scene_for_prompt(it.prompt, rng) for it in items)]
    far = frechet_distance(f[0], evaluator.features(render(circles)).numpy())
    assert again < 2 * floor and floor < 0.1 * far, (floor, again, far)


# ---------------------------------------------------------------------------------------- images and ranks

@pytest.fixture(scope="module")
def tiny_pipe():
    from s2g.tiny import load_tiny
    return load_tiny()


def test_images_do_not_depend_on_batch_or_shard(tiny_pipe):
    from s2g.guidance import S2Guidance
    items = work_items(prompt_set("val", 5), [0, 3])
    make = lambda seed: S2Guidance(scale=4, omega=1.0, seed=seed)  # noqa: E731 - masks follow the seed
    kw = dict(steps=4, shift=3.0, sampler="euler", progress=False)
    whole, nfe, _ = generate(tiny_pipe, make, items, batch_size=4, **kw)
    parts = [generate(tiny_pipe, make, shard(items, r, 3), batch_size=4, **kw)[0] for r in range(3)]
    rebuilt = torch.empty_like(whole)
    for r in range(3):
        rebuilt[r::3] = parts[r]
    assert torch.equal(whole, rebuilt)
    other_batch, _, _ = generate(tiny_pipe, make, items, batch_size=7, **kw)
    assert torch.equal(whole, other_batch)
    one_by_one, _, _ = generate(tiny_pipe, make, items, batch_size=1, **kw)  # each image its own masks
    torch.testing.assert_close(whole, one_by_one, rtol=0, atol=1e-4)  # batched GEMMs round differently
    from s2g.guidance.base import Step
    from s2g.sampling import sd3_sigmas
    sig = sd3_sigmas(4, 3.0).tolist()
    inside = [make(0).active(Step(i, 4, sig[i], sig[i + 1])) for i in range(4)]  # 3 passes inside, CFG's 2 out
    assert nfe == [sum(3 if i else 2 for i in inside)] * len(items) and 0 < sum(inside) < 4
    with pytest.raises(ValueError, match="ranks"):
        shard(items, 0, len(items) + 1)


# ---------------------------------------------------------------------------------------- scripts/evaluate.py

def _evaluate(*args, torchrun: int = 0, env: dict | None = None):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    cmd = [sys.executable, "scripts/evaluate.py"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "scripts/evaluate.py"]
    flags = [a for a in args if a.startswith("-")]  # Hydra's -m goes before the overrides
    args = [a for a in args if not a.startswith("-")]
    return subprocess.run([*cmd, *flags, "progress=false", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


TINY = ["prompts=val", "num_prompts=6", "seeds=[0,1]", "steps=3", "batch_size=4", "bootstrap.n=200",
        "bootstrap.fd_n=20"]


def _rows(run):
    with open(run / "per_image.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_end_to_end_torchrun_equals_one_process(tmp_path):
    one = _evaluate(*TINY, "guidance=s2", "guidance.scale=4", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    m = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert m["n_images"] == 12 and m["scene_metrics"] is True
    o = m["adherence"]["overall"]
    assert all(0 <= o[k]["lo"] <= o[k]["mean"] <= o[k]["hi"] <= 1 for k in ("count", "color", "shape", "all"))
    assert m["fidelity"]["feature_dim"] == 128 and m["fidelity"]["n_generated"] == 12
    assert set(m["fidelity"]["precision_recall_per_seed"]) == {"0", "1"}
    for key in ("precision", "recall"):  # the delete-half jackknife interval around the full-sample value
        iv = m["fidelity"][f"{key}_interval"]
        assert iv["mean"] == m["fidelity"][key] and iv["lo"] <= iv["mean"] <= iv["hi"] and iv["n_clusters"] == 6
    from s2g.eval.report import load_run, rescore_fidelity
    assert rescore_fidelity(load_run(tmp_path / "one")) == m["fidelity"]  # saved features reproduce the metrics
    assert m["cost"]["nfe_per_image"] > 3 * 2 and m["cost"]["seconds_per_image"] > 0
    for f in ("per_image.csv", "samples.png", "features.safetensors", "config.yaml", "run.json"):
        assert (tmp_path / "one" / f).exists()

    two = _evaluate(*TINY, "guidance=s2", "guidance.scale=4", f"hydra.run.dir={tmp_path / 'two'}", torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["world_size"] == 2
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")
    for key in ("adherence", "fidelity"):
        assert m[key] == m2[key]
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "one" / "features.safetensors"))["features"],
                       load_file(str(tmp_path / "two" / "features.safetensors"))["features"])

    # never overwritten: the same dir again fails with one line and leaves the metrics alone
    before = (tmp_path / "one" / "metrics.json").read_bytes()
    again = _evaluate(*TINY, f"hydra.run.dir={tmp_path / 'one'}")
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "never overwritten" in again.stderr
    assert (tmp_path / "one" / "metrics.json").read_bytes() == before

    # paired comparison of two runs on the same items: S² at ω = 0 is CFG, so every difference is exactly 0
    cfg = _evaluate(*TINY, "guidance=cfg", "guidance.scale=4", f"hydra.run.dir={tmp_path / 'cfg'}", "logger=wandb",
                    "logger.mode=offline")
    s2_0 = _evaluate(*TINY, "guidance=s2", "guidance.scale=4", "guidance.omega=0", f"hydra.run.dir={tmp_path / 's2_0'}")
    assert cfg.returncode == 0 and s2_0.returncode == 0, cfg.stderr[-2000:] + s2_0.stderr[-2000:]
    assert list((tmp_path / "cfg" / "wandb").glob("offline-run-*/run-*.wandb"))  # metrics + grid, offline
    pr = _evaluate(f"pair=[{tmp_path / 's2_0'},{tmp_path / 'cfg'}]")
    assert pr.returncode == 0, pr.stderr[-2000:]
    res = json.loads((tmp_path / "s2_0" / "paired_vs_cfg.json").read_text())
    assert res["n_pairs"] == 12 and res["all"]["mean"] == res["all"]["lo"] == res["all"]["hi"] == 0.0
    assert abs(res["frechet"]["mean"]) < 1e-9 and abs(res["frechet"]["lo"]) < 1e-9  # same images, same FD
    assert all(res[k][e] == 0.0 for k in ("precision", "recall") for e in ("mean", "lo", "hi"))


@pytest.mark.parametrize("args, message", [
    (["prompts=nope"], "unknown prompt set"),
    (["scene_metrics=true", "prompts=__FILE__"], "not in the scene grammar"),
    (["seeds=[0]", "num_prompts=1"], "ranks"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\na red dog\n")
    args = [a.replace("__FILE__", str(f)) for a in args]
    env = {"WORLD_SIZE": "3", "RANK": "0"} if message == "ranks" else None
    p = _evaluate(*args, f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and message in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # the run dir Hydra made for it is removed again


def test_multirun_gather_and_a_user_metric(tmp_path):
    from safetensors.torch import save_file

    from s2g.eval.plugins import ConvFeatures, save_reference_stats
    net = ConvFeatures(16)  # random weights, brought as a file
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    ref = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        save_reference_stats(net((ref - 0.5) / 0.5).flatten(1), tmp_path / "ref.safetensors")
    sweep = tmp_path / "sweep"
    plug = ["+extra_metrics.conv._target_=s2g.eval.plugins.FeatureNetwork",
            "+extra_metrics.conv.network=s2g.eval.plugins:ConvFeatures", "+extra_metrics.conv.kwargs.dim=16",
            f"+extra_metrics.conv.weights={tmp_path / 'net.safetensors'}",
            f"+extra_metrics.conv.reference={tmp_path / 'ref.safetensors'}"]
    p = _evaluate("-m", *TINY, "guidance=none,cfg", f"hydra.sweep.dir={sweep}", *plug)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").exists())
    assert len(runs) == 2
    m = json.loads((runs[1] / "metrics.json").read_text())
    assert m["guidance"] == "cfg" and np.isfinite(m["extra"]["conv"]["frechet"])
    assert m["extra"]["conv"]["feature_dim"] == 16
    g = _evaluate(f"gather={sweep}", f"baseline={runs[0].name}")
    assert g.returncode == 0, g.stderr[-3000:]
    table = (sweep / "summary.md").read_text()
    assert "guidance=cfg" in table and "Δ all" in table and (sweep / "summary.png").stat().st_size > 0
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "d_all" in rows[1]


def test_train_evaluator_short_run_records_itself_and_never_overwrites(tmp_path):
    out = tmp_path / "ev.safetensors"
    cmd = [sys.executable, "scripts/train_evaluator.py", "--steps", "3", "--batch-size", "8", "--heldout", "20",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from s2g.eval.evaluator import describe_evaluator
    meta = describe_evaluator(out)
    assert meta["steps"] == "3" and "--steps 3" in meta["command"] and meta["heldout"]["clean"]["n"] == 20
    assert SceneEvaluator.load(out).features(torch.rand(2, 3, 32, 32)).shape == (2, 128)
    before = out.read_bytes()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "never overwritten" in again.stderr and out.read_bytes() == before
