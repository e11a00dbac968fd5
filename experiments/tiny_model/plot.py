"""Loss curve and probe curves of a tiny-model training run (PNG).

    python experiments/tiny_model/plot.py outputs/train_tiny/v2_main/train_log.jsonl \
        experiments/tiny_model/probes_v2.jsonl experiments/tiny_model/eval_curve.jsonl

Writes loss_curve.png and probes.png next to this file (or into --out-dir). Any number of train_log.jsonl files
(runs resumed into other dirs) are joined by step.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="train_log.jsonl files and probe jsonl files (told apart by content)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent))
    args = ap.parse_args(argv)
    logs, probes, evals = [], [], []
    for f in args.files:
        rows = read(f)
        (evals if rows and "guider" in rows[0] else probes if rows and "checkpoint" in rows[0] else logs).extend(rows)
    out = Path(args.out_dir)
    if logs:
        logs = sorted({r["step"]: r for r in logs}.values(), key=lambda r: r["step"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in logs], [r["loss"] for r in logs], lw=0.8)
        ax.set(xlabel="step", ylabel="training loss (mean of 25 steps)", yscale="log", title="tiny model v2: loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png", dpi=120)
    if probes:
        probes = sorted({r["step"]: r for r in probes}.values(), key=lambda r: r["step"])
        steps = [r["step"] for r in probes]
        fig, axes = plt.subplots(1, 4 if evals else 3, figsize=(17 if evals else 13, 3.5))
        for key, label in (("gap_0.9", "σ=0.9"), ("gap_0.6", "σ=0.6")):
            axes[0].plot(steps, [r[key] for r in probes], "o-", label=label)
        axes[0].set(title="order gap: (err swapped - err true) / err true", xlabel="step")
        for key, label in (("left_flip", "left share: orig - swapped"), ("top_flip", "top share: orig - swapped")):
            axes[1].plot(steps, [r[key] for r in probes], "o-", label=label)
        axes[1].set(title="x̂0 layout at σ=0.9 (red mass)", xlabel="step")
        sampled = [r for r in probes if "cfg4_relation_found" in r]
        for key, label in (("cfg4_relation_found", "relation | found, CFG 4"),
                           ("none_relation_found", "relation | found, no guidance"),
                           ("cfg4_shape_single", "shape (single), CFG 4"), ("cfg4_found", "both found, CFG 4")):
            axes[2].plot([r["step"] for r in sampled], [r[key] for r in sampled], "o-", label=label)
        axes[2].axhline(0.5, color="gray", lw=0.5, ls="--")
        axes[2].set(title="sampled, 28 Euler steps (probe judge)", xlabel="step", ylim=(0, 1.02))
        if evals:  # the evaluator, CFG 4, 3 seeds; v1 (the shipped model) as dashed lines
            rows = sorted((r for r in evals if r["guider"] == "cfg:4" and r["seeds"] == "[0,1,2]"),
                          key=lambda r: r["step"])
            v1 = [r for r in rows if "assets" in r["checkpoint"]]
            rows = [r for r in rows if "assets" not in r["checkpoint"]]
            for key, label in (("all", "all correct"), ("relation_given_found", "relation | found"),
                               ("flipped_given_found", "flipped | found"), ("shape", "shape")):
                line, = axes[3].plot([r["step"] for r in rows], [r["overall"][key] for r in rows], "o-", label=label)
                for r in v1:
                    axes[3].axhline(r["overall"][key], color=line.get_color(), lw=0.8, ls="--")
            axes[3].set(title="evaluator, CFG 4, val 100 x 3 seeds (dashed: v1)", xlabel="step", ylim=(0, 1.02))
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "probes.png", dpi=120)


if __name__ == "__main__":
    main()
