"""Procedural compositional scenes: one or two coloured shapes on black, with a prompt and the ground truth.

Every scene is drawn on the fly from a seed (no downloads), so the embedded text-to-image model can be trained
anywhere and every prompt has an answer that can be checked exactly: the colour, shape, size and position of each
object are returned alongside the image. Prompts come from a small grammar:

    "a red circle"                               one object
    "a blue square and a yellow triangle"        two objects, anywhere (not overlapping)
    "a green triangle left of a red circle"      two objects, the first left of / right of / above / below the second

Shapes are rendered with anti-aliasing (coverage on a 4x supersampled grid, averaged down) so the model learns
clean edges instead of staircase pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

# RGB in [0, 1]. Saturated and far apart in colour space so a pixel's colour names its object unambiguously.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "white": (0.95, 0.95, 0.95),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUND = (0.0, 0.0, 0.0)

# Every word the grammar can produce; the tiny text encoder's vocabulary is exactly this list.
WORDS: tuple[str, ...] = ("a", "and", "left", "right", "of", "above", "below", *COLORS, *SHAPES)

# Object half-size (centre to edge of the bounding box) as a fraction of the image side.
SIZE_RANGE = (0.13, 0.20)
_SUPERSAMPLE = 4


@dataclass
class SceneObject:
    color: str
    shape: str
    x: float  # centre, fraction of the image width (0 = left)
    y: float  # centre, fraction of the image height (0 = top)
    size: float  # half-size, fraction of the image side


@dataclass
class Scene:
    prompt: str
    objects: list[SceneObject]
    relation: str | None = None  # "and", one of RELATIONS, or None for a single object


@dataclass
class SceneBatch:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    prompts: list[str]
    scenes: list[Scene] = field(repr=False)


# --------------------------------------------------------------------------------------------------------------
# Prompts


def describe(obj: SceneObject) -> str:
    return f"a {obj.color} {obj.shape}"


def parse_prompt(prompt: str) -> tuple[list[tuple[str, str]], str | None]:
    """Inverse of the grammar: "a red circle left of a blue square" -> ([("red","circle"),("blue","square")], "left of").

    Used by evaluators to read the answer off a prompt. Raises ValueError for text outside the grammar.
    """
    words = prompt.strip().lower().split()
    obj = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    rel = "|".join(["and", *RELATIONS])
    m = re.fullmatch(rf"{obj}(?: ({rel}) {obj})?", " ".join(words))
    if m is None:
        from .clips import MOTIONS  # here, not at the top: clips builds on this module

        grammar = "('a <colour> <shape>' [and|left of|right of|above|below 'a <colour> <shape>'])"
        if any(f" {phrase}" in f" {' '.join(words)}" for phrase in MOTIONS):
            raise ValueError(f"prompt {prompt!r} is a video prompt (it names a motion); the scene grammar describes "
                             f"still images {grammar}")
        raise ValueError(f"prompt {prompt!r} is not in the scene grammar {grammar}")
    objects = [(m.group(1), m.group(2))]
    if m.group(3) is not None:
        objects.append((m.group(4), m.group(5)))
    return objects, m.group(3)


# --------------------------------------------------------------------------------------------------------------
# Random scenes


def _random_scene(rng: np.random.Generator) -> Scene:
    colors, shapes = list(COLORS), list(SHAPES)

    def pick() -> tuple[str, str]:
        return colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]

    u = rng.random()
    if u < 0.4:  # one object, anywhere it fits
        c, s = pick()
        r = rng.uniform(*SIZE_RANGE) * 1.25  # lone objects a bit larger: more pixels for the shape
        obj = SceneObject(c, s, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), r)
        return Scene(describe(obj), [obj], None)

    relation = "and" if u < 0.7 else RELATIONS[rng.integers(len(RELATIONS))]
    (c1, s1), (c2, s2) = pick(), pick()
    while (c2, s2) == (c1, s1):  # two identical objects make "left of" ambiguous; re-draw
        c2, s2 = pick()
    return _place_pair(rng, (c1, s1), (c2, s2), relation)


def _place_pair(rng: np.random.Generator, first: tuple[str, str], second: tuple[str, str], relation: str) -> Scene:
    (c1, s1), (c2, s2) = first, second
    for _ in range(1000):  # rejection sampling of positions; accepts within a few tries
        r1, r2 = rng.uniform(*SIZE_RANGE), rng.uniform(*SIZE_RANGE)
        x1, y1 = rng.uniform(r1, 1 - r1), rng.uniform(r1, 1 - r1)
        x2, y2 = rng.uniform(r2, 1 - r2), rng.uniform(r2, 1 - r2)
        gap = r1 + r2 + 0.04
        apart = max(abs(x1 - x2), abs(y1 - y2)) >= gap  # bounding boxes (plus margin) do not touch
        ok = {
            "and": apart,
            # the relation must be clear: separated along its axis, and more than along the other one
            "left of": x2 - x1 >= gap and x2 - x1 > abs(y2 - y1),
            "right of": x1 - x2 >= gap and x1 - x2 > abs(y2 - y1),
            "above": y2 - y1 >= gap and y2 - y1 > abs(x2 - x1),
            "below": y1 - y2 >= gap and y1 - y2 > abs(x2 - x1),
        }[relation]
        if ok:
            a, b = SceneObject(c1, s1, x1, y1, r1), SceneObject(c2, s2, x2, y2, r2)
            return Scene(f"{describe(a)} {relation} {describe(b)}", [a, b], relation)
    raise RuntimeError("could not place two objects")  # pragma: no cover - SIZE_RANGE leaves plenty of room


def scene_for_prompt(prompt: str, rng: np.random.Generator) -> Scene:
    """A random layout of a given prompt, drawn as the training data draws it: the real-image reference of the
    evaluator (a render of the same prompt). Raises ValueError for text outside the grammar."""
    objects, relation = parse_prompt(prompt)
    if relation is None:
        (c, s), = objects
        r = rng.uniform(*SIZE_RANGE) * 1.25
        obj = SceneObject(c, s, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), r)
        return Scene(describe(obj), [obj], None)
    return _place_pair(rng, objects[0], objects[1], relation)


def random_scenes(n: int, seed: int) -> list[Scene]:
    """n scenes, a pure function of (n, seed)."""
    rng = np.random.default_rng(seed)
    return [_random_scene(rng) for _ in range(n)]


def sample_scenes(n: int, seed: int, size: int = 32) -> SceneBatch:
    """n random scenes rendered at size x size: images in [0, 1], prompts, ground truth. Deterministic in seed."""
    scenes = random_scenes(n, seed)
    return SceneBatch(render(scenes, size), [s.prompt for s in scenes], scenes)


# --------------------------------------------------------------------------------------------------------------
# Rendering


def coverage(shape: str, x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, r: float) -> torch.Tensor:
    """Boolean mask of points (x, y) inside a shape centred at (cx, cy) with half-size r (all in image fractions)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r  # same area as... roughly the circle's, so size alone does not give the shape away
        return (dx.abs() <= h) & (dy.abs() <= h)
    if shape == "triangle":
        # Upward equilateral triangle inscribed in the circle of radius r*1.15 (a touch larger: a triangle of
        # the circle's radius has much less area). y grows downward.
        R = 1.15 * r
        top, base = -R, R / 2
        half_w = R * np.sqrt(3) / 2
        # inside iff below the apex lines and above the base: |dx| <= half_w * (dy - top) / (base - top)
        return (dy <= base) & (dx.abs() <= half_w * (dy - top) / (base - top))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scenes: list[Scene], size: int = 32) -> torch.Tensor:
    """Rasterise scenes to [N, 3, size, size] images in [0, 1] with anti-aliased edges."""
    n_fine = size * _SUPERSAMPLE
    # sample points at the centres of the fine pixels
    t = (torch.arange(n_fine, dtype=torch.float32) + 0.5) / n_fine
    y, x = torch.meshgrid(t, t, indexing="ij")
    images = torch.empty(len(scenes), 3, size, size)
    images[:] = torch.tensor(BACKGROUND).view(3, 1, 1)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:  # later objects are painted over earlier ones (they never overlap anyway)
            fine = coverage(obj.shape, x, y, obj.x, obj.y, obj.size).float()
            alpha = torch.nn.functional.avg_pool2d(fine[None, None], _SUPERSAMPLE)[0]  # [1, size, size]
            color = torch.tensor(COLORS[obj.color]).view(3, 1, 1)
            images[i] = images[i] * (1 - alpha) + color * alpha
    return images
