"""What a guider costs: one whole sampling run's wall time and work counters, and a run's peak memory. Shared by
scripts/benchmark.py (random-weight MMDiTs at any shape) and experiments/claims (the cost item, Table 5 analog).
"""
from __future__ import annotations

import time

import torch


def timed_sampling(denoiser, guider, cond: dict, uncond: dict, noise: torch.Tensor, sigmas: torch.Tensor, *,
                   sampler: str = "euler", share_prefix: bool = True, weak=None) -> dict:
    """One whole sampling run of a batch: wall seconds (CUDA synchronised), and per image the guided denoiser's
    counters, which are counts: NFE (passes run), network calls, block rows of the main network and of the others
    (Autoguidance's weak one). `weak`: the weak denoiser for a guider that needs one and has none."""
    from ..sampling import SAMPLERS, GuidedDenoiser

    if getattr(guider, "needs_weak_model", False) and guider.weak is None:
        guider.weak = weak
    sync = torch.cuda.synchronize if noise.device.type == "cuda" else (lambda: None)
    guider.reset(denoiser.num_blocks)
    guided = GuidedDenoiser(denoiser, guider, cond, uncond, share_prefix)
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        SAMPLERS[sampler](guided, noise, sigmas, progress=False)
    sync()
    seconds = time.perf_counter() - t
    B = noise.shape[0]
    return {"seconds": seconds, "nfe": guided.nfe, "calls": guided.calls, "block_rows": guided.block_rows / B,
            "other_block_rows": guided.other_block_rows / B}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) / 1024  # kB -> MB


def peak_rss(run) -> dict:
    """`run()` with the process's resident-memory high-water mark reset first (Linux: clear_refs 5), so the peak
    is that call's own: {"peak_rss_mb", "rss_before_sampling_mb"}. Meant for a fresh process per measurement."""
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    return {"peak_rss_mb": _status_mb("VmHWM"), "rss_before_sampling_mb": before}
