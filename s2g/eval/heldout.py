"""The evaluator's accuracy on renders it never saw: adherence of each render to its own prompt (every metric
should be ~1) and the error of each centroid against the ground truth."""
from __future__ import annotations

import numpy as np

from ..data.scenes import sample_scenes
from .adherence import ATTRIBUTES, score
from .evaluator import render_batch


def heldout_accuracy(evaluator, n: int = 2000, seed: int = 10**6, kind: str = "clean") -> dict:
    """kind: "clean" (the data renderer, as the generator was trained on) or "corrupted" (the training
    corruptions, no extra objects). Returns the mean of each adherence metric, the number of renders, and the
    mean and max centroid error in pixels over objects whose detection matches (colour and shape)."""
    if kind == "clean":
        batch = sample_scenes(n, seed)
        images, scenes = batch.images, batch.scenes
    elif kind == "corrupted":
        images, _, _, scenes = render_batch(n, np.random.default_rng(seed), augment=True, extras=False)
    else:
        raise ValueError(f"kind must be 'clean' or 'corrupted', got {kind!r}")
    detections = evaluator.detect(images)
    rows = [score(s.prompt, d) for s, d in zip(scenes, detections)]
    out = {"n": n, "kind": kind}
    for a in ATTRIBUTES:
        vals = [r[a] for r in rows if r[a] is not None]
        out[a] = round(float(np.mean(vals)), 5)
    size = images.shape[-1]
    errors = []
    for s, dets in zip(scenes, detections):
        for o in s.objects:
            match = [d for d in dets if (d.color, d.shape) == (o.color, o.shape)]
            if match:
                d = min(match, key=lambda d: (d.x - o.x) ** 2 + (d.y - o.y) ** 2)
                errors.append(size * float(np.hypot(d.x - o.x, d.y - o.y)))
    out["centroid_error_px_mean"] = round(float(np.mean(errors)), 3) if errors else None
    out["centroid_error_px_max"] = round(float(np.max(errors)), 3) if errors else None
    return out
