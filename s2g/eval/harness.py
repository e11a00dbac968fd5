"""The evaluation harness: (prompt, seed) work items -> images -> per-image rows and features -> metrics.

An image depends only on its (prompt, seed): its initial noise comes from a generator seeded by a hash of
both, and so do its S² masks (the guider seeds one mask generator per row from that hash; a batch holds items of
one seed only, whose guider carries that seed). Every call is padded to `call_rows` rows (the padding rows are
dropped), so every network call has the same shape however the items are split over processes or resumed runs.
`call_rows(items, batch_size)` gives that shape: the batch size, but never more rows than the run's largest
seed group, so a batch size far above the run's size costs no padding beyond what one call would hold. Hence
`torchrun` with any number of ranks gives exactly the single-process images.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.scenes import parse_prompt, render, scene_for_prompt
from . import stats
from .adherence import ATTRIBUTES, score
from .prompts import FAMILIES, family


def item_seed(seed, prompt: str) -> int:
    """A 63-bit seed that is a pure function of (seed, prompt)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{prompt}".encode()).digest()[:8], "little") >> 1


def item_noise(shape, seed: int, prompt: str) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(item_seed(seed, prompt)))


@dataclass(frozen=True)
class Item:
    index: int  # position in the run's (seed-major) item list
    seed: int
    prompt_index: int
    prompt: str


def work_items(prompts: list[str], seeds: list[int]) -> list[Item]:
    """Every (prompt, seed) pair, seed-major: what `evaluate` takes."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    return [Item(k, s, i, p) for k, (s, i, p) in
            enumerate((s, i, p) for s in seeds for i, p in enumerate(prompts))]


def shard(items: list[Item], rank: int, world: int) -> list[Item]:
    if world > len(items):
        raise ValueError(f"{world} ranks but only {len(items)} (prompt, seed) items: use at most {len(items)} ranks")
    return items[rank::world]


@contextlib.contextmanager
def counting_passes(guider):
    """Counts the predictions the guider asks for (its NFE): `counter[0]` after the block."""
    counter = [0]
    original = guider.passes

    def passes(step):
        out = original(step)
        counter[0] += len(out)
        return out

    guider.passes = passes
    try:
        yield counter
    finally:
        del guider.passes  # back to the class method


def call_rows(items: list[Item], batch_size: int) -> int:
    """Rows per sampling call for a run of `items` (all ranks' items): `batch_size`, but at most the largest seed
    group (a batch holds one seed), so padding never goes beyond the rows the run's largest call needs. Every rank
    computes it from the whole item list: the same call shape everywhere."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
    groups: dict[int, int] = {}
    for it in items:
        groups[it.seed] = groups.get(it.seed, 0) + 1
    return max(1, min(int(batch_size), max(groups.values(), default=1)))


def generate(pipe, make_guider, items: list[Item], *, batch_size: int, steps: int, shift: float, sampler: str,
             progress: bool = True, desc: str = "evaluate", rows: int | None = None, on_batch=None):
    """Images [n, C, H, W] in [0, 1] for `items` (in their order), NFE per image, and seconds of sampling.

    make_guider(seed) -> a guider seeded for that seed (S² masks). `batch_size` items per call, each call padded
    to `rows` rows (default `batch_size`; see `call_rows`). on_batch(batch, padded, images, nfe, seconds), if
    given, is called after every call with its items, the padded items and their images (padding included)."""
    rows = int(batch_size if rows is None else rows)
    batch_size = min(int(batch_size), rows)
    out: dict[int, torch.Tensor] = {}
    nfe: dict[int, int] = {}
    seconds = 0.0
    by_seed: dict[int, list[Item]] = {}
    for it in items:
        by_seed.setdefault(it.seed, []).append(it)
    # a context manager: an interrupt closes the bar, so that what is printed next starts on its own line
    with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
        for seed, group in by_seed.items():
            guider = make_guider(seed)
            for i in range(0, len(group), batch_size):
                batch = group[i:i + batch_size]
                padded = batch + [batch[-1]] * (rows - len(batch))  # fixed call shapes: see module docstring
                noise = torch.stack([item_noise(pipe.latent_shape, it.seed, it.prompt) for it in padded])
                t0 = time.perf_counter()
                with counting_passes(guider) as counter:
                    images = pipe([it.prompt for it in padded], guider, noise=noise, steps=steps, shift=shift,
                                  sampler=sampler, batch_size=rows,
                                  row_seeds=[item_seed(it.seed, it.prompt) for it in padded])
                dt = time.perf_counter() - t0
                seconds += dt
                for it, img in zip(batch, images):
                    out[it.index], nfe[it.index] = img, counter[0]
                if on_batch is not None:
                    on_batch(batch, padded, images, counter[0], dt)
                bar.update(len(batch))
    order = [it.index for it in items]
    images = torch.stack([out[k] for k in order]) if order else torch.empty(0)
    return images, [nfe[k] for k in order], seconds


def reference_renders(items: list[Item], reference_seed: int, size: int = 32) -> torch.Tensor:
    """A real render of each item's prompt, in a layout drawn from (reference_seed, seed, prompt)."""
    scenes = [scene_for_prompt(it.prompt, np.random.default_rng(item_seed(f"ref{reference_seed}:{it.seed}",
                                                                          it.prompt)))
              for it in items]
    return render(scenes, size)


def check_scene_prompts(prompts: list[str]) -> None:
    for p in prompts:
        parse_prompt(p)  # one clear ValueError for text outside the grammar


def image_rows(items: list[Item], detections) -> list[dict]:
    rows = []
    for it, dets in zip(items, detections):
        s = score(it.prompt, dets)
        rows.append({"index": it.index, "seed": it.seed, "prompt_index": it.prompt_index, "prompt": it.prompt,
                     "family": family(it.prompt), **s, "n_objects": len(dets),
                     "objects": ";".join(f"{d.color} {d.shape} ({d.x:.2f},{d.y:.2f})" for d in dets)})
    return rows


def _mean_interval(values, clusters, **boot) -> dict:
    """Mean and bootstrap interval over prompts; a single prompt has no interval (lo = hi = None)."""
    values = np.asarray(values, dtype=float)
    if len(set(np.asarray(clusters).tolist())) < 2:
        return {"mean": float(values.mean()), "lo": None, "hi": None, "n": int(len(values))}
    return stats.bootstrap_mean(values, clusters, **boot).as_dict()


def adherence_summary(rows: list[dict], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Every adherence metric, overall and per family, as mean and bootstrap interval over prompts (a prompt's
    seeds stay together), plus relation given found."""
    def block(sub):
        out = {}
        clusters = np.array([r["prompt_index"] for r in sub])
        for a in (*ATTRIBUTES, "found"):
            keep = [i for i, r in enumerate(sub) if r[a] is not None]
            if keep:
                vals = np.array([sub[i][a] for i in keep], dtype=float)
                out[a] = _mean_interval(vals, clusters[keep], n_boot=n_boot, level=level, seed=seed)
        found = [r for r in sub if r["found"] == 1]
        for key in ("relation", "flipped") if found else ():  # the order control: see adherence.py
            out[f"{key}_given_found"] = _mean_interval([r[key] for r in found], [r["prompt_index"] for r in found],
                                                       n_boot=n_boot, level=level, seed=seed)
        out["n_images"] = len(sub)
        out["n_prompts"] = len(set(clusters.tolist()))
        return out

    summary = {"overall": block(rows), "families": {}}
    for fam in FAMILIES:
        sub = [r for r in rows if r["family"] == fam]
        if sub:
            summary["families"][fam] = block(sub)
    relational = [r for r in rows if r["relation"] is not None]
    if relational:
        summary["families"]["relational"] = block(relational)
    summary["per_seed_all"] = {str(s): float(np.mean([r["all"] for r in rows if r["seed"] == s]))
                               for s in sorted({r["seed"] for r in rows})}
    return summary


FIDELITY_K = 3  # k of the k-NN precision / recall


def fidelity_shortfall(clusters, k: int = FIDELITY_K) -> str | None:
    """Why the fidelity block cannot be computed on samples with these prompt labels (one per sample), or None:
    the Fréchet distance's interval resamples prompts (at least 2), and precision / recall need more than k
    samples for a k-th neighbour."""
    clusters = np.asarray(clusters)
    n, c = len(clusters), len(set(clusters.tolist()))
    if c < 2 or n <= k:
        return (f"fidelity (Fréchet distance, precision, recall) needs at least {k + 1} samples of at least 2 "
                f"prompts; this run has {n} of {c}")
    return None


def _half_sample_ok(clusters, k: int) -> bool:
    """The delete-half jackknife keeps half the prompts: its smallest half must still hold more than k samples."""
    sizes = sorted(np.unique(np.asarray(clusters), return_counts=True)[1].tolist())
    return len(sizes) >= 4 and sum(sizes[:len(sizes) - len(sizes) // 2]) > k


def fidelity_summary(gen: np.ndarray, ref: np.ndarray, ref2: np.ndarray, clusters: np.ndarray, k: int = 3,
                     n_boot: int = 200, level: float = 0.95, seed: int = 0, seeds: np.ndarray | None = None,
                     n_halves: int = 100) -> dict:
    """Fréchet distance between generated and real-render features (same prompts), its bootstrap interval over
    prompts, its sampling floor (the same distance between two independent render sets of the same prompts),
    and precision / recall (k-NN manifolds, k = 3). Precision and recall cannot be bootstrapped (a resample's
    duplicated rows shrink the k-NN radii): their intervals come from the delete-half jackknife over prompts
    (`stats.half_sample_interval`, `n_halves` replicates; a prompt's images and renders leave together). Their
    spread per noise seed (`seeds`: each image's seed) is kept too, each on that seed's images and renders."""
    short = fidelity_shortfall(clusters, k)
    if short is not None:
        raise ValueError(short)
    fd = stats.frechet_distance(gen, ref)
    interval = stats.bootstrap_statistic(lambda g, r: stats.frechet_distance(g, r), gen, ref, clusters=clusters,
                                         n_boot=n_boot, level=level, seed=seed).as_dict()
    interval["mean"] = fd  # the point estimate on the full sample; lo/hi from the bootstrap
    precision, recall = stats.precision_recall(ref, gen, k=k)
    out = {"frechet": interval, "frechet_floor": stats.frechet_distance(ref2, ref), "precision": float(precision),
           "recall": float(recall), "feature_dim": int(gen.shape[1]), "n_generated": int(len(gen)),
           "n_reference": int(len(ref)), "k": k}
    if _half_sample_ok(clusters, k):  # else precision / recall come without an interval
        p, r = stats.half_sample_interval(lambda g, f: stats.precision_recall(f, g, k=k), gen, ref,
                                          clusters=clusters, level=level, n_halves=n_halves, seed=seed,
                                          bounds=(0.0, 1.0))
        out["precision_interval"], out["recall_interval"] = p.as_dict(), r.as_dict()
    if seeds is not None and len(set(seeds.tolist())) > 1:
        per = {str(s): [float(v) for v in stats.precision_recall(ref[seeds == s], gen[seeds == s], k=k)]
               for s in sorted(set(seeds.tolist())) if (seeds == s).sum() > k}
        out["precision_recall_per_seed"] = per
    return out
