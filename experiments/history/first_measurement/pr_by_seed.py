"""Precision / recall per noise seed for finished evaluate.py runs (their spread; a bootstrap would shrink the
k-NN radii). New runs carry this in metrics.json (`fidelity.precision_recall_per_seed`); the first measurement
predates it, so this recomputes it from each run's features.safetensors and the same real renders.

    python experiments/history/first_measurement/pr_by_seed.py OUT.json RUN_DIR [RUN_DIR ...]
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from s2g.eval import SceneEvaluator  # noqa: E402
from s2g.eval.harness import Item, reference_renders  # noqa: E402
from s2g.eval.report import load_run  # noqa: E402
from s2g.eval.stats import precision_recall  # noqa: E402


def main(out: Path, runs: list[Path]) -> None:
    if out.exists():
        sys.exit(f"error: {out} exists; outputs are never overwritten")
    torch.set_num_threads(1)
    evaluator, result = SceneEvaluator.load(), {}
    for d in runs:
        run = load_run(d)
        items = [Item(int(r["index"]), int(r["seed"]), int(r["prompt_index"]), r["prompt"]) for r in run["rows"]]
        ref = evaluator.features(reference_renders(items, int(run["config"].get("reference_seed", 0)))).numpy()
        seeds = np.array([it.seed for it in items])
        result[d.name] = {"all": precision_recall(ref, run["features"], k=3)} | {
            f"seed {s}": precision_recall(ref[seeds == s], run["features"][seeds == s], k=3) for s in sorted(set(seeds))}
        print(d.name, {k: [round(x, 3) for x in v] for k, v in result[d.name].items()})
    out.write_text(json.dumps({k: {s: [float(x) for x in v] for s, v in r.items()} for k, r in result.items()},
                              indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python experiments/history/first_measurement/pr_by_seed.py OUT.json RUN_DIR [RUN_DIR ...]")
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
