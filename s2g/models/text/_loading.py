"""Shared loading steps for the text encoders: read safetensors, build on the meta device, check, assign."""
from __future__ import annotations

import torch

from ..checkpoint import load_state_dict


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """A path (safetensors only; pickles are refused) or a state dict -> {name: tensor}."""
    sd = load_state_dict(source)
    if not sd:
        raise ValueError(f"no tensors in {source if not isinstance(source, dict) else 'the given state dict'}")
    return sd


def check_keys(cls, cfg, sd: dict[str, torch.Tensor], *, name: str, dtype=None, device=None):
    """Instantiate `cls(cfg)` without allocating, require exactly its keys and shapes, then take the tensors.

    Tensors are assigned, not copied, so a memory-mapped file is not duplicated when dtype/device already match."""
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{name} weights do not match the inferred architecture: {len(missing)} missing "
                         f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")
    for k, want in expected.items():
        if sd[k].shape != want.shape:
            raise ValueError(f"{name} weight {k} has shape {tuple(sd[k].shape)}, expected {tuple(want.shape)}")
    dtype = dtype or next(t.dtype for t in sd.values() if t.is_floating_point())
    model.load_state_dict({k: sd[k].to(device=device, dtype=dtype) for k in expected}, assign=True)
    return model.eval().requires_grad_(False)
