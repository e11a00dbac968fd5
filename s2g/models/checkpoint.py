"""Checkpoint reading: safetensors only, the SD3 single-file split, and the MMDiT loader.

Weights are read through `safetensors` memory maps, so a loaded model's parameters are views of the file's pages
rather than a second copy in RAM. Pickle files (.ckpt/.pt/.pth/.bin) are refused outright: unpickling runs code.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}

# Prefixes of the single-file SD3 / SD3.5 checkpoints (sd3_medium_incl_clips_t5xxlfp16.safetensors etc.).
COMPONENT_PREFIXES = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip (PK\x03\x04) or, in legacy mode, a raw pickle (protocol >= 2 starts with 0x80).
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise ValueError(
            f"{path}: pickle checkpoints are never loaded (unpickling can run arbitrary code); convert it once, "
            f"in an environment you trust, with safetensors.torch.save_file(torch.load(...), 'model.safetensors')"
        )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers / short files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {msg}") from None


def load_state_dict(source) -> dict[str, torch.Tensor]:
    """Return a flat {name: tensor} dict from a `.safetensors` path, a folder of `.safetensors` shards, or a dict.

    Tensors from files are memory-mapped (no second copy is materialised)."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or a state dict, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():  # diffusers folder: one file or `*-0000k-of-0000n.safetensors` shards
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            hint = f" (found pickle files {pickles[:3]}, which are never loaded)" if pickles else ""
            raise FileNotFoundError(f"no .safetensors file in directory {path}{hint}")
        state = {}
        for f in files:
            state.update(_read_safetensors(f))
        return state
    return _read_safetensors(path)


def split_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a full single-file SD3 checkpoint by prefix, stripping the prefix.

    Returns {"mmdit", "vae", "clip_l", "clip_g", "t5xxl", "other"} (each possibly empty); "other" holds keys that
    match no known prefix, unchanged (e.g. a bare MMDiT file lands there in full)."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (*COMPONENT_PREFIXES, "other")}
    for key, value in state_dict.items():
        for name, prefix in COMPONENT_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            parts["other"][key] = value
    return parts
