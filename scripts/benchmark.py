"""Time our MMDiT forward against diffusers' SD3Transformer2DModel: same config, same random weights, one run.

    python scripts/benchmark.py                                   # CPU, small config with every MMDiT-X feature
    python scripts/benchmark.py --preset sd3_medium --dtype bf16 --resolution 1024 --device cuda
    python scripts/benchmark.py --mode guidance                   # sampling cost of each guider relative to CFG

Reports the median of --repeats timed forwards after --warmup untimed ones (the two models alternate, so load
drift hits both), and speedup = diffusers time / our time (> 1: ours is faster). diffusers is the oracle here
only; s2g itself never imports it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s2g.models.checkpoint import load_mmdit  # noqa: E402
from s2g.models.mmdit import CONFIGS, MMDiTConfig  # noqa: E402

PRESETS = {
    **CONFIGS,
    # Small enough for a shared 2-core CPU, but with qk-norm, dual-attention blocks and the real text widths.
    "small": MMDiTConfig(depth=8, hidden=512, heads=8, pos_embed_max_size=64, qk_norm=True,
                         dual_attention_blocks=(0, 1, 2)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def diffusers_model(cfg: MMDiTConfig):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(
        sample_size=64, patch_size=cfg.patch, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.hidden, pooled_projection_dim=cfg.pooled_dim,
        pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.dual_attention_blocks,
        qk_norm="rms_norm" if cfg.qk_norm else None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context-len", type=int, default=154, help="text tokens (77 CLIP + 77 T5, reference length)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here (never overwritten)")
    ap.add_argument("--mode", choices=["forward", "guidance"], default="forward",
                    help="forward: ours vs diffusers; guidance: whole sampling runs per guider, relative to CFG")
    ap.add_argument("--steps", type=int, default=28, help="sampling steps (guidance mode)")
    args = ap.parse_args(argv)
    if args.resolution % 16:
        ap.error(f"--resolution {args.resolution} is not a multiple of 16 (8x VAE, patch 2)")
    if args.out is not None and args.out.exists():
        ap.error(f"--out {args.out} exists; not overwriting")
    device, dtype, cfg = torch.device(args.device), DTYPES[args.dtype], PRESETS[args.preset]
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.mode == "guidance":
        return guidance_costs(args, device, dtype, cfg)

    with torch.device(device):  # diffusers' own random init (no zero adaLN), then both models share the weights
        ref = diffusers_model(cfg).to(dtype).eval().requires_grad_(False)
    ours = load_mmdit(ref.state_dict(), dtype=dtype, device=device)

    g = torch.Generator(device).manual_seed(1)
    lat = args.resolution // 8
    x = torch.randn(args.batch, cfg.in_channels, lat, lat, generator=g, device=device, dtype=dtype)
    sigma = torch.rand(args.batch, generator=g, device=device)
    context = torch.randn(args.batch, args.context_len, cfg.context_dim, generator=g, device=device, dtype=dtype)
    pooled = torch.randn(args.batch, cfg.pooled_dim, generator=g, device=device, dtype=dtype)
    runners = {
        "ours": lambda: ours(x, sigma, context, pooled),
        "diffusers": lambda: ref(x, context, pooled, timestep=1000 * sigma).sample,
    }

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, out

    times = {k: [] for k in runners}
    with torch.inference_mode():
        outs = {k: fn() for k, fn in runners.items()}
        for _ in range(args.warmup - 1):
            for fn in runners.values():
                fn()
        for _ in range(args.repeats):
            for k, fn in runners.items():
                times[k].append(timed(fn)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = (outs["ours"].float() - outs["diffusers"].float()).abs().max().item()
    scale = outs["diffusers"].float().abs().max().item()
    result = {
        "preset": args.preset, "dtype": args.dtype, "device": device_name(device), "resolution": args.resolution,
        "batch": args.batch, "tokens": (lat // cfg.patch) ** 2 + args.context_len, "repeats": args.repeats,
        "ours_ms": 1e3 * med["ours"], "diffusers_ms": 1e3 * med["diffusers"],
        "speedup": med["diffusers"] / med["ours"], "max_abs_diff": diff, "max_abs_output": scale,
        "torch": torch.__version__,
    }
    print(f"{args.preset} {args.dtype} {args.resolution}px batch {args.batch} on {result['device']}: "
          f"ours {result['ours_ms']:.1f} ms, diffusers {result['diffusers_ms']:.1f} ms (median of {args.repeats}), "
          f"speedup {result['speedup']:.3f}x; max|diff| {diff:.2e} (output max {scale:.2f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def guidance_costs(args, device, dtype, cfg: MMDiTConfig) -> int:
    """Wall time of whole sampling runs per guider on one random-weight MMDiT, as a ratio to CFG (the paper
    reports +40% for S² on SD3). S² is timed with and without sharing the block prefix between the full
    conditional pass and its sub-network pass."""
    from s2g.guidance import CFG, S2Guidance
    from s2g.models.mmdit import MMDiT
    from s2g.sampling import sample, sd3_sigmas

    with torch.device(device):
        model = MMDiT(cfg).to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(1)
    lat = args.resolution // 8
    noise = torch.randn(args.batch, cfg.in_channels, lat, lat, generator=g, device=device)
    cond = {"context": torch.randn(args.batch, args.context_len, cfg.context_dim, generator=g, device=device,
                                   dtype=dtype),
            "pooled": torch.randn(args.batch, cfg.pooled_dim, generator=g, device=device, dtype=dtype)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    sigmas = sd3_sigmas(args.steps)
    runs = {
        "cfg": (CFG(7.5), True),
        "s2": (S2Guidance(), True),
        "s2_separate_passes": (S2Guidance(), False),
        "naive_s2_n4": (S2Guidance(num_subnetworks=4), True),
    }

    def timed(guider, share):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        sample(model, noise, sigmas, guider, cond, uncond, progress=False, share_prefix=share)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    times = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(args.warmup):
            timed(*runs["cfg"])
        for _ in range(args.repeats):
            for k, run in runs.items():
                times[k].append(timed(*run))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"mode": "guidance", "preset": args.preset, "dtype": args.dtype, "device": device_name(device),
              "resolution": args.resolution, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
              "seconds": med, "relative_to_cfg": {k: v / med["cfg"] for k, v in med.items()},
              "torch": torch.__version__}
    print(f"{args.preset} {args.dtype} {args.resolution}px batch {args.batch}, {args.steps} steps on "
          f"{result['device']} (median of {args.repeats}):")
    for k, v in med.items():
        print(f"  {k:20s} {v:8.2f} s   x{result['relative_to_cfg'][k]:.3f} of CFG")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
