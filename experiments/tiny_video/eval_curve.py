"""The video evaluator's metrics for tiny text-to-video checkpoints along a run: one JSON line per (checkpoint, guider).

    python experiments/tiny_video/eval_curve.py outputs/train_tiny_video/main/exports/tiny_video_001000.safetensors \
        --guiders none cfg:4 --out experiments/tiny_video/eval_curve.jsonl

Each row samples the first `--num-prompts` prompts of the VAL set (val, not test: checkpoints and scales are
chosen on this curve) for every seed in `--seeds`, from the same noise for every guider (paired), 28 Euler steps,
and scores the clips with s2g.eval.video. It keeps the step and training seconds from the checkpoint's header,
the mean of every evaluator dimension, the all-correct rate per family, and the FVD analog against rendered clips
of the same prompts (its floor at this many clips is in s2g/eval/README_video.md). Rows already in `--out` for
the same (checkpoint, guider, prompts, seeds) are skipped, so an interrupted curve resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from s2g.data.clips import render_prompts, video_prompt_set
from s2g.eval.video import VideoEvaluator, frechet_video_distance
from s2g.guidance import CFG, Conditional
from s2g.tiny_video import load_tiny_video

DIMENSIONS = ("all", "found", "count_stable", "color", "object_class", "multiple_objects", "direction",
              "dynamic_degree", "motion_smoothness", "subject_consistency", "temporal_flickering")
REAL_SEED = 99  # the rendered clips the FVD analog compares against (a layout seed no guider row uses)


def make_guider(spec: str):
    """"none" (the conditional prediction alone, one pass) or "cfg:<scale>"."""
    name, _, scale = spec.partition(":")
    if name == "none":
        return Conditional()
    if name == "cfg" and scale:
        return CFG(scale=float(scale))
    raise SystemExit(f"error: guider {spec!r}: use none or cfg:<scale>")


def _mean(values) -> float | None:
    """Mean over the clips a dimension applies to (None where it does not: no direction for a static prompt)."""
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def evaluate_checkpoint(checkpoint: Path, guiders: list[str], prompts: list[str], seeds: list[int], steps: int,
                        evaluator: VideoEvaluator) -> list[dict]:
    with safe_open(str(checkpoint), "pt") as f:
        meta = f.metadata()
    pipe = load_tiny_video(checkpoint, weak_checkpoint=None)
    real = render_prompts(prompts * len(seeds), REAL_SEED, pipe.num_frames, pipe.latent_shape[-1]).videos
    real_feats = evaluator.features(real)
    rows = []
    for spec in guiders:
        t0 = time.time()
        videos = torch.cat([pipe(prompts, make_guider(spec), seed=s, steps=steps, batch_size=32) for s in seeds])
        scores, feats = evaluator.read(videos, prompts * len(seeds))
        row = {"checkpoint": str(checkpoint), "step": int(meta.get("steps", -1)),
               "train_seconds": float(meta.get("train_seconds", "nan")), "guider": spec,
               "num_prompts": len(prompts), "seeds": seeds, "steps": steps,
               "means": {k: _mean([r[k] for r in scores]) for k in DIMENSIONS}}
        fams = sorted({r["family"] for r in scores})
        row["all_by_family"] = {f: round(float(np.mean([r["all"] for r in scores if r["family"] == f])), 4)
                                for f in fams}
        row["fvd"] = {k: round(v, 4) for k, v in frechet_video_distance(real_feats, feats).items()}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--guiders", nargs="+", default=["none", "cfg:4"])
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    for c in args.checkpoints:
        if not c.is_file():
            raise SystemExit(f"error: checkpoint not found: {c}")
    for g in args.guiders:
        make_guider(g)  # bad specs fail before any sampling
    torch.set_num_threads(args.threads)
    prompts = video_prompt_set("val", args.num_prompts)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["checkpoint"], r["guider"], r["num_prompts"], tuple(r["seeds"]), r["steps"]))
    evaluator = VideoEvaluator.load()
    for c in args.checkpoints:
        todo = [g for g in args.guiders
                if (str(c), g, args.num_prompts, tuple(args.seeds), args.steps) not in done]
        if not todo:
            continue
        rows = evaluate_checkpoint(c, todo, prompts, args.seeds, args.steps, evaluator)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
