"""Named prompt sets drawn from the scene grammar: `val` for tuning, `test` for reporting, never overlapping.

The grammar has 1548 distinct prompts: 18 single objects ("a red circle") and 306 ordered pairs of distinct
objects for each of "and", "left of", "right of", "above", "below". Each family is shuffled with a fixed seed and
split: test takes 12 single-object prompts and 198 of each pair family (1002 prompts), val takes the other 6
single-object prompts and the next 100 of each pair family (506). The order within a set interleaves the families
so that any prefix (`num_prompts=300`) keeps their proportions, and every single-object prompt sits in the first
300, so that a small run still reports that family.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.scenes import COLORS, RELATIONS, SHAPES, parse_prompt

FAMILIES: tuple[str, ...] = ("single", "and", *RELATIONS)
SPLIT_SEED = 20261130
_TEST = {"single": 12, "pair": 198}
_VAL = {"single": 6, "pair": 100}


def family(prompt: str) -> str:
    """The prompt's family: "single", "and", or its relation. Raises ValueError outside the grammar."""
    objects, relation = parse_prompt(prompt)
    return "single" if relation is None else relation


def grammar_prompts() -> dict[str, list[str]]:
    """Every prompt the grammar can produce, by family, in a fixed order."""
    objects = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    out = {"single": list(objects)}
    for rel in ("and", *RELATIONS):
        out[rel] = [f"{a} {rel} {b}" for a in objects for b in objects if a != b]
    return out


def _interleave(by_family: dict[str, list[str]], single_span: int) -> list[str]:
    """Spread each family evenly over the list; single-object prompts over the first `single_span` places."""
    total = sum(len(v) for v in by_family.values())
    keyed = []
    for fam, prompts in by_family.items():
        span = single_span if fam == "single" else total
        keyed += [((i + 0.5) / len(prompts) * span, FAMILIES.index(fam), p) for i, p in enumerate(prompts)]
    return [p for *_, p in sorted(keyed)]


def _splits() -> dict[str, list[str]]:
    rng = np.random.default_rng(SPLIT_SEED)
    test, val = {}, {}
    for fam, prompts in grammar_prompts().items():
        order = [prompts[i] for i in rng.permutation(len(prompts))]
        sizes = _TEST["single" if fam == "single" else "pair"], _VAL["single" if fam == "single" else "pair"]
        test[fam], val[fam] = order[:sizes[0]], order[sizes[0]:sizes[0] + sizes[1]]
    return {"test": _interleave(test, 300), "val": _interleave(val, 150)}


PROMPT_SETS = ("test", "val")


def prompt_set(name: str, num_prompts: int | None = None) -> list[str]:
    """A named set (`test`, `val`), or a text file with one prompt per line; the first `num_prompts` of it."""
    if name in PROMPT_SETS:
        prompts = _splits()[name]
    elif Path(name).expanduser().is_file():
        lines = Path(name).expanduser().read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        raise ValueError(f"unknown prompt set {name!r}: use one of {', '.join(PROMPT_SETS)} or a text file "
                         f"with one prompt per line")
    if num_prompts is not None:
        if int(num_prompts) < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if int(num_prompts) > len(prompts):
            raise ValueError(f"num_prompts={num_prompts} but prompt set {name!r} has {len(prompts)} prompts")
        prompts = prompts[:int(num_prompts)]
    if not prompts:
        raise ValueError(f"prompt set {name!r} is empty")
    return prompts


def prompt_lines(path) -> dict[str, int]:
    """{prompt: its first line number (1-based)} of a prompt file (blank lines and # comments skipped), in file
    order: what an error about a prompt names, so that line 7 of a long file is found at once."""
    out: dict[str, int] = {}
    for n, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            out.setdefault(line.strip(), n)
    return out
