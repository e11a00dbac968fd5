"""GenEval-style adherence of one image to its prompt, from the evaluator's detections.

Per image (1 = correct, 0 = wrong):
- count:    as many objects detected as the prompt names;
- color:    the detected colours are the prompt's colours, as a multiset (so an extra or a missing object fails);
- shape:    the same for shapes;
- relation: relational prompts only: both named objects are found (colour and shape) and GenEval's rule holds
            for their centroids: the offset between them, shrunk on each axis by 0.1 x the sum of the two
            bounding-box extents, has a component along the relation's direction larger than half the offset's
            length (so within about 60° of the axis, with a margin for touching objects). If a named object
            is found twice, its largest detection is used;
- found:    relational prompts only: both named objects are found (relation given found = relation / found);
- flipped:  relational prompts only: both are found and the *opposite* relation holds ("A right of B" for
            "A left of B"). A model blind to word order draws both equally often, so relation given found
            against flipped given found is the order control; chance alone is not (layouts are not uniform);
- all:      the detected (colour, shape) pairs are exactly the prompt's, and the relation holds if there is one.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..data.scenes import parse_prompt

ATTRIBUTES = ("count", "color", "shape", "relation", "all")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


POSITION_THRESHOLD = 0.1  # GenEval's default


def relation_holds(relation: str, a, b, threshold: float = POSITION_THRESHOLD) -> bool:
    """Whether object a is `relation` object b, as GenEval decides it (centroids x, y and box extents w, h in
    image fractions; y grows downward)."""
    off = np.array([a.x - b.x, a.y - b.y])
    dims = np.array([getattr(a, "w", 0.0) + getattr(b, "w", 0.0), getattr(a, "h", 0.0) + getattr(b, "h", 0.0)])
    norm = float(np.hypot(*off))
    if norm == 0:
        return False
    revised = np.maximum(np.abs(off) - threshold * dims, 0) * np.sign(off)
    dx, dy = revised / norm
    if relation == "left of":
        return dx < -0.5
    if relation == "right of":
        return dx > 0.5
    if relation == "above":
        return dy < -0.5
    if relation == "below":
        return dy > 0.5
    raise ValueError(f"not a spatial relation: {relation!r}")


def score(prompt: str, detections) -> dict:
    """{count, color, shape, relation, found, flipped, all} for one image; relation, found and flipped are None
    for prompts without a spatial relation."""
    objects, relation = parse_prompt(prompt)
    got = [(d.color, d.shape) for d in detections]
    exact = Counter(got) == Counter(objects)
    out = {
        "count": int(len(got) == len(objects)),
        "color": int(Counter(c for c, _ in got) == Counter(c for c, _ in objects)),
        "shape": int(Counter(s for _, s in got) == Counter(s for _, s in objects)),
        "relation": None,
        "found": None,
        "flipped": None,
        "all": int(exact),
    }
    if relation not in (None, "and"):
        pick = []
        for want in objects:
            match = [d for d in detections if (d.color, d.shape) == want]
            pick.append(max(match, key=lambda d: d.area) if match else None)
        found = all(p is not None for p in pick)
        ok = found and relation_holds(relation, *pick)
        out["found"], out["relation"] = int(found), int(ok)
        out["flipped"] = int(found and relation_holds(OPPOSITE[relation], *pick))
        out["all"] = int(exact and ok)
    return out
