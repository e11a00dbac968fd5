"""Evaluator vs eyes on generated images, and which evaluator layer a Fréchet distance can see.

    python experiments/eval/eyecheck.py OUT_DIR                 # ~8 min on one thread: 1200 images, grids, FD
    python experiments/eval/eyecheck.py OUT_DIR --run RUN_DIR   # 20 saved images of a finished evaluate.py run

Generates the first 200 validation prompts x seeds 0, 1 with the shipped embedded model under no guidance,
CFG 4 and CFG 7.5 (28 Euler steps, the harness's per-(prompt, seed) noise), then writes
- grid_<guider>_<page>.png: 40 images per guider (every 10th item, seed 0 then seed 1), each tile with its
  prompt, the evaluator's reading and its verdict, for a person to judge (results: experiments/eval/README.md);
- readings.csv: the evaluator's reading of those 120 images;
- feature_layers.json: the Fréchet distance from real renders to each image set, on the spatial mean of every
  layer of the evaluator, with an independent render set (the floor) and a blurred render set.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from s2g.eval import SceneEvaluator, frechet_distance, prompt_set, score, work_items  # noqa: E402
from s2g.eval.harness import Item, generate, reference_renders  # noqa: E402
from s2g.guidance import CFG, Conditional  # noqa: E402
from s2g.pipeline import load_tiny  # noqa: E402

TILE = 160


def grids(name, images, items, evaluator, out: Path, rows_out: list, step: int = 10, pages: int = 2):
    sel = list(range(0, len(items), step))[:20 * pages]
    dets = evaluator.detect(images[sel])
    for page in range(pages):
        canvas = Image.new("RGB", (5 * TILE, 4 * (TILE + 52)), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for k in range(20):
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


def from_run(run: Path, out: Path) -> None:
    """Grid of every 40th image that `evaluate.py save_images=true` saved, read again by the evaluator."""
    out.mkdir(parents=True, exist_ok=False)
    with open(run / "per_image.csv", newline="") as f:
        picked = list(csv.DictReader(f))[::40][:20]
    items = [Item(int(r["index"]), int(r["seed"]), int(r["prompt_index"]), r["prompt"]) for r in picked]
    images = torch.stack([torch.from_numpy(np.array(Image.open(
        run / "images" / f"seed{it.seed}_{it.prompt_index:05d}.png").convert("RGB"))).permute(2, 0, 1).float() / 255
        for it in items])
    rows: list[dict] = []
    grids(run.name, images, items, SceneEvaluator.load(), out, rows, step=1, pages=1)
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
    if len(sys.argv) == 4 and sys.argv[2] == "--run":
        from_run(Path(sys.argv[3]), Path(sys.argv[1]))
    elif len(sys.argv) == 2:
        main(Path(sys.argv[1]))
    else:
        sys.exit("usage: python experiments/eval/eyecheck.py OUT_DIR [--run RUN_DIR]")
