#!/usr/bin/env bash
# The GPU benchmark in one command (prepared; see README.md): SD3-medium shape, random weights, 1024², bf16.
#   1. one MMDiT forward, ours vs diffusers' SD3Transformer2DModel (batch 2 = one CFG step), eager and compiled
#      (regional torch.compile of the same parts in both);
#   2. whole 28-step sampling runs per guider (CFG, S² as one sweep, S² as separate passes, naive S² N = 4):
#      work units, wall time, peak memory (torch.cuda.max_memory_allocated), eager and compiled.
# Each part has its own time limit (4 min 50 s in all), so one slow compile cannot sink the rest.
#     bash experiments/benchmark/gpu_sd3_medium.sh            # JSON into experiments/benchmark/gpu/
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT_DIR:-experiments/benchmark/gpu}
mkdir -p "$out"
# BENCH_COMMON overrides the shape and device (a CPU dry run: "--preset small --resolution 64 --device cpu")
read -r -a common <<< "${BENCH_COMMON:---preset sd3_medium --dtype bf16 --resolution 1024 --device cuda}"
forward=(--mode forward --batch 2 --repeats 10 --warmup 3)
guidance=(--mode guidance --batch 1 --steps 28 --repeats 3 --warmup 1)
part() {  # part SECONDS NAME ARGS...: one benchmark run, JSON to $out/NAME.json
  local limit=$1 name=$2; shift 2
  timeout "$limit" python scripts/benchmark.py "${common[@]}" "$@" --out "$out/$name.json" \
    || echo "$name: failed or over its ${limit} s limit (exit $?)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
part 40 forward_eager "${forward[@]}"
part 60 guidance_eager "${guidance[@]}"
part 80 forward_compiled "${forward[@]}" --compile
part 110 guidance_compiled "${guidance[@]}" --compile
