"""The tiny video model's test table: CFG's scale chosen on val, then unguided and CFG on test, paired.

    python experiments/tiny_video/test_table.py      # ~30 min on one thread; writes experiments/tiny_video/test_table.md

The runs are experiments/claims.py's (the same protocol, run dirs and commands as `claims.py best --model
tiny_video`, which reuses them): CFG's six scales on video_val (the first 64 val prompts, seed 0), the highest
all-correct rate selected (ties to the lower FVD analog); then none and CFG at that scale on video_test (the
first 150 test prompts x seeds 0, 1, 2 = 450 clips each, the same noise for both). Neither run uses the weak
model, so this runs before it exists (`--no-weak`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("claims", HERE.parent / "claims" / "claims.py")
claims = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims)

TARGETS = [  # (what, evaluator dimension, family or None = every clip, threshold)
    ("direction correct", "direction", None, 0.90),
    ("count stable over all frames", "count_stable", None, 0.90),
    ("the physics family follows its law", "motion_smoothness", "physics", 0.75),  # falling + bouncing clips
    ("all correct", "all", None, 0.70),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-weak", action="store_true", help="load the model without its weak model (not needed)")
    args = ap.parse_args()
    if args.no_weak:
        claims.MODELS["tiny_video"] = {**claims.MODELS["tiny_video"], "weak_checkpoint": None}
    run = claims.Runner("tiny_video", HERE / "test_table" / "commands.sh")
    (HERE / "test_table").mkdir(exist_ok=True)
    (HERE / "test_table" / "commands.sh").unlink(missing_ok=True)
    selected, tuning = claims.tune(run, ["cfg"])
    cfg_params = selected["cfg"]
    none, cfg = run("test", "none", {}), run("test", "cfg", cfg_params)
    m = {name: claims.metrics(r) for name, r in (("none", none), ("cfg", cfg))}
    d = claims.paired(none, cfg)
    lines = [f"# The tiny video model on test (s2g/assets/tiny_video.safetensors)", "",
             f"Test: {run.sets('test')} ({run.count('test')} per row, 28 Euler steps). CFG at its val-selected "
             f"scale ({claims.setting(cfg_params)}). {run.intervals}", "",
             claims.table([("none", none), (f"CFG ({claims.setting(cfg_params)})", cfg)], cfg), "",
             "## Targets (at the best CFG scale)", "", "| target | measured | threshold | met |", "|---|---|---|---|"]
    for what, key, fams, threshold in TARGETS:
        block = m["cfg"]["adherence"]["families"][fams] if fams else m["cfg"]["adherence"]["overall"]
        value, shown = block[key]["mean"], claims.iv(block[key]) + (f" ({fams} clips)" if fams else "")
        lines.append(f"| {what} | {shown} | ≥ {threshold} | {'yes' if value >= threshold else 'no'} |")
    gap = -d["all"]["mean"]
    lines.append(f"| none below CFG on all correct | {claims.iv(d['all'], signed=True)} (none − CFG) | ≤ −0.10 | "
                 f"{'yes' if gap >= 0.10 else 'no'} |")
    lines += ["", "## Tuning (val: " + run.sets("val") + ")", "", tuning, "",
              "Regenerate: `python experiments/tiny_video/test_table.py` (the exact commands: test_table/commands.sh)."]
    (HERE / "test_table.md").write_text("\n".join(lines) + "\n")
    (HERE / "test_table" / "selected.json").write_text(json.dumps(selected, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
