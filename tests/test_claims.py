"""experiments/claims/claims.py calls the library without Hydra; each of its runs must be the run that its recorded
command line (`python scripts/evaluate.py <overrides>`) makes. Here the Hydra configs are composed as that script
composes them, and every argument claims.py passes is compared with what the script builds."""
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from s2g.config import apply_guidance_defaults, build_model, guider_factory
from s2g.eval.run import evaluate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("claims", ROOT / "experiments" / "claims" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose(overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        return compose("evaluate", overrides=overrides)


SEL = {"scale": 6, "omega": 0.25, "interval_unit": "steps"}
RUNS = [  # (group, params): every group of METHODS, the controls' variants, and a run the model's defaults reach
    ("none", {}), ("cfg", {"scale": 1.5}), ("cfg", {}), ("s2", {}), ("cfgpp", {"scale": 0.1}), ("apg", {"scale": 3}),
    ("cfg_zero_star", {"scale": 1.5}), ("autoguidance", {"scale": 1.5}), ("slg", {"scale": 3, "skip_scale": 1.5}),
    ("pag", {"scale": 3, "perturbed_scale": 1.5}), ("seg", {"scale": 3, "seg_scale": 1.5}), ("s2", dict(SEL)),
    ("naive_s2", dict(SEL)), ("s2", dict(SEL, num_subnetworks=8, drop_ratio=0.3, interval=[0.1, 0.9])),
    ("s2", dict(SEL, form="appendix")), ("s2", dict(SEL, _target_="s2g.guidance.controls.PlaceboS2")),
    ("cfg", {"_target_": "s2g.guidance.controls.IntervalCFG", "+inner_scale": 6.085, "scale": 6,
             "interval": [0.1, 0.9], "+interval_unit": "steps"}),
    ("slg", {"scale": 6, "skip_scale": 0.25, "layers": [5], "start": 0.0, "stop": 1.0, "interval": [0.1, 0.9],
             "interval_unit": "steps"}),
    ("s2", dict(SEL, omega=-0.25, **{"+allow_negative_omega": True})),
]


@pytest.mark.parametrize("model", ["tiny", "tiny_early"])
@pytest.mark.parametrize("group, params", RUNS)
def test_each_run_builds_the_guider_its_command_builds(claims, model, group, params):
    overrides = claims.overrides_for(model, "val", group, params)
    cfg = _compose(overrides)
    applied = apply_guidance_defaults(cfg.model, group, cfg.guidance, overrides)  # as scripts/evaluate.py
    expected = overrides + [f"guidance.{k}={claims.fmt(v)}" for k, v in applied.items()]
    got, spec = claims.with_model_defaults(model, group, params, overrides)
    assert got == expected
    for seed in (0, 3):
        ours, script = claims.guider_factory(spec)(seed), guider_factory(cfg.guidance)(seed)
        assert type(ours) is type(script) and vars(ours) == vars(script)
    if (group, params) == ("cfg", {}):  # the model's val-selected scale reaches the run, named in the command
        assert applied == {"scale": 6} and got[-1] == "guidance.scale=6"


@pytest.mark.parametrize("subset", ["val", "test", "ablation"])
def test_prompt_sets_sampling_and_evaluation_settings_are_the_commands(claims, subset):
    cfg = _compose(claims.overrides_for("tiny", subset, "cfg", {}))
    s = claims.SETS[subset]
    assert (cfg.prompts, cfg.num_prompts, list(cfg.seeds)) == (s["prompts"], s["num_prompts"], s["seeds"])
    assert (cfg.sampler.name, cfg.steps, cfg.shift) == tuple(claims.SAMPLING[k] for k in ("sampler", "steps", "shift"))
    assert cfg.progress is False and cfg.threads == 1
    defaults = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for key in ("batch_size", "scene_metrics", "evaluator", "min_area", "reference_seed", "grid", "save_images"):
        assert defaults[key] == cfg[key], key  # claims.py leaves these at evaluate()'s defaults
    from s2g.eval.run import BOOTSTRAP
    assert dict(cfg.bootstrap) == BOOTSTRAP and not cfg.extra_metrics and cfg.logger.name == "none"


@pytest.mark.parametrize("model", ["tiny", "tiny_early", "tiny_video", "tiny_video_early"])
def test_the_model_is_the_commands(claims, model):
    script, _ = build_model(_compose([f"model={model}"]).model)
    ours = claims.load_model(model)
    assert tuple(ours.latent_shape) == tuple(script.latent_shape)
    for a, b in ((ours.denoiser, script.denoiser), (ours.weak, script.weak)):
        assert (a is None) == (b is None)
        if a is not None:
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = ours.text_encoder.state_dict(), script.text_encoder.state_dict()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_claims_run_equals_its_command(claims, tmp_path, monkeypatch):
    """End to end on a small set: the run dir claims.py writes holds the images' rows, features and metrics of
    `python scripts/evaluate.py <its run.json overrides>`, and run.json names that command."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    monkeypatch.setitem(claims.SETS, "val", {"prompts": "val", "num_prompts": 4, "seeds": [0, 1]})
    monkeypatch.setitem(claims.SAMPLING, "steps", 3)
    run = claims.Runner("tiny", root=tmp_path / "runs")
    ours = run("val", "s2", {"scale": 4, "omega": 1})
    record = json.loads((ours / "run.json").read_text())
    assert record["command"] == "python scripts/evaluate.py " + " ".join(record["overrides"])
    theirs = tmp_path / "script"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "scripts/evaluate.py", *record["overrides"], "sampler.steps=3",
                        f"hydra.run.dir={theirs}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (ours / "per_image.csv").read_text() == (theirs / "per_image.csv").read_text()
    assert torch.equal(load_file(str(ours / "features.safetensors"))["features"],
                       load_file(str(theirs / "features.safetensors"))["features"])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ours, theirs))
    for m in (a, b):
        m.pop("cost")
    assert a == b
    assert run("val", "s2", {"scale": 4, "omega": 1}) == ours  # a finished run is found, not redone
    import yaml  # config.yaml: evaluate.yaml's keys at the values the command resolves to; model, guider buildable
    mine, script = (yaml.safe_load((d / "config.yaml").read_text()) for d in (ours, theirs))
    assert set(mine) - {"written_by"} == set(script)
    for key in set(script) - {"model", "guidance", "hydra"}:
        assert mine[key] == script[key], key
    from omegaconf import OmegaConf
    pipe, _ = build_model(OmegaConf.create(mine["model"]))
    assert pipe.weak is not None and tuple(pipe.latent_shape) == (3, 32, 32)
    built = [guider_factory(OmegaConf.create(c["guidance"]))(1) for c in (mine, script)]
    assert type(built[0]) is type(built[1]) and vars(built[0]) == vars(built[1])


def test_video_claims_quantities_on_rendered_clips(claims):
    """The motion item's per-clip quantities on clips that follow their prompts exactly: displacement ≈ the truth,
    never too static, the law fits, all correct (rows as per_clip.csv holds them: None as "", lists as JSON)."""
    import json

    from s2g.data.clips import render_prompts
    from s2g.eval.video import score_clips

    prompts = ["a red circle moving left", "a green triangle falling", "a white circle bouncing",
               "a blue square moving up and a yellow triangle moving left", "a purple square standing still"]
    rows = score_clips(render_prompts(prompts, seed=3).videos, prompts)
    csv_rows = [{k: "" if v is None else json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                for r in rows]
    vals = [claims._motion_values(r) for r in csv_rows]
    for v, p in zip(vals, prompts):
        if "still" in p:
            assert v["displacement_ratio"] is None and v["too_static"] is None and v["dynamic_degree"] is None
        else:
            assert 0.6 < v["displacement_ratio"] < 1.4 and v["too_static"] == 0 and v["dynamic_degree"] == 1
        physics = "falling" in p or "bouncing" in p
        assert (v["law_fit"] == 1 and v["law_residual_px"] < 0.5) if physics else v["law_fit"] is None
        assert v["pair_all"] == (1 if " and " in p else None)
    moved = claims._motion_values(dict(csv_rows[0], displacement_px="[0.0]", dynamic="too static"))
    assert moved["displacement_ratio"] == 0 and moved["too_static"] == 1


def test_video_claims_runs_and_tables(claims, tmp_path, monkeypatch):
    """A video model's runs go to its video sets; the tables and the motion claims read them, paired by clip."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("train_tiny_video", ROOT / "scripts" / "train_tiny_video.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / "configs" / "train_tiny_video.yaml")
    cfg.pop("hydra")
    cfg.model = {"dim": 32, "num_layers": 2, "num_heads": 1, "ffn_dim": 64, "freq_dim": 32, "patch_size": [2, 4, 4]}
    cfg.text = {"dim": 16, "depth": 1, "heads": 1, "max_len": 16, "pooled_dim": 16}
    cfg.steps, cfg.batch_size, cfg.warmup, cfg.probe_every, cfg.export_every, cfg.threads = 1, 2, 1, 0, 0, 1
    (tmp_path / "model").mkdir()
    train.train(cfg, tmp_path / "model")
    monkeypatch.setitem(claims.MODELS, "tiny_video", {"checkpoint": tmp_path / "model" / "tiny_video.safetensors",
                                                      "weak_checkpoint": None})
    monkeypatch.setitem(claims.SETS, "video_val", {"prompts": "video_val", "num_prompts": 5, "seeds": [0, 1]})
    monkeypatch.setitem(claims.SAMPLING, "steps", 2)
    run = claims.Runner("tiny_video", root=tmp_path / "runs")
    assert run.count("val") == "10 clips" and run.sets("val") == "prompts=video_val num_prompts=5 seeds=[0,1]"
    a, b = run("val", "s2", {"scale": 4, "omega": 1}), run("val", "cfg", {"scale": 4})
    assert a.parent.name == "video_val" and claims.unit(a) == "clip"
    text = claims.tables([("S²", a, b), ("CFG", b, None)])
    assert text.splitlines()[0].startswith("|  | all correct | Δ all vs CFG | p | direction |")
    assert text.count("\n| S² |") == 3 and text.count("\n| CFG |") == 3
    rows = {r[0]: r for r in claims.claim_rows(claims.claim_stats(a, b))}
    from s2g.eval.report import load_run
    ra, rb = load_run(a)["rows"], load_run(b)["rows"]
    flick = lambda rs: np.mean([float(r["temporal_flickering"]) for r in rs])  # noqa: E731
    assert rows["temporal flickering (all prompts; 1 = no flicker)"][-1] == "10"
    assert rows["temporal flickering (all prompts; 1 = no flicker)"][4].startswith(f"{flick(ra) - flick(rb):+.3f}")
