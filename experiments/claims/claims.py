"""The paper's text-to-image claims on the embedded model, one item per folder of experiments/claims/.

    python experiments/claims/claims.py best                    # Table 1/2: every method tuned on val, test report
    python experiments/claims/claims.py best --model tiny_early # the same on the early checkpoint (the weaker model)
    python experiments/claims/claims.py fixed                   # S² on top of CFG at the same λ (paper's protocol)
    python experiments/claims/claims.py blocks                  # Table 4: number of dropped blocks
    python experiments/claims/claims.py sweeps                  # Fig. 7a/b/e: λ, ω, σ interval
    python experiments/claims/claims.py subnetworks             # Fig. 8: N = 1, 2, 4, 8, quality against cost
    python experiments/claims/claims.py form                    # appendix reading against Algorithm 1
    python experiments/claims/claims.py controls                # placebo, matched-λ CFG, fixed block, ω < 0
    python experiments/claims/claims.py cost                    # Table 5: NFE, work, time, peak memory

The video claims (Table 3, Fig. 1/5) on the embedded video model, with the same items where they apply:

    python experiments/claims/claims.py best --model tiny_video     # Table 3: VIDEO_METHODS tuned on video_val
    python experiments/claims/claims.py fixed --model tiny_video    # S² on CFG at λ 5 (Wan's) and CFG's own λ
    python experiments/claims/claims.py motion --model tiny_video   # dynamics, physics, two-object prompts, consistency
    python experiments/claims/claims.py sweeps --model tiny_video   # ω (0 to 2)
    python experiments/claims/claims.py blocks --model tiny_video   # dropped blocks; also subnetworks, controls, cost

Every image comes from the library scripts/evaluate.py calls (`s2g.eval.run.evaluate` and `write_run`, called
in-process with the objects that command builds, so that a sweep pays Python's start-up once; tests/test_claims.py
checks that they are the same); each run dir holds the exact equivalent command line in run.json, and each
item folder a commands.sh listing them. Runs live in runs/<model>/<set>/<name>/ and are shared between items
(the CFG baseline at λ is one run, whoever needs it). A finished run is never redone, so an interrupted item
resumes where it stopped. Paired differences match (prompt, seed) items, so a 100-prompt ablation pairs with
the first 100 prompts of a 200-prompt baseline.

Protocol (fixed before any test run):
- tuning on VAL (64 val prompts x seeds 0, 1); every method gets one grid of 6 settings (none has nothing to
  tune); the selected setting is the one with the highest all-correct rate, ties to the lower Fréchet distance.
- the report on TEST (the first 200 test prompts x seeds 0, 1, 2 = 600 images per method), paired against CFG;
- ablations (items 3-8) on ABLATION (the first 100 test prompts x seeds 0, 1, 2), around S²'s val-selected
  setting; nothing is chosen on them.
- video: the same rules on video_val (the first 64 val prompts x seed 0), video_test (the first 150 test prompts
  x seeds 0, 1, 2 = 450 clips per method) and video_ablation (those 150 prompts x seed 0), sized for a budget
  of 6 h of one thread for every video item (a clip costs about 1.3 s at 2 NFE a step here); they took 7.6 h.

Every table number carries its 95% interval over prompts (see INTERVALS); runs written before precision/recall
had intervals are rescored from their saved features once (fidelity_rescored.json), and paired differences are
cached next to the run (paired_vs_*.json), so rebuilding every table from finished runs takes minutes. The cost
item keeps its measurements in cost.json, reused likewise.
"""
from __future__ import annotations

from s2g import cli  # first: sets the thread defaults before torch is imported (s2g/cli.py)

cli.one_blas_thread()
import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from s2g import ASSETS  # noqa: E402
from s2g.eval.report import interval as iv  # noqa: E402
from s2g.eval.report import markdown_table as _markdown  # noqa: E402
from s2g.eval.report import plot_adherence_fd  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

SETS = {  # prompt set, number of prompts, seeds: `prompts=... num_prompts=... seeds=[...]` on the command line
    "val": {"prompts": "val", "num_prompts": 64, "seeds": [0, 1]},
    "test": {"prompts": "test", "num_prompts": 200, "seeds": [0, 1, 2]},
    "ablation": {"prompts": "test", "num_prompts": 100, "seeds": [0, 1, 2]},
    # the video model's (experiments/claims/video/claims_video.py): clips cost ~1.3 s each at 2 NFE a step
    "video_val": {"prompts": "video_val", "num_prompts": 64, "seeds": [0]},
    "video_test": {"prompts": "video_test", "num_prompts": 150, "seeds": [0, 1, 2]},
    "video_ablation": {"prompts": "video_test", "num_prompts": 150, "seeds": [0]},
}

# What scripts/evaluate.py builds from the command line, as library arguments (tests/test_claims.py composes the
# Hydra configs and checks each against them):
# model=<name>: the embedded model's loader arguments (configs/model/<name>.yaml);
MODELS = {"tiny": {}, "tiny_early": {"checkpoint": ASSETS / "tiny_early.safetensors", "weak_checkpoint": None},
          "tiny_video": {"weak_checkpoint": ASSETS / "tiny_video_weak.safetensors"},
          "tiny_video_early": {"checkpoint": ASSETS / "tiny_video_early.safetensors", "weak_checkpoint": None}}
LOADERS = {"tiny": "s2g.tiny.load_tiny", "tiny_early": "s2g.tiny.load_tiny",
           "tiny_video": "s2g.tiny_video.load_tiny_video", "tiny_video_early": "s2g.tiny_video.load_tiny_video"}
VIDEO_MODELS = ("tiny_video", "tiny_video_early")  # their items read the video sets (video_val, ...) and VIDEO_METHODS
# sampler=euler (configs/sampler/euler.yaml);
SAMPLING = {"sampler": "euler", "steps": 28, "shift": 3.0}
# guidance=<group>: the class configs/guidance/<group>.yaml names (`_target_`) and the values where that yaml
# differs from the class's own defaults; `seed` where the yaml has one (`seed: ${seed}`), which each image's own
# seed replaces (S² masks).
GROUPS = {
    "none": ("s2g.guidance.Conditional", {}),
    "cfg": ("s2g.guidance.CFG", {"scale": 7.5}),
    "cfgpp": ("s2g.guidance.CFGPlusPlus", {}),
    "apg": ("s2g.guidance.APG", {"scale": 7.5}),
    "cfg_zero_star": ("s2g.guidance.CFGZeroStar", {"scale": 7.5}),
    "autoguidance": ("s2g.guidance.AutoGuidance", {}),
    "slg": ("s2g.guidance.SkipLayerGuidance", {}),
    "pag": ("s2g.guidance.PerturbedAttentionGuidance", {}),
    "seg": ("s2g.guidance.SmoothedEnergyGuidance", {}),
    "s2": ("s2g.guidance.S2Guidance", {"seed": 0}),
    "naive_s2": ("s2g.guidance.S2Guidance", {"num_subnetworks": 4, "seed": 0}),
}

# method -> (guidance config group, grid of guidance.* values). 6 settings each; the Cartesian product in order.
METHODS = {
    "none": ("none", {}),
    "cfg": ("cfg", {"scale": [1.5, 2, 3, 4, 6, 9]}),
    "cfgpp": ("cfgpp", {"scale": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0]}),
    "apg": ("apg", {"scale": [3, 5, 7.5, 10, 15, 20]}),
    "cfg_zero_star": ("cfg_zero_star", {"scale": [1.5, 2, 3, 4, 6, 9]}),
    "autoguidance": ("autoguidance", {"scale": [1.5, 2, 2.5, 3, 4, 6]}),
    "slg": ("slg", {"scale": [3, 4, 6], "skip_scale": [1.5, 3]}),
    "pag": ("pag", {"scale": [3, 4, 6], "perturbed_scale": [1.5, 3]}),
    "seg": ("seg", {"scale": [3, 4, 6], "seg_scale": [1.5, 3]}),
    "s2": ("s2", {"scale": [3, 4, 6], "omega": [0.25, 1], "interval_unit": ["steps"]}),
    "naive_s2": ("naive_s2", {"scale": [3, 4, 6], "omega": [0.25, 1], "interval_unit": ["steps"]}),
}
# The video model's methods (Table 3 of the paper): STG is skip-layer guidance on the video DiT's blocks over the
# whole trajectory (the SLG guider, the middle block of 10), CFG-Zero* with Wan's zero-initialised first step (the
# yaml's zero_init_steps 1). CFG's video_val grid put its best at λ 2 (1.5-9 within each other's intervals), below
# the image grid's range, so the methods whose scale is CFG's λ (APG, STG, S², naive S²) search around 2-4 here;
# these grids were set from that val result, before any of their runs.
VIDEO_METHODS = {
    "none": ("none", {}),
    "cfg": ("cfg", {"scale": [1.5, 2, 3, 4, 6, 9]}),
    "cfgpp": ("cfgpp", {"scale": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0]}),
    "apg": ("apg", {"scale": [1.5, 2, 3, 4, 6, 9]}),
    "cfg_zero_star": ("cfg_zero_star", {"scale": [1.5, 2, 3, 4, 6, 9]}),
    "stg": ("slg", {"scale": [2, 3, 4], "skip_scale": [1, 2], "layers": [[5]], "start": [0.0], "stop": [1.0]}),
    "autoguidance": ("autoguidance", {"scale": [1.5, 2, 2.5, 3, 4, 6]}),
    "s2": ("s2", {"scale": [2, 3, 4], "omega": [0.25, 1], "interval_unit": ["steps"]}),
    "naive_s2": ("naive_s2", {"scale": [2, 3, 4], "omega": [0.25, 1], "interval_unit": ["steps"]}),
}
# S²'s window, named in every S² run's name: runs named without it were made before the window was read as step
# fractions and before each image drew its own masks (σ ∈ [0.1, 0.9], one mask sequence per seed); they stay
# on disk because the tables of the items not rerun since (blocks, sweeps, subnetworks, form) cite them.
S2_WINDOW = {"interval_unit": "steps"}
PAPER = {"scale": 7.5, "omega": 0.25}  # the paper's S² setting on SD3
PAPER_VIDEO = {"scale": 5.0, "omega": 0.25}  # and on Wan (Wan 2.1's own CFG scale)


# ------------------------------------------------------------------------------------------------ running


def fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(fmt(x) for x in v) + "]"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def run_name(group: str, params: dict) -> str:
    return "_".join([group] + [f"{k}={fmt(v)}" for k, v in params.items()]).replace("/", "-")


def set_overrides(subset: str) -> list[str]:
    return [f"{k}={fmt(v)}" for k, v in SETS[subset].items()]


def overrides_for(model: str, subset: str, group: str, params: dict) -> list[str]:
    return [f"model={model}", *set_overrides(subset), f"guidance={group}", "progress=false",
            *[f"{'+' if k.startswith('+') else ''}guidance.{k.lstrip('+')}={fmt(v)}" for k, v in params.items()]]


def load_model(model: str):
    """The pipeline `model=<model>` loads."""
    import importlib

    module, name = LOADERS[model].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**MODELS[model])


def guidance_defaults(model: str) -> dict:
    """configs/model/<model>.yaml's `guidance_defaults` ({group: {key: value}}; tiny_early inherits tiny's)."""
    import yaml

    name = {"tiny_early": "tiny", "tiny_video_early": "tiny_video"}.get(model, model)  # the early ones inherit
    return yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text()).get("guidance_defaults") or {}


def guider_spec(group: str, params: dict) -> dict:
    """`guidance=<group>` with `params` as guidance.* overrides: {"_target_": class path, **arguments} (a `_target_`
    in params replaces the group's class, a `+key` adds a key the yaml lacks)."""
    target, base = GROUPS[group]
    given = {k.lstrip("+"): v for k, v in params.items()}
    return {"_target_": given.pop("_target_", target), **base, **given}


def guider_factory(spec: dict):
    """make_guider(seed), as scripts/evaluate.py's (s2g.config.guider_factory): s2g.guidance.from_spec, and a spec
    with a `seed` (S² masks) takes the image's."""
    from s2g.guidance import from_spec

    def make_guider(seed: int):
        return from_spec(spec, **({"seed": seed} if "seed" in spec else {}))

    return make_guider


class Runner:
    """Runs (or finds) one evaluation per (model, set, guider, params); appends each command to a log."""

    def __init__(self, model: str, commands: Path | None = None, root: Path | None = None):
        self.model, self.commands = model, commands
        self.root = HERE / "runs" / model if root is None else Path(root)  # root: elsewhere (tests)
        self.methods = VIDEO_METHODS if model in VIDEO_MODELS else METHODS
        self.prefix = "video_" if model in VIDEO_MODELS else ""  # items name val/test/ablation: this model's sets
        self.used: dict[Path, None] = {}  # the runs this item asked for, in order
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = load_model(self.model)
        return self._pipe

    def sampling_minutes(self) -> float:
        """The recorded sampling time of every run used (what regenerating them costs, one thread each)."""
        return sum(metrics(r)["cost"][f"seconds_per_{unit(r)}"] * metrics(r)[f"n_{unit(r)}s"] for r in self.used) / 60

    def sets(self, subset: str) -> str:
        """The command-line overrides of this model's `subset` (val, test, ablation)."""
        return " ".join(set_overrides(self.prefix + subset))

    @property
    def intervals(self) -> str:
        return INTERVALS.replace("per image", "per clip").replace("images", "clips") if self.prefix else INTERVALS

    def count(self, subset: str) -> str:
        """"600 images", "450 clips": what one run of `subset` samples."""
        s = SETS[self.prefix + subset]
        return f"{s['num_prompts'] * len(s['seeds'])} {'clips' if self.prefix else 'images'}"

    def dir(self, subset: str, group: str, params: dict) -> Path:
        return self.root / subset / run_name(group, params)

    def __call__(self, subset: str, group: str, params: dict | None = None) -> Path:
        params, subset = dict(params or {}), self.prefix + subset
        out = self.dir(subset, group, params)
        self.used[out] = None
        overrides = overrides_for(self.model, subset, group, params)
        command = " ".join(["python scripts/evaluate.py", *overrides, f"hydra.run.dir={_relative(out, ROOT)}"])
        if self.commands is not None:
            self.commands.parent.mkdir(parents=True, exist_ok=True)
            with open(self.commands, "a") as f:
                f.write(command + "\n")
        if (out / "metrics.json").is_file():
            return out
        if out.exists():  # a run killed mid-way left files behind: write_run() never overwrites, so clear them
            for p in out.iterdir():
                p.unlink()
        t = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {_relative(out, HERE)}", flush=True)
        self.evaluate(out, subset, group, params, overrides)
        print(f"    {time.time() - t:.0f} s", flush=True)
        return out

    def evaluate(self, out: Path, subset: str, group: str, params: dict, overrides: list[str]) -> None:
        """The run `python scripts/evaluate.py <overrides>` makes, through the same library calls."""
        import yaml

        from s2g.eval import work_items
        from s2g.eval.kinds import kind_for_pipe
        from s2g.eval.run import evaluate, write_run

        overrides, spec = with_model_defaults(self.model, group, params, overrides)
        s = SETS[subset]
        items = work_items(kind_for_pipe(self.pipe).prompt_set(s["prompts"], s["num_prompts"]), s["seeds"])
        results = evaluate(self.pipe, guider_factory(spec), items, **SAMPLING, prompt_set=s["prompts"],
                           guidance_name=group, threads=1, progress=False)
        config = run_config(self.model, subset, spec)
        write_run(out, results, config=yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                  overrides=overrides)


def run_config(model: str, subset: str, spec: dict) -> dict:
    """config.yaml of a claims run: configs/evaluate.yaml's keys with the values the run used (what its command
    resolves to), the model and the guider as `_target_` nodes, so that tools reading a run's config build them."""
    import inspect

    from s2g.eval.run import BOOTSTRAP, evaluate

    defaults = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {"guidance": spec, "sampler": {"name": SAMPLING["sampler"], "steps": SAMPLING["steps"],
                                          "shift": SAMPLING["shift"]},
            "model": {"_target_": LOADERS[model],
                      **{k: str(v) if isinstance(v, Path) else v for k, v in MODELS[model].items()}},
            "logger": {"name": "none"}, **SETS[subset], "seed": SETS[subset]["seeds"][0],
            "steps": SAMPLING["steps"], "shift": SAMPLING["shift"],
            **{k: defaults[k] for k in ("batch_size", "scene_metrics", "evaluator", "min_area", "reference_seed")},
            "bootstrap": dict(BOOTSTRAP), "grid": defaults["grid"], "save_images": defaults["save_images"],
            "extra_metrics": {}, "pair": None, "gather": None, "baseline": None, "progress": False, "threads": 1,
            "written_by": "experiments/claims/claims.py, calling the library in-process with what run.json's command "
                          "builds"}


def _relative(path: Path, to: Path) -> Path:
    return path.relative_to(to) if path.is_relative_to(to) else path


def with_model_defaults(model: str, group: str, params: dict, overrides: list[str]) -> tuple[list[str], dict]:
    """As scripts/evaluate.py: the model config's guidance_defaults for the keys `params` leaves unset, appended to
    the overrides (so that run.json's command alone reproduces the run); and the guider spec with them."""
    given = {k.lstrip("+") for k in params}
    applied = {k: v for k, v in (guidance_defaults(model).get(group) or {}).items() if k not in given}
    return overrides + [f"guidance.{k}={fmt(v)}" for k, v in applied.items()], guider_spec(group, {**params, **applied})


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def unit(run: Path) -> str:
    """What a run's metrics.json counts: "image" or "clip" (s2g.eval.kinds)."""
    return "clip" if metrics(run).get("kind") == "video" else "image"


def all_correct(run: Path) -> float:
    return metrics(run)["adherence"]["overall"]["all"]["mean"]


def frechet(run: Path) -> float:
    return metrics(run)["fidelity"]["frechet"]["mean"]


def grid(spec: dict) -> list[dict]:
    import itertools

    keys = list(spec)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(spec[k] for k in keys))] or [{}]


# ------------------------------------------------------------------------------------------------ tables


def paired(a: Path, b: Path) -> dict:
    """A - B on shared (prompt, seed) items, cached next to A as paired_vs_<b's set>_<b>.json (a cache written
    before the precision/recall differences existed is recomputed)."""
    from s2g.eval.report import load_run, paired as paired_runs

    cache = a / f"paired_vs_{b.parent.name}_{b.name}.json"
    if cache.is_file():
        res = json.loads(cache.read_text())
        if "precision" in res:
            return res
    res = paired_runs(load_run(a), load_run(b))
    cache.write_text(json.dumps(res, indent=1))
    return res


def fidelity(run: Path) -> dict:
    """The run's fidelity block with precision/recall intervals: from metrics.json, or for runs written before
    those intervals existed, recomputed from the saved features (cached as fidelity_rescored.json)."""
    f = metrics(run)["fidelity"]
    if "precision_interval" in f:
        for key in ("precision_interval", "recall_interval"):  # runs written before the cut to [0, 1]
            f[key] = dict(f[key], lo=max(f[key]["lo"], 0.0), hi=min(f[key]["hi"], 1.0))
        return f
    cache = run / "fidelity_rescored.json"
    if not cache.is_file():
        from s2g.eval.report import load_run, rescore_fidelity
        from s2g.runinfo import git_revision

        res = rescore_fidelity(load_run(run))
        assert abs(res["frechet"]["mean"] - f["frechet"]["mean"]) < 1e-9 and res["precision"] == f["precision"]
        cache.write_text(json.dumps({"produced_by": f"s2g.eval.report.rescore_fidelity from features.safetensors "
                                                    f"(git {git_revision()})", "fidelity": res}, indent=1))
    return json.loads(cache.read_text())["fidelity"]


ATTRIBUTES = {"count": "count", "color": "colour", "shape": "shape", "relation": "relation"}


def tables(lines: list[tuple[str, Path, Path | None]], base_name: str = "CFG") -> str:
    """Rows (label, run, baseline run or None) as three tables, every number with its 95% interval:
    headline (all correct, FD, precision, recall, NFE; paired Δ to the row's baseline), per attribute (with Δ),
    per prompt family. Clip runs: video_tables."""
    if unit(lines[0][1]) == "clip":
        return video_tables(lines, base_name)
    head = ["", "all correct", f"Δ all vs {base_name}", "p", "FD", "Δ FD", "precision", "Δ P", "recall", "Δ R",
            "NFE"]
    attr_head = ["", *ATTRIBUTES.values(), "relation given found", *[f"Δ {v}" for v in ATTRIBUTES.values()]]
    fams = list(metrics(lines[0][1])["adherence"]["families"])
    body, attr_body, fam_body = [], [], []
    for label, run, base in lines:
        m, f = metrics(run), fidelity(run)
        o = m["adherence"]["overall"]
        pd = paired(run, base) if base is not None and base != run else None
        d = lambda k, digits=3: iv(pd[k], digits, signed=True) if pd and k in pd else "—"  # noqa: E731
        body.append([label, iv(o["all"]), d("all"), f"{pd['all']['p_value']:.3f}" if pd else "—",
                     iv(f["frechet"], 2), d("frechet", 2), iv(f["precision_interval"]), d("precision"),
                     iv(f["recall_interval"]), d("recall"), f"{m['cost']['nfe_per_image']:.0f}"])
        attr_body.append([label, *[iv(o[k]) for k in ATTRIBUTES], iv(o["relation_given_found"]),
                          *[d(k) for k in ATTRIBUTES]])
        fam = m["adherence"]["families"]
        fam_body.append([label, *[iv(fam[k]["all"]) for k in fams]])
    return "\n\n".join([_markdown(head, body), "Per attribute (relation: relational prompts only):",
                         _markdown(attr_head, attr_body), "All correct by prompt family:",
                         _markdown(["", *fams], fam_body)])


VIDEO_HEAD = {"direction": "direction", "dynamic_degree": "dynamic degree", "motion_smoothness": "law fit",
              "count_stable": "count stable", "subject_consistency": "subject consistency",
              "temporal_flickering": "temporal flickering", "color": "colour", "object_class": "object class",
              "multiple_objects": "multiple objects"}


def video_tables(lines: list[tuple[str, Path, Path | None]], base_name: str = "CFG") -> str:
    """Clip runs: headline (all correct, the motion dimensions, FVD analog, NFE; paired Δ), every evaluator
    dimension with its Δ, and all correct per family; every number with its 95% interval. The total is all
    correct (a clip passes every dimension that applies to it), as VBench's total sums its dimensions."""
    head = ["", "all correct", f"Δ all vs {base_name}", "p", "direction", "Δ dir", "dynamic degree", "Δ dyn",
            "law fit", "Δ law", "FVD analog", "Δ FVD", "NFE"]
    dims = list(VIDEO_HEAD)
    dim_head = ["", *VIDEO_HEAD.values(), *[f"Δ {VIDEO_HEAD[k]}" for k in dims]]
    fams = list(metrics(lines[0][1])["adherence"]["families"])
    body, dim_body, fam_body = [], [], []
    for label, run, base in lines:
        m, f = metrics(run), metrics(run)["fidelity"]
        o = m["adherence"]["overall"]
        pd = paired(run, base) if base is not None and base != run else None
        d = lambda k, digits=3: iv(pd[k], digits, signed=True) if pd and k in pd else "—"  # noqa: E731
        body.append([label, iv(o["all"]), d("all"), f"{pd['all']['p_value']:.3f}" if pd else "—",
                     iv(o["direction"]), d("direction"), iv(o["dynamic_degree"]), d("dynamic_degree"),
                     iv(o["motion_smoothness"]), d("motion_smoothness"), iv(f["frechet"], 2), d("frechet", 2),
                     f"{m['cost']['nfe_per_clip']:.0f}"])
        dim_body.append([label, *[iv(o.get(k)) for k in dims], *[d(k) for k in dims]])
        fam = m["adherence"]["families"]
        fam_body.append([label, *[iv(fam[k]["all"]) for k in fams]])
    note = ("Every dimension (law fit: VBench's motion smoothness, the trajectory against the named law; "
            "definitions in s2g/eval/README_video.md):")
    return "\n\n".join([_markdown(head, body), note, _markdown(dim_head, dim_body), "All correct by prompt family:",
                         _markdown(["", *fams], fam_body)])


def table(rows: list[tuple[str, Path]], base: Path | None, base_name: str = "CFG") -> str:
    return tables([(label, run, base) for label, run in rows], base_name)


INTERVALS = ("95% intervals over prompts (a prompt's seeds stay together): bootstrap for the adherence rates and "
             "the Fréchet distance (FD), delete-half jackknife for precision and recall (a bootstrap's duplicated "
             "images would shrink their k-NN radii). Δ = paired difference to the baseline on the same prompts and "
             "noise, with its interval; p = sign-flip test on all correct. NFE is a count, exact: the predictions "
             "the guider asks for per image, the paper's count (naive S² asks for N sub-networks a step; when two "
             "of its masks coincide, the pass runs once, so the cost table's NFE, which counts passes run, is "
             "lower). Cost in time and memory: the cost item (claims/cost/).")


def plot(points: list[tuple], path: Path, title: str, base: Path | None = None) -> None:
    """s2g.eval.report.plot_adherence_fd of runs: all correct against FD per run; and, when a baseline is given
    (or per row as (label, run, base)), the paired differences to it."""
    lines = [(p[0], p[1], p[2] if len(p) > 2 else base) for p in points]
    own = [(label, metrics(r)["adherence"]["overall"]["all"], metrics(r)["fidelity"]["frechet"]) for label, r, _ in lines]
    deltas = [(label, paired(r, b)["all"], paired(r, b)["frechet"]) for label, r, b in lines
              if b is not None and b != r]
    plot_adherence_fd(own, path, title, deltas)


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only: the items run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    print(text)


def setting(params: dict) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in params.items()) or "—"


# ------------------------------------------------------------------------------------------------ items


def tune(run: Runner, methods=None) -> dict:
    """Every method's grid (run.methods) on VAL; the selected setting per method (highest all correct, ties →
    lower FD)."""
    selected, lines = {}, ["| method | setting | val all correct [95% interval] | val FD [95% interval] |",
                           "|---|---|---|---|"]
    for name, (group, spec) in run.methods.items():
        if methods and name not in methods:
            continue
        if name == "autoguidance" and run.model in ("tiny_early", "tiny_video_early"):
            continue  # no weak model matched to the early checkpoint's text encoder
        scored = []
        for params in grid(spec):
            r = run("val", group, params)
            scored.append((-round(all_correct(r), 6), frechet(r), params))
            lines.append(f"| {name} | {setting(params)} | {iv(metrics(r)['adherence']['overall']['all'])} | "
                         f"{iv(metrics(r)['fidelity']['frechet'], 2)} |")
        selected[name] = min(scored, key=lambda s: (s[0], s[1]))[2]
    return selected, "\n".join(lines)


def best(run: Runner, folder: Path) -> None:
    selected, tuning = tune(run)
    (folder / "selected.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "selected.json").write_text(json.dumps(selected, indent=1))
    runs = [(f"{name} ({setting(p)})", run("test", run.methods[name][0], p)) for name, p in selected.items()]
    base = run("test", "cfg", selected["cfg"])
    text = [f"# Best against best ({run.model}): every method at its val-selected setting, on test",
            "", f"Test: {run.sets('test')} ({run.count('test')} per method, 28 Euler steps). Baseline: CFG at its "
            f"val-selected scale. {run.intervals}", "", table(runs, base), "",
            "## Tuning (val: " + run.sets("val") + ")", "", tuning, ""]
    write(folder, "table.md", "\n".join(text))
    plot(runs, folder / "plot.png", f"{run.model}: each method at its val-selected setting (test, {run.count('test')})",
         base)


def s2_selected(model: str) -> dict:
    path = HERE / "best" / model / "selected.json"
    if not path.is_file():
        sys.exit(f"error: {path} missing: run `claims.py best --model {model}` first (S²'s val-selected setting)")
    return json.loads(path.read_text())


def fixed(run: Runner, folder: Path) -> None:
    """S² on top of CFG at the same λ: the paper's λ 7.5 / ω 0.25 (video: λ 5), and at CFG's val-selected λ."""
    sel = s2_selected(run.model)
    paper = PAPER_VIDEO if run.prefix else PAPER
    lam_cfg = sel["cfg"]["scale"]
    points, text = [], [f"# S² on top of CFG at the same λ ({run.model}, test)", "",
                      f"Test: {run.sets('test')} ({run.count('test')}). {run.intervals}", ""]
    for lam in dict.fromkeys([paper["scale"], lam_cfg]):
        base = run("test", "cfg", {"scale": lam})
        rows = [(f"CFG λ {fmt(lam)}", base)]
        for omega in dict.fromkeys([paper["omega"], sel["s2"]["omega"], 1.0]):
            rows.append((f"S² λ {fmt(lam)} ω {fmt(omega)}",
                         run("test", "s2", {"scale": lam, "omega": omega, **S2_WINDOW})))
        text += [f"## λ = {fmt(lam)}" + (" (the paper's)" if lam == paper["scale"] else " (CFG's val-selected)"),
                 "", table(rows, base, f"CFG {fmt(lam)}"), ""]
        points += [(label, r, base) for label, r in rows]
    write(folder, "table.md", "\n".join(text))
    plot(points, folder / "plot.png", f"S² on top of CFG at the same λ ({run.model}, test, {run.count('test')})")


def around_s2(run: Runner, folder: Path, title: str, variants: list[tuple[str, str, dict]], base_params=None):
    """Ablation rows (label, group, guidance params) on ABLATION, against CFG at S²'s selected λ."""
    sel = s2_selected(run.model)["s2"]
    base = run("ablation", "cfg", {"scale": sel["scale"]} if base_params is None else base_params)
    rows = [(f"CFG λ {fmt(sel['scale'])}", base)] + [(lab, run("ablation", g, p)) for lab, g, p in variants]
    text = [f"# {title} ({run.model})", "", f"Ablation set: {run.sets('ablation')} ({run.count('ablation')}); S²'s "
            f"val-selected setting: {setting(sel)}. Baseline: CFG at the same λ. {run.intervals}", "",
            table(rows, base, "CFG"), ""]
    write(folder, "table.md", "\n".join(text))
    plot(rows, folder / "plot.png", f"{title} ({run.model})", base)
    return rows


def blocks(run: Runner, folder: Path) -> None:
    sel = s2_selected(run.model)["s2"]
    depth = 10
    around_s2(run, folder, "Table 4 analog: number of dropped blocks (0 = CFG)",
              [(f"S² drop {k}/{depth}", "s2", dict(sel, drop_ratio=k / depth)) for k in (1, 2, 3, 4)])


def sweeps(run: Runner, folder: Path) -> None:
    sel = s2_selected(run.model)["s2"]
    lam, omega = sel["scale"], sel["omega"]
    omegas = [(f"S² ω {fmt(w)}", "s2", dict(sel, omega=w)) for w in (0.25, 0.5, 1, 2)]
    if run.prefix:  # video: the ω sweep alone (the budget), ω 0 = the CFG row
        write(folder, "table.md", f"# Fig. 7b analog ({run.model}): the ω sweep (omega/table.md); the λ sweep "
              "and the σ interval are run on images only\n")
        around_s2(run, folder / "omega", "Fig. 7b analog: ω sweep (ω 0 = CFG)", omegas)
        return
    write(folder, "table.md", f"# Fig. 7 analogs ({run.model}): the λ sweep (lambda/table.md), the ω sweep "
          "(omega/table.md) and the σ interval (interval/table.md)\n")
    rows = []
    for s in (2, 4, 7.5, 12):
        rows.append((f"CFG λ {fmt(s)}", run("ablation", "cfg", {"scale": s})))
        rows.append((f"S² λ {fmt(s)}", run("ablation", "s2", {"scale": s, "omega": omega})))
    text = [f"# Fig. 7a analog: λ sweep, S² (ω {fmt(omega)}) against CFG ({run.model})", "",
            "Each S² row's Δ is against CFG at its own λ (the row above it).", ""]
    lines = []
    for (lc, c), (ls, s) in zip(rows[::2], rows[1::2]):
        lines += [(lc, c, None), (ls, s, c)]
    text += [INTERVALS, "", tables(lines, "CFG same λ"), ""]
    write(folder / "lambda", "table.md", "\n".join(text))
    plot(lines, folder / "lambda" / "plot.png", f"λ sweep, CFG and S² ω {fmt(omega)} ({run.model})")
    around_s2(run, folder / "omega", "Fig. 7b analog: ω sweep (ω 0 = CFG)", omegas)
    around_s2(run, folder / "interval", "Fig. 7e analog: the σ interval of the S² term",
              [(f"S² window [{a}, {b}] ({sel.get('interval_unit', 'sigma')})", "s2", dict(sel, interval=[a, b]))
               for a, b in ((0.4, 0.6), (0.3, 0.7), (0.1, 0.9), (0.0, 1.0), (0.0, 0.5), (0.5, 1.0))])


def subnetworks(run: Runner, folder: Path) -> None:
    plt = _pyplot()
    sel = s2_selected(run.model)["s2"]
    rows = around_s2(run, folder, "Fig. 8 analog: N sub-networks per step (quality against cost)",
                     [(f"S² N {n}", "s2", dict(sel, num_subnetworks=n)) for n in (1, 2, 4, 8)])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, r in rows:
        m = metrics(r)
        a = m["adherence"]["overall"]["all"]
        nfe = m["cost"][f"nfe_per_{unit(r)}"]
        ax.errorbar(nfe, a["mean"], yerr=[[a["mean"] - a["lo"]], [a["hi"] - a["mean"]]], fmt="o", capsize=2)
        ax.annotate(label, (nfe, a["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"NFE per {unit(rows[0][1])} (28 steps)")
    ax.set_ylabel("all correct")
    ax.grid(alpha=0.3)
    _save(fig, folder / "cost.png")


def form(run: Runner, folder: Path) -> None:
    sel = s2_selected(run.model)["s2"]
    around_s2(run, folder, "Appendix reading (−ω·mean D̂) against Algorithm 1 (−ω·mean(D̂ − D_c))",
              [("S² Algorithm 1", "s2", dict(sel)), ("S² appendix", "s2", dict(sel, form="appendix"))])


def kappa(run: Runner, params: dict) -> float:
    """κ = Σ⟨D̂ − D_c, D_c − D_u⟩ / Σ‖D_c − D_u‖² of S² at `params`, measured on VAL (never on test)."""
    import torch

    from s2g.eval.harness import generate, work_items
    from s2g.guidance.controls import KappaProbe

    torch.set_num_threads(1)
    probes = []

    def make(seed):
        probes.append(KappaProbe(**{k: v for k, v in params.items()}, seed=seed))
        return probes[-1]

    generate(run.pipe, make, work_items(val_prompts(run.model, 64), [0]), batch_size=32, progress=False, **SAMPLING)
    num, den = sum(p._num for p in probes), sum(p._den for p in probes)  # one probe: its sums span both batches
    return num / den


def controls(run: Runner, folder: Path) -> None:
    sel = s2_selected(run.model)["s2"]
    lam, omega = sel["scale"], sel["omega"]
    cache = folder / "kappa.json"
    if cache.is_file():
        k = json.loads(cache.read_text())["kappa"]
    else:
        k = kappa(run, sel)
        folder.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"kappa": k, "setting": sel, "measured_on": "val, 64 prompts, seed 0"}))
    lam_eff = lam - omega * k
    fixed_block = 5  # a middle block of 10 (block 0 is protected in S²)
    variants = [
        ("S²", "s2", dict(sel)),
        ("placebo: noise of the norm of D̂ − D_c", "s2", dict(sel, _target_="s2g.guidance.controls.PlaceboS2")),
        (f"CFG at matched λ_eff {lam_eff:.3f} in S²'s interval", "cfg",
         {"_target_": "s2g.guidance.controls.IntervalCFG", "+inner_scale": round(lam_eff, 4), "scale": lam,
          "interval": [0.1, 0.9], "+interval_unit": "steps"}),
        (f"one fixed dropped block ({fixed_block}) = SLG rule", "slg",
         {"scale": lam, "skip_scale": omega, "layers": [fixed_block], "start": 0.0, "stop": 1.0,
          "interval": [0.1, 0.9], "interval_unit": "steps"}),
        (f"ω < 0 (−{fmt(omega)})", "s2", dict(sel, omega=-omega, **{"+allow_negative_omega": True})),
    ]
    around_s2(run, folder, f"Controls around S² (κ = {k:.4f} on val, λ_eff = λ − ωκ = {lam_eff:.3f})", variants)


def methods_for(model: str) -> dict:
    return VIDEO_METHODS if model in VIDEO_MODELS else METHODS


def val_prompts(model: str, n: int) -> list[str]:
    """The first n prompts of the model's val set (images: val; clips: video_val)."""
    from s2g.data.clips import video_prompt_set
    from s2g.eval.prompts import prompt_set

    return video_prompt_set("val", n) if model in VIDEO_MODELS else prompt_set("val", n)


def _guider(group: str, params: dict, seed: int = 0):
    """The guider `guidance=<group>` with `params` builds for `seed` (no model defaults: every cost row is explicit)."""
    return guider_factory(guider_spec(group, params))(seed)


def _one_run(pipe, guider, cond, uncond, noise) -> dict:
    """One sampling run of a batch: wall time, NFE and block-row work per image (s2g.eval.cost.timed_sampling)."""
    from s2g.eval.cost import timed_sampling
    from s2g.sampling import sd3_sigmas

    r = timed_sampling(pipe.denoiser, guider, cond, uncond, noise, sd3_sigmas(SAMPLING["steps"], SAMPLING["shift"]),
                       sampler=SAMPLING["sampler"], weak=pipe.weak)
    return {"seconds_per_image": r["seconds"] / noise.shape[0], "nfe": r["nfe"], "block_rows": r["block_rows"],
            "weak_block_rows": r["other_block_rows"]}


def cost_worker(model: str, name: str, params: dict) -> None:
    """Fresh process: one batch (cost_batch) of one method; prints its peak RSS (s2g.eval.cost.peak_rss: the high-water
    mark is reset after the model is built, as scripts/benchmark.py does)."""
    import torch

    from s2g.eval.cost import peak_rss

    torch.set_num_threads(1)
    guider = _guider(methods_for(model)[name][0], params)
    pipe = load_model(model)
    cond, uncond = pipe.conditioning(val_prompts(model, cost_batch(model)))
    noise = pipe.noise(cost_batch(model), 0)
    print(json.dumps(peak_rss(lambda: _one_run(pipe, guider, cond, uncond, noise))))


def cost_batch(model: str) -> int:
    """The cost item's batch: 32 images, or 8 clips (a clip is ~30x an image's work here; 8 keeps the video item,
    9 methods x (timing + fresh-process memory) repeats, inside its budget)."""
    return 8 if model in VIDEO_MODELS else 32


def measure_cost(model: str, repeats: int, memory_repeats: int) -> dict:
    import subprocess

    import torch

    torch.set_num_threads(1)
    sel = s2_selected(model)
    sel["naive_s2 N 8"] = dict(sel["s2"], num_subnetworks=8)
    names = list(sel)
    pipe = load_model(model)
    cond, uncond = pipe.conditioning(val_prompts(model, cost_batch(model)))
    noise = pipe.noise(cost_batch(model), 0)
    group = lambda n: methods_for(model)[n.split()[0]][0]  # noqa: E731
    rotate = lambda r: names[r % len(names):] + names[:r % len(names)]  # noqa: E731
    res = {n: [] for n in names}
    for r in range(repeats):
        print(f"[{time.strftime('%H:%M:%S')}] timing repeat {r + 1}/{repeats}", flush=True)
        for n in rotate(r):
            res[n].append(_one_run(pipe, _guider(group(n), sel[n]), cond, uncond, noise))
    mem = {n: [] for n in names}
    for r in range(memory_repeats):
        print(f"[{time.strftime('%H:%M:%S')}] memory repeat {r + 1}/{memory_repeats}", flush=True)
        for n in rotate(r):
            out = subprocess.run([sys.executable, __file__, "cost", "--model", model, "--worker", n, "--params",
                                  json.dumps(sel[n])], capture_output=True, text=True, check=True).stdout
            mem[n].append(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"])
    rows = {}
    for n in names:
        if len({x["nfe"] for x in res[n]}) != 1:
            raise RuntimeError(f"{n}: the NFE differs between repeats of the same batch")
        rows[n] = {"setting": sel[n], "nfe": res[n][0]["nfe"], "block_rows": res[n][0]["block_rows"],
                   "weak_block_rows": res[n][0]["weak_block_rows"],
                   "seconds_per_image": [x["seconds_per_image"] for x in res[n]], "peak_rss_mb": mem[n]}
    return rows


def _median_range(values, digits: int, prefix: str = "") -> str:
    """Median [min, max] of n repeats: [min, max] holds the median with probability 1 − 2·2⁻ⁿ whatever the
    distribution (97% for n = 6, 94% for n = 5)."""
    f = f"{prefix}{{:.{digits}f}}"
    return f"{f.format(np.median(values))} [{f.format(min(values))}, {f.format(max(values))}]"


def cost(run: Runner, folder: Path, repeats: int = 6, memory_repeats: int = 5) -> None:
    """Table 5 analog: per method at its val-selected setting, one batch of val prompts (cost_batch), 28 Euler steps, one
    thread: NFE and block-row work (counts), wall time (`repeats` runs in one process, methods interleaved in a
    rotating order so that load drift hits all; each repeat's ratio to CFG's time in the same repeat) and peak
    RSS (`memory_repeats` fresh processes per method, interleaved likewise). The measurements are kept in
    cost.json and reused, as finished runs are: delete it to measure again."""
    saved = folder / "cost.json"
    data = json.loads(saved.read_text()) if saved.is_file() else {}
    rows = data.get("rows", {})
    if not rows or any(len(r["seconds_per_image"]) != repeats or len(r["peak_rss_mb"]) != memory_repeats
                       for r in rows.values()):
        t = time.time()
        rows = measure_cost(run.model, repeats, memory_repeats)
        data = {"measured_minutes": (time.time() - t) / 60, "rows": rows}
        folder.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(data, indent=1))
    c = rows["cfg"]
    what = "clip" if run.prefix else "image"
    lines = [f"# Table 5 analog: cost per method ({run.model}, one batch of {cost_batch(run.model)} {what}s, 28 Euler "
             "steps, 1 thread)", "",
             f"NFE and work are counts (exact): NFE = network passes run per {what} (naive S²'s coinciding masks "
             f"in a step run once), work = block evaluations per {what} of the main network (the weak "
             "network's are listed apart: Autoguidance's weak model is 2/3 as wide). Time: median [min, max] of "
             f"{repeats} runs, methods interleaved; ×CFG = the same over each repeat's ratio to CFG's run in that "
             f"repeat. Peak RSS during sampling (model weights included): median [min, max] of {memory_repeats} "
             f"fresh processes per method. [min, max] of n repeats holds their median with probability "
             f"1 − 2·2⁻ⁿ ({1 - 2 * 0.5 ** repeats:.0%} for time, {1 - 2 * 0.5 ** memory_repeats:.0%} for memory). "
             "The shared 2-core machine, one thread per process.", "",
             f"| method | setting | NFE | work (×CFG) | weak work | s/{what} | s/{what} ×CFG | peak RSS MB | "
             "peak RSS ×CFG |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        t_ratio = [a / b for a, b in zip(r["seconds_per_image"], c["seconds_per_image"])]
        m_ratio = [a / b for a, b in zip(r["peak_rss_mb"], c["peak_rss_mb"])]
        lines.append(f"| {n} | {setting(r['setting'])} | {r['nfe']} | {r['block_rows']:.0f} "
                     f"(×{r['block_rows'] / c['block_rows']:.3f}) | {r['weak_block_rows']:.0f} | "
                     f"{_median_range(r['seconds_per_image'], 3)} | {_median_range(t_ratio, 2, '×')} | "
                     f"{_median_range(r['peak_rss_mb'], 0)} | {_median_range(m_ratio, 3, '×')} |")
    again = f"python experiments/claims/claims.py cost --model {run.model}"
    lines += ["", f"Regenerate: `{again}` (measuring took {data['measured_minutes']:.0f} min here, the shared 2-core "
              "machine; the measurements are kept in cost.json and reused: delete it to measure again)."]
    (folder / "commands.sh").write_text(again + "\n")
    write(folder, "table.md", "\n".join(lines) + "\n")
    cost_plot(rows, folder / "plot.png", f"cost per method ({run.model}), ratio to CFG: median and [min, max]")


def cost_plot(rows: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    c = rows["cfg"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (key, label) in enumerate([("seconds_per_image", "wall time"), ("peak_rss_mb", "peak RSS")]):
        ratios = [np.array(rows[n][key]) / np.array(c[key]) for n in names]
        med = np.array([np.median(r) for r in ratios])
        err = np.array([med - [r.min() for r in ratios], [r.max() for r in ratios] - med])
        ax.bar(np.arange(len(names)) + (j - 0.5) * 0.4, med, 0.4, yerr=err, capsize=2, label=label)
    ax.plot(np.arange(len(names)), [rows[n]["block_rows"] / c["block_rows"] for n in names], "k_", ms=14,
            label="block work, main network (count)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("× CFG")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def _motion_values(row: dict) -> dict:
    """One clip's measured quantities for the video claims (None where one does not apply): displacement against
    the ground truth (the largest distance from the start, over the middle of the law's range: 1 = the right
    amount of motion), too static, the fit to the named law and its residual (px), all correct, consistency."""
    from s2g.data.clips import displacement_range, parse_video_prompt

    num = lambda k: None if row.get(k, "") == "" else float(row[k])  # noqa: E731
    motions = [m for _, _, m in parse_video_prompt(row["prompt"])]
    shown = json.loads(row["displacement_px"]) if row.get("displacement_px") else []
    ratios = [d / (sum(displacement_range(m)) / 2) for d, m in zip(shown, motions) if d is not None and m != "still"]
    law = [x for x in (json.loads(row["law_residual_px"]) if row.get("law_residual_px") else []) if x is not None]
    physics = row["family"] in ("falling", "bouncing")
    moving = row["family"] != "static"
    return {"displacement_ratio": float(np.mean(ratios)) if ratios else None,
            "dynamic_degree": num("dynamic_degree") if moving else None,
            "too_static": float(row["dynamic"] == "too static") if moving and row.get("dynamic") else None,
            "law_fit": num("motion_smoothness") if physics else None,
            "law_residual_px": float(np.mean(law)) if physics and law else None,
            "pair_all": num("all") if row["family"] == "pair" else None,
            "subject_consistency": num("subject_consistency"), "temporal_flickering": num("temporal_flickering")}


CLAIMS = [  # (key, what it measures, the paper's claim)
    ("displacement_ratio", "displacement / ground truth (moving prompts; 1 = right)", "more pronounced motion"),
    ("dynamic_degree", "dynamic degree (moving prompts: displacement in the law's range)", "more pronounced motion"),
    ("too_static", "share too static (moving prompts)", "more pronounced motion"),
    ("law_fit", "law fit (falling, bouncing: trajectory follows the law)", "physically plausible movement"),
    ("law_residual_px", "law residual px (falling, bouncing; lower = better)", "physically plausible movement"),
    ("pair_all", "all correct, two-object prompts", "complex prompts followed to the end"),
    ("subject_consistency", "subject consistency (all prompts)", "consistency drops slightly (reviewer, 14B)"),
    ("temporal_flickering", "temporal flickering (all prompts; 1 = no flicker)", "consistency drops slightly"),
]


def claim_stats(a: Path, b: Path) -> list[tuple]:
    """Each CLAIMS quantity for runs A and B on their shared (prompt, seed) clips where it applies to both:
    (what, claim, A's mean, B's mean, A − B with its 95% interval over prompts and sign-flip p, clips); the three
    statistics are None where fewer than two prompts apply."""
    from s2g.eval.report import load_run
    from s2g.eval.stats import bootstrap_mean, paired_difference

    ra, rb = load_run(a)["rows"], load_run(b)["rows"]
    index = {(r["seed"], r["prompt"]): r for r in rb}
    pairs = [(_motion_values(r), _motion_values(index[(r["seed"], r["prompt"])]), r["prompt"])
             for r in ra if (r["seed"], r["prompt"]) in index]
    out = []
    for key, what, claim in CLAIMS:
        keep = [(x[key], y[key], c) for x, y, c in pairs if x[key] is not None and y[key] is not None]
        if len({c for _, _, c in keep}) < 2:
            out.append((what, claim, None, None, None, len(keep)))
            continue
        va, vb, cl = (np.array(v) for v in zip(*keep))
        d = paired_difference(va.astype(float), vb.astype(float), cl).as_dict()
        ia, ib = (bootstrap_mean(v.astype(float), cl).as_dict() for v in (va, vb))
        out.append((what, claim, ia, ib, d, len(keep)))
    return out


def claim_rows(stats: list[tuple]) -> list[list[str]]:
    """claim_stats as table rows: quantity, claim, A, B, A − B [95% interval], p, clips."""
    return [[what, claim, "—", "—", "—", "—", str(n)] if d is None else
            [what, claim, iv(ia), iv(ib), iv(d, signed=True), f"{d['p_value']:.3f}", str(n)]
            for what, claim, ia, ib, d, n in stats]


def claims_plot(comparisons: list[tuple[str, list[tuple]]], path: Path, title: str) -> None:
    """Forest plot: each quantity's paired Δ (S² − CFG) with its 95% interval, one colour per comparison (the
    residual in px, the rest as rates or ratios)."""
    plt = _pyplot()
    labels = [what for what, *_ in comparisons[0][1]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    for j, (name, stats) in enumerate(comparisons):
        y = np.arange(len(labels)) + (j - (len(comparisons) - 1) / 2) * 0.25
        for yi, (_, _, _, _, d, _) in zip(y, stats):
            if d is not None:
                ax.errorbar(d["mean"], yi, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o", ms=4,
                            capsize=2, color=f"C{j}", label=name if yi == y[0] else None)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Δ S² − CFG (paired, 95% interval over prompts)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def motion(run: Runner, folder: Path) -> None:
    """The article's video claims as measured quantities, S² against CFG on the same clips: at each method's
    val-selected setting (best against best), and on top of CFG at the same λ (the paper's protocol)."""
    if not run.prefix:
        sys.exit("error: the motion item is for a video model (--model tiny_video)")
    sel = s2_selected(run.model)
    comparisons = [("best against best", run("test", "s2", sel["s2"]), run("test", "cfg", sel["cfg"]),
                    f"S² ({setting(sel['s2'])}) − CFG ({setting(sel['cfg'])})")]
    lam = PAPER_VIDEO["scale"]
    comparisons.append(("the paper's protocol", run("test", "s2", {**PAPER_VIDEO, **S2_WINDOW}),
                        run("test", "cfg", {"scale": lam}), f"S² (λ {fmt(lam)}, ω {fmt(PAPER_VIDEO['omega'])}) − "
                                                            f"CFG (λ {fmt(lam)})"))
    head = ["quantity", "the paper's claim", "S²", "CFG", "Δ S² − CFG", "p", "clips"]
    text = [f"# The video claims, measured ({run.model}, test)", "",
            f"Test: {run.sets('test')} ({run.count('test')} per method). Each quantity on the clips it applies to, "
            "paired by (prompt, seed) on the same noise; 95% bootstrap intervals over prompts, sign-flip p. "
            "Displacement: the largest distance from the start position (the evaluator's track), over the middle "
            "of the named motion's range (s2g.data.clips.displacement_range). Dimensions: s2g/eval/README_video.md.",
            ""]
    stats = [(title, claim_stats(a, b)) for title, a, b, _ in comparisons]
    for (title, _, _, label), (_, st) in zip(comparisons, stats):
        text += [f"## {title}: {label}", "", _markdown(head, claim_rows(st)), ""]
    write(folder, "table.md", "\n".join(text))
    claims_plot(stats, folder / "plot.png", f"the video claims, S² − CFG ({run.model}, test, {run.count('test')})")


ITEMS = {"best": best, "fixed": fixed, "blocks": blocks, "sweeps": sweeps, "subnetworks": subnetworks,
         "form": form, "controls": controls, "cost": cost, "motion": motion}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("item", choices=list(ITEMS))
    ap.add_argument("--model", default="tiny", choices=list(MODELS))
    ap.add_argument("--only", nargs="*", help="best: tune only these methods (no test, no table)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # cost: one method's peak memory, in a fresh process
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return cost_worker(args.model, args.worker.split()[0], json.loads(args.params))
    folder = HERE / args.item / args.model
    commands = folder / "commands.sh"
    if commands.exists():
        commands.unlink()  # rewritten as the item runs: the exact commands of this item's runs
    run = Runner(args.model, commands)
    t = time.time()
    if args.only:
        tune(run, args.only)
    else:
        ITEMS[args.item](run, folder)
        if run.used:
            with open(folder / "table.md", "a") as f:
                f.write(f"\nRegenerate: `python experiments/claims/claims.py {args.item} --model {args.model}` "
                        f"(the exact commands: commands.sh). Its {len(run.used)} runs sample for "
                        f"{run.sampling_minutes():.0f} min on one thread here (their recorded sampling time, the "
                        "shared 2-core machine); finished runs are reused, so an item run after others takes less.\n")
    print(f"{args.item} ({args.model}): {(time.time() - t) / 60:.1f} min")


if __name__ == "__main__":
    main()
