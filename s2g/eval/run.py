"""Running one evaluation: `evaluate(pipe, make_guider, items, ...) -> results`, then `write_run(run_dir, results,
...)` (single process or torchrun). Comparing and reporting finished runs (pair, rescore, gather, tables, plots)
is report.py.

Layout of a run dir: metrics.json, per_image.csv (clips: per_clip.csv), features.safetensors, samples.png (clips:
also samples.gif), config.yaml, run.json (+ images/ when samples are saved). report.py reads only those files.
What differs between images and clips is one object per kind (kinds.py).
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..runinfo import git_revision
from . import stats
from .harness import _mean_interval, generate, shard

OUTPUTS = ("metrics.json", "per_image.csv", "per_clip.csv", "features.safetensors", "samples.png", "samples.gif",
           "config.yaml", "run.json")
BOOTSTRAP = {"n": 2000, "fd_n": 200, "pr_halves": 100, "level": 0.95, "seed": 0}  # configs/evaluate.yaml's


# ------------------------------------------------------------------------------------------- torch.distributed


def _distributed() -> tuple[int, int]:
    """(rank, world) under torchrun (gloo on CPU, nccl on GPU), (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------- evaluation


def check_new_run_dir(run_dir: Path) -> None:
    """Outputs are never overwritten: FileExistsError if `run_dir` already holds any of a run's files."""
    clash = [n for n in OUTPUTS if (Path(run_dir) / n).exists()]
    if clash:
        raise FileExistsError(f"{run_dir} already holds {', '.join(clash)}; outputs are never overwritten "
                              f"(choose another run dir)")


def evaluate(pipe, make_guider, items, *, batch_size: int = 32, steps: int = 28, shift: float = 3.0,
             sampler: str = "euler", scene_metrics="auto", evaluator="embedded", min_area: int = 10,
             reference_seed: int = 0, bootstrap: dict | None = None, extra_metrics: dict | None = None,
             grid: int = 32, save_images="auto", images_dir: Path | None = None, prompt_set: str = "custom",
             guidance_name: str = "guidance", threads: int | None = 1, progress: bool = True) -> dict | None:
    """One guider on (prompt, seed) `items` (`harness.work_items`): samples -> per-sample rows, evaluator features
    and metrics. Under torchrun every rank generates its share and rank 0 gathers: the same numbers as one process.

    pipe: a TextToImage (scenes) or a TextToVideo (clips): the pipeline's kind (kinds.py) picks the evaluator,
        the rows, the references and the summary.
    make_guider(seed) -> a guider whose own generator (S² masks) follows that seed.
    scene_metrics: the evaluator's metrics: "auto" (on when every prompt is in the kind's grammar and the
        evaluator reads the samples: 32x32 images, square pixel-space clips) | True | False.
    evaluator: "embedded" (s2g/assets/evaluator.safetensors; the video evaluator reads frames with it), a path, or
        a SceneEvaluator / VideoEvaluator.
    bootstrap: {n, fd_n, pr_halves, level, seed} (BOOTSTRAP's values by default).
    extra_metrics: {name: plug-in object} (s2g/eval/plugins.py); for clips it is handed [N, F, 3, H, W].
    grid: samples kept for samples.png (clips: also samples.gif) (first seed, first prompts).
    save_images: True | False | "auto" (= metrics off); each sample under `images_dir`, by each rank (images PNG,
        clips MP4).
    prompt_set: the prompt set's name, recorded in the metrics.
    threads: torch threads for this process (None: leave as is).
    Returns {"metrics", "rows", "features", "grid"} on rank 0 (write it with `write_run`), None on other ranks.
    The defaults are configs/evaluate.yaml's."""
    from .kinds import KINDS, kind_for_pipe

    boot = {**BOOTSTRAP, **(bootstrap or {})}
    extra_metrics = dict(extra_metrics or {})
    if threads is not None:
        torch.set_num_threads(int(threads))
    if not items:
        raise ValueError("no (prompt, seed) items to evaluate")
    if scene_metrics not in ("auto", True, False):
        raise ValueError(f"scene_metrics must be auto, true or false, got {scene_metrics!r}")
    if save_images not in ("auto", True, False):
        raise ValueError(f"save_images must be auto, true or false, got {save_images!r}")
    kind = kind_for_pipe(pipe)
    if any(str(prompt_set) in k.prompt_sets for k in KINDS.values() if k is not kind):
        kind.prompt_set(str(prompt_set))  # a named set of the other kind: its one-line refusal
    prompts = list(dict.fromkeys(it.prompt for it in items))
    seeds = list(dict.fromkeys(it.seed for it in items))
    if scene_metrics is True or kind.grammar_only(pipe.latent_shape):
        kind.check_prompts(prompts)  # every prompt, before any sampling
    # more ranks than items: the same clear error on every rank, before any process group exists
    shard(items, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    unreadable = kind.readable(pipe.latent_shape)
    scene = scene_metrics is True or (scene_metrics == "auto" and unreadable is None and kind.in_grammar(prompts))
    if scene_metrics is True and unreadable is not None:
        raise ValueError(unreadable)
    if scene:
        evaluator = kind.load_evaluator(evaluator, int(min_area))
    save = save_images is True or (save_images == "auto" and not scene)
    if save and images_dir is None:
        raise ValueError("save_images needs an images_dir")
    rank, world = _distributed()
    mine = shard(items, rank, world)

    images, nfe, seconds = generate(pipe, make_guider, mine, batch_size=int(batch_size), steps=int(steps),
                                    shift=float(shift), sampler=sampler, progress=bool(progress) and rank == 0,
                                    desc=f"{guidance_name} [{rank}/{world}]" if world > 1 else guidance_name)
    t_eval = time.perf_counter()
    if scene:
        rows, feats = kind.read(evaluator, mine, images)
    else:
        feats = torch.zeros(len(mine), 0)
        rows = [{"index": it.index, "seed": it.seed, "prompt_index": it.prompt_index, "prompt": it.prompt}
                for it in mine]
    extra_feats = {}
    for name, metric in extra_metrics.items():
        values = metric.per_image(images, [it.prompt for it in mine]) if hasattr(metric, "per_image") else {}
        for key, v in (values or {}).items():
            for row, x in zip(rows, np.asarray(v, dtype=float).tolist()):
                row[f"{name}.{key}"] = x
        if hasattr(metric, "features"):
            extra_feats[name] = metric.features(images).float().cpu()
    for row, n in zip(rows, nfe):
        row["nfe"] = n
    if save:
        Path(images_dir).mkdir(parents=True, exist_ok=True)
        for it, img in zip(mine, images):
            kind.save_sample(img, Path(images_dir) / f"seed{it.seed}_{it.prompt_index:05d}",
                             fps=float(getattr(pipe, "fps", 16.0)))
    kept = {it.index: img for it, img in zip(mine, images) if it.seed == seeds[0] and it.prompt_index < int(grid)}
    eval_seconds = time.perf_counter() - t_eval
    parts = _gather({"rows": rows, "feats": feats, "grid": kept, "extra": extra_feats, "seconds": seconds,
                     "eval_seconds": eval_seconds}, world)
    if rank != 0:
        return None
    order = np.argsort([r["index"] for p in parts for r in p["rows"]])
    rows = [[r for p in parts for r in p["rows"]][i] for i in order]
    feats = torch.cat([p["feats"] for p in parts])[torch.from_numpy(order)]
    kept = {k: v for p in parts for k, v in p["grid"].items()}
    unit, sample_shape = kind.unit, tuple(images.shape[1:])
    metrics = {"guidance": guidance_name, "prompts": str(prompt_set), "num_prompts": len(prompts), "seeds": seeds,
               f"n_{unit}s": len(rows), f"{kind.name}_metrics": scene, "world_size": world,
               **kind.header(sample_shape)}
    if scene:
        metrics["adherence"] = kind.adherence(rows, boot)
        ref = kind.reference(evaluator, items, int(reference_seed), sample_shape)
        ref2 = kind.reference(evaluator, items, int(reference_seed) + 1, sample_shape)
        metrics["fidelity"] = kind.fidelity(feats.numpy(), ref, ref2, rows, boot)
    metrics["extra"] = _extra_summary(extra_metrics, rows, parts, order, boot)
    total_seconds = sum(p["seconds"] for p in parts)
    metrics["cost"] = {f"nfe_per_{unit}": float(np.mean([r["nfe"] for r in rows])),
                       f"seconds_per_{unit}": total_seconds / len(rows),
                       f"evaluator_seconds_per_{unit}": sum(p["eval_seconds"] for p in parts) / len(rows),
                       "threads_per_process": torch.get_num_threads(), "processes": world,
                       "batch_size": int(batch_size)}
    return {"metrics": metrics, "rows": rows, "features": feats, "grid": kept}


def _extra_summary(extra: dict, rows: list[dict], parts: list, order, boot: dict) -> dict:
    out = {}
    clusters = np.array([r["prompt_index"] for r in rows])
    for name, metric in extra.items():
        summary = {}
        for key in [k for k in rows[0] if k.startswith(f"{name}.")]:
            summary[key[len(name) + 1:]] = _mean_interval([r[key] for r in rows], clusters, n_boot=int(boot["n"]),
                                                          level=float(boot["level"]), seed=int(boot["seed"]))
        if hasattr(metric, "features") and hasattr(metric, "reference_stats"):
            feats = torch.cat([p["extra"][name] for p in parts])[torch.from_numpy(order)].double().numpy()
            mu, cov = metric.reference_stats()
            summary["frechet"] = stats.frechet_from_stats(*stats.gaussian_stats(feats), mu, cov)
            summary["feature_dim"] = int(feats.shape[1])
        out[name] = summary
    return out


def write_run(run_dir: Path, results: dict, *, config: str, overrides: list[str], command: str | None = None) -> dict:
    """`evaluate`'s results as a run dir: metrics.json, per_image.csv (clips: per_clip.csv), features.safetensors,
    samples.png (clips: also samples.gif), config.yaml (`config`: the run's settings as YAML text) and run.json (git
    revision, `overrides`, the guider's name and `command`, by default `python scripts/evaluate.py <overrides>`:
    the command line that reproduces the run). Never overwrites. Returns run.json's record."""
    from safetensors.torch import save_file

    from .kinds import kind_of

    run_dir = Path(run_dir)
    check_new_run_dir(run_dir)
    metrics, rows, feats, grid = results["metrics"], results["rows"], results["features"], results["grid"]
    kind = kind_of(metrics)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(run_dir / kind.rows_file, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows)
    save_file({"features": feats.float().contiguous(),
               "index": torch.tensor([r["index"] for r in rows])}, str(run_dir / "features.safetensors"))
    if grid:
        prompt_of = {r["index"]: r["prompt"] for r in rows}
        kind.write_grid(run_dir, torch.stack([grid[k] for k in sorted(grid)]), [prompt_of[k] for k in sorted(grid)])
    (run_dir / "config.yaml").write_text(config)
    overrides = list(overrides)
    record = {"git_revision": git_revision(), "overrides": overrides, "guidance": metrics["guidance"],
              "command": command or " ".join(["python", "scripts/evaluate.py", *overrides]),
              "time": time.strftime("%c")}
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {run_dir}: {summary_line(metrics)}")
    return record


def summary_line(m: dict) -> str:
    from .kinds import kind_of

    kind = kind_of(m)
    unit = kind.unit
    parts = [f"{m[f'n_{unit}s']} {unit}s", *kind.summary_parts(m)]
    if m.get("fidelity"):
        f = m["fidelity"]
        parts.append(f"FD {f['frechet']['mean']:.2f} (floor {f['frechet_floor']:.2f}) P {f['precision']:.3f} "
                     f"R {f['recall']:.3f}")
    c = m["cost"]
    parts.append(f"NFE {c[f'nfe_per_{unit}']:.0f}, {c[f'seconds_per_{unit}']:.3f} s/{unit}")
    return "; ".join(parts)
