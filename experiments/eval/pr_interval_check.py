"""Is the delete-half jackknife's standard error for precision/recall plausible on generated images?

Per finished run with several seeds: for each seed's images alone, the half-sample se (`stats.half_sample_interval`)
next to the spread of P and R between the seeds, pooled over runs. The seeds share their prompts, so that spread
holds noise variation only; the se, which also resamples prompts, should be no smaller, and not much larger.

    python experiments/eval/pr_interval_check.py RUN_DIR [RUN_DIR ...]
    python experiments/eval/pr_interval_check.py experiments/claims/runs/tiny/test/*/
"""
import sys
from pathlib import Path

import numpy as np
import torch

from s2g.eval import SceneEvaluator  # noqa: E402
from s2g.eval.harness import Item, reference_renders  # noqa: E402
from s2g.eval.report import load_run  # noqa: E402
from s2g.eval.stats import half_sample_interval, precision_recall  # noqa: E402


def main(runs: list[Path]) -> None:
    torch.set_num_threads(1)
    evaluator, values, ses = SceneEvaluator.load(), [], []
    for d in runs:
        run = load_run(d)
        rows = run["rows"]
        seeds = np.array([int(r["seed"]) for r in rows])
        if len(set(seeds.tolist())) < 2:
            sys.exit(f"error: {d} has one seed; the check needs several")
        items = [Item(int(r["index"]), int(r["seed"]), int(r["prompt_index"]), r["prompt"]) for r in rows]
        ref = evaluator.features(reference_renders(items, int(run["config"].get("reference_seed", 0)))).double().numpy()
        prompts = np.array([int(r["prompt_index"]) for r in rows])
        v, s = [], []
        for seed in sorted(set(seeds.tolist())):
            m = seeds == seed
            p, r = half_sample_interval(lambda g, f: precision_recall(f, g), run["features"][m], ref[m],
                                        clusters=prompts[m])
            v.append((p.mean, r.mean))
            s.append((p.se, r.se))
        values.append(v)
        ses.append(s)
        print(f"{d.name}: P per seed {[round(x[0], 3) for x in v]}, R {[round(x[1], 3) for x in v]}", flush=True)
    between = np.sqrt(np.mean([np.var(v, axis=0, ddof=1) for v in values], axis=0))
    se = np.mean([np.mean(s, axis=0) for s in ses], axis=0)
    print(f"{len(values)} runs: spread between seeds (P, R) {between[0]:.4f}, {between[1]:.4f}; "
          f"half-sample se on one seed's images {se[0]:.4f}, {se[1]:.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(a) for a in sys.argv[1:]])
