"""What scripts/evaluate.py runs: one evaluation (single process or torchrun), `gather` over a sweep, and `pair`.

Layout of a run dir: metrics.json, per_image.csv, features.safetensors, samples.png, config.yaml, run.json
(+ images/ when images are saved). `gather` and `pair` read only those files.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ..runinfo import build_model, git_revision
from . import stats
from .harness import (Item, _mean_interval, adherence_summary, check_scene_prompts, fidelity_summary, generate,
                      image_rows, reference_renders, shard, work_items)
from .prompts import prompt_set

OUTPUTS = ("metrics.json", "per_image.csv", "features.safetensors", "samples.png", "config.yaml", "run.json")
TABLE_METRICS = ("all", "count", "color", "shape", "relation", "relation_given_found", "flipped_given_found")


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


def evaluate(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, guidance_name: str = "guidance"):
    import hydra

    torch.set_num_threads(int(cfg.threads))
    clash = [n for n in OUTPUTS if (run_dir / n).exists()]
    if clash:
        raise FileExistsError(f"{run_dir} already holds {', '.join(clash)}; outputs are never overwritten "
                              f"(choose another hydra.run.dir)")
    prompts = prompt_set(str(cfg.prompts), cfg.num_prompts)
    seeds = [int(s) for s in (cfg.seeds if OmegaConf.is_list(cfg.seeds) else [cfg.seeds])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    if cfg.scene_metrics not in ("auto", True, False):
        raise ValueError(f"scene_metrics must be auto, true or false, got {cfg.scene_metrics!r}")
    if cfg.scene_metrics is True:
        check_scene_prompts(prompts)
    items = work_items(prompts, seeds)
    # more ranks than items: the same clear error on every rank, before any process group exists
    shard(items, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    def make_guider(seed: int):
        g = OmegaConf.to_container(cfg.guidance, resolve=False)
        if "seed" in g:
            g["seed"] = seed  # the guider's own generator (S² masks) follows the image's seed
        return hydra.utils.instantiate(OmegaConf.create(g))

    make_guider(seeds[0])  # bad guider parameters fail before the model loads
    extra = {name: hydra.utils.instantiate(c) for name, c in (cfg.extra_metrics or {}).items()}
    pipe, _ = build_model(cfg.model)
    scene = cfg.scene_metrics is True or (cfg.scene_metrics == "auto" and tuple(pipe.latent_shape) == (3, 32, 32)
                                          and _in_grammar(prompts))
    if cfg.scene_metrics is True and tuple(pipe.latent_shape) != (3, 32, 32):
        raise ValueError(f"scene_metrics=true needs the embedded 32x32 scene model; this model makes "
                         f"{tuple(pipe.latent_shape)} latents")
    evaluator = None
    if scene:
        from .evaluator import EVALUATOR_CHECKPOINT, SceneEvaluator
        path = EVALUATOR_CHECKPOINT if cfg.evaluator == "embedded" else Path(str(cfg.evaluator))
        evaluator = SceneEvaluator.load(path, min_area=int(cfg.min_area))
    rank, world = _distributed()
    mine = shard(items, rank, world)
    save_images = cfg.save_images is True or (cfg.save_images == "auto" and not scene)

    images, nfe, seconds = generate(pipe, make_guider, mine, batch_size=int(cfg.batch_size), steps=int(cfg.steps),
                                    shift=float(cfg.shift), sampler=cfg.sampler.name,
                                    progress=bool(cfg.progress) and rank == 0,
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
    for name, metric in extra.items():
        values = metric.per_image(images, [it.prompt for it in mine]) if hasattr(metric, "per_image") else {}
        for key, v in (values or {}).items():
            for row, x in zip(rows, np.asarray(v, dtype=float).tolist()):
                row[f"{name}.{key}"] = x
        if hasattr(metric, "features"):
            extra_feats[name] = metric.features(images).float().cpu()
    for row, n in zip(rows, nfe):
        row["nfe"] = n
    if save_images:
        from ..pipeline import save_png
        (run_dir / "images").mkdir(exist_ok=True)
        for it, img in zip(mine, images):
            save_png(img, run_dir / "images" / f"seed{it.seed}_{it.prompt_index:05d}.png")
    grid = {it.index: img for it, img in zip(mine, images) if it.seed == seeds[0] and it.prompt_index < int(cfg.grid)}
    eval_seconds = time.perf_counter() - t_eval
    parts = _gather({"rows": rows, "feats": feats, "grid": grid, "extra": extra_feats, "seconds": seconds,
                     "eval_seconds": eval_seconds}, world)
    if rank != 0:
        return None
    order = np.argsort([r["index"] for p in parts for r in p["rows"]])
    rows = [[r for p in parts for r in p["rows"]][i] for i in order]
    feats = torch.cat([p["feats"] for p in parts])[torch.from_numpy(order)]
    grid = {k: v for p in parts for k, v in p["grid"].items()}
    metrics = {"guidance": guidance_name, "prompts": str(cfg.prompts), "num_prompts": len(prompts), "seeds": seeds,
               "n_images": len(rows), "scene_metrics": scene, "world_size": world}
    boot = cfg.bootstrap
    if scene:
        metrics["adherence"] = adherence_summary(rows, int(boot.n), float(boot.level), int(boot.seed))
        ref = evaluator.features(reference_renders(items, int(cfg.reference_seed))).numpy()
        ref2 = evaluator.features(reference_renders(items, int(cfg.reference_seed) + 1)).numpy()
        clusters = np.array([r["prompt_index"] for r in rows])
        metrics["fidelity"] = fidelity_summary(feats.numpy(), ref, ref2, clusters, n_boot=int(boot.fd_n),
                                               seeds=np.array([r["seed"] for r in rows]),
                                               level=float(boot.level), seed=int(boot.seed),
                                               n_halves=int(boot.pr_halves))
    metrics["extra"] = _extra_summary(extra, rows, parts, order, boot)
    total_seconds = sum(p["seconds"] for p in parts)
    metrics["cost"] = {"nfe_per_image": float(np.mean([r["nfe"] for r in rows])),
                       "seconds_per_image": total_seconds / len(rows),
                       "evaluator_seconds_per_image": sum(p["eval_seconds"] for p in parts) / len(rows),
                       "threads_per_process": int(cfg.threads), "processes": world,
                       "batch_size": int(cfg.batch_size)}
    _write(run_dir, cfg, metrics, rows, feats, grid, overrides or [], guidance_name)
    return metrics


def _in_grammar(prompts) -> bool:
    try:
        check_scene_prompts(prompts)
        return True
    except ValueError:
        return False


def _extra_summary(extra: dict, rows: list[dict], parts: list, order, boot) -> dict:
    out = {}
    clusters = np.array([r["prompt_index"] for r in rows])
    for name, metric in extra.items():
        summary = {}
        for key in [k for k in rows[0] if k.startswith(f"{name}.")]:
            summary[key[len(name) + 1:]] = _mean_interval([r[key] for r in rows], clusters, n_boot=int(boot.n),
                                                          level=float(boot.level), seed=int(boot.seed))
        if hasattr(metric, "features") and hasattr(metric, "reference_stats"):
            feats = torch.cat([p["extra"][name] for p in parts])[torch.from_numpy(order)].double().numpy()
            mu, cov = metric.reference_stats()
            summary["frechet"] = stats.frechet_from_stats(*stats.gaussian_stats(feats), mu, cov)
            summary["feature_dim"] = int(feats.shape[1])
        out[name] = summary
    return out


def _write(run_dir: Path, cfg, metrics, rows, feats, grid, overrides, guidance_name) -> None:
    from safetensors.torch import save_file

    from ..pipeline import image_grid, save_png

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
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    record = {"git_revision": git_revision(), "overrides": overrides, "guidance": guidance_name,
              "command": " ".join(["python", "scripts/evaluate.py", *overrides]), "time": time.strftime("%c")}
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    if cfg.logger.name == "wandb":
        import wandb

        run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
                         tags=list(cfg.logger.tags), dir=str(run_dir),
                         config={**OmegaConf.to_container(cfg, resolve=True), **record})
        run.log({"metrics": _flat(metrics), "samples": wandb.Image(str(run_dir / "samples.png"))})
        run.finish()
    print(f"wrote {run_dir}: {summary_line(metrics)}")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def summary_line(m: dict) -> str:
    parts = [f"{m['n_images']} images"]
    if m.get("adherence"):
        o = m["adherence"]["overall"]
        parts += [f"all {_fmt(o['all'])}"]
        parts += [f"{k} {o[k]['mean']:.3f}" for k in ("count", "color", "shape", "relation") if k in o]
    if m.get("fidelity"):
        f = m["fidelity"]
        parts.append(f"FD {f['frechet']['mean']:.2f} (floor {f['frechet_floor']:.2f}) P {f['precision']:.3f} "
                     f"R {f['recall']:.3f}")
    c = m["cost"]
    parts.append(f"NFE {c['nfe_per_image']:.0f}, {c['seconds_per_image']:.3f} s/image")
    return "; ".join(parts)


# -------------------------------------------------------------------------------------------- paired / gather


def load_run(path: Path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "metrics.json").is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (not a finished evaluate.py run)")
    with open(path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml")) if (path / "config.yaml").is_file() else {}
    return {"dir": path, "metrics": json.loads((path / "metrics.json").read_text()), "rows": rows, "config": config,
            "features": load_file(str(path / "features.safetensors"))["features"].double().numpy(),
            "run": json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}}


def paired(a: dict, b: dict, n_boot: int = 2000, level: float = 0.95, seed: int = 0, fd_boot: int = 200,
           pr_halves: int = 100) -> dict:
    """A - B on the (prompt, seed) items both runs share: every adherence metric (mean difference, cluster
    bootstrap interval over prompts, sign-flip p-value), and, when both runs have scene features, the Fréchet
    distance difference FD(A, ref) - FD(B, ref) against the same real renders of those items, on a shared
    bootstrap of prompts, and the precision and recall differences on a shared delete-half jackknife."""
    key = lambda r: (r["seed"], r["prompt"])  # noqa: E731
    ib = {key(r): i for i, r in enumerate(b["rows"])}
    pairs = [(i, ib[key(r)]) for i, r in enumerate(a["rows"]) if key(r) in ib]
    if not pairs:
        raise ValueError(f"{a['dir']} and {b['dir']} share no (prompt, seed) items")
    ia, jb = (np.array(x) for x in zip(*pairs))
    clusters = np.array([a["rows"][i]["prompt"] for i in ia])
    out = {"a": str(a["dir"]), "b": str(b["dir"]), "n_pairs": len(pairs)}
    for m in ("all", "count", "color", "shape", "relation"):
        va = [a["rows"][i].get(m, "") for i in ia]
        vb = [b["rows"][j].get(m, "") for j in jb]
        keep = [k for k in range(len(va)) if va[k] != "" and vb[k] != ""]
        if keep:
            d = stats.paired_difference(np.array([float(va[k]) for k in keep]), np.array([float(vb[k]) for k in keep]),
                                        clusters[keep], n_boot=n_boot, level=level, seed=seed)
            out[m] = d.as_dict()
    fa, fb = a["features"][ia], b["features"][jb]
    if fa.shape[1] and fb.shape[1] and a["metrics"].get("fidelity") and len(set(clusters.tolist())) > 1:
        from .evaluator import SceneEvaluator
        items = [Item(k, int(a["rows"][i]["seed"]), int(a["rows"][i]["prompt_index"]), a["rows"][i]["prompt"])
                 for k, i in enumerate(ia)]
        ref_seed = int(a["config"].get("reference_seed", 0))
        ref = SceneEvaluator.load().features(reference_renders(items, ref_seed)).double().numpy()
        diff = lambda x, y, r: stats.frechet_distance(x, r) - stats.frechet_distance(y, r)  # noqa: E731
        d = stats.bootstrap_statistic(diff, fa, fb, ref, clusters=clusters, n_boot=fd_boot, level=level,
                                      seed=seed).as_dict()
        d["mean"] = diff(fa, fb, ref)
        out["frechet"] = d
        if len(set(clusters.tolist())) >= 4:
            k = int(a["metrics"]["fidelity"].get("k", 3))
            pr_diff = lambda x, y, r: np.subtract(stats.precision_recall(r, x, k=k),  # noqa: E731
                                                  stats.precision_recall(r, y, k=k))
            dp, dr = stats.half_sample_interval(pr_diff, fa, fb, ref, clusters=clusters, level=level,
                                                n_halves=pr_halves, seed=seed)
            out["precision"], out["recall"] = dp.as_dict(), dr.as_dict()
    return out


def rescore_fidelity(run: dict) -> dict:
    """A finished run's fidelity block recomputed from its saved features by today's `fidelity_summary` (with the
    run's own reference seed and bootstrap settings): for runs written before a statistic was added."""
    from .evaluator import SceneEvaluator

    if not run["features"].shape[1]:
        raise ValueError(f"{run['dir']}: no scene features (scene_metrics was off); nothing to rescore")
    rows, cfg = run["rows"], run["config"]
    items = [Item(int(r["index"]), int(r["seed"]), int(r["prompt_index"]), r["prompt"]) for r in rows]
    ref_seed, boot = int(cfg.get("reference_seed", 0)), cfg.get("bootstrap", {})
    evaluator = SceneEvaluator.load()
    ref, ref2 = (evaluator.features(reference_renders(items, s)).double().numpy() for s in (ref_seed, ref_seed + 1))
    return fidelity_summary(run["features"], ref, ref2, np.array([int(r["prompt_index"]) for r in rows]),
                            n_boot=int(boot.get("fd_n", 200)), level=float(boot.get("level", 0.95)),
                            seed=int(boot.get("seed", 0)), seeds=np.array([int(r["seed"]) for r in rows]),
                            n_halves=int(boot.get("pr_halves", 100)))


def pair(dirs, boot) -> dict:
    if dirs is None or len(dirs) != 2:
        raise ValueError(f"pair needs two run dirs: pair=[<run A>,<run B>], got {dirs}")
    a, b = (load_run(Path(str(d))) for d in dirs)
    out_path = a["dir"] / f"paired_vs_{Path(str(dirs[1])).name}.json"
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; outputs are never overwritten")
    res = paired(a, b, int(boot.n), float(boot.level), int(boot.seed), int(boot.fd_n), int(boot.pr_halves))
    out_path.write_text(json.dumps(res, indent=1))
    for m in ("all", "count", "color", "shape", "relation", "frechet", "precision", "recall"):
        if m in res:
            r = res[m]
            p = f"  p = {r['p_value']:.3g}" if r.get("p_value") is not None else ""
            print(f"{m:9s} A-B {r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{p}")
    print(f"wrote {out_path} ({res['n_pairs']} paired images)")
    return res


def _fmt(d: dict | None) -> str:
    if not d:
        return ""
    return f"{d['mean']:.3f}" if d["lo"] is None else f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def gather(sweep: Path, baseline: str | None = None) -> list[dict]:
    """Every finished run under `sweep` -> summary.csv, summary.md and summary.png (adherence against Fréchet
    distance, one point per run, with intervals), plus paired differences to `baseline` if given."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"gather: not a directory: {sweep}")
    outs = [sweep / n for n in ("summary.csv", "summary.md", "summary.png")]
    if any(p.exists() for p in outs):
        raise FileExistsError(f"{sweep} already holds a summary; outputs are never overwritten")
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    if not runs:
        raise FileNotFoundError(f"gather: no runs with metrics.json under {sweep}")
    base = None
    if baseline is not None:
        if not (sweep / str(baseline) / "metrics.json").is_file():
            raise ValueError(f"baseline {baseline!r} is not a finished run under {sweep}")
        base = load_run(sweep / str(baseline))
    records = {d: json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {} for d in runs}
    runs.sort(key=lambda d: (records[d].get("guidance", ""), d.name))  # one guider's runs together
    # Hydra writes a multirun's bools as True, a single run's as typed: compare case-blind
    common = set.intersection(*({o.lower() for o in r.get("overrides", [])} for r in records.values()))
    table = []
    for d in runs:
        m = json.loads((d / "metrics.json").read_text())
        swept = [o for o in records[d].get("overrides", []) if o.lower() not in common]  # what differs
        row = {"run": d.name, "guidance": m.get("guidance"), "overrides": " ".join(swept)}
        o = (m.get("adherence") or {}).get("overall", {})
        for k in TABLE_METRICS:
            if k in o:
                row[k], row[f"{k}_lo"], row[f"{k}_hi"] = o[k]["mean"], o[k]["lo"], o[k]["hi"]
        f = m.get("fidelity")
        if f:
            row.update(frechet=f["frechet"]["mean"], frechet_lo=f["frechet"]["lo"], frechet_hi=f["frechet"]["hi"],
                       frechet_floor=f["frechet_floor"], precision=f["precision"], recall=f["recall"])
            for k in ("precision", "recall"):  # runs written before these intervals show the value alone
                row[f"{k}_lo"], row[f"{k}_hi"] = (f.get(f"{k}_interval", {}).get(b) for b in ("lo", "hi"))
        row.update(nfe=m["cost"]["nfe_per_image"], seconds_per_image=m["cost"]["seconds_per_image"],
                   n_images=m["n_images"])
        if base is not None and d.name != str(baseline):
            p = paired(load_run(d), base)
            for k in ("all", "relation", "shape"):
                if k in p:
                    row[f"d_{k}"], row[f"d_{k}_lo"], row[f"d_{k}_hi"] = p[k]["mean"], p[k]["lo"], p[k]["hi"]
        table.append(row)
    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(outs[0], "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(table)
    lines = [f"# {sweep}", "", "95% bootstrap intervals over prompts." +
             (f" Δ = paired difference to `{baseline}` (same prompts, same noise)." if base else ""), ""]
    head = ["run", "all", "count", "color", "shape", "relation", "rel. given found", "flipped given found",
            "FD (floor)", "P", "R", "NFE", "s/img"] + (["Δ all", "Δ relation"] if base else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        iv = lambda k: _fmt({"mean": r[k], "lo": r[f"{k}_lo"], "hi": r[f"{k}_hi"]}) if k in r else ""  # noqa: E731
        cells = [f"{r['run']} ({r['overrides']})" if r["overrides"] else r["run"], iv("all"), iv("count"), iv("color"),
                 iv("shape"), iv("relation"), iv("relation_given_found"), iv("flipped_given_found"),
                 f"{r['frechet']:.2f} ({r['frechet_floor']:.2f})" if "frechet" in r else "",
                 iv("precision"), iv("recall"),
                 f"{r['nfe']:.0f}", f"{r['seconds_per_image']:.3f}"]
        if base:
            cells += [f"{r['d_all']:+.3f} [{r['d_all_lo']:+.3f}, {r['d_all_hi']:+.3f}]" if "d_all" in r else "—",
                      f"{r['d_relation']:+.3f} [{r['d_relation_lo']:+.3f}, {r['d_relation_hi']:+.3f}]"
                      if "d_relation" in r else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    outs[1].write_text("\n".join(lines) + "\n")
    _plot(table, outs[2])
    print("\n".join(lines))
    print(f"wrote {outs[0]}, {outs[1].name}, {outs[2].name}")
    return table


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in table:
        if "all" not in r or "frechet" not in r:
            continue
        err = lambda k: [[r[k] - (r[f"{k}_lo"] if r[f"{k}_lo"] is not None else r[k])],  # noqa: E731
                         [(r[f"{k}_hi"] if r[f"{k}_hi"] is not None else r[k]) - r[k]]]
        ax.errorbar(r["frechet"], r["all"], yerr=err("all"), xerr=err("frechet"), fmt="o", capsize=2)
        ax.annotate(r["overrides"] or r["run"], (r["frechet"], r["all"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("Fréchet distance to real renders (evaluator features; lower is better)")
    ax.set_ylabel("all correct (higher is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use scripts/evaluate.py")
