"""Running one evaluation: `evaluate(pipe, make_guider, items, ...) -> results`, then `write_run(run_dir, results,
...)` (single process or torchrun). Comparing and reporting finished runs (pair, rescore, gather, tables, plots)
is report.py.

Layout of a run dir: metrics.json, per_image.csv (clips: per_clip.csv), features.safetensors, samples.png (clips:
also samples.gif), config.yaml, run.json (+ images/ when samples are saved); metrics.json is written last, so a
dir holding it is a finished run. While the run goes on, partial/ holds its settings and every finished batch
(`open_run_dir`, the `work_dir` of `evaluate`); it is removed once the run's files are written. report.py reads
only those files.
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


PARTIAL = "partial"  # a run dir's sub-directory of finished batches while the run goes on (`evaluate`'s work_dir)
NOT_COMPARED = ("progress", "threads", "logger")  # config keys a resumed run may change: they change no result


def check_new_run_dir(run_dir: Path) -> None:
    """Outputs are never overwritten: FileExistsError if `run_dir` already holds any of a run's files."""
    clash = [n for n in OUTPUTS if (Path(run_dir) / n).exists()]
    if clash:
        raise FileExistsError(f"{run_dir} already holds {', '.join(clash)}; outputs are never overwritten "
                              f"(choose another run dir)")


def open_run_dir(run_dir: Path, config: str, write: bool = True) -> bool:
    """Starts or resumes the run dir of a run whose settings are `config` (YAML text): True when it resumes.

    A dir with metrics.json is finished: FileExistsError. A dir with `partial/config.yaml` holds an interrupted run:
    it resumes when its saved config equals `config` (keys in NOT_COMPARED aside), else ValueError naming the first
    key that differs. Otherwise the dir must hold none of a run's files, and `config` is saved there (`write`:
    one writer, rank 0 under torchrun)."""
    import yaml

    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        raise FileExistsError(f"{run_dir} holds a finished run (metrics.json); outputs are never overwritten "
                              f"(choose another run dir)")
    saved = run_dir / PARTIAL / "config.yaml"
    if saved.is_file():
        old, new = yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(config) or {}
        diff = first_difference(old, new, NOT_COMPARED)
        if diff is not None:
            key, a, b = diff
            raise ValueError(f"{run_dir} holds an interrupted run with other settings: {key} was {a!r}, this "
                             f"command has {b!r}; resume it with its own settings ({saved}) or choose another "
                             f"run dir")
        return True
    check_new_run_dir(run_dir)
    if write:
        _write_atomic(saved, config.encode())
    return False


def first_difference(a, b, ignore=(), prefix: str = ""):
    """(dotted key, a's value, b's value) of the first key where two nested configs differ, in a's key order then
    b's; None when they are equal. Top-level keys in `ignore` are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if not prefix and k in ignore:
                continue
            if k not in a or k not in b:
                return f"{prefix}{k}", a.get(k, "<unset>"), b.get(k, "<unset>")
            d = first_difference(a[k], b[k], ignore, f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def remove_unstarted(run_dir: Path) -> None:
    """Removes what a run that stopped before its first finished batch left: `partial/` without batches, then the
    run dir if empty. A dir holding anything else is left alone."""
    import shutil

    work = Path(run_dir) / PARTIAL
    if work.is_dir() and not any(work.glob("*.safetensors")):
        shutil.rmtree(work, ignore_errors=True)
    try:
        Path(run_dir).rmdir()
    except OSError:
        pass


def finished_items(run_dir: Path) -> int:
    """How many (prompt, seed) items the run in `run_dir` has finished and saved (its partial/ batches)."""
    return len(_load_partial(Path(run_dir) / PARTIAL))


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _plain(obj):
    """JSON for numpy scalars: rows go through JSON whether or not the run is resumed, so both give equal rows."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _save_batch(work: Path, recs: list[dict], seconds: float, eval_seconds: float) -> None:
    """One finished batch as partial/<first item index>.safetensors: features and kept grid samples as tensors,
    rows and timings in the header. The name is unique: a batch holds only items no earlier batch finished."""
    from safetensors.torch import save

    tensors = {"index": torch.tensor([r["row"]["index"] for r in recs]),
               "features": torch.stack([r["feat"] for r in recs]).float().contiguous()}
    for name in recs[0]["extra"]:
        tensors[f"extra.{name}"] = torch.stack([r["extra"][name] for r in recs]).float().contiguous()
    kept = [r for r in recs if r["grid"] is not None]
    if kept:
        tensors["grid"] = torch.stack([r["grid"] for r in kept]).float().contiguous()
        tensors["grid_index"] = torch.tensor([r["row"]["index"] for r in kept])
    meta = {"rows": json.dumps([r["row"] for r in recs]), "seconds": repr(seconds),
            "eval_seconds": repr(eval_seconds), "sample_shape": json.dumps(list(recs[0]["shape"]))}
    _write_atomic(work / f"{recs[0]['row']['index']:07d}.safetensors", save(tensors, metadata=meta))


def _load_partial(work: Path) -> dict[int, dict]:
    """{item index: record} of every finished batch in `work` (a later file wins; equal anyway)."""
    from safetensors import safe_open

    out: dict[int, dict] = {}
    for f in sorted(Path(work).glob("*.safetensors")) if Path(work).is_dir() else []:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata()
            t = {k: fh.get_tensor(k) for k in fh.keys()}
        rows = json.loads(meta["rows"])
        grid = dict(zip(t["grid_index"].tolist(), t["grid"])) if "grid" in t else {}
        share, eval_share = float(meta["seconds"]) / len(rows), float(meta["eval_seconds"]) / len(rows)
        for i, row in enumerate(rows):
            out[row["index"]] = {"row": row, "feat": t["features"][i], "grid": grid.get(row["index"]),
                                 "extra": {k[len("extra."):]: v[i] for k, v in t.items() if k.startswith("extra.")},
                                 "seconds": share, "eval_seconds": eval_share,
                                 "shape": tuple(json.loads(meta["sample_shape"]))}
    return out


def _sample_path(kind, images_dir: Path, it) -> Path:
    return Path(images_dir) / f"seed{it.seed}_{it.prompt_index:05d}{kind.sample_suffix}"


def _check_prompt_text(pipe, kind, prompts: list[str], grammar: bool, prompt_set: str) -> None:
    """Every prompt checked before the first step: against the kind's grammar (`grammar`) and the text encoder's
    vocabulary (an encoder with `check`, the tiny models'); the error names the prompt file's line."""
    check_text = getattr(getattr(pipe, "text_encoder", None), "check", None)
    lines = {}
    if Path(str(prompt_set)).expanduser().is_file():
        from .prompts import prompt_lines

        lines = prompt_lines(prompt_set)
    for i, p in enumerate(prompts):
        try:
            if grammar:
                kind.check_prompts([p])
            if check_text is not None and p != "":
                check_text([p])
        except ValueError as e:
            where = f"{prompt_set}, line {lines[p]}" if p in lines else f"prompt {i + 1} of {prompt_set}"
            raise ValueError(f"{where}: {e}") from None


def _denoiser_config(den):
    """The network config behind a denoiser's wrappers (XPrediction, OnDevice: `.net`), or None."""
    for _ in range(4):
        if den is None:
            return None
        cfg = getattr(den, "config", None)
        if cfg is not None:
            return cfg
        den = getattr(den, "net", None)
    return None


def call_memory(pipe, rows: int, passes: int) -> int | None:
    """A rough estimate, in bytes, of the activations one sampling call of `rows` rows keeps live at once, each
    row run `passes` times (cond, uncond, sub-networks travel together through the block sweep): per row and
    pass, one transformer block's tensors, tokens·(6·width + 2·mlp width) values (q, k, v, attention output,
    residual, the MLP's hidden layer and its activation), at the weights' element size. No tokens² scores: the
    networks attend through torch's scaled_dot_product_attention, whose fused kernels never hold them, so a
    batch that fits is not refused. None when the denoiser does not say its width (nothing is refused then)."""
    cfg = _denoiser_config(pipe.denoiser)
    width = getattr(cfg, "hidden", None) or getattr(cfg, "dim", None)
    patch = getattr(cfg, "patch", None) or getattr(cfg, "patch_size", None)
    if not (width and patch):
        return None
    mlp = getattr(cfg, "ffn_dim", None) or int(width * getattr(cfg, "mlp_ratio", 4.0))
    spatial = tuple(pipe.latent_shape[1:])
    patch = (int(patch),) * len(spatial) if isinstance(patch, int) else tuple(patch)[-len(spatial):]
    tokens = int(np.prod([max(1, s // p) for s, p in zip(spatial, patch)]))
    try:
        size = next(pipe.denoiser.parameters()).element_size()
    except (AttributeError, StopIteration):
        size = 4
    return int(rows) * int(passes) * tokens * (6 * width + 2 * mlp) * size


def available_memory(pipe) -> int | None:
    """Free bytes where the denoiser runs: the GPU's free memory, or the host's MemAvailable (Linux); None if
    unknown."""
    try:
        device = next(pipe.denoiser.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_call_memory(pipe, rows: int, passes: int, batch_size: int, available: int | None = None) -> None:
    """ValueError, with the estimate, when one sampling call (`call_memory`) would not fit in `available` bytes
    (default: `available_memory`)."""
    need = call_memory(pipe, rows, passes)
    available = available_memory(pipe) if available is None else available
    if need is None or available is None or need <= available:
        return
    fits = max(1, int(rows * available // need))
    raise ValueError(f"batch_size={batch_size}: a sampling call of {rows} rows x {passes} passes needs about "
                     f"{need / 2 ** 30:.1f} GiB of activations (a rough estimate from the model config), more than "
                     f"the {available / 2 ** 30:.1f} GiB available; use batch_size={fits} or less")


def _max_passes(make_guider, seed: int, pipe, steps: int, shift: float) -> int:
    """The most passes the guider asks for at any step (its rows per image in one call); 3 if it cannot say
    without sampling."""
    from ..guidance.base import Step

    try:
        guider = make_guider(seed)
        guider.reset(num_blocks=int(pipe.denoiser.num_blocks), rows=[0])
        sig = [float(v) for v in pipe.schedule(int(steps), float(shift))]
        return max(len(guider.passes(Step(i, int(steps), sig[i], sig[i + 1]))) for i in range(int(steps)))
    except Exception:  # noqa: BLE001 - an estimate only: a guider that needs more set up is counted as S²'s 3
        return 3


def evaluate(pipe, make_guider, items, *, batch_size: int = 32, steps: int = 28, shift: float = 3.0,
             sampler: str = "euler", scene_metrics="auto", evaluator="embedded", min_area: int = 10,
             reference_seed: int = 0, bootstrap: dict | None = None, extra_metrics: dict | None = None,
             grid: int = 32, save_images="auto", images_dir: Path | None = None, prompt_set: str = "custom",
             guidance_name: str = "guidance", threads: int | None = 1, progress: bool = True,
             work_dir: Path | None = None) -> dict | None:
    """One guider on (prompt, seed) `items` (`harness.work_items`): samples -> per-sample rows, evaluator features
    and metrics. Under torchrun every rank generates its share and rank 0 gathers: the same numbers as one process.

    pipe: a TextToImage (scenes) or a TextToVideo (clips): the pipeline's kind (kinds.py) picks the evaluator,
        the rows, the references and the summary.
    make_guider(seed) -> a guider whose own generator (S² masks) follows that seed.
    batch_size: items per sampling call; a call is padded to `harness.call_rows` rows (never more than the run's
        largest seed group), and refused up front when it would not fit in memory (`check_call_memory`).
    scene_metrics: the evaluator's metrics: "auto" (on when every prompt is in the kind's grammar and the
        evaluator reads the samples: 32x32 images, square pixel-space clips) | True | False. The fidelity block
        needs at least 4 samples of 2 prompts (`harness.fidelity_shortfall`); a smaller run has none, and says
        why in metrics.json (`fidelity_skipped`).
    evaluator: "embedded" (s2g/assets/evaluator.safetensors; the video evaluator reads frames with it), a path, or
        a SceneEvaluator / VideoEvaluator.
    bootstrap: {n, fd_n, pr_halves, level, seed} (BOOTSTRAP's values by default).
    extra_metrics: {name: plug-in object} (s2g/eval/plugins.py); for clips it is handed [N, F, 3, H, W].
    grid: samples kept for samples.png (clips: also samples.gif) (first seed, first prompts).
    save_images: True | False | "auto" (= metrics off); each sample under `images_dir`, by each rank (images PNG,
        clips MP4). A file there that this run did not write is never overwritten: refused before sampling.
    prompt_set: the prompt set's name, recorded in the metrics (a file: errors name its line).
    threads: torch threads for this process (None: leave as is).
    work_dir: where every finished batch is saved as it finishes (rows, features, kept samples; atomically); the
        same call again skips what is there, and ends with the results of an uninterrupted run.
    Returns {"metrics", "rows", "features", "grid"} on rank 0 (write it with `write_run`), None on other ranks.
    The defaults are configs/evaluate.yaml's."""
    from .harness import call_rows, fidelity_shortfall
    from .kinds import KINDS, kind_for_pipe

    boot = {**BOOTSTRAP, **(bootstrap or {})}
    extra_metrics = dict(extra_metrics or {})
    if threads is not None:
        torch.set_num_threads(int(threads))
    if not items:
        raise ValueError("no (prompt, seed) items to evaluate")
    if int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    rows_per_call = call_rows(items, int(batch_size))  # refuses batch_size < 1
    if scene_metrics not in ("auto", True, False):
        raise ValueError(f"scene_metrics must be auto, true or false, got {scene_metrics!r}")
    if save_images not in ("auto", True, False):
        raise ValueError(f"save_images must be auto, true or false, got {save_images!r}")
    kind = kind_for_pipe(pipe)
    if any(str(prompt_set) in k.prompt_sets for k in KINDS.values() if k is not kind):
        kind.prompt_set(str(prompt_set))  # a named set of the other kind: its one-line refusal
    prompts = list(dict.fromkeys(it.prompt for it in items))
    seeds = list(dict.fromkeys(it.seed for it in items))
    # every prompt, before any sampling (a bad last line of a file must not cost the samples before it)
    _check_prompt_text(pipe, kind, prompts, scene_metrics is True or kind.grammar_only(pipe.latent_shape),
                       str(prompt_set))
    # more ranks than items: the same clear error on every rank, before any process group exists
    shard(items, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    unreadable = kind.readable(pipe.latent_shape)
    scene = scene_metrics is True or (scene_metrics == "auto" and unreadable is None and kind.in_grammar(prompts))
    if scene_metrics is True and unreadable is not None:
        raise ValueError(unreadable)
    fidelity_skipped = fidelity_shortfall([it.prompt_index for it in items]) if scene else None
    save = save_images is True or (save_images == "auto" and not scene)
    if save and images_dir is None:
        raise ValueError("save_images needs an images_dir")
    check_call_memory(pipe, rows_per_call, _max_passes(make_guider, items[0].seed, pipe, steps, shift),
                      int(batch_size))
    work = Path(work_dir) if work_dir is not None else None
    done = _load_partial(work) if work is not None else {}
    for k, rec in done.items():  # a partial/ of other items: not this run's
        it = items[k] if 0 <= k < len(items) else None
        if it is None or (rec["row"]["seed"], rec["row"]["prompt"]) != (it.seed, it.prompt):
            raise ValueError(f"{work} holds results for other items than this run's (item {k}); choose another "
                             f"run dir")
    if save:  # a sample file that is there and not of an item this run finished was not written by this run
        done = {k: r for k, r in done.items() if _sample_path(kind, images_dir, items[k]).exists()}
        clash = [p for it in items if it.index not in done and (p := _sample_path(kind, images_dir, it)).exists()]
        if clash:
            more = f" (and {len(clash) - 1} more of this run's sample files)" if len(clash) > 1 else ""
            raise FileExistsError(f"{clash[0]} exists{more}; outputs are never overwritten (choose another run dir)")
    if scene:
        evaluator = kind.load_evaluator(evaluator, int(min_area))
        if fidelity_skipped:
            print(f"{guidance_name}: {fidelity_skipped}: metrics.json gets adherence only")
    rank, world = _distributed()
    mine = shard(items, rank, world)
    todo = [it for it in mine if it.index not in done]
    if done and rank == 0:
        print(f"{guidance_name}: resuming: {len(done)} of {len(items)} items already finished in {work}")
    fps = float(getattr(pipe, "fps", 16.0))

    def finish_batch(batch, padded, images, nfe, seconds):
        t0 = time.perf_counter()
        n = len(batch)
        if scene:  # the evaluator reads the padded call too: its shapes, like the sampler's, never vary
            rows, feats = kind.read(evaluator, padded, images)
            rows, feats = rows[:n], feats[:n]
        else:
            feats = torch.zeros(n, 0)
            rows = [{"index": it.index, "seed": it.seed, "prompt_index": it.prompt_index, "prompt": it.prompt}
                    for it in batch]
        images = images[:n]
        extra = {}
        for name, metric in extra_metrics.items():
            values = metric.per_image(images, [it.prompt for it in batch]) if hasattr(metric, "per_image") else {}
            for key, v in (values or {}).items():
                for row, x in zip(rows, np.asarray(v, dtype=float).tolist()):
                    row[f"{name}.{key}"] = x
            if hasattr(metric, "features"):
                extra[name] = metric.features(images).float().cpu()
        for row in rows:
            row["nfe"] = nfe
        rows = json.loads(json.dumps(rows, default=_plain))
        if save:
            for it, img in zip(batch, images):
                path = _sample_path(kind, images_dir, it)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".tmp{os.getpid()}_{path.name}")  # the suffix tells the writer the format
                kind.save_sample(img, tmp.with_suffix(""), fps=fps)
                os.replace(tmp, path)
        recs = [{"row": row, "feat": feats[i].float().cpu(), "extra": {k: v[i] for k, v in extra.items()},
                 "grid": images[i].float().cpu() if it.seed == seeds[0] and it.prompt_index < int(grid) else None,
                 "shape": tuple(images.shape[1:])} for i, (it, row) in enumerate(zip(batch, rows))]
        eval_seconds = time.perf_counter() - t0
        if work is not None:  # after the samples: a batch on disk has its sample files
            _save_batch(work, recs, seconds, eval_seconds)
        for rec in recs:
            rec["seconds"], rec["eval_seconds"] = seconds / n, eval_seconds / n
            done[rec["row"]["index"]] = rec

    generate(pipe, make_guider, todo, batch_size=int(batch_size), steps=int(steps), shift=float(shift),
             sampler=sampler, progress=bool(progress) and rank == 0, rows=rows_per_call, on_batch=finish_batch,
             desc=f"{guidance_name} [{rank}/{world}]" if world > 1 else guidance_name)
    recs = [done[it.index] for it in mine]
    part = {"rows": [r["row"] for r in recs], "feats": torch.stack([r["feat"] for r in recs]),
            "grid": {r["row"]["index"]: r["grid"] for r in recs if r["grid"] is not None},
            "extra": {name: torch.stack([r["extra"][name] for r in recs]) for name in recs[0]["extra"]},
            "seconds": sum(r["seconds"] for r in recs), "eval_seconds": sum(r["eval_seconds"] for r in recs),
            "shape": recs[0]["shape"]}
    parts = _gather(part, world)
    if rank != 0:
        return None
    order = np.argsort([r["index"] for p in parts for r in p["rows"]])
    rows = [[r for p in parts for r in p["rows"]][i] for i in order]
    feats = torch.cat([p["feats"] for p in parts])[torch.from_numpy(order)]
    kept = {k: v for p in parts for k, v in p["grid"].items()}
    unit, sample_shape = kind.unit, tuple(parts[0]["shape"])
    metrics = {"guidance": guidance_name, "prompts": str(prompt_set), "num_prompts": len(prompts), "seeds": seeds,
               f"n_{unit}s": len(rows), f"{kind.name}_metrics": scene, "world_size": world,
               **kind.header(sample_shape)}
    if scene:
        metrics["adherence"] = kind.adherence(rows, boot)
        if fidelity_skipped:
            metrics["fidelity_skipped"] = fidelity_skipped
        else:
            ref = kind.reference(evaluator, items, int(reference_seed), sample_shape)
            ref2 = kind.reference(evaluator, items, int(reference_seed) + 1, sample_shape)
            metrics["fidelity"] = kind.fidelity(feats.numpy(), ref, ref2, rows, boot)
    metrics["extra"] = _extra_summary(extra_metrics, rows, parts, order, boot)
    total_seconds = sum(p["seconds"] for p in parts)
    metrics["cost"] = {f"nfe_per_{unit}": float(np.mean([r["nfe"] for r in rows])),
                       f"seconds_per_{unit}": total_seconds / len(rows),
                       f"evaluator_seconds_per_{unit}": sum(p["eval_seconds"] for p in parts) / len(rows),
                       "threads_per_process": torch.get_num_threads(), "processes": world,
                       "batch_size": int(batch_size), "rows_per_call": rows_per_call}
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
    # last, and whole or not at all: a dir with metrics.json is a finished run (open_run_dir)
    _write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=1).encode())
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
