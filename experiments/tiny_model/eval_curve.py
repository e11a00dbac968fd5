"""The evaluator's metrics (s2g/eval/, scripts/evaluate.py) for tiny checkpoints along a run: one JSON line each.

    python experiments/tiny_model/eval_curve.py outputs/train_tiny/v2_main/exports/tiny_001000.safetensors \
        --guiders none cfg:4 --out experiments/tiny_model/eval_curve.jsonl

Each (checkpoint, guider) is one `scripts/evaluate.py` run (default: the first 100 prompts of the `val` set, seed 0,
28 Euler steps) in its own outputs/evaluate/<stamp> dir; the row keeps that dir, the step from the checkpoint's
header, and the overall and relational means. Val, not test: checkpoints and scales are chosen on this curve.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
from s2g.tiny import describe_checkpoint  # noqa: E402

KEYS = ("all", "count", "color", "shape", "relation", "relation_given_found", "flipped_given_found", "found")


def means(block: dict) -> dict:
    return {k: round(block[k]["mean"], 4) for k in KEYS if isinstance(block.get(k), dict)}


def run(checkpoint: str, guider: str, prompts: str, num_prompts: int, seeds: str) -> dict:
    name, _, scale = guider.partition(":")
    cmd = [sys.executable, "scripts/evaluate.py", f"guidance={name}", f"prompts={prompts}",
           f"num_prompts={num_prompts}", f"seeds={seeds}", f"model.checkpoint={checkpoint}",
           "model.weak_checkpoint=null", "progress=false"] + ([f"guidance.scale={scale}"] if scale else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    m = re.search(r"^wrote (\S+):", out.stdout, re.M)
    if out.returncode or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    metrics = json.loads((Path(m.group(1)) / "metrics.json").read_text())
    row = {"checkpoint": checkpoint, "step": int(describe_checkpoint(ROOT / checkpoint).get("steps", -1)),
           "guider": guider, "prompts": prompts, "num_prompts": num_prompts, "seeds": seeds, "run_dir": m.group(1),
           "overall": means(metrics["adherence"]["overall"])}
    rel = metrics["adherence"].get("families", {}).get("relational")
    if rel:
        row["relational"] = means(rel)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--guiders", nargs="+", default=["none", "cfg:4"], help="name[:scale] of configs/guidance")
    ap.add_argument("--prompts", default="val")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--seeds", default="[0]")
    ap.add_argument("--out", help="append the rows here")
    args = ap.parse_args(argv)
    for ckpt in args.checkpoints:
        for guider in args.guiders:
            row = run(ckpt, guider, args.prompts, args.num_prompts, args.seeds)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
