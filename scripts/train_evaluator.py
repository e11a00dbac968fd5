"""Train the scene evaluator (s2g/eval/evaluator.py) on freshly rendered, augmented scenes, then measure it.

    python scripts/train_evaluator.py                                   # ~5 min on one CPU thread
    python scripts/train_evaluator.py --out s2g/assets/evaluator.safetensors --steps 900

Writes safetensors weights whose header holds this command, the training record and the held-out accuracy
(2000 clean renders from `scenes.sample_scenes`, and 2000 renders with the training corruptions but no extra
objects, both from seeds never used in training). Refuses to overwrite an existing file.
"""
from __future__ import annotations

from s2g import cli  # first: sets the thread defaults before torch is imported (s2g/cli.py)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from s2g.eval.evaluator import SceneEvaluator, SceneNet, render_batch  # noqa: E402
from s2g.eval.heldout import heldout_accuracy  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="weights file (default outputs/evaluator/<time>/evaluator.safetensors)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early (the schedule still assumes --steps)")
    ap.add_argument("--heldout", type=int, default=2000, help="renders per held-out check")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out) if args.out else ROOT / "outputs" / "evaluator" / stamp / "evaluator.safetensors"
    if out.exists():
        cli.fail(f"{out} exists; outputs are never overwritten")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # training scenes; held-out checks use seeds >= 10**6
    net = SceneNet(args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 50
    def lr_factor(s: int) -> float:  # linear warm-up, cosine decay to 5%
        return min(1.0, (s + 1) / warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    t0, losses, step = time.time(), [], 0
    bar = tqdm(range(args.steps), desc="train evaluator")
    for step in bar:
        images, col, shp, _ = render_batch(args.batch_size, rng)
        col_logits, shp_logits, _ = net(images)
        loss = F.cross_entropy(col_logits, col) + F.cross_entropy(shp_logits, shp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            break
    seconds = time.time() - t0
    evaluator = SceneEvaluator(net)
    heldout = {kind: heldout_accuracy(evaluator, args.heldout, seed=10**6 + i, kind=kind)
               for i, kind in enumerate(("clean", "corrupted"))}
    meta = {
        "command": " ".join(["python", "scripts/train_evaluator.py", *(argv if argv is not None else sys.argv[1:])]),
        "width": str(args.width),
        "steps": str(step + 1),
        "train_seconds": f"{seconds:.0f}",
        "final_loss": f"{np.mean(losses[-50:]):.5f}",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
        "config": json.dumps(vars(args)),
        "heldout": json.dumps(heldout),
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out), metadata=meta)
    print(json.dumps(heldout, indent=1))
    print(f"wrote {out} ({step + 1} steps, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
