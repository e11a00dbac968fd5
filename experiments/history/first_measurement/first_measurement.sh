#!/usr/bin/env bash
# The first measurement of the v1 embedded model, since replaced by v2 (experiments/history/README.md): test
# prompts 0-399, seeds 0 and 1, 28 Euler steps; no guidance, CFG at 2 / 4 / 7.5, and S² at the paper's λ = 7.5
# with ω = 0.25 (its default) and ω = 1. One thread per process; ~45 min on the 2-core machine next to a training
# job. Run today, it measures the shipped v2 model, not the v1 numbers committed beside it.
# Usage: bash experiments/history/first_measurement/first_measurement.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: first_measurement.sh OUT_DIR}
COMMON="prompts=test num_prompts=400 seeds=[0,1] save_images=true progress=false"
python scripts/evaluate.py $COMMON guidance=none hydra.run.dir=$OUT/none
python scripts/evaluate.py -m $COMMON guidance=cfg guidance.scale=2,4,7.5 hydra.sweep.dir=$OUT
python scripts/evaluate.py -m $COMMON guidance=s2 guidance.scale=7.5 guidance.omega=0.25,1 hydra.sweep.dir=$OUT
python scripts/evaluate.py gather=$OUT baseline=1_cfg             # every run against CFG λ = 4, paired
for s2 in 0_s2 1_s2; do                                           # S² against CFG at its own λ = 7.5, paired
  python scripts/evaluate.py "pair=[$OUT/$s2,$OUT/2_cfg]"
done
python experiments/eval/eyecheck.py $OUT/eyecheck_s2 --run $OUT/1_s2   # 20 S² (ω = 1) images for a person
