"""Time our MMDiT forward against diffusers' SD3Transformer2DModel: same config, same random weights, one run.

    python scripts/benchmark.py                                   # CPU, small config with every MMDiT-X feature
    python scripts/benchmark.py --preset sd3_medium --dtype bf16 --resolution 1024 --device cuda
    python scripts/benchmark.py --mode guidance --memory          # each guider's work, time, memory relative to CFG
    python scripts/benchmark.py --mode guidance --count-only --preset sd3_medium   # work units only, no model run

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

from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import torch  # noqa: E402

from s2g.eval.cost import peak_rss, timed_sampling  # noqa: E402
from s2g.models.checkpoint import load_mmdit  # noqa: E402
from s2g.models.mmdit import CONFIGS, MMDiTConfig  # noqa: E402
from s2g.models.sweep import block_rows, check_variants  # noqa: E402

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
    ap.add_argument("--count-only", action="store_true",
                    help="guidance mode: count work units at the preset's shape without running the model")
    ap.add_argument("--memory", action="store_true",
                    help="guidance mode on CPU: also the peak RSS of a fresh process per guider")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true",
                    help="regional torch.compile: each transformer block, embedders and head (ours and diffusers')")
    args = ap.parse_args(argv)
    if args.resolution % 16:
        ap.error(f"--resolution {args.resolution} is not a multiple of 16 (8x VAE, patch 2)")
    if args.out is not None and args.out.exists():
        ap.error(f"--out {args.out} exists; not overwriting")
    device, dtype, cfg = torch.device(args.device), DTYPES[args.dtype], PRESETS[args.preset]
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if device.type == "cpu" and not args.count_only:
        torch.set_num_threads(args.threads)
    if args.compile:  # one graph per block kind and row count; separate passes add batch-1 (specialised) ones
        torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)
    if args.mode == "guidance":
        return guidance_costs(args, device, dtype, cfg)

    with torch.device(device):  # diffusers' own random init (no zero adaLN), then both models share the weights
        ref = diffusers_model(cfg).to(dtype).eval().requires_grad_(False)
    ours = load_mmdit(ref.state_dict(), dtype=dtype, device=device)
    if args.compile:  # the same regions in both: every block, the embedders, the head
        ours.compile()
        for m in (*ref.transformer_blocks, ref.pos_embed, ref.time_text_embed, ref.context_embedder, ref.norm_out,
                  ref.proj_out):
            m.compile()

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
        "torch": torch.__version__, "compiled": args.compile,
    }
    print(f"{args.preset} {args.dtype} {args.resolution}px batch {args.batch}{' compiled' if args.compile else ''} "
          f"on {result['device']}: "
          f"ours {result['ours_ms']:.1f} ms, diffusers {result['diffusers_ms']:.1f} ms (median of {args.repeats}), "
          f"speedup {result['speedup']:.3f}x; max|diff| {diff:.2e} (output max {scale:.2f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


class CostOnly:
    """The Denoiser seam with zero velocities: the guided denoiser's work counters depend only on the passes,
    never on values, so this counts the work of any model shape (SD3-medium included) without running it."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks

    def __call__(self, x, sigma, skip=None, **cond):
        return torch.zeros_like(x)

    def forward_shared(self, x, sigma, *, skips, inputs=None, **cond):
        inputs, _, B = check_variants(list(skips), inputs, x.shape[0])
        return [torch.zeros_like(x[:B]) for _ in inputs]


def guiders():
    """name -> (guider, share_prefix): one batched sweep per step (the default) or separate passes."""
    from s2g.guidance import CFG, S2Guidance
    return {
        "cfg": (CFG(7.5), True),
        "s2": (S2Guidance(), True),
        "s2_separate_passes": (S2Guidance(), False),
        "naive_s2_n4": (S2Guidance(num_subnetworks=4), True),
    }


def expected_s2_work_ratio(num_blocks: int, steps: int, drop_ratio=0.1, protected=(0,), interval=(0.1, 0.9),
                           shift: float = 3.0, interval_unit: str = "steps") -> float:
    """S² work / CFG work per image, averaged exactly over every mask (N = 1, uniform over the allowed sets)."""
    from itertools import combinations

    from s2g.guidance import S2Guidance
    from s2g.guidance.base import Step
    from s2g.guidance.s2 import num_dropped
    from s2g.sampling import sd3_sigmas
    droppable = [b for b in range(num_blocks) if b not in protected]
    masks = list(combinations(droppable, num_dropped(drop_ratio, num_blocks)))
    extra = sum(block_rows([frozenset(), frozenset(), frozenset(m)], [0, 1, 0], 1, num_blocks) - 2 * num_blocks
                for m in masks) / len(masks)
    probe = S2Guidance(interval=interval, interval_unit=interval_unit)  # S²'s own window rule
    sig = sd3_sigmas(steps, shift).tolist()
    active = sum(probe.active(Step(i, steps, sig[i], sig[i + 1])) for i in range(steps))
    return (steps * 2 * num_blocks + active * extra) / (steps * 2 * num_blocks)


def _setup(args, device, dtype, cfg: MMDiTConfig, cost_only: bool = False):
    from s2g.models.mmdit import MMDiT
    from s2g.sampling import sd3_sigmas

    if cost_only:
        model = CostOnly(cfg.depth)
    else:
        with torch.device(device):
            model = MMDiT(cfg).to(dtype).eval().requires_grad_(False)
        if args.compile:
            model.compile()
    g = torch.Generator(device).manual_seed(1)
    lat = args.resolution // 8
    noise = torch.randn(args.batch, cfg.in_channels, lat, lat, generator=g, device=device)
    cond = {"context": torch.randn(args.batch, args.context_len, cfg.context_dim, generator=g, device=device,
                                   dtype=dtype),
            "pooled": torch.randn(args.batch, cfg.pooled_dim, generator=g, device=device, dtype=dtype)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    return model, noise, cond, uncond, sd3_sigmas(args.steps)


def _sample(model, noise, sigmas, guider, share, cond, uncond) -> dict:
    """One whole sampling run; its wall time and cost counters (per image)."""
    r = timed_sampling(model, guider, cond, uncond, noise, sigmas, share_prefix=share)
    return {"seconds": r["seconds"], "nfe_per_image": r["nfe"], "calls": r["calls"], "work_per_image": r["block_rows"]}


def _memory_worker(args, device, dtype, cfg, name: str) -> int:
    """Fresh process: one sampling run of guider `name`; prints its peak RSS as one JSON line. The high-water
    mark is reset after the model is built, so the peak is the sampling run's own."""
    model, noise, cond, uncond, sigmas = _setup(args, device, dtype, cfg)
    guider, share = guiders()[name]
    print(json.dumps(peak_rss(lambda: _sample(model, noise, sigmas, guider, share, cond, uncond))))
    return 0


def _peak_memory(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--mode", "guidance", "--memory-worker", name, "--preset", args.preset,
           "--dtype", args.dtype, "--resolution", str(args.resolution), "--batch", str(args.batch),
           "--context-len", str(args.context_len), "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout  # eager: compiling costs memory
    return json.loads(out.strip().splitlines()[-1])


def guidance_costs(args, device, dtype, cfg: MMDiTConfig) -> int:
    """Per guider, one random-weight MMDiT: work units per image (block-row evaluations, counted by the guided
    denoiser), NFE per image, wall time of whole sampling runs, and peak memory, each also as a ratio to CFG.
    `--count-only` counts work at any model shape without running the model."""
    if args.memory_worker:
        return _memory_worker(args, device, dtype, cfg, args.memory_worker)
    runs = guiders()
    model, noise, cond, uncond, sigmas = _setup(args, device, dtype, cfg, cost_only=args.count_only)
    counts = {k: _sample(CostOnly(cfg.depth), noise, sigmas, g, share, cond, uncond) for k, (g, share) in runs.items()}
    result = {"mode": "guidance", "preset": args.preset, "blocks": cfg.depth, "steps": args.steps,
              "batch": args.batch, "torch": torch.__version__, "compiled": args.compile,
              "expected_s2_work_ratio": expected_s2_work_ratio(cfg.depth, args.steps),
              "guiders": {k: {"nfe_per_image": c["nfe_per_image"], "work_per_image": c["work_per_image"],
                              "work_ratio": c["work_per_image"] / counts["cfg"]["work_per_image"]}
                          for k, c in counts.items()}}
    rows = result["guiders"]
    if not args.count_only:
        result.update(dtype=args.dtype, device=device_name(device), resolution=args.resolution,
                      repeats=args.repeats)
        times = {k: [] for k in runs}
        for _ in range(args.warmup):  # every guider: its row counts may need their own compile
            for g, share in runs.values():
                _sample(model, noise, sigmas, g, share, cond, uncond)
        for _ in range(args.repeats):  # guiders alternate, so load drift hits all of them
            for k, (g, share) in runs.items():
                r = _sample(model, noise, sigmas, g, share, cond, uncond)
                assert r["work_per_image"] == counts[k]["work_per_image"]  # the counter is model-independent
                times[k].append(r["seconds"])
        for k in runs:
            rows[k]["seconds"] = statistics.median(times[k])
            rows[k]["wall_ratio"] = rows[k]["seconds"] / statistics.median(times["cfg"])
        for k in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                _sample(model, noise, sigmas, *runs[k], cond, uncond)
                rows[k]["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            elif args.memory:
                rows[k].update(_peak_memory(args, k))
                rows[k]["peak_mb"] = rows[k]["peak_rss_mb"]
        for k in runs:
            if "peak_mb" in rows[k]:
                rows[k]["memory_ratio"] = rows[k]["peak_mb"] / rows["cfg"]["peak_mb"]
    where = "counted, not run" if args.count_only else (f"{args.dtype} {args.resolution}px"
                                                         f"{' compiled' if args.compile else ''} on {result['device']}")
    print(f"{args.preset} ({cfg.depth} blocks), batch {args.batch}, {args.steps} steps, {where}; "
          f"expected S²/CFG work over all masks: {result['expected_s2_work_ratio']:.4f}")
    for k, r in rows.items():
        line = f"  {k:20s} NFE {r['nfe_per_image']:4d}  work {r['work_per_image']:7.0f} (x{r['work_ratio']:.4f})"
        if "seconds" in r:
            line += f"  {r['seconds']:8.2f} s (x{r['wall_ratio']:.3f})"
        if "peak_mb" in r:
            line += f"  peak {r['peak_mb']:8.1f} MB (x{r['memory_ratio']:.3f})"
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
