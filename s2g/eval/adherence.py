"""GenEval-style adherence of one image to its prompt, from the evaluator's detections.

Per image (1 = correct, 0 = wrong):
- count:    as many objects detected as the prompt names;
- color:    the detected colours are the prompt's colours, as a multiset (so an extra or a missing object fails);
- shape:    the same for shapes;
- relation: relational prompts only: both named objects are found (colour and shape) and their centroids are in
            the named relation, along its axis by more than across it (the 90° cone that the training layouts
            also obey): "A left of B" means x_B - x_A > |y_B - y_A|. If a named object is found twice, its
            largest detection is used;
- found:    relational prompts only: both named objects are found (relation given found = relation / found);
- all:      the detected (colour, shape) pairs are exactly the prompt's, and the relation holds if there is one.
"""
from __future__ import annotations

from collections import Counter

from ..data.scenes import parse_prompt

ATTRIBUTES = ("count", "color", "shape", "relation", "all")


def relation_holds(relation: str, a, b) -> bool:
    """Whether object a is `relation` object b (centroids; y grows downward)."""
    dx, dy = b.x - a.x, b.y - a.y
    if relation == "left of":
        return dx > abs(dy)
    if relation == "right of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"not a spatial relation: {relation!r}")


def score(prompt: str, detections) -> dict:
    """{count, color, shape, relation, found, all} for one image; relation and found are None for prompts
    without a spatial relation."""
    objects, relation = parse_prompt(prompt)
    got = [(d.color, d.shape) for d in detections]
    exact = Counter(got) == Counter(objects)
    out = {
        "count": int(len(got) == len(objects)),
        "color": int(Counter(c for c, _ in got) == Counter(c for c, _ in objects)),
        "shape": int(Counter(s for _, s in got) == Counter(s for _, s in objects)),
        "relation": None,
        "found": None,
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
        out["all"] = int(exact and ok)
    return out
