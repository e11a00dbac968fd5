"""The video evaluator's accuracy on rendered clips it never saw, and its response to edits with known answers.

    OMP_NUM_THREADS=1 python experiments/eval/video_accuracy.py --out experiments/eval/video_accuracy

Writes results.json and results.md there:
1. clean: random clips of the whole grammar (the training data's mix), seed 10⁶: every metric per family, and the
   errors of the tracks against the ground truth (centroid, displacement, velocity, acceleration, bounce);
2. corrupted: the same clips with blur and fresh pixel noise per frame (generator-like): every metric;
3. edits of the clean clips, each with the set of metrics it must fail (time reversal, a mirror, a static clip
   labelled moving, the wrong law, a moving clip labelled static): the share of clips failing exactly that set;
4. the Fréchet video distance between two independent render sets of the test prompts (its sampling floor) at
   300 and 1200 clips, and against reversed, mirrored and motionless clips of the same prompts.
One thread, about 5 minutes.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from s2g.data.clips import (DIRECTIONS, FAMILIES, PHRASES, REF_SIZE, Clip, render_clips, render_prompts, sample_clips,
                            video_prompt_set)
from s2g.eval.video import ATTRIBUTES, VideoEvaluator, frechet_video_distance

SEED = 10**6  # never used for training data (training draws its own seeds from 0 up)


def means(rows: list[dict]) -> dict:
    out = {}
    for a in ATTRIBUTES:
        vals = [r[a] for r in rows if r[a] is not None]
        out[a] = round(float(np.mean(vals)), 4) if vals else None
    return out


def by_family(rows: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r["family"]].append(r)
    return {fam: {"n": len(groups[fam]), **means(groups[fam])} for fam in FAMILIES if groups[fam]}


def truth_errors(rows: list[dict], clips) -> dict:
    """Track against ground truth, reference px and frames: per-frame centroid error, largest-displacement error,
    fitted velocity (directions), acceleration (falling), restitution, impact time and gravity (bouncing)."""
    err = defaultdict(list)
    for row, clip in zip(rows, clips):
        truth = clip.positions() * REF_SIZE
        for obj, det, pos in zip(clip.objects, row["objects"], truth):
            track = np.array([[np.nan, np.nan] if q is None else q for q in det["track"]])
            seen = ~np.isnan(track).any(1)
            err["centroid_px"] += np.hypot(*(track[seen] - pos[seen]).T).tolist()
            d_true = float(np.hypot(*(pos - pos[0]).T).max())
            err["displacement_px"].append(abs(det["displacement_px"] - d_true))
            law = det["law"]
            if obj.motion in DIRECTIONS:
                err["velocity_px_per_frame"].append(float(np.hypot(law["velocity"][0] - obj.vx,
                                                                     law["velocity"][1] - obj.vy)))
            elif obj.motion == "falling":
                err["acceleration_px_per_frame2"].append(abs(law["acceleration"] - obj.g))
            elif obj.motion == "bouncing":
                err["restitution"].append(abs(law["restitution"] - obj.restitution))
                err["impact_time_frames"].append(abs(law["t_bounce"] - obj.t_bounce))
                err["bounce_gravity_px_per_frame2"].append(abs(law["g"] - obj.g))
                err["floor_gap_px"].append(abs(law["floor_gap_px"]))
    return {k: {"mean": round(float(np.mean(v)), 4), "p95": round(float(np.quantile(v, 0.95)), 4),
                "max": round(float(np.max(v)), 4), "n": len(v)} for k, v in err.items()}


def corrupt(videos: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian blur (σ 0.7 px) and fresh N(0, 0.03²) pixel noise on every frame."""
    g = torch.Generator().manual_seed(seed)
    k = torch.exp(-torch.arange(-2, 3, dtype=torch.float32) ** 2 / (2 * 0.7 ** 2))
    k = k / k.sum()
    x = videos.flatten(0, 2)[:, None]
    x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), (k[:, None] * k[None])[None, None])
    x = x.view(videos.shape) + 0.03 * torch.randn(videos.shape, generator=g)
    return x.clamp(0, 1)


def exact_failures(rows: list[dict], expected) -> dict:
    """Share of clips whose failing metrics are exactly expected(row) (plus "all" when any fails), and each
    metric's failure rate."""
    hits = 0
    fail = defaultdict(int)
    for r in rows:
        got = {a for a in ATTRIBUTES if r[a] == 0}
        want = set(expected(r))
        hits += got == (want | {"all"} if want else set())
        for a in got:
            fail[a] += 1
    return {"n": len(rows), "exactly_expected": round(hits / len(rows), 4),
            "failure_rate": {a: round(fail[a] / len(rows), 4) for a in ATTRIBUTES if fail[a]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/eval/video_accuracy")
    ap.add_argument("--n", type=int, default=1200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = VideoEvaluator.load()
    res = {"n": args.n, "seed": SEED, "frames": 8, "size": 32}

    # 1. clean renders
    batch = sample_clips(args.n, SEED)
    rows = ev.score(batch.videos, batch.prompts, details=True)
    residuals = [x for r in rows for x in r["law_residual_px"]]
    res["clean"] = {"all_families": means(rows), "by_family": by_family(rows),
                    "truth_errors": truth_errors(rows, batch.clips),
                    "law_residual_px": {"mean": round(float(np.mean(residuals)), 4),
                                        "max": round(float(np.max(residuals)), 4)}}
    print(f"clean {time.time() - t0:.0f}s", res["clean"]["all_families"], flush=True)

    # 2. corrupted
    crow = ev.score(corrupt(batch.videos, SEED), batch.prompts)
    res["corrupted"] = {"all_families": means(crow), "by_family": by_family(crow),
                        "flicker_mean": round(float(np.mean([r["flicker"] for r in crow])), 4)}
    print(f"corrupted {time.time() - t0:.0f}s", res["corrupted"]["all_families"], flush=True)

    # 3. edits with known answers
    edits = {}

    def reversed_expect(r):  # a reversed bounce still goes down then up, but gains energy (restitution 1.25)
        return ({"direction"} if r["family"] in ("direction", "pair", "falling") else
                {"motion_smoothness"} if r["family"] == "bouncing" else set())

    edits["reversed in time"] = exact_failures(ev.score(batch.videos.flip(1), batch.prompts), reversed_expect)
    edits["mirrored left-right"] = exact_failures(
        ev.score(batch.videos.flip(-1), batch.prompts),
        lambda r: {"direction"} if ("left" in r["prompt"] or "right" in r["prompt"]) else set())
    rng = np.random.default_rng(SEED + 3)
    objs = [p.rsplit(" ", 2)[0] for p in video_prompt_set("test") if p.endswith("standing still")]
    objs = [objs[i] for i in rng.integers(len(objs), size=200)]
    dirs = [PHRASES[list(DIRECTIONS)[i]] for i in rng.integers(4, size=200)]
    still = render_prompts([f"{o} standing still" for o in objs], SEED + 4)
    edits["static labelled moving"] = exact_failures(ev.score(still.videos, [f"{o} {d}" for o, d in zip(objs, dirs)]),
                                                     lambda r: {"direction", "dynamic_degree"})
    moving = render_prompts([f"{o} {d}" for o, d in zip(objs, dirs)], SEED + 5)
    edits["moving labelled standing still"] = exact_failures(
        ev.score(moving.videos, [f"{o} standing still" for o in objs]),
        lambda r: {"dynamic_degree", "motion_smoothness"})
    down = render_prompts([f"{o} moving down" for o in objs[:100]], SEED + 6)
    edits["moving down labelled falling"] = exact_failures(ev.score(down.videos, [f"{o} falling" for o in objs[:100]]),
                                                           lambda r: {"motion_smoothness"})
    fall = render_prompts([f"{o} falling" for o in objs[100:]], SEED + 7)
    edits["falling labelled moving down"] = exact_failures(
        ev.score(fall.videos, [f"{o} moving down" for o in objs[100:]]), lambda r: {"motion_smoothness"})
    res["edits"] = edits
    print(f"edits {time.time() - t0:.0f}s", json.dumps(edits), flush=True)

    # 4. Fréchet video distance: floor and sensitivity, test prompts x 4 layouts
    prompts = video_prompt_set("test") * 4
    a, b = render_prompts(prompts, SEED + 1), render_prompts(prompts, SEED + 2)
    fa, fb = ev.features(a.videos), ev.features(b.videos)
    fvd = {"dim": int(fa.shape[1]), "floor_300": frechet_video_distance(fa[:300], fb[:300]),
           "floor_1200": frechet_video_distance(fa, fb),
           "reversed_1200": frechet_video_distance(fa, ev.features(b.videos.flip(1))),
           "mirrored_1200": frechet_video_distance(fa, ev.features(b.videos.flip(-1)))}
    # every object held at its first position (pairs cannot stand still in the grammar, so build the clips)
    frozen = [Clip(c.prompt, [replace(o, motion="still", x0=float(q[0, 0]) * REF_SIZE, y0=float(q[0, 1]) * REF_SIZE,
                                      vx=0.0, vy=0.0, g=0.0, t_bounce=None) for o, q in zip(c.objects, c.positions())],
                   c.family, 8) for c in b.clips]
    fvd["motionless_1200"] = frechet_video_distance(fa, ev.features(render_clips(frozen)))
    res["fvd"] = {k: ({kk: round(vv, 4) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in fvd.items()}
    res["seconds"] = round(time.time() - t0, 1)
    print(f"fvd {time.time() - t0:.0f}s", json.dumps(res["fvd"]), flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(markdown(res))


def markdown(res: dict) -> str:
    cols = list(ATTRIBUTES)
    lines = [f"# Video evaluator accuracy ({res['n']} clips, {res['frames']} frames of {res['size']}x{res['size']}, "
             f"seed {res['seed']})", "", "Written by `experiments/eval/video_accuracy.py`.", ""]
    for kind in ("clean", "corrupted"):
        lines += [f"## {kind}", "", "| family | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
        fams = res[kind]["by_family"]
        rows = [("all", sum(f["n"] for f in fams.values()), res[kind]["all_families"])] + \
            [(k, v["n"], v) for k, v in fams.items()]
        for name, n, vals in rows:
            lines.append(f"| {name} | {n} | " + " | ".join("–" if vals[a] is None else f"{vals[a]:.3f}" for a in cols)
                         + " |")
        if kind == "corrupted":
            lines += ["", f"Blur σ 0.7 px and fresh N(0, 0.03²) noise on every frame; mean flicker "
                      f"{res[kind]['flicker_mean']:.4f} (threshold 0.02)."]
        lines.append("")
    lines += ["## Tracks against the ground truth (clean; reference px and frames)", "",
              "| quantity | mean | p95 | max | n |", "|---|---|---|---|---|"]
    for k, v in res["clean"]["truth_errors"].items():
        lines.append(f"| {k} | {v['mean']} | {v['p95']} | {v['max']} | {v['n']} |")
    lr = res["clean"]["law_residual_px"]
    lines += ["", f"Law-fit residual on clean clips: mean {lr['mean']} px, max {lr['max']} px.", "",
              "## Edits with known answers", "", "| edit | n | fails exactly the expected metrics | failure rates |",
              "|---|---|---|---|"]
    for k, v in res["edits"].items():
        rates = ", ".join(f"{a} {x:.3f}" for a, x in v["failure_rate"].items())
        lines.append(f"| {k} | {v['n']} | {v['exactly_expected']:.3f} | {rates} |")
    f = res["fvd"]
    lines += ["", f"## Fréchet video distance (dimension {f['dim']}; test prompts, independent layouts)", "",
              "| against real clips of the same prompts | FVD | appearance part | motion part |", "|---|---|---|---|"]
    for k in ("floor_300", "floor_1200", "reversed_1200", "mirrored_1200", "motionless_1200"):
        lines.append(f"| {k.replace('_', ' ')} | {f[k]['fvd']:.4f} | {f[k]['appearance']:.4f} | {f[k]['motion']:.4f} |")
    lines += ["", f"One thread, {res['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
