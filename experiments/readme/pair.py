"""The README's picture: CFG and S² on the embedded model, side by side on the same noise.

    python experiments/readme/pair.py                      # writes experiments/readme/cfg_vs_s2.png (~30 s, 1 thread)
    python experiments/readme/pair.py --out /tmp/pair.png --seed 1

Rows are prompts; columns alternate CFG and S² for each of `--samples` noise draws, so every CFG tile has its S²
twin on its right, started from the same noise. Both guiders take the model's val-selected settings
(`guidance_defaults` in configs/model/tiny.yaml) on top of their guidance configs, as `scripts/sample.py` does,
so the picture shows what a user gets by default. 28 Euler steps, SD3's shift 3.
"""
from __future__ import annotations

from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import argparse  # noqa: E402
import importlib  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from s2g.images import image_grid, save_png  # noqa: E402
from s2g.tiny import load_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "a red circle",
    "a yellow triangle",
    "a green circle and a white square",
    "a blue square and a yellow triangle",
    "a purple triangle left of a yellow circle",
    "a white square above a red triangle",
]
COLUMNS = {"CFG": "cfg", "S2": "s2"}  # column label (the default font has no ²) -> configs/guidance/<name>.yaml


def guider(name: str, seed: int):
    """The guider of configs/guidance/<name>.yaml with the tiny model's guidance_defaults applied."""
    spec = yaml.safe_load((ROOT / "configs" / "guidance" / f"{name}.yaml").read_text())
    defaults = yaml.safe_load((ROOT / "configs" / "model" / "tiny.yaml").read_text())["guidance_defaults"]
    spec.update(defaults.get(name, {}))
    if "seed" in spec:
        spec["seed"] = seed  # the yaml says ${seed}: the run's seed, as in scripts/sample.py
    module, cls = spec.pop("_target_").rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "cfg_vs_s2.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=3, help="noise draws per prompt")
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    torch.set_num_threads(1)

    pipe = load_tiny()
    batch = [p for p in PROMPTS for _ in range(args.samples)]
    noise = pipe.noise(len(batch), args.seed)  # one draw, given to both guiders
    images = {}
    for label, name in COLUMNS.items():
        g = guider(name, args.seed)
        print(f"{label}: {g!r}")
        images[label] = pipe(batch, g, seed=args.seed, steps=args.steps, noise=noise)

    # columns: CFG 1, S2 1, CFG 2, S2 2, ...: each pair shares its noise
    cols = [(label, j) for j in range(args.samples) for label in COLUMNS]
    tiles = torch.stack([images[label][i * args.samples + j] for i in range(len(PROMPTS)) for label, j in cols])
    scale = 3
    grid = image_grid(tiles, len(PROMPTS), len(cols), scale=scale)
    save_png(grid, args.out, row_labels=PROMPTS, col_labels=[f"{label} ({j + 1})" for label, j in cols],
             tile=tiles.shape[-1] * scale)
    changed = ((images["CFG"] - images["S2"]).abs().amax(1) > 0.1).float().mean((1, 2))  # per image, any channel
    print(f"wrote {args.out}; pixels changed by > 0.1 between each CFG/S2 pair: at most {changed.max():.1%} "
          f"(mean {changed.mean():.1%}) of an image")


if __name__ == "__main__":
    main()
