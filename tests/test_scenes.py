"""Procedural scenes: determinism, ground truth that matches the pixels, anti-aliased areas, the grammar."""
import math

import pytest
import torch

from s2g.data.scenes import (COLORS, RELATIONS, SHAPES, WORDS, Scene, SceneObject, parse_prompt, random_scenes,
                             render, sample_scenes)


def test_deterministic_in_seed():
    a, b, c = sample_scenes(32, seed=5), sample_scenes(32, seed=5), sample_scenes(32, seed=6)
    assert a.prompts == b.prompts and torch.equal(a.images, b.images)
    assert a.prompts != c.prompts


def test_prompts_follow_grammar_and_ground_truth():
    scenes = random_scenes(400, seed=0)
    kinds = {s.relation for s in scenes}
    assert kinds == {None, "and", *RELATIONS}  # every construction occurs
    for s in scenes:
        objects, relation = parse_prompt(s.prompt)
        assert objects == [(o.color, o.shape) for o in s.objects] and relation == s.relation
        assert set(s.prompt.split()) <= set(WORDS)
        for o in s.objects:  # inside the frame
            assert o.size <= o.x <= 1 - o.size and o.size <= o.y <= 1 - o.size
        if len(s.objects) == 2:
            a, b = s.objects
            dx, dy = b.x - a.x, b.y - a.y  # y grows downward
            expect = {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx),
                      "below": -dy > abs(dx), "and": True}[s.relation]
            assert expect, s
            # bounding boxes apart: the objects never overlap
            assert max(abs(dx), abs(dy)) >= a.size + b.size


def test_parse_prompt_rejects_other_text():
    with pytest.raises(ValueError, match="grammar"):
        parse_prompt("a red dog")
    with pytest.raises(ValueError, match="grammar"):
        parse_prompt("red circle")


@pytest.mark.parametrize("shape, area", [
    ("circle", lambda r: math.pi * r * r),
    ("square", lambda r: (2 * 0.85 * r) ** 2),
    ("triangle", lambda r: 3 * math.sqrt(3) / 4 * (1.15 * r) ** 2),  # equilateral, circumradius 1.15 r
])
def test_antialiased_area_matches_geometry(shape, area):
    size, r = 32, 0.3
    img = render([Scene("", [SceneObject("white", shape, 0.5, 0.5, r)])], size)[0]
    alpha = img[0] / COLORS["white"][0]  # black background, so coverage = intensity / colour
    assert alpha.sum().item() == pytest.approx(area(r) * size * size, rel=0.03)  # 4x supersampling
    partial = ((alpha > 0.05) & (alpha < 0.95)).sum().item()
    assert partial > 10  # edges are blended, not staircase


def test_pixels_carry_the_ground_truth():
    """Each object's pixels have its colour, and their centroid is its centre (triangle: the inscribed circle's
    centre is not the centroid, so only circles and squares are checked for position)."""
    size = 32
    scenes = [s for s in random_scenes(60, seed=1) if len(s.objects) == 2]
    images = render(scenes, size)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for s, img in zip(scenes, images):
        for o in s.objects:
            col = torch.tensor(COLORS[o.color]).view(3, 1, 1)
            near = ((xx / size - o.x).abs() < o.size * 1.2) & ((yy / size - o.y).abs() < o.size * 1.2)
            full = near & ((img - col).abs().amax(0) < 1e-6)  # fully covered pixels of this object
            assert full.sum() >= 4, (s.prompt, o)
            if o.shape != "triangle":
                w = (img * near).sum(0)  # intensity as weight inside this object's box
                cx, cy = (w * xx).sum() / w.sum() / size, (w * yy).sum() / w.sum() / size
                assert cx.item() == pytest.approx(o.x, abs=0.02) and cy.item() == pytest.approx(o.y, abs=0.02)
    assert len(COLORS) >= 4 and len(SHAPES) == 3
