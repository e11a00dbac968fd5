"""Give a training state made without the time channel one (s2g.tiny_video.TimeChannel), to resume from it.

    python experiments/tiny_video/add_time_channel.py OLD_STATE NEW_STATE

The patch embedding of the DiT and of its EMA gets a fourth input channel with zero weights, and Adam's moments
for that weight grow zeros likewise, so the network computes exactly what it did at the step the state was
saved (tests/test_tiny_video.py checks it); training then learns to read the channel. The header records it
in its command list. The embedded run went through this once, at the step in experiments/tiny_video/README.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

KEY = "patch_embedding.weight"  # [dim, in_dim, pt, ph, pw]


def add_time_channel(old: Path, new: Path) -> int:
    if Path(new).exists():
        raise FileExistsError(f"{new} exists; outputs are never overwritten")
    with safe_open(str(old), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    if tensors[f"dit.{KEY}"].shape[1] != 3:
        raise ValueError(f"{old}: the patch embedding reads {tensors[f'dit.{KEY}'].shape[1]} channels, not 3")
    # Adam's moments are stored per parameter index; the patch embedding's is the one of its shape
    shape = tensors[f"dit.{KEY}"].shape
    moments = [k for k, v in tensors.items() if k.startswith("opt.") and v.shape == shape]
    if len(moments) != 2:
        raise ValueError(f"{old}: expected the two Adam moments of {KEY}, found {moments}")
    for k in [f"dit.{KEY}", f"ema_dit.{KEY}", *moments]:
        w = tensors[k]
        tensors[k] = torch.cat([w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], 1).contiguous()
    step = int(meta["step"])
    commands = json.loads(meta.get("commands", "[]"))
    meta["commands"] = json.dumps([*commands, f"python experiments/tiny_video/add_time_channel.py (at step {step})"])
    meta["time_channel"] = "ramp"
    config = json.loads(meta["config"])
    config["model"]["time_channel"] = True
    meta["config"] = json.dumps(config)
    save_file(tensors, str(new), metadata=meta)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    print(f"{args.new}: step {add_time_channel(args.old, args.new)}, patch embedding 3 -> 4 channels")


if __name__ == "__main__":
    main()
