"""What every run records and shares: the git revision it used, and regional compilation of a loaded model."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """HEAD's hash, with -dirty when tracked files differ from it; "unknown" outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compile_regions(denoiser) -> None:
    """`model.compile: true`: the MMDiT's regional compilation (each block, the embedders and the head), through
    the wrappers around it (XPrediction, OnDevice). Lazy: the first sampling step compiles."""
    from .models.mmdit import MMDiT

    net = denoiser
    while not isinstance(net, MMDiT) and hasattr(net, "net"):
        net = net.net
    if not isinstance(net, MMDiT):
        raise ValueError(f"model.compile: {type(denoiser).__name__} has no MMDiT inside to compile")
    net.compile()
