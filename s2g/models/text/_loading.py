"""Shared loading steps for the text encoders: read safetensors, build on the meta device, check, assign."""
from __future__ import annotations

import torch

from ..checkpoint import build_with_weights, load_state_dict


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """A path (safetensors only; pickles are refused) or a state dict -> {name: tensor}."""
    sd = load_state_dict(source)
    if not sd:
        raise ValueError(f"no tensors in {source if not isinstance(source, dict) else 'the given state dict'}")
    return sd


def check_keys(cls, cfg, sd: dict[str, torch.Tensor], *, name: str, dtype=None, device=None):
    """`cls(cfg)` holding exactly the tensors of `sd` (see checkpoint.build_with_weights)."""
    return build_with_weights(lambda: cls(cfg), sd, what=f"{name} weights do not match the inferred architecture",
                              dtype=dtype, device=device)
