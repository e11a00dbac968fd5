#!/usr/bin/env bash
# The Wan 2.1 T2V 1.3B GPU benchmark in one command (prepared; see README.md): random weights, bf16, the 1.3B
# shape at 81 frames 832x480 (latents 16x21x60x104, 32,760 tokens), 512 text rows.
#   1. forward: one DiT forward, ours (WanDiT) vs diffusers' WanTransformer3DModel holding the same tensors,
#      batch 2 (one CFG step), eager: median ms of each, their max |diff|;
#   2. guidance: whole sampling runs of Wan's flow UniPC on Wan's grid (shift 5), λ 5, ω 0.25, per guider
#      (CFG, S² as one sweep, S² as separate passes): work units, wall seconds, peak memory
#      (torch.cuda.max_memory_allocated), each also against CFG. WAN_BENCH_STEPS steps (default 10: S²'s window
#      covers steps 1-8, the same 80 % as steps 5-44 of 50; one CFG step is about a second here).
# Each part has its own time limit (4 min 40 s in all with the checks), so one slow part cannot sink the other.
#     bash experiments/benchmark/gpu_wan_1_3b.sh            # JSON into experiments/benchmark/gpu_wan/
# CPU dry run at a tiny shape (checks the Python, times nothing useful):
#     OUT_DIR=/tmp/wan_dry WAN_BENCH_DEVICE=cpu WAN_BENCH_TINY=1 bash experiments/benchmark/gpu_wan_1_3b.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT_DIR:-experiments/benchmark/gpu_wan}
device=${WAN_BENCH_DEVICE:-cuda}
steps=${WAN_BENCH_STEPS:-10}
common=(--device "$device" --steps "$steps")
[ "${WAN_BENCH_TINY:-0}" = 1 ] && common+=(--tiny)

read -r -d '' PY <<'EOF'
import argparse, json, math, statistics, sys, time
import torch

p = argparse.ArgumentParser()
p.add_argument("part", choices=["check", "forward", "guidance"])
p.add_argument("--device", default="cuda")
p.add_argument("--tiny", action="store_true", help="a tiny config (CPU dry run)")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--out", default=None)
args = p.parse_args()

def fail(msg):
    print(f"gpu_wan_1_3b: {msg}", file=sys.stderr)
    sys.exit(2)

device = torch.device(args.device)
if args.part == "check":
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("no CUDA device visible; this script is for a lent GPU (CPU dry run: WAN_BENCH_DEVICE=cpu WAN_BENCH_TINY=1)")
    if device.type == "cpu" and not args.tiny:
        fail("the full 1.3B shape on CPU would take hours: add WAN_BENCH_TINY=1 for a dry run")
    try:
        from diffusers import WanTransformer3DModel  # noqa: F401
    except ImportError as e:
        fail(f"diffusers with WanTransformer3DModel is needed for the forward comparison ({e}); pip install diffusers")
    try:
        from s2g.models import WanDiT, load_wan  # noqa: F401
        from s2g.sampling import DiscreteTimesteps, sample, wan_sigmas, wan_timesteps  # noqa: F401
    except ImportError as e:
        fail(f"s2g does not import from the repository root ({e}); pip install -e .")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if free < 40 * 2**30:
            fail(f"{free / 2**30:.0f} GiB free of {total / 2**30:.0f} GiB; the benchmark needs about 40 GiB")
        print(f"{torch.cuda.get_device_name(device)}, {free / 2**30:.0f} GiB free, torch {torch.__version__}")
    else:
        print(f"CPU dry run, torch {torch.__version__}")
    sys.exit(0)

from s2g.models import WanConfig, WanDiT, load_wan
from s2g.models.wan import CONFIGS
from s2g.sampling import DiscreteTimesteps, GuidedDenoiser, SAMPLERS, wan_sigmas, wan_timesteps
from s2g.guidance import CFG, S2Guidance

dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
if args.tiny:
    cfg = WanConfig(dim=64, num_layers=4, num_heads=2, ffn_dim=128, text_dim=32, freq_dim=32, text_len=16)
    frames, height, width = 5, 32, 48
else:
    cfg = CONFIGS["t2v_1.3b"]
    frames, height, width = 81, 480, 832
latent = (cfg.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
text_rows = cfg.text_len or 512
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
g = torch.Generator(device).manual_seed(0)
shape = {"config": {k: getattr(cfg, k) for k in ("dim", "num_layers", "num_heads", "ffn_dim")},
         "frames": frames, "size": [width, height], "latent": list(latent), "text_rows": text_rows,
         "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name(device)
         if device.type == "cuda" else "cpu", "torch": torch.__version__}

def peak_reset():
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

def peak_mb():
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

def save(result):
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")

if args.part == "forward":
    from diffusers import WanTransformer3DModel
    t0 = time.perf_counter()
    with torch.device(device):
        ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                    attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                                    text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                    num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                                    qk_norm="rms_norm_across_heads", eps=cfg.eps)
    ref = ref.to(dtype).eval().requires_grad_(False)
    ours = load_wan(ref.state_dict(), dtype=dtype, device=device, heads=cfg.num_heads, text_len=cfg.text_len)
    build_s = time.perf_counter() - t0
    x = torch.randn(2, *latent, generator=g, device=device)
    ctx = torch.randn(2, text_rows, cfg.text_dim, generator=g, device=device).to(dtype)
    t = torch.full((2,), 999, device=device, dtype=torch.int64)
    calls = {"ours": lambda: ours(x, t.float() / 1000, ctx),
             "diffusers": lambda: ref(x.to(dtype), t, ctx, return_dict=False)[0]}
    times = {k: [] for k in calls}
    with torch.inference_mode():
        outs = {k: f().float() for k, f in calls.items()}
        for _ in range(args.warmup):
            for f in calls.values():
                f()
        for _ in range(args.repeats):  # alternating, so drift hits both
            for k, f in calls.items():
                sync(); t1 = time.perf_counter(); f(); sync()
                times[k].append(time.perf_counter() - t1)
        peaks = {}
        for k, f in calls.items():
            peak_reset(); f(); sync()
            peaks[k] = peak_mb()
    diff = (outs["ours"] - outs["diffusers"]).abs().max().item()
    scale = outs["diffusers"].abs().max().item()
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    save({"part": "forward", **shape, "batch": 2, "build_seconds": build_s, "repeats": args.repeats,
          "ms": ms, "speedup": ms["diffusers"] / ms["ours"], "peak_mb": peaks, "max_abs_diff": diff,
          "output_max": scale, "relative_diff": diff / max(scale, 1e-12)})
    if not math.isfinite(diff) or diff > 0.05 * scale:
        print(f"gpu_wan_1_3b: ours and diffusers disagree: max |diff| {diff:.3g} on outputs up to {scale:.3g}",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(0)

# guidance: whole sampling runs per guider
t0 = time.perf_counter()
with torch.device(device):
    fresh = WanDiT(cfg)
    with torch.no_grad():  # Wan's init zeroes the output projection: give it weights so the samples move
        fresh.head.head.weight.normal_(0, 0.02, generator=g)
model = load_wan(fresh.state_dict(), dtype=dtype, device=device, heads=cfg.num_heads, text_len=cfg.text_len)
del fresh  # the fp32 parts (time embedding, modulation, norm3, head) stay fp32, as for real weights
build_s = time.perf_counter() - t0
resident_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None  # the weights
noise = torch.randn(1, *latent, generator=g, device=device)
cond = {"context": torch.randn(1, text_rows, cfg.text_dim, generator=g, device=device).to(dtype)}
uncond = {"context": torch.randn(1, text_rows, cfg.text_dim, generator=g, device=device).to(dtype)}
runs = {"cfg": (lambda: CFG(5.0), True), "s2": (lambda: S2Guidance(scale=5.0, omega=0.25), True),
        "s2_separate_passes": (lambda: S2Guidance(scale=5.0, omega=0.25), False)}

def run(make, share, steps):
    """One whole sampling run as Wan samples: its grid, its integer timesteps fed to the DiT, flow UniPC."""
    sig = wan_sigmas(steps, 5.0)
    net = DiscreteTimesteps(model, sig, wan_timesteps(steps, 5.0))
    guider = make()
    guider.reset(model.num_blocks, rows=[0])
    guided = GuidedDenoiser(net, guider, cond, uncond, share)
    sync(); t1 = time.perf_counter()
    with torch.inference_mode():
        out = SAMPLERS["unipc"](guided, noise, sig, progress=False)
    sync()
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite sample")
    return {"seconds": time.perf_counter() - t1, "nfe": guided.nfe, "work": guided.block_rows}

for make, share in runs.values():  # two steps: S² is active on step 0, so its 3-row sweep is warmed too
    run(make, share, 2)
rows = {}
for k, (make, share) in runs.items():
    peak_reset()
    r = run(make, share, args.steps)
    r["peak_mb"] = peak_mb()
    rows[k] = r
base = rows["cfg"]
for r in rows.values():
    r["work_ratio"] = r["work"] / base["work"]
    r["wall_ratio"] = r["seconds"] / base["seconds"]
    if r["peak_mb"] is not None:
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
save({"part": "guidance", **shape, "steps": args.steps, "shift": 5.0, "sampler": "unipc", "scale": 5.0,
      "omega": 0.25, "build_seconds": build_s, "resident_mb_before_sampling": resident_mb, "guiders": rows})
EOF

part() {  # part SECONDS NAME: one Python part, JSON to $out/NAME.json
  local limit=$1 name=$2
  timeout "$limit" python -c "$PY" "$name" "${common[@]}" --out "$out/$name.json"
  local rc=$?
  [ $rc -eq 0 ] || echo "$name: failed or over its ${limit} s limit (exit $rc)"
  return $rc
}
timeout 60 python -c "$PY" check "${common[@]}" || { echo "gpu_wan_1_3b: checks failed, nothing run"; exit 2; }
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
part 80 forward
part 140 guidance
