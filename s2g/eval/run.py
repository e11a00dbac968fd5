"""Running one evaluation: `evaluate(pipe, make_guider, items, ...) -> results`, then `write_run(run_dir, results,
...)` (single process or torchrun). Comparing and reporting finished runs (pair, rescore, gather, tables, plots)
is report.py.

Layout of a run dir: metrics.json, per_image.csv, features.safetensors, samples.png, config.yaml, run.json
(+ images/ when images are saved). report.py reads only those files.
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
from .harness import (_mean_interval, adherence_summary, check_scene_prompts, fidelity_summary, generate, image_rows,
                      reference_renders, shard)

OUTPUTS = ("metrics.json", "per_image.csv", "features.safetensors", "samples.png", "config.yaml", "run.json")
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
    """One guider on (prompt, seed) `items` (`harness.work_items`): images -> per-image rows, evaluator features
    and metrics. Under torchrun every rank generates its share and rank 0 gathers: the same numbers as one process.

    pipe: a TextToImage; make_guider(seed) -> a guider whose own generator (S² masks) follows that seed.
    scene_metrics: "auto" (on when every prompt is in the scene grammar and images are 32x32) | True | False.
    evaluator: "embedded" (s2g/assets/evaluator.safetensors), a path, or a SceneEvaluator.
    bootstrap: {n, fd_n, pr_halves, level, seed} (BOOTSTRAP's values by default).
    extra_metrics: {name: plug-in object} (s2g/eval/plugins.py).
    grid: images kept for samples.png (first seed, first prompts).
    save_images: True | False | "auto" (= scene metrics off); saved as PNG under `images_dir`, by each rank.
    prompt_set: the prompt set's name, recorded in the metrics.
    threads: torch threads for this process (None: leave as is).
    Returns {"metrics", "rows", "features", "grid"} on rank 0 (write it with `write_run`), None on other ranks.
    The defaults are configs/evaluate.yaml's."""
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
    prompts = list(dict.fromkeys(it.prompt for it in items))
    seeds = list(dict.fromkeys(it.seed for it in items))
    if scene_metrics is True:
        check_scene_prompts(prompts)
    # more ranks than items: the same clear error on every rank, before any process group exists
    shard(items, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    scene = scene_metrics is True or (scene_metrics == "auto" and tuple(pipe.latent_shape) == (3, 32, 32)
                                      and _in_grammar(prompts))
    if scene_metrics is True and tuple(pipe.latent_shape) != (3, 32, 32):
        raise ValueError(f"scene_metrics=true needs the embedded 32x32 scene model; this model makes "
                         f"{tuple(pipe.latent_shape)} latents")
    if scene:
        from .evaluator import EVALUATOR_CHECKPOINT, SceneEvaluator
        if not isinstance(evaluator, SceneEvaluator):
            path = EVALUATOR_CHECKPOINT if evaluator == "embedded" else Path(str(evaluator))
            evaluator = SceneEvaluator.load(path, min_area=int(min_area))
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
        detections, feats = evaluator.read(images)
        rows = image_rows(mine, detections)
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
        from ..images import save_png
        Path(images_dir).mkdir(parents=True, exist_ok=True)
        for it, img in zip(mine, images):
            save_png(img, Path(images_dir) / f"seed{it.seed}_{it.prompt_index:05d}.png")
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
    metrics = {"guidance": guidance_name, "prompts": str(prompt_set), "num_prompts": len(prompts), "seeds": seeds,
               "n_images": len(rows), "scene_metrics": scene, "world_size": world}
    if scene:
        metrics["adherence"] = adherence_summary(rows, int(boot["n"]), float(boot["level"]), int(boot["seed"]))
        ref = evaluator.features(reference_renders(items, int(reference_seed))).numpy()
        ref2 = evaluator.features(reference_renders(items, int(reference_seed) + 1)).numpy()
        clusters = np.array([r["prompt_index"] for r in rows])
        metrics["fidelity"] = fidelity_summary(feats.numpy(), ref, ref2, clusters, n_boot=int(boot["fd_n"]),
                                               seeds=np.array([r["seed"] for r in rows]),
                                               level=float(boot["level"]), seed=int(boot["seed"]),
                                               n_halves=int(boot["pr_halves"]))
    metrics["extra"] = _extra_summary(extra_metrics, rows, parts, order, boot)
    total_seconds = sum(p["seconds"] for p in parts)
    metrics["cost"] = {"nfe_per_image": float(np.mean([r["nfe"] for r in rows])),
                       "seconds_per_image": total_seconds / len(rows),
                       "evaluator_seconds_per_image": sum(p["eval_seconds"] for p in parts) / len(rows),
                       "threads_per_process": torch.get_num_threads(), "processes": world,
                       "batch_size": int(batch_size)}
    return {"metrics": metrics, "rows": rows, "features": feats, "grid": kept}


def _in_grammar(prompts) -> bool:
    try:
        check_scene_prompts(prompts)
        return True
    except ValueError:
        return False


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
    """`evaluate`'s results as a run dir: metrics.json, per_image.csv, features.safetensors, samples.png,
    config.yaml (`config`: the run's settings as YAML text) and run.json (git revision, `overrides`, the
    guider's name and `command`, by default `python scripts/evaluate.py <overrides>`: the command line that
    reproduces the run). Never overwrites. Returns run.json's record."""
    from safetensors.torch import save_file

    from ..images import image_grid, save_png

    run_dir = Path(run_dir)
    check_new_run_dir(run_dir)
    metrics, rows, feats, grid = results["metrics"], results["rows"], results["features"], results["grid"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(run_dir / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows)
    save_file({"features": feats.float().contiguous(),
               "index": torch.tensor([r["index"] for r in rows])}, str(run_dir / "features.safetensors"))
    if grid:
        imgs = torch.stack([grid[k] for k in sorted(grid)])
        cols = 8 if len(imgs) >= 8 else len(imgs)
        rows_n = (len(imgs) + cols - 1) // cols
        pad = torch.full((rows_n * cols - len(imgs), *imgs.shape[1:]), 0.5)
        scale = max(1, 96 // imgs.shape[-1])
        save_png(image_grid(torch.cat([imgs, pad]), rows_n, cols, scale=scale), run_dir / "samples.png")
    (run_dir / "config.yaml").write_text(config)
    overrides = list(overrides)
    record = {"git_revision": git_revision(), "overrides": overrides, "guidance": metrics["guidance"],
              "command": command or " ".join(["python", "scripts/evaluate.py", *overrides]),
              "time": time.strftime("%c")}
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {run_dir}: {summary_line(metrics)}")
    return record


def summary_line(m: dict) -> str:
    from .report import interval

    parts = [f"{m['n_images']} images"]
    if m.get("adherence"):
        o = m["adherence"]["overall"]
        parts += [f"all {interval(o['all'])}"]
        parts += [f"{k} {o[k]['mean']:.3f}" for k in ("count", "color", "shape", "relation") if k in o]
    if m.get("fidelity"):
        f = m["fidelity"]
        parts.append(f"FD {f['frechet']['mean']:.2f} (floor {f['frechet_floor']:.2f}) P {f['precision']:.3f} "
                     f"R {f['recall']:.3f}")
    c = m["cost"]
    parts.append(f"NFE {c['nfe_per_image']:.0f}, {c['seconds_per_image']:.3f} s/image")
    return "; ".join(parts)
