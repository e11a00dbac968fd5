"""What the embedded models' training scripts share: the rectified-flow loss, the schedule, EMA, and resumable
state in safetensors.

The scripts (scripts/train_tiny.py for images, scripts/train_tiny_video.py for video) only build their network
and draw their data; everything here takes tensors and modules and knows nothing of Hydra.

Rectified flow as SD3 and Wan train it: x_σ = (1-σ)·x0 + σ·ε, velocity v = ε - x0, σ = sigmoid(n) with
n ~ N(mean, std) (logit-normal). A network may predict v directly, or x̂0, seen as v̂ = (x - x̂0)/σ; the loss is
the velocity loss either way (with σ floored for x̂0, so the smallest noise levels do not dominate).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def rf_loss(predict: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor], x0: torch.Tensor,
            prompts: list[str], gen: torch.Generator, uncond_prob: float = 0.1, mean: float = 0.0,
            std: float = 1.0, prediction: str = "x0", sigma_floor: float = 0.05) -> torch.Tensor:
    """Rectified-flow loss on data x0 [B, ...] in [-1, 1]; `predict(x, sigma, prompts)` runs text encoder and
    network. A share `uncond_prob` of prompts becomes "" so one network also learns the unconditional velocity
    that every guider needs. All randomness comes from `gen`, in a fixed order (drop, σ, ε), so a resumed run
    draws what the uninterrupted one would have."""
    B = x0.shape[0]
    drop = torch.rand(B, generator=gen) < uncond_prob
    sigma = torch.sigmoid(mean + std * torch.randn(B, generator=gen))
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma.view(B, *([1] * (x0.ndim - 1)))
    x = (1 - s) * x0 + s * eps
    out = predict(x, sigma, ["" if d else p for p, d in zip(prompts, drop.tolist())])
    if prediction == "velocity":
        return (out - (eps - x0)).square().mean()
    if prediction == "x0":  # ‖v̂ - v‖² = ‖x̂0 - x0‖²/σ²
        return ((out - x0) / s.clamp(min=sigma_floor)).square().mean()
    raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from lr to lr·min_lr_ratio at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1+s)/(10+s)): early exports still follow the model."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def save_train_state(path: Path, step: int, modules: dict, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Weights of every module, Adam's moments and the step, in one safetensors file, written atomically (a run
    killed mid-save keeps the previous file)."""
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().reshape(-1) if k == "step" else v.detach().contiguous()
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={**meta, "step": str(step)})
    tmp.replace(path)


def load_train_state(path, modules: dict, opt: torch.optim.Optimizer) -> tuple[int, dict[str, str]]:
    """Restore what save_train_state wrote; returns (step, header)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state["state"].setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
    opt.load_state_dict(state)
    return int(meta["step"]), meta


def save_weights(path: Path, parts: dict[str, torch.nn.Module], meta: dict, dtype: torch.dtype) -> None:
    """An export: each module's state dict under its prefix (e.g. "model.diffusion_model."), cast to `dtype`,
    written atomically with `meta` as the header."""
    tensors = {prefix + k: v.detach().to(dtype).contiguous()
               for prefix, m in parts.items() for k, v in m.state_dict().items()}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
