"""User metrics for scripts/evaluate.py: bring a network as files (a Python class and safetensors weights).

A metric plug-in is any object with one or both of
    per_image(images, prompts) -> {name: array [N]}       e.g. a CLIP score per image (images [N,3,H,W] in [0, 1])
    features(images) -> Tensor [N, D]                     with reference_stats() -> (mu [D], cov [D, D]):
                                                          a Fréchet distance to a reference set (an FID)
configured under `extra_metrics` with a Hydra `_target_`:

    extra_metrics:
      fid:
        _target_: s2g.eval.plugins.FeatureNetwork
        network: my_package.inception:InceptionPool3     # module:Class, built with `kwargs`
        weights: /w/inception.safetensors                # loaded with safetensors, strictly (never unpickled)
        reference: /w/coco_val_stats.safetensors         # tensors `mu` and `cov` (save_reference_stats writes it)
        resize: 299

Per-image values go into per_image.csv as `<name>.<key>` and into metrics.json under `extra.<name>` with
bootstrap intervals over prompts; a features metric with a reference gets `extra.<name>.frechet`.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import stats


def _import(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"network must be 'module.path:ClassName', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import network {spec!r}: {e}") from None


class FeatureNetwork:
    """A user's feature network: `network(**kwargs)` with weights from a safetensors file, fed images resized
    to `resize` and normalised with (mean, std); its output [N, D] are the features."""

    def __init__(self, network: str, weights: str, reference: str | None = None, kwargs: dict | None = None,
                 resize: int | None = None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), batch_size: int = 64,
                 device: str = "cpu"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"extra metric weights not found: {path}")
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: weights must be a .safetensors file (pickles are never loaded)")
        self.net = _import(network)(**(kwargs or {}))
        self.net.load_state_dict(load_file(str(path)), strict=True)
        self.net.eval().to(device)
        self.reference = Path(reference).expanduser() if reference else None
        if self.reference is not None and not self.reference.is_file():
            raise FileNotFoundError(f"extra metric reference statistics not found: {self.reference}")
        self.resize, self.batch_size, self.device = resize, int(batch_size), device
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].float()
            if self.resize:
                x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
            x = ((x - self.mean) / self.std).to(self.device)
            out.append(self.net(x).flatten(1).float().cpu())
        return torch.cat(out)

    def reference_stats(self):
        if self.reference is None:
            raise ValueError("this FeatureNetwork has no `reference` statistics file: set reference=...")
        ref = load_file(str(self.reference))
        return ref["mu"].double().numpy(), ref["cov"].double().numpy()


def save_reference_stats(features, path) -> None:
    """Mean and covariance of reference features, in the file format `FeatureNetwork(reference=...)` reads."""
    mu, cov = stats.gaussian_stats(features)
    save_file({"mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov)}, str(path))


class ConvFeatures(torch.nn.Module):
    """A small CNN used as the example (and test) feature network: conv layers and a global mean pool."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, dim, 3, 2, 1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(dim, dim, 3, 2, 1), torch.nn.SiLU())

    def forward(self, x):
        return self.body(x).mean((2, 3))
