#!/usr/bin/env bash
# The first measurement of the shipped embedded model (experiments/eval/README.md): test prompts, 2 seeds,
# 28 Euler steps; no guidance, CFG at 2 / 4 / 7.5, and S² at the paper's λ = 7.5 with ω = 0.25 (its default)
# and ω = 1. One thread per process; ~25 min on the 2-core machine. Usage: bash experiments/eval/first_measurement.sh OUT
set -euo pipefail
OUT=${1:?usage: first_measurement.sh OUT_DIR}
COMMON="prompts=test num_prompts=400 seeds=[0,1] save_images=true progress=false"
python scripts/evaluate.py $COMMON guidance=none hydra.run.dir=$OUT/none
python scripts/evaluate.py -m $COMMON guidance=cfg guidance.scale=2,4,7.5 hydra.sweep.dir=$OUT
python scripts/evaluate.py -m $COMMON guidance=s2 guidance.scale=7.5 guidance.omega=0.25,1 hydra.sweep.dir=$OUT
python scripts/evaluate.py gather=$OUT baseline=1_cfg
