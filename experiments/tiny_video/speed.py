"""Training steps/s of tiny Wan DiT sizes on this machine (one thread), measured before the long run.

    python experiments/tiny_video/speed.py 8,128,4,2,4,32 10,96,3,2,4,32    # depth,dim,heads,t_patch,s_patch,batch

Each spec builds the model and text encoder of scripts/train_tiny_video.py with those sizes (ffn 4 x dim), runs
4 full training steps on real batches (clips drawn, loss, backward, AdamW) and reports the mean of the last 3.
"""
from __future__ import annotations

from s2g import cli  # noqa: F401  first: sets the thread defaults before torch is imported
import importlib.util
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from s2g.training import rf_loss

ROOT = Path(__file__).resolve().parents[2]


def main(specs: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_tiny_video", ROOT / "scripts" / "train_tiny_video.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    torch.set_num_threads(1)
    base = OmegaConf.load(ROOT / "configs" / "train_tiny_video.yaml")
    base.pop("hydra")
    for s in specs:
        depth, dim, heads, pt, ps, batch = map(int, s.split(","))
        cfg = OmegaConf.merge(base, {"model": {"num_layers": depth, "dim": dim, "num_heads": heads, "ffn_dim": 4 * dim,
                                               "patch_size": [pt, ps, ps]}, "batch_size": batch})
        dit, text, _ = tt.build(cfg)
        params = list(dit.parameters()) + list(text.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for step in range(4):
            t = time.time()
            videos, prompts, gen = tt.batch(cfg, step)
            loss = rf_loss(lambda x, sg, p: dit(x, sg, text.encode(p)["context"]), videos, prompts, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.time() - t)
        tokens = (cfg.num_frames // pt) * (cfg.frame_size // ps) ** 2
        n = sum(p.numel() for p in dit.parameters()) / 1e6
        print(f"{s}: {tokens} tokens, {n:.2f} M parameters, {sum(times[1:]) / 3:.2f} s/step "
              f"({1 / (sum(times[1:]) / 3):.2f} steps/s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
