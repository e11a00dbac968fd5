"""The video evaluator against a person's eyes on generated clips.

    python experiments/eval/eyecheck_video.py OUT_DIR [--checkpoint FILE] [--guiders none cfg:4] [--num-prompts 40]
    python experiments/eval/eyecheck_video.py OUT_DIR --agreement      # after filling OUT_DIR/judgments.csv

The first step samples the first `--num-prompts` VAL prompts (seed 0, 28 Euler steps, the harness's noise: the
clips an evaluation of those items makes) under each guider, scores them with s2g.eval.video, and writes
- page_<guider>_<k>.png: 10 clips a page, every frame in a row (×3), with the clip number and prompt only
  (blind: nothing of the evaluator's reading is on the page);
- readings.csv: the evaluator's verdicts per clip, and judgments.csv: the same clips with empty `eye_*` columns
  for the person (1 / 0; blank = cannot tell), who fills them from the pages, looking at the frames only.

`--agreement` compares the two per dimension (found, direction, dynamic degree, law fit, count stable, all):
agreement rate, and the clips where they disagree, listed in agreement.md.
"""
from __future__ import annotations

from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from s2g.data.clips import video_prompt_set  # noqa: E402
from s2g.eval.harness import generate, work_items  # noqa: E402
from s2g.eval.video import score_clips  # noqa: E402
from s2g.guidance import CFG, Conditional  # noqa: E402
from s2g.tiny_video import TINY_VIDEO_CHECKPOINT, load_tiny_video  # noqa: E402

DIMS = ("found", "direction", "dynamic_degree", "motion_smoothness", "count_stable", "all")
SCALE, PER_PAGE, LABEL_W = 3, 10, 250


def make_guider(spec: str):
    name, _, scale = spec.partition(":")
    if name == "none":
        return lambda seed: Conditional()
    if name == "cfg" and scale:
        return lambda seed: CFG(scale=float(scale))
    raise SystemExit(f"error: guider {spec!r}: use none or cfg:<scale>")


def page(clips: torch.Tensor, prompts: list[str], start: int, path: Path) -> None:
    """Rows of clips: the clip number and prompt, then every frame. Blind: the evaluator's readings stay in
    readings.csv, so the person judging sees what the evaluator sees and nothing of what it concluded."""
    n, f, _, h, w = clips.shape
    th, tw = h * SCALE, w * SCALE
    canvas = Image.new("RGB", (LABEL_W + f * (tw + 2), n * (th + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        y = i * (th + 4)
        words = f"#{start + i} {prompts[i]}".split()
        lines, line = [], ""
        for word in words:  # wrap the prompt at ~40 characters
            if len(line) + len(word) > 40:
                lines, line = [*lines, line], ""
            line = f"{line} {word}".strip()
        for k, text in enumerate([*lines, line]):
            draw.text((2, y + 2 + 12 * k), text, fill=(0, 0, 0))
        for j in range(f):
            frame = (clips[i, j].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(frame).resize((tw, th), Image.NEAREST), (LABEL_W + j * (tw + 2), y))
    canvas.save(path)


def sample(out: Path, checkpoint: Path, guiders: list[str], num_prompts: int) -> None:
    out.mkdir(parents=True, exist_ok=False)  # never overwrite an earlier check
    torch.set_num_threads(1)
    pipe = load_tiny_video(checkpoint, weak_checkpoint=None)
    items = work_items(video_prompt_set("val", num_prompts), [0])
    readings = []
    for spec in guiders:
        clips = generate(pipe, make_guider(spec), items, batch_size=min(40, len(items)), steps=28, shift=3.0,
                         sampler="euler", desc=spec)[0]
        rows = score_clips(clips, [it.prompt for it in items])
        name = spec.replace(":", "")
        for k in range(0, len(items), PER_PAGE):
            prompts = [r["prompt"] for r in rows[k:k + PER_PAGE]]
            page(clips[k:k + PER_PAGE], prompts, k, out / f"page_{name}_{k // PER_PAGE}.png")
        readings += [{"guider": spec, "clip": i, "prompt": r["prompt"], "family": r["family"],
                      **{f"evaluator_{d}": r[d] for d in DIMS}} for i, r in enumerate(rows)]
    with open(out / "readings.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, list(readings[0]))
        wr.writeheader()
        wr.writerows(readings)
    with open(out / "judgments.csv", "w", newline="") as f:  # blind too: no evaluator column
        wr = csv.DictWriter(f, ["guider", "clip", "prompt", "family", *[f"eye_{d}" for d in DIMS], "note"])
        wr.writeheader()
        wr.writerows({k: r[k] for k in ("guider", "clip", "prompt", "family")} for r in readings)
    (out / "run.json").write_text(json.dumps({"checkpoint": str(checkpoint), "guiders": guiders,
                                              "num_prompts": num_prompts, "seeds": [0], "steps": 28}, indent=1))


def agreement(out: Path) -> None:
    with open(out / "readings.csv", newline="") as f:
        readings = {(r["guider"], r["clip"]): r for r in csv.DictReader(f)}
    with open(out / "judgments.csv", newline="") as f:
        rows = [{**readings[(r["guider"], r["clip"])], **r} for r in csv.DictReader(f)]
    lines = ["| dimension | clips judged | agreement | evaluator yes, eyes no | evaluator no, eyes yes |",
             "|---|---|---|---|---|"]
    disagree = []
    for d in DIMS:
        both = [r for r in rows if r[f"evaluator_{d}"] not in ("", "None") and r[f"eye_{d}"] != ""]
        if not both:
            continue
        ev = [int(float(r[f"evaluator_{d}"])) for r in both]
        eye = [int(r[f"eye_{d}"]) for r in both]
        agree = sum(a == b for a, b in zip(ev, eye))
        lines.append(f"| {d} | {len(both)} | {agree / len(both):.2f} ({agree}/{len(both)}) | "
                     f"{sum(a > b for a, b in zip(ev, eye))} | {sum(a < b for a, b in zip(ev, eye))} |")
        disagree += [f"- {r['guider']} #{r['clip']} {r['prompt']}: {d} evaluator {a}, eyes {b}"
                     + (f" ({r['note']})" if r["note"] else "") for r, a, b in zip(both, ev, eye) if a != b]
    text = "\n".join(["# The video evaluator against the eyes", "", *lines, "", "## Disagreements", "", *disagree])
    (out / "agreement.md").write_text(text + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", type=Path, default=TINY_VIDEO_CHECKPOINT)
    ap.add_argument("--guiders", nargs="+", default=["none", "cfg:4"])
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--agreement", action="store_true")
    args = ap.parse_args()
    if args.agreement:
        return agreement(args.out)
    sample(args.out, args.checkpoint, args.guiders, args.num_prompts)


if __name__ == "__main__":
    main()
