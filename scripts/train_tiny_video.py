"""Train the embedded tiny text-to-video model: a Wan 2.1 DiT in pixel space + the tiny text encoder, jointly.

    python scripts/train_tiny_video.py                          # main model -> <run dir>/tiny_video.safetensors
    python scripts/train_tiny_video.py stage=weak weak.text_from=<run dir>/tiny_video.safetensors   # weak model
    python scripts/train_tiny_video.py resume=<run dir>/train_state.safetensors                     # continue

Clips (s2g.data.clips: 8 frames of 32x32, moving shapes with exact motion) are drawn on the fly from (seed, step),
and the noise too, so a resumed run sees exactly the batches the uninterrupted one would have. The network is
the real `WanDiT` (3-D RoPE self-attention, cross-attention to text, modulation) at a tiny size, on pixels: a
2x4x4 patch turns a clip into 256 tokens of 96 values, the image model's 4x4 patch over two frames (with
`model.time_channel`, each frame's time as a fourth input channel: s2g.tiny_video.TimeChannel says why). Pixel space
because a latent would need a video VAE trained here first, on the same scarce CPU hours, and its errors would
mix with the DiT's in every measurement; the patch embedding does the compression a VAE would.

The loss is s2g.training.rf_loss with x̂0-prediction (the image model's choice, for the same reason: whole
objects early). Exports use the single-file layout `model.diffusion_model.*` (Wan's parameter names) +
`text_encoders.tiny.*`, EMA weights, the training record in the header.
"""
from __future__ import annotations

from s2g import cli  # first: sets the thread defaults before torch is imported (s2g/cli.py)

import copy
import json
import platform
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from s2g.data.clips import WORDS, clip_for_prompt, random_video_prompts, render_clips
from s2g.models.tiny_text import TinyTextEncoder
from s2g.models.wan import WanDiT
from s2g.tiny import load_tiny_text
from s2g.tiny_video import TimeChannel
from s2g.training import (ema_decay_at, ema_update, load_train_state, lr_at, rf_loss, save_train_state,
                          save_weights)

DIT_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "text_encoders.tiny."
PROBE_PROMPTS = {"left": "a red circle moving left", "right": "a red circle moving right",
                 "up": "a blue square moving up", "down": "a blue square moving down"}


def build_dit(m, text: TinyTextEncoder) -> WanDiT:
    return WanDiT(dim=m.dim, num_layers=m.num_layers, num_heads=m.num_heads, ffn_dim=m.ffn_dim,
                  in_dim=4 if m.get("time_channel") else 3,
                  out_dim=3, text_dim=text.config["dim"], freq_dim=m.freq_dim, patch_size=tuple(m.patch_size),
                  text_len=None)


def network(dit: WanDiT):
    """What the loss and the probe call: the DiT, with each frame's time appended when it reads 4 channels."""
    return TimeChannel(dit) if dit.config.in_dim == 4 else dit


def build(cfg: DictConfig) -> tuple[WanDiT, TinyTextEncoder, bool]:
    """(dit, text encoder, train_text). The weak stage reuses the main model's text encoder, frozen, so both
    denoisers read the same conditioning tensors (Autoguidance feeds them one cond dict)."""
    torch.manual_seed(cfg.seed)
    if cfg.stage == "main":
        text = TinyTextEncoder(WORDS, **cfg.text)
        return build_dit(cfg.model, text), text, True
    if cfg.stage == "weak":
        if not cfg.weak.text_from:
            raise ValueError("stage=weak needs weak.text_from=<main run>/tiny_video.safetensors")
        text = load_tiny_text(cfg.weak.text_from).requires_grad_(False)
        m = OmegaConf.merge(cfg.model, {k: cfg.weak[k] for k in ("dim", "num_heads", "ffn_dim")})
        return build_dit(m, text), text, False
    raise ValueError(f"stage must be main or weak, got {cfg.stage!r}")


def batch(cfg: DictConfig, step: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """Clips [B, 3, F, H, W] in [-1, 1], their prompts, and the loss's generator: pure in (seed, step)."""
    rng = np.random.default_rng(cfg.seed * 1_000_003 + step)
    prompts = random_video_prompts(cfg.batch_size, rng, dict(cfg.data_mix))
    clips = [clip_for_prompt(p, rng, cfg.num_frames) for p in prompts]
    videos = render_clips(clips, cfg.frame_size).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, F, 3, H, W] -> Wan's layout
    return videos.contiguous(), prompts, torch.Generator().manual_seed(cfg.seed * 7_919 + step)


@torch.no_grad()
def probe(dit: WanDiT, text: TinyTextEncoder, cfg: DictConfig, sigma: float = 0.9, n: int = 4) -> dict:
    """Does motion separate early? x̂0 at σ 0.9 (one network call from noise, n fixed noises) for one prompt
    per direction; the brightness-weighted centroid of the foreground moves this many px along the named
    axis between the first and the last frame (the truth travels 10.5-17.5 px)."""
    gen = torch.Generator().manual_seed(12345)
    F, S = cfg.num_frames, cfg.frame_size
    eps = torch.randn(n, 3, F, S, S, generator=gen)
    out = {}
    for name, prompt in PROBE_PROMPTS.items():
        ctx = text.encode([prompt] * n)["context"]
        x0 = network(dit)(sigma * eps, torch.full((n,), sigma), ctx).clamp(-1, 1) * 0.5 + 0.5  # [n, 3, F, H, W]
        w = (x0.amax(1) - 0.25).clamp(min=0)  # foreground weight [n, F, H, W]: background is black
        coords = torch.arange(S, dtype=torch.float32)
        mass = w.sum((-1, -2)).clamp(min=1e-6)
        cx, cy = (w.sum(-2) * coords).sum(-1) / mass, (w.sum(-1) * coords).sum(-1) / mass  # [n, F]
        axis, sign = {"left": (cx, -1), "right": (cx, 1), "up": (cy, -1), "down": (cy, 1)}[name]
        out[name] = round(float(sign * (axis[:, -1] - axis[:, 0]).mean()) * 32 / S, 2)
    return out


def train(cfg: DictConfig, out_dir: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    dit, text, train_text = build(cfg)
    ema_dit, ema_text = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(dit.parameters()) + (list(text.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    modules = {"dit": dit, "ema_dit": ema_dit, **({"text": text, "ema_text": ema_text} if train_text else {})}
    steps = cfg.steps if cfg.stage == "main" else max(1, round(cfg.steps * cfg.weak.steps_fraction))
    start, prev = load_train_state(cfg.resume, modules, opt) if cfg.resume else (0, {})

    meta = {"format": "s2g-tiny-video", "family": "wan", "stage": cfg.stage, "prediction": cfg.prediction,
            "num_frames": str(cfg.num_frames), "frame_size": str(cfg.frame_size),
            "num_heads": str(dit.config.num_heads),  # not in the tensors: load_wan needs it
            **({"time_channel": "ramp"} if dit.config.in_dim == 4 else {}),  # s2g.tiny_video.TimeChannel
            "command": " ".join(["python", "scripts/train_tiny_video.py", *sys.argv[1:]]),
            "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
            "machine": f"{platform.machine()} torch {torch.__version__} threads {cfg.threads}"}
    elapsed_before = float(prev.get("train_seconds", 0))
    commands = json.loads(prev["commands"]) if "commands" in prev else []
    if commands:
        commands[-1] += f"  (stopped at step {start})"
    meta["commands"] = json.dumps([*commands, meta["command"]])
    t0, losses = time.time(), []
    name = "tiny_video" if cfg.stage == "main" else "tiny_video_weak"

    def checkpoint(step: int):
        recent = losses[-cfg.log_every:]
        m = {**meta, "steps": str(step), "train_seconds": f"{elapsed_before + time.time() - t0:.0f}",
             "final_loss": f"{sum(recent) / max(1, len(recent)):.5f}"}
        save_train_state(out_dir / "train_state.safetensors", step, modules, opt, m)
        parts = {DIT_PREFIX: ema_dit, **({TEXT_PREFIX: ema_text} if train_text else {})}
        m = {**m, **(ema_text.metadata() if train_text else {})}
        dtype = getattr(torch, cfg.export_dtype)
        save_weights(out_dir / f"{name}.safetensors", parts, m, dtype)
        if cfg.export_every and step % cfg.export_every == 0:  # numbered exports: the metric-vs-step curve
            (out_dir / "exports").mkdir(exist_ok=True)
            save_weights(out_dir / "exports" / f"{name}_{step:06d}.safetensors", parts, m, dtype)

    net = network(dit)

    def predict(x, sigma, prompts):
        return net(x, sigma, text.encode(prompts)["context"])

    dit.train(), text.train(train_text)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {name}", mininterval=10)
    step = start
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        videos, prompts, gen = batch(cfg, step)
        loss = rf_loss(predict, videos, prompts, gen, cfg.uncond_prob, **cfg.logit_normal,
                       prediction=cfg.prediction, sigma_floor=cfg.sigma_floor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = ema_decay_at(step, cfg.ema_decay)
        ema_update(ema_dit, dit, decay)
        if train_text:
            ema_update(ema_text, text, decay)
        losses.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0:
            avg = sum(losses[-cfg.log_every:]) / cfg.log_every
            bar.set_postfix(loss=f"{avg:.4f}")
            record = {"step": done, "loss": round(avg, 6), "lr": opt.param_groups[0]["lr"],
                      "seconds": round(elapsed_before + time.time() - t0, 1)}
            if cfg.probe_every and done % cfg.probe_every == 0:
                record["probe_px"] = probe(ema_dit, ema_text, cfg)
            with open(out_dir / "train_log.jsonl", "a") as f:  # a resume into the same dir appends
                f.write(json.dumps(record) + "\n")
        if done % cfg.checkpoint_every == 0 or (cfg.export_every and done % cfg.export_every == 0) or done == steps:
            checkpoint(done)
        out_of_time = cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes
        if out_of_time or (cfg.stop_at and done >= cfg.stop_at):
            print(f"stopping at step {done}; resume with resume={out_dir / 'train_state.safetensors'}", flush=True)
            checkpoint(done)
            break
    return {"steps": step + 1}


@hydra.main(config_path="../configs", config_name="train_tiny_video", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    with cli.user_errors():
        result = train(cfg, out_dir)
    print(f"done: {result['steps']} steps, weights in {out_dir}")


if __name__ == "__main__":
    main()
