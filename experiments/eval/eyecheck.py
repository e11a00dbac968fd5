"""Evaluator vs eyes on generated images, and which evaluator layer a Fréchet distance can see.

    python experiments/eval/eyecheck.py OUT_DIR                 # ~8 min on one thread: 1200 images, grids, FD
    python experiments/eval/eyecheck.py OUT_DIR --run RUN_DIR   # 20 images of a finished evaluate.py run
    python experiments/eval/eyecheck.py OUT_DIR --run RUN_DIR --failures   # its first 20 scored wrong

Generates the first 200 validation prompts x seeds 0, 1 with the shipped embedded model under no guidance,
CFG 4 and CFG 7.5 (28 Euler steps, the harness's per-(prompt, seed) noise), then writes
- grid_<guider>_<page>.png: 40 images per guider (every 10th item, seed 0 then seed 1), each tile with its
  prompt, the evaluator's reading and its verdict, for a person to judge (results: experiments/eval/README.md);
- readings.csv: the evaluator's reading of those 120 images;
- feature_layers.json: the Fréchet distance from real renders to each image set, on the spatial mean of every
  layer of the evaluator, with an independent render set (the floor) and a blurred render set.
"""
from __future__ import annotations

from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]

from s2g.eval import SceneEvaluator, frechet_distance, prompt_set, score, work_items  # noqa: E402
from s2g.eval.harness import Item, generate, reference_renders  # noqa: E402
from s2g.guidance import CFG, Conditional  # noqa: E402
from s2g.tiny import load_tiny  # noqa: E402

TILE = 160


def grids(name, images, items, evaluator, out: Path, rows_out: list, step: int = 10, pages: int = 2):
    sel = list(range(0, len(items), step))[:20 * pages]
    dets = evaluator.detect(images[sel])
    for page in range(pages):
        canvas = Image.new("RGB", (5 * TILE, 4 * (TILE + 52)), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for k in range(min(20, len(sel) - page * 20)):
            j = page * 20 + k
            i = sel[j]
            img = (images[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            r, c = divmod(k, 5)
            x0, y0 = c * TILE, r * (TILE + 52)
            canvas.paste(Image.fromarray(img).resize((TILE, TILE), Image.NEAREST), (x0, y0))
            draw.rectangle([x0, y0, x0 + TILE - 1, y0 + TILE - 1], outline=(128, 128, 128), width=2)
            s = score(items[i].prompt, dets[j])
            got = ", ".join(f"{o.color[:3]} {o.shape[:3]}" for o in dets[j])
            verdict = "OK" if s["all"] else "X " + ",".join(a for a, v in s.items() if v == 0 and a != "flipped")
            text = f"#{j} {items[i].prompt}"
            draw.text((x0 + 2, y0 + TILE + 1), text[:27], fill=(0, 0, 0))
            draw.text((x0 + 2, y0 + TILE + 13), text[27:54], fill=(0, 0, 0))
            draw.text((x0 + 2, y0 + TILE + 25), got[:27], fill=(0, 0, 200))
            draw.text((x0 + 2, y0 + TILE + 37), verdict[:27], fill=(0, 130, 0) if s["all"] else (200, 0, 0))
            rows_out.append({"guider": name, "tile": j, "seed": items[i].seed, "prompt": items[i].prompt,
                             "evaluator_reads": got, **s})
        canvas.save(out / f"grid_{name}_{page}.png")


def from_run(run: Path, out: Path, failures: bool = False) -> None:
    """Grid of 20 images of a finished evaluate.py run, read again by the evaluator: 20 evenly spaced, or with
    `failures` the first 20 that the run scored wrong (all correct = 0). Images come from images/ when the run
    saved them, else they are sampled again from the run's config.yaml (an image depends only on its prompt and
    seed, so these are the run's own images)."""
    out.mkdir(parents=True, exist_ok=False)
    with open(run / "per_image.csv", newline="") as f:
        rows_in = list(csv.DictReader(f))
    picked = [r for r in rows_in if float(r["all"]) == 0][:20] if failures else \
        rows_in[::max(1, len(rows_in) // 20)][:20]
    items = [Item(int(r["index"]), int(r["seed"]), int(r["prompt_index"]), r["prompt"]) for r in picked]
    if (run / "images").is_dir():
        images = torch.stack([torch.from_numpy(np.array(Image.open(
            run / "images" / f"seed{it.seed}_{it.prompt_index:05d}.png").convert("RGB"))).permute(2, 0, 1).float()
            / 255 for it in items])
    else:
        from omegaconf import OmegaConf

        from s2g.config import build_model, guider_factory
        cfg = OmegaConf.load(run / "config.yaml")
        torch.set_num_threads(1)
        pipe, _ = build_model(cfg.model)
        make = guider_factory(cfg.guidance)
        images = generate(pipe, make, items, batch_size=int(cfg.batch_size), steps=int(cfg.steps),
                          shift=float(cfg.shift), sampler=cfg.sampler.name, progress=False)[0]
    rows: list[dict] = []
    grids(run.name + ("_failures" if failures else ""), images, items, SceneEvaluator.load(), out, rows, step=1,
          pages=1)
    with open(out / "readings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=False)  # never overwrite an earlier check
    evaluator = SceneEvaluator.load()
    items = work_items(prompt_set("val", 200), [0, 1])
    pipe = load_tiny()
    guiders = {"none": lambda s: Conditional(), "cfg4": lambda s: CFG(scale=4), "cfg7.5": lambda s: CFG(scale=7.5)}
    sets = {name: generate(pipe, g, items, batch_size=50, steps=28, shift=3.0, sampler="euler", desc=name)[0]
            for name, g in guiders.items()}
    rows: list[dict] = []
    for name, images in sets.items():
        grids(name, images, items, evaluator, out, rows)
    with open(out / "readings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sets["renders (floor)"] = reference_renders(items, 1)
    sets["renders blurred 3x3"] = F.avg_pool2d(reference_renders(items, 1), 3, 1, 1)
    with torch.no_grad():
        ref = {k: v.mean((2, 3)).numpy() for k, v in evaluator.net.stages(reference_renders(items, 0)).items()}
        fd = {name: {k: round(frechet_distance(ref[k], v.mean((2, 3)).numpy()), 4)  # "mid" = the FD features
                     for k, v in evaluator.net.stages(images).items()} for name, images in sets.items()}
    (out / "feature_layers.json").write_text(json.dumps(fd, indent=1))
    print(json.dumps(fd, indent=1))


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[2] == "--run" and sys.argv[4:] in ([], ["--failures"]):
        from_run(Path(sys.argv[3]), Path(sys.argv[1]), failures=len(sys.argv) == 5)
    elif len(sys.argv) == 2:
        main(Path(sys.argv[1]))
    else:
        sys.exit("usage: python experiments/eval/eyecheck.py OUT_DIR [--run RUN_DIR [--failures]]")
