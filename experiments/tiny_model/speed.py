"""Training steps/s of candidate tiny-model sizes (1 thread, batch from configs/train_tiny.yaml's data).

    python experiments/tiny_model/speed.py 10,96,3,4,64 10,96,3,2,64      # depth,hidden,heads,patch,batch

Times 9 optimiser steps after 3 warm-up steps; on a shared CPU the numbers move with the other jobs' load.
"""
from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import importlib.util  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
tt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tt)
torch.set_num_threads(1)
for arg in sys.argv[1:]:
    depth, hidden, heads, patch, bs = map(int, arg.split(","))
    cfg = OmegaConf.load(ROOT / "configs" / "train_tiny.yaml")
    cfg.pop("hydra")
    cfg.model = dict(depth=depth, hidden=hidden, heads=heads, patch=patch)
    cfg.batch_size = bs
    mmdit, text, _ = tt.build(cfg)
    params = list(mmdit.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for step in range(12):
        t = time.time()
        images, prompts, gen = tt.batch(cfg, step)
        loss = tt.rf_loss(mmdit, text, images, prompts, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.time() - t)
    n = sum(p.numel() for p in mmdit.parameters()) / 1e6
    print(f"depth {depth} hidden {hidden} heads {heads} patch {patch} batch {bs}: "
          f"{9 / sum(times[3:]):.2f} steps/s, MMDiT {n:.2f}M parameters", flush=True)
