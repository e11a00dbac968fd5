"""S²'s and CFG's block-row work at the Wan 2.1 T2V 1.3B shape, counted exactly, without running the model.

    python experiments/benchmark/wan_work_units.py           # -> experiments/benchmark/wan_work_units.json

The same counting as the SD3-medium figures (`sd3_medium_work_units.json`, made by `scripts/benchmark.py --mode
guidance --count-only`): that script's zero-velocity stand-in `CostOnly` of the model's depth goes through the
guided denoiser, whose counters depend only on the passes a guider asks for (work = block rows per video: one
block applied to one video's row; embeddings and head not counted; NFE = predictions per video), and its
`expected_s2_work_ratio` averages S²'s extra work exactly over every mask. Here at Wan's shape and settings: 30
blocks, 50 steps of Wan's own grid (shift 5) through its flow UniPC, 81 frames at 832x480 (latents 16 x 21 x 60 x
104, 21 x 30 x 52 = 32,760 tokens), the paper's λ 5 and ω 0.25 (its Wan runs), S²'s default window (the central
80 % of the steps: int(0.1·50) <= i < int(0.9·50), 40 steps), drop ratio 0.1 (3 of 30 blocks, block 0 protected).
Batch 1 with no row key (the masks come from the guider's seed 0, as in the SD3 count); one sampling run per guider.

Also written: the multiply-accumulate count of one block row at this shape (2 FLOPs each, from the layer shapes:
q, k, v, o and the attention over 32,760 tokens, the cross-attention over Wan's 512 text rows, the FFN), so the
work can be read as FLOPs: every block costs the same, and the blocks are almost all of the model.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

from s2g.guidance import CFG, S2Guidance
from s2g.models.wan import CONFIGS
from s2g.sampling import SAMPLERS, GuidedDenoiser, wan_sigmas

OUT = Path(__file__).with_suffix(".json")
PRESET, STEPS, SHIFT, SCALE, OMEGA = "t2v_1.3b", 50, 5.0, 5.0, 0.25
FRAMES, HEIGHT, WIDTH = 81, 480, 832


def benchmark_module():
    """scripts/benchmark.py, for its counting (`CostOnly`, `expected_s2_work_ratio`)."""
    path = ROOT / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("s2g_benchmark_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [n for n in ("CostOnly", "expected_s2_work_ratio") if not hasattr(module, n)]
    if missing:
        raise SystemExit(f"{path} no longer defines {', '.join(missing)}: point this script at the new home of "
                         "the SD3 work counting")
    return module


def latent_shape(frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, channels: int = 16):
    """Wan's VAE: 4x in time (1 + 4k frames -> 1 + k), 8x in space."""
    return channels, (frames - 1) // 4 + 1, height // 8, width // 8


def block_row_flops(tokens: int, dim: int, ffn: int, text_rows: int = 512) -> int:
    """FLOPs (2 per multiply-accumulate) of one Wan block on one video's row: self-attention q, k, v, o and
    QKᵀ, AV over the video tokens; cross-attention q, o on the video tokens, k, v on the text rows, QKᵀ, AV;
    the FFN's two layers. Norms, RoPE, modulation and softmax are left out (elementwise, < 1 %)."""
    self_attn = 4 * tokens * dim * dim + 2 * tokens * tokens * dim
    cross_attn = 2 * tokens * dim * dim + 2 * text_rows * dim * dim + 2 * tokens * text_rows * dim
    return 2 * (self_attn + cross_attn + 2 * tokens * dim * ffn)


def guiders():
    """name -> (guider, share_prefix), as the SD3 count: the sweep (default), separate passes, naive S² N = 4."""
    return {
        "cfg": (CFG(SCALE), True),
        "s2": (S2Guidance(scale=SCALE, omega=OMEGA), True),
        "s2_separate_passes": (S2Guidance(scale=SCALE, omega=OMEGA), False),
        "naive_s2_n4": (S2Guidance(scale=SCALE, omega=OMEGA, num_subnetworks=4), True),
        # The other reading of "the central 80 %": σ in [0.1, 0.9] on Wan's grid (fewer steps at shift 5).
        "s2_sigma_window": (S2Guidance(scale=SCALE, omega=OMEGA, interval_unit="sigma"), True),
    }


def count(cost_only, num_blocks: int, guider, share: bool, shape) -> dict:
    guider.reset(num_blocks)
    noise = torch.zeros(1, *shape)
    cond = {"context": torch.zeros(1, 1, 1)}  # the stand-in never reads it
    guided = GuidedDenoiser(cost_only(num_blocks), guider, cond, {"context": torch.zeros(1, 1, 1)}, share)
    with torch.inference_mode():
        SAMPLERS["unipc"](guided, noise, wan_sigmas(STEPS, SHIFT), progress=False)
    return {"nfe_per_image": guided.nfe, "work_per_image": guided.block_rows}


def main() -> int:
    bench = benchmark_module()
    cfg = CONFIGS[PRESET]
    shape = latent_shape()
    pt, ph, pw = cfg.patch_size
    tokens = (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)
    sig = wan_sigmas(STEPS, SHIFT).tolist()
    from s2g.guidance.base import Step
    active = {k: sum(g.active(Step(i, STEPS, sig[i], sig[i + 1])) for i in range(STEPS))
              for k, (g, _) in guiders().items() if k.startswith("s2")}
    counts = {k: count(bench.CostOnly, cfg.num_layers, g, share, shape) for k, (g, share) in guiders().items()}
    flops = block_row_flops(tokens, cfg.dim, cfg.ffn_dim)
    cfg_work = counts["cfg"]["work_per_image"]
    result = {
        "mode": "guidance", "preset": f"wan21_{PRESET}", "blocks": cfg.num_layers, "steps": STEPS, "shift": SHIFT,
        "sampler": "unipc", "batch": 1, "frames": FRAMES, "size": [WIDTH, HEIGHT], "latent": list(shape),
        "tokens": tokens, "scale": SCALE, "omega": OMEGA, "drop_ratio": 0.1, "s2_active_steps": active,
        "torch": torch.__version__,
        "expected_s2_work_ratio": bench.expected_s2_work_ratio(cfg.num_layers, STEPS),
        "block_row_tflops": flops / 1e12,
        "guiders": {k: {**c, "work_ratio": c["work_per_image"] / cfg_work,
                        "block_pflops_per_video": c["work_per_image"] * flops / 1e15}
                    for k, c in counts.items()},
    }
    print(f"Wan 2.1 {PRESET} ({cfg.num_layers} blocks), {FRAMES} frames {WIDTH}x{HEIGHT} -> latents "
          f"{'x'.join(map(str, shape))}, {tokens} tokens, {STEPS} steps (shift {SHIFT}), counted, not run; "
          f"expected S²/CFG work over all masks: {result['expected_s2_work_ratio']:.4f}; "
          f"one block row {flops / 1e12:.2f} TFLOPs")
    for k, r in result["guiders"].items():
        print(f"  {k:20s} NFE {r['nfe_per_image']:4d}  work {r['work_per_image']:7.0f} (x{r['work_ratio']:.4f})  "
              f"{r['block_pflops_per_video']:7.1f} PFLOPs")
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
