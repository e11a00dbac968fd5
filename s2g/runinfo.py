"""What the Hydra entry points share: building a model from its config group, and the revision a run used."""
from __future__ import annotations

import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
SCRIPT_KEYS = ("default_prompts", "grid", "guidance_defaults")  # model-config keys that only the scripts read


def git_revision() -> str:
    """HEAD's hash, with -dirty when tracked files differ from it; "unknown" outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_model(model_cfg: DictConfig):
    """(model, script keys): the config's loader (`_target_`) called without the keys only scripts read, which
    come back as a dict; "embedded" checkpoints mean the weights shipped in s2g/assets (the loader's default),
    "embedded:<name>" the file s2g/assets/<name>.safetensors."""
    import hydra

    args = OmegaConf.to_container(model_cfg, resolve=True)
    extras = {k: args.pop(k) for k in SCRIPT_KEYS if k in args}
    compile_ = bool(args.pop("compile", False))
    for key in ("checkpoint", "weak_checkpoint"):
        if args.get(key) == "embedded":
            args.pop(key)
        elif isinstance(args.get(key), str) and args[key].startswith("embedded:"):
            args[key] = str(ASSETS / f"{args[key][len('embedded:'):]}.safetensors")
    model = hydra.utils.instantiate(args)
    if compile_:
        for denoiser in (model.denoiser, model.weak):
            if denoiser is not None:
                compile_regions(denoiser)
    return model, extras


def apply_guidance_defaults(model_cfg: DictConfig, name: str, guidance_cfg: DictConfig, overrides) -> dict:
    """The model config's own settings for guider `name` (`guidance_defaults: {name: {key: value}}`, e.g. the
    embedded model's val-selected scale) written into `guidance_cfg`, except the keys the command line sets
    (`guidance.<key>=...` in `overrides`). Returns {key: value} of what was applied."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = (model_cfg.get("guidance_defaults") or {}).get(name) or {}
    applied = {k: v for k, v in defaults.items() if f"guidance.{k}" not in given}
    for k, v in applied.items():
        OmegaConf.update(guidance_cfg, k, v, force_add=True)
    return OmegaConf.to_container(OmegaConf.create(applied)) if applied else {}


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
