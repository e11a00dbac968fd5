"""Train the embedded tiny text-to-image model: an SD3 MMDiT in pixel space + the tiny text encoder, jointly.

    python scripts/train_tiny.py                                   # main model -> <run dir>/tiny.safetensors
    python scripts/train_tiny.py stage=weak weak.text_from=<run dir>/tiny.safetensors   # Autoguidance's weak model
    python scripts/train_tiny.py resume=<run dir>/train_state.safetensors              # continue a cut-off run

Rectified flow as SD3 trains it: x_σ = (1-σ)·x0 + σ·ε with σ = sigmoid(n), n ~ N(mean, std) (logit-normal),
loss ‖v̂ - (ε - x0)‖², where the network predicts x̂0 and v̂ = (x - x̂0)/σ (`prediction: x0`, see rf_loss; SD3's
plain velocity output is `prediction: velocity`). 10% of prompts are replaced by "" so the same network learns
the unconditional velocity that every guider needs. Scenes are drawn on the fly from (seed, step), and the noise
too, so a resumed run sees exactly the batches the uninterrupted one would have.

Everything saved is safetensors: the resumable train state (weights, EMA, Adam moments) and the export in the SD3
single-file layout (`model.diffusion_model.*` + `text_encoders.tiny.*`, EMA weights) that s2g.tiny loads.
"""
from __future__ import annotations

from s2g import cli  # first: sets the thread defaults before torch is imported (s2g/cli.py)

import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tqdm import tqdm  # noqa: E402

from s2g import training  # noqa: E402
from s2g.data.scenes import WORDS, random_scenes, render, sample_scenes  # noqa: E402
from s2g.models.mmdit import MMDiT  # noqa: E402
from s2g.models.tiny_text import TinyTextEncoder  # noqa: E402
from s2g.tiny import TEXT_PREFIX, load_tiny_text  # noqa: E402

MMDIT_PREFIX = "model.diffusion_model."


# ---------------------------------------------------------------------------------------------------------- models


def build_mmdit(hidden: int, depth: int, heads: int, patch: int, image_size: int, text: TinyTextEncoder) -> MMDiT:
    # qk-norm (as SD3.5) steadies training, and its per-head weight makes the head count readable from the
    # tensors, so load_mmdit infers the whole configuration from the file even with head_dim != 64.
    return MMDiT(depth=depth, hidden=hidden, heads=heads, patch=patch, in_channels=3, out_channels=3, qk_norm=True,
                 context_dim=text.config["dim"], pooled_dim=text.config["pooled_dim"],
                 pos_embed_max_size=image_size // patch)


def build(cfg: DictConfig) -> tuple[MMDiT, TinyTextEncoder, bool]:
    """(mmdit, text encoder, train_text). The weak stage reuses the main model's text encoder, frozen, so both
    denoisers read the same conditioning tensors (Autoguidance feeds them one cond dict)."""
    torch.manual_seed(cfg.seed)
    if cfg.stage == "main":
        text = TinyTextEncoder(WORDS, **cfg.text)
        m = cfg.model
        return build_mmdit(m.hidden, m.depth, m.heads, m.patch, cfg.image_size, text), text, True
    if cfg.stage == "weak":
        if not cfg.weak.text_from:
            raise ValueError("stage=weak needs weak.text_from=<main run>/tiny.safetensors (its text encoder is reused)")
        text = load_tiny_text(cfg.weak.text_from).requires_grad_(False)
        mmdit = build_mmdit(cfg.weak.hidden, cfg.model.depth, cfg.weak.heads, cfg.model.patch, cfg.image_size, text)
        return mmdit, text, False
    raise ValueError(f"stage must be main or weak, got {cfg.stage!r}")


def total_steps(cfg: DictConfig) -> int:
    return cfg.steps if cfg.stage == "main" else max(1, round(cfg.steps * cfg.weak.steps_fraction))


# ------------------------------------------------------------------------------------------------------------ loss


def rf_loss(mmdit: MMDiT, text: TinyTextEncoder, images: torch.Tensor, prompts: list[str],
            gen: torch.Generator, uncond_prob: float = 0.1, mean: float = 0.0, std: float = 1.0,
            prediction: str = "x0", sigma_floor: float = 0.05) -> torch.Tensor:
    """s2g.training.rf_loss on images in [0, 1] (mapped to [-1, 1]), the text encoder run on the (dropped) prompts.

    prediction="velocity": the network's output is v (SD3). prediction="x0": the output is x̂0 and the velocity
    is v̂ = (x - x̂0)/σ (s2g.pipeline.XPrediction); the loss is the same velocity loss, with σ floored at
    `sigma_floor` so the smallest noise levels do not dominate. In pixel space with 4x4 patches, x0-prediction
    learns whole shapes far sooner: a velocity network must also copy 48 noise values per token through its
    width (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"; what we saw in a first run:
    scattered per-patch blobs instead of objects after 1400 steps)."""
    def predict(x, sigma, dropped):
        cond = text.encode(dropped)
        return mmdit(x, sigma, cond["context"], cond["pooled"])

    return training.rf_loss(predict, images * 2 - 1, prompts, gen, uncond_prob, mean, std, prediction, sigma_floor)


def scene_kind(scene) -> str:
    return "single" if scene.relation is None else "and" if scene.relation == "and" else "relation"


def mixed_scenes(n: int, seed: int, mix, size: int) -> tuple[torch.Tensor, list[str]]:
    """n scenes with exactly round(n * share) of each kind (single / and / relation; the rest go to relation),
    drawn from scenes.py's grammar in chunks and kept while their kind's quota is open. Pure in (n, seed)."""
    quota = {k: round(n * mix[k]) for k in ("single", "and")}
    quota["relation"] = n - sum(quota.values())
    kept, chunk = [], 0
    while len(kept) < n:
        for scene in random_scenes(2 * n, seed=seed * 1_000 + chunk):
            if quota[scene_kind(scene)] > 0 and len(kept) < n:
                quota[scene_kind(scene)] -= 1
                kept.append(scene)
        chunk += 1
    return render(kept, size), [s.prompt for s in kept]


def batch(cfg: DictConfig, step: int):
    """Scenes and the loss's generator for `step`: a pure function of (seed, step), so resuming is exact."""
    seed = cfg.seed * 1_000_003 + step
    if cfg.get("data_mix"):
        images, prompts = mixed_scenes(cfg.batch_size, seed, cfg.data_mix, cfg.image_size)
    else:  # scenes.py's own mix (v1)
        scenes = sample_scenes(cfg.batch_size, seed=seed, size=cfg.image_size)
        images, prompts = scenes.images, scenes.prompts
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    return images, prompts, gen


# ----------------------------------------------------------------------------------------------------- checkpoints


def export(path: Path, mmdit: MMDiT, text: TinyTextEncoder | None, meta: dict, dtype: torch.dtype) -> None:
    """SD3 single-file layout: the MMDiT under model.diffusion_model., the text encoder under text_encoders.tiny."""
    parts = {MMDIT_PREFIX: mmdit, **({TEXT_PREFIX: text} if text is not None else {})}
    training.save_weights(path, parts, {**meta, **text.metadata()} if text is not None else meta, dtype)


# ------------------------------------------------------------------------------------------------------------ main


def train(cfg: DictConfig, out_dir: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    mmdit, text, train_text = build(cfg)
    ema_mmdit, ema_text = copy.deepcopy(mmdit).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(mmdit.parameters()) + (list(text.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    modules = {"mmdit": mmdit, "ema_mmdit": ema_mmdit, **({"text": text, "ema_text": ema_text} if train_text else {})}
    steps = total_steps(cfg)
    start = training.load_train_state(cfg.resume, modules, opt)[0] if cfg.resume else 0

    meta = {"format": "s2g-tiny", "stage": cfg.stage, "image_size": str(cfg.image_size), "prediction": cfg.prediction,
            "command": " ".join(["python", "scripts/train_tiny.py", *sys.argv[1:]]),
            "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                       f"threads {cfg.threads} device {cfg.device}".strip()}
    t0, losses, history = time.time(), [], []
    elapsed_before, commands = 0.0, []
    if cfg.resume:  # carry the time spent and the commands of the runs this one continues
        with safe_open(cfg.resume, framework="pt") as f:
            prev = f.metadata()
        elapsed_before = float(prev.get("train_seconds", 0))
        commands = json.loads(prev.get("commands", json.dumps([prev.get("command", "")])))
        commands[-1] += f"  (stopped at step {start})"
    meta["commands"] = json.dumps([*commands, meta["command"]])

    def checkpoint(step: int):
        recent = sum(losses[-cfg.log_every:]) / max(1, len(losses[-cfg.log_every:]))
        m = {**meta, "steps": str(step), "train_seconds": f"{elapsed_before + time.time() - t0:.0f}",
             "final_loss": f"{recent:.5f}"}
        training.save_train_state(out_dir / "train_state.safetensors", step, modules, opt, m)
        name = f"tiny{'' if cfg.stage == 'main' else '_weak'}"
        export(out_dir / f"{name}.safetensors", ema_mmdit, ema_text if train_text else None, m,
               getattr(torch, cfg.export_dtype))
        if cfg.get("export_every") and step % cfg.export_every == 0:  # numbered EMA exports: metrics vs step
            (out_dir / "exports").mkdir(exist_ok=True)
            export(out_dir / "exports" / f"{name}_{step:06d}.safetensors", ema_mmdit,
                   ema_text if train_text else None, m, getattr(torch, cfg.export_dtype))

    mmdit.train(), text.train(train_text)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {cfg.stage}", mininterval=5)
    step = start
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = training.lr_at(step, steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        images, prompts, gen = batch(cfg, step)
        loss = rf_loss(mmdit, text, images, prompts, gen, cfg.uncond_prob, **cfg.logit_normal,
                       prediction=cfg.prediction, sigma_floor=cfg.sigma_floor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = training.ema_decay_at(step, cfg.ema_decay)
        training.ema_update(ema_mmdit, mmdit, decay)
        if train_text:
            training.ema_update(ema_text, text, decay)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0:
            avg = sum(losses[-cfg.log_every:]) / cfg.log_every
            history.append((step + 1, avg))
            bar.set_postfix(loss=f"{avg:.4f}")
            elapsed = elapsed_before + time.time() - t0
            print(f"step {step + 1} loss {avg:.5f} lr {opt.param_groups[0]['lr']:.2e} elapsed {elapsed:.0f}s",
                  flush=True)
            with open(out_dir / "train_log.jsonl", "a") as f:  # the loss curve; a resume into the same dir appends
                f.write(json.dumps({"step": step + 1, "loss": round(avg, 6), "lr": opt.param_groups[0]["lr"],
                                    "seconds": round(elapsed, 1)}) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or (step + 1) % (cfg.get("export_every") or steps) == 0 \
                or step + 1 == steps:
            checkpoint(step + 1)
        out_of_time = cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes
        if out_of_time or (cfg.stop_at and step + 1 >= cfg.stop_at):
            print(f"stopping at step {step + 1} ({'max_minutes' if out_of_time else 'stop_at'}); "
                  f"resume with resume={out_dir / 'train_state.safetensors'}", flush=True)
            checkpoint(step + 1)
            break
    return {"steps": step + 1, "history": history}


@hydra.main(config_path="../configs", config_name="train_tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    with cli.user_errors():  # e.g. stage=weak without weak.text_from: one line, exit code 2
        result = train(cfg, out_dir)
    print(f"done: {result['steps']} steps, weights in {out_dir}")


if __name__ == "__main__":
    main()
