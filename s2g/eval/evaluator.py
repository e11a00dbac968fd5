"""The scene evaluator: reads each object's colour, shape and centroid from a 32x32 image of the scene grammar.

Design: a small U-Net (`SceneNet`) labels every pixel twice, with its colour (background or one of the six
palette colours) and with the shape of the object it belongs to (background, circle, square, triangle). Objects
are the connected components (8-neighbourhood) of the colour map, one colour at a time, of at least `min_area`
pixels; an object's shape is the shape class with the largest summed probability over its pixels, and its
centroid is the foreground-probability-weighted mean of its pixel centres. So two touching objects of different
colours stay two objects, and a shape broken into pieces counts as several objects, as a reader would count it.

Why per-pixel labels rather than a classifier over whole images: the per-pixel task has exact ground truth from
the renderer, needs no matching of predicted slots to objects, and the same network's bottleneck gives the
image-level features of the Fréchet distance (`features`: the 128 channels of the 4x4 bottleneck, averaged over
space).

It is trained on freshly rendered scenes (`render_batch`) with augmentations chosen to resemble a generator's
output: blur, pixel noise, a faint coloured haze on the background, ragged and wobbly edges (a smooth random
warp of each shape plus noise on its coverage), slight rotations and stretches, rounded square corners, colour
shifts, and a third object or an empty canvas now and then. Weights: `s2g/assets/evaluator.safetensors`, whose
header holds the training command and record (`python scripts/train_evaluator.py`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .. import ASSETS
from ..data.scenes import COLORS, SHAPES, SIZE_RANGE, coverage, random_scenes

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
EVALUATOR_CHECKPOINT = ASSETS / "evaluator.safetensors"
IMAGE_SIZE = 32


# ------------------------------------------------------------------------------------------------- the network


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class SceneNet(nn.Module):
    """U-Net over 32x32 RGB: per-pixel colour logits [B, 7, H, W], shape logits [B, 4, H, W], and image features
    [B, 128] (the mean of the 4x4 bottleneck, whose receptive field covers the whole image)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.enc1 = _conv(3, w)                                       # 32
        self.enc2 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))        # 16
        self.enc3 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))    # 8
        self.mid = nn.Sequential(_conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w))     # 4
        self.dec3 = _conv(8 * w + 4 * w, 4 * w)
        self.dec2 = _conv(4 * w + 2 * w, 2 * w)
        self.dec1 = _conv(2 * w + w, w)
        self.head = nn.Conv2d(w, 1 + len(COLORS) + 1 + len(SHAPES), 1)
        self.feature_dim = 8 * w

    def stages(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage's activations, input to head (experiments/eval/eyecheck.py compares them as features)."""
        st = {"enc1": self.enc1(images * 2 - 1)}
        st["enc2"] = self.enc2(st["enc1"])
        st["enc3"] = self.enc3(st["enc2"])
        st["mid"] = self.mid(st["enc3"])
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        st["dec3"] = self.dec3(torch.cat([up(st["mid"]), st["enc3"]], 1))
        st["dec2"] = self.dec2(torch.cat([up(st["dec3"]), st["enc2"]], 1))
        st["dec1"] = self.dec1(torch.cat([up(st["dec2"]), st["enc1"]], 1))
        return st

    def forward(self, images: torch.Tensor):
        st = self.stages(images)
        logits = self.head(st["dec1"])
        k = 1 + len(COLORS)
        return logits[:, :k], logits[:, k:], st["mid"].mean((2, 3))


# ------------------------------------------------------------------------------------------- reading a scene


@dataclass
class Detection:
    color: str
    shape: str
    x: float  # centroid, fraction of the width (0 = left)
    y: float  # centroid, fraction of the height (0 = top)
    area: int  # pixels
    shape_confidence: float  # mean probability of the chosen shape over the object's pixels
    w: float = 0.0  # bounding-box width, fraction of the width
    h: float = 0.0  # bounding-box height, fraction of the height

    def as_dict(self) -> dict:
        return asdict(self)


class SceneEvaluator:
    """`detect(images)` -> one list of `Detection`s per image; `features(images)` -> [N, 128] for Fréchet
    distances. Images are [N, 3, 32, 32] in [0, 1]."""

    def __init__(self, net: SceneNet, min_area: int = 10, batch_size: int = 256, meta: dict | None = None):
        self.net = net.eval()
        self.min_area = int(min_area)
        self.batch_size = int(batch_size)
        self.meta = meta or {}

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @classmethod
    def load(cls, path=EVALUATOR_CHECKPOINT, **kwargs) -> "SceneEvaluator":
        from ..models.checkpoint import load_state_dict
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluator weights not found: {path} "
                                    f"(train them: python scripts/train_evaluator.py)")
        state = load_state_dict(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        net = SceneNet(int(meta.get("width", 16)))
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(net, meta=meta, **kwargs)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the scene evaluator reads [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] images, got "
                             f"{tuple(images.shape)}")
        return images.float().clamp(0, 1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor):
        """(colour probabilities [N,7,H,W], shape probabilities [N,4,H,W], features [N,128]), batched."""
        images = self._check(images)
        outs = [self.net(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        col, shp, feat = (torch.cat(t) for t in zip(*outs))
        return col.softmax(1), shp.softmax(1), feat

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)[2]

    def detect(self, images: torch.Tensor) -> list[list[Detection]]:
        col, shp, _ = self.predict(images)
        return [self._objects(c, s) for c, s in zip(col.numpy(), shp.numpy())]

    def read(self, images: torch.Tensor) -> tuple[list[list[Detection]], torch.Tensor]:
        """Detections and features in one pass."""
        col, shp, feat = self.predict(images)
        return [self._objects(c, s) for c, s in zip(col.numpy(), shp.numpy())], feat

    def _objects(self, col: np.ndarray, shp: np.ndarray) -> list[Detection]:
        H, W = col.shape[1:]
        label = col.argmax(0)  # 0 = background
        fg = 1.0 - col[0]
        ys, xs = np.mgrid[0:H, 0:W]
        found = []
        for ci, name in enumerate(COLOR_NAMES, start=1):
            mask = label == ci
            if mask.sum() < self.min_area:
                continue
            comps, n = ndimage.label(mask, structure=np.ones((3, 3)))
            for k in range(1, n + 1):
                m = comps == k
                area = int(m.sum())
                if area < self.min_area:
                    continue
                w = fg[m]
                score = shp[1:, m].sum(1)  # summed probability of each shape over the object's pixels
                si = int(score.argmax())
                found.append(Detection(name, SHAPES[si], float(((xs[m] + 0.5) * w).sum() / w.sum() / W),
                                       float(((ys[m] + 0.5) * w).sum() / w.sum() / H), area,
                                       float(score[si] / area), float(np.ptp(xs[m]) + 1) / W,
                                       float(np.ptp(ys[m]) + 1) / H))
        return found


# ---------------------------------------------------------------------------------------------- training data


def _shape_mask(shape: str, x, y, cx, cy, r, rng: np.random.Generator, augment: bool) -> torch.Tensor:
    """Coverage of one object at points (x, y), optionally rotated, stretched, warped and (squares) rounded."""
    dx, dy = x - cx, y - cy
    if augment:
        theta = rng.normal(0, 0.08)  # a few degrees
        c, s = math.cos(theta), math.sin(theta)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
        ax, ay = np.exp(rng.normal(0, 0.07, 2))
        dx, dy = dx / ax, dy / ay
        amp = rng.uniform(0, 0.12) * r  # a smooth wobble of the outline, up to ~12% of the half-size
        for _ in range(3):
            fx, fy, ph = rng.normal(0, 1.5 / r, 2).tolist() + [rng.uniform(0, 2 * math.pi)]
            dx = dx + amp / 3 * torch.sin(fx * x + fy * y + ph)
            ph = rng.uniform(0, 2 * math.pi)
            dy = dy + amp / 3 * torch.cos(fy * x - fx * y + ph)
        if shape == "square" and rng.random() < 0.5:
            h = 0.85 * r
            rho = rng.uniform(0, 0.35) * h  # rounded corners: still a square to a reader
            qx, qy = dx.abs() - (h - rho), dy.abs() - (h - rho)
            outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
            return outside <= rho
    return coverage(shape, dx, dy, 0.0, 0.0, r)


def render_batch(n: int, rng: np.random.Generator, size: int = IMAGE_SIZE, augment: bool = True,
                 extras: bool | None = None, supersample: int = 2):
    """n random scenes -> (images [n,3,H,W] in [0,1], colour labels [n,H,W] (0 = background, 1.. = COLORS
    order), shape labels [n,H,W] (0 = background, 1.. = SHAPES order), scenes).

    A pixel's label is the object covering at least half of it. With `augment`, also a third object now and
    then, empty canvases (`extras`, default: as `augment`), and the generator-like corruptions listed in the
    module docstring."""
    extras = augment if extras is None else extras
    scenes = random_scenes(n, int(rng.integers(2**31)))
    fine = size * supersample
    t = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine
    y, x = torch.meshgrid(t, t, indexing="ij")
    images = torch.zeros(n, 3, size, size)
    col_lab = torch.zeros(n, size, size, dtype=torch.long)
    shp_lab = torch.zeros(n, size, size, dtype=torch.long)
    for i, scene in enumerate(scenes):
        objects = list(scene.objects)
        if extras:
            u = rng.random()
            if u < 0.03:
                objects = []
            elif u < 0.13:  # a third object where it fits: generators sometimes draw one
                extra = random_scenes(1, int(rng.integers(2**31)))[0].objects[0]
                extra.size = rng.uniform(*SIZE_RANGE)
                if all(max(abs(extra.x - o.x), abs(extra.y - o.y)) >= extra.size + o.size + 0.02 for o in objects):
                    objects.append(extra)
        img = torch.zeros(3, size, size)
        for obj in objects:
            r = obj.size * (rng.uniform(0.8, 1.2) if augment else 1.0)
            m = _shape_mask(obj.shape, x, y, obj.x, obj.y, r, rng, augment).float()
            alpha = F.avg_pool2d(m[None, None], supersample)[0, 0]
            color = torch.tensor(COLORS[obj.color])
            if augment:
                color = (color + torch.from_numpy(rng.uniform(-0.08, 0.08, 3)).float()) * rng.uniform(0.85, 1.05)
                edge = (alpha > 0.02) & (alpha < 0.98)  # ragged anti-aliasing
                alpha = (alpha + edge * torch.from_numpy(rng.normal(0, 0.15, alpha.shape)).float()).clamp(0, 1)
            img = img * (1 - alpha) + color.clamp(0, 1).view(3, 1, 1) * alpha
            inside = alpha >= 0.5
            col_lab[i][inside] = 1 + COLOR_NAMES.index(obj.color)
            shp_lab[i][inside] = 1 + SHAPES.index(obj.shape)
        if augment:
            if rng.random() < 0.3:  # faint coloured haze on the background
                haze = torch.from_numpy(rng.normal(0, 1, (1, 3, 4, 4))).float()
                img = img + rng.uniform(0, 0.06) * F.interpolate(haze, size=size, mode="bilinear")[0].abs()
            s = rng.uniform(0, 1.0) if rng.random() < 0.7 else 0.0
            if s > 0.05:
                img = _blur(img, s)
            img = img + rng.uniform(0, 0.05) * torch.from_numpy(rng.normal(0, 1, img.shape)).float()
        images[i] = img.clamp(0, 1)
    return images, col_lab, shp_lab, scenes


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-k * k / (2 * sigma * sigma))
    k = k / k.sum()
    img = F.conv2d(F.pad(img[:, None], (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    img = F.conv2d(F.pad(img, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
    return img[:, 0]


def describe_evaluator(path=EVALUATOR_CHECKPOINT) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: (json.loads(v) if k in ("config", "heldout") else v) for k, v in meta.items()}
