"""Does the video model use its motion words? The x̂0 error on rendered clips with the right prompt, with one word
swapped, and with the empty prompt, at high σ: one JSON line per checkpoint.

    python experiments/tiny_video/word_use.py outputs/train_tiny_video/main/exports/tiny_video_00*.safetensors \
        --out experiments/tiny_video/word_use.jsonl

For each swap (left ↔ right, up ↔ down: the sign of the motion; left ↔ up: its axis; falling ↔ moving up;
standing still ↔ moving left), 32 clips of the true prompt (fixed layouts, seed 1) are noised with fixed noise to
σ and denoised once under each prompt. `use` = (err(swapped) − err(true)) / (err(empty) − err(true)): 0 when the
word is ignored (the swapped prompt is as good as the true one), 1 when swapping it loses all the prompt gives,
above 1 when the wrong word is worse than no prompt. The centroid probe in the training log asks the same
question of one prompt's x̂0; this asks it of the loss, where a small use is visible before the samples move.
Rows already in --out for a checkpoint are skipped.
"""
from __future__ import annotations

from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from s2g.data.clips import render_prompts  # noqa: E402
from s2g.tiny_video import load_tiny_video  # noqa: E402

SWAPS = {  # name: (true prompt, swapped prompt)
    "left-right": ("a red circle moving left", "a red circle moving right"),
    "right-left": ("a red circle moving right", "a red circle moving left"),
    "up-down": ("a blue square moving up", "a blue square moving down"),
    "down-up": ("a blue square moving down", "a blue square moving up"),
    "left-up (axis)": ("a red circle moving left", "a red circle moving up"),
    "falling-up": ("a green triangle falling", "a green triangle moving up"),
    "still-left": ("a yellow square standing still", "a yellow square moving left"),
}
SIGMAS = (0.95, 0.9, 0.8, 0.7)


@torch.no_grad()
def word_use(checkpoint: Path, n: int = 32) -> dict:
    pipe = load_tiny_video(checkpoint, weak_checkpoint=None)
    out = {}
    for name, (true, wrong) in SWAPS.items():
        x0 = render_prompts([true] * n, seed=1).videos.permute(0, 2, 1, 3, 4) * 2 - 1  # [n, 3, F, H, W]
        row = {}
        for sigma in SIGMAS:
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
            x = (1 - sigma) * x0 + sigma * eps
            err = {}
            for key, prompt in (("true", true), ("swapped", wrong), ("empty", "")):
                ctx = pipe.text_encoder.encode([prompt] * n)
                v = pipe.denoiser(x, torch.full((n,), sigma), **ctx)  # velocity: x̂0 = x - σ v
                err[key] = float((x - sigma * v - x0).square().mean())
            row[str(sigma)] = round((err["swapped"] - err["true"]) / max(err["empty"] - err["true"], 1e-9), 3)
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    done = set()
    if args.out.is_file():
        done = {json.loads(line)["checkpoint"] for line in args.out.read_text().splitlines() if line.strip()}
    for ckpt in args.checkpoints:
        if str(ckpt) in done:
            continue
        with safe_open(str(ckpt), "pt") as f:
            meta = f.metadata()
        row = {"checkpoint": str(ckpt), "step": int(meta["steps"]), "use": word_use(ckpt)}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(row["step"], {k: v["0.95"] for k, v in row["use"].items()}, flush=True)


if __name__ == "__main__":
    main()
