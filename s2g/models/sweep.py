"""One sweep over a network's blocks for many variants at once: the batched form of the Denoiser seam.

A *variant* is one prediction: an input (the stacked inputs of a step, e.g. [cond; uncond], each B rows) and a
*plan*: what to do differently at some blocks (`Perturbation`): skip the block (identity; S², SLG), make its
attention the identity (PAG), or blur its image queries (SEG). A plain set of block indices is a plan that skips
them. Variants travel as one batch while they agree on what happened so far; a variant forks from its group at
its first perturbed block (a skip keeps its activations by reference, no copy; a perturbed block runs as its own
call) and rejoins the batch at the next block it runs normally. So a step of S² or PAG is one sweep: cond,
uncond and perturbed rows share every block batch, and the perturbed row costs only the blocks from its first
perturbed one on.

Each row's result equals a separate pass up to float rounding (a batch of different size may round differently).
Any model with blocks can use it: it supplies a state (a tuple of row-aligned tensors, None allowed) and
`run_block(i, state, perturbation) -> state` (perturbation None: the block as trained; never SKIP); see
`MMDiT.forward_shared` and `toy.model.ToyMLP.forward_shared`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

State = tuple  # row-aligned tensors (or None), all with K·B rows for K slabs of B rows

KINDS = ("skip", "identity_attention", "smoothed_attention")


@dataclass(frozen=True)
class Perturbation:
    """What a pass does to one block. `skip`: the block is the identity. `identity_attention` (PAG): each
    image token attends only to itself among the image tokens. `smoothed_attention` (SEG): the image queries
    are Gaussian-blurred over the token grid with std `sigma` tokens (sigma > 9999 or inf: their mean)."""

    kind: str
    sigma: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind == "smoothed_attention":
            if self.sigma is None or math.isnan(self.sigma) or self.sigma <= 0:
                raise ValueError(f"smoothed attention needs a blur sigma > 0, got {self.sigma}")
            object.__setattr__(self, "sigma", float(self.sigma))
        elif self.sigma is not None:
            raise ValueError(f"{self.kind} takes no sigma, got {self.sigma}")


SKIP = Perturbation("skip")
IDENTITY_ATTENTION = Perturbation("identity_attention")


def smoothed_attention(sigma: float) -> Perturbation:
    return Perturbation("smoothed_attention", sigma)


def as_plan(spec) -> dict[int, Perturbation]:
    """{block: Perturbation} from a plan: None, an iterable of block indices (all skipped), or a mapping
    block -> Perturbation (or its kind's name)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {int(i): p if isinstance(p, Perturbation) else Perturbation(p) for i, p in spec.items()}
    return {int(i): SKIP for i in spec}


def check_plan(spec, num_blocks: int, kinds: Sequence[str], model: str) -> dict[int, Perturbation]:
    """`as_plan`, with one-line errors for blocks out of range and perturbations the model cannot do."""
    plan = as_plan(spec)
    bad = sorted(i for i in plan if not 0 <= i < num_blocks)
    if bad:
        raise ValueError(f"skip indices {bad} outside the {num_blocks} blocks [0, {num_blocks}) (out of range)")
    unknown = sorted({p.kind for p in plan.values()} - set(kinds))
    if unknown:
        raise ValueError(f"{model} cannot do {', '.join(unknown)} (it can do: {', '.join(kinds)})")
    return plan


def check_variants(skips: Sequence, inputs: Sequence[int] | None, rows: int) -> tuple[list[int], int, int]:
    """(inputs, K, B): `inputs[j]` is the stacked input variant j reads (default all 0); K = max + 1 inputs of
    B = rows / K rows each."""
    inputs = [0] * len(skips) if inputs is None else [int(k) for k in inputs]
    if len(inputs) != len(skips):
        raise ValueError(f"{len(inputs)} inputs for {len(skips)} skip sets")
    if not skips:
        return inputs, 1, rows
    K = max(inputs) + 1
    if min(inputs) < 0 or rows % K:
        raise ValueError(f"inputs {inputs} do not split a batch of {rows} rows into equal inputs")
    return inputs, K, rows // K


def _rows(t: Tensor | None, positions: list[int], total: int, B: int) -> Tensor | None:
    if t is None or positions == list(range(total)):
        return t
    start = positions[0]
    if positions == list(range(start, start + len(positions))):
        return t.narrow(0, start * B, len(positions) * B)  # a view: no copy
    return torch.cat([t.narrow(0, p * B, B) for p in positions])


def _gather(parts: list[tuple[State, int, list[int]]], B: int) -> State:
    """Stack the chosen slabs of several states into one state (a component is None if any part's is)."""
    chunks = [[_rows(t, pos, total, B) for t in state] for state, total, pos in parts]
    if len(chunks) == 1:
        return tuple(chunks[0])
    return tuple(None if any(c[m] is None for c in chunks) else torch.cat([c[m] for c in chunks])
                 for m in range(len(chunks[0])))


def sweep(state: State, skips: Sequence, inputs: Sequence[int], K: int, B: int, num_blocks: int,
          run_block: Callable[[int, State, Perturbation | None], State]) -> tuple[State, list[int]]:
    """Run every variant through its plan (`skips[j]`: a skip set or a plan, see `as_plan`). Returns
    (final state, slab): variant j's final rows are slab[j]·B ... slab[j]·B + B of the final state (variants with
    the same history share a slab)."""
    if not skips:
        return state, []
    plans = [as_plan(s) for s in skips]
    # A piece: (state, number of slabs in it, [(slab position, variants sharing that slab)]).
    slabs = [(k, [j for j, i in enumerate(inputs) if i == k]) for k in range(K)]
    pieces = [(state, K, [s for s in slabs if s[1]])]
    for i in range(num_blocks):
        kept = []
        runs: dict = {}  # perturbation (None: as trained) -> ([(state, total, positions)], [member groups])
        for st, total, members_at in pieces:
            keep, run_pos = [], {}
            for pos, members in members_at:
                by_action: dict = {}
                for m in members:
                    by_action.setdefault(plans[m].get(i), []).append(m)
                if SKIP in by_action:
                    keep.append((pos, by_action.pop(SKIP)))
                for action, running in by_action.items():
                    run_pos.setdefault(action, []).append(pos)
                    runs.setdefault(action, ([], []))[1].append(running)
            if keep:
                kept.append((st, total, keep))
            for action, positions in run_pos.items():
                runs[action][0].append((st, total, positions))
        for action, (parts, members) in runs.items():
            out = run_block(i, _gather(parts, B), action)
            kept.append((out, len(members), list(enumerate(members))))
        pieces = kept
    final = _gather([(st, total, [p for p, _ in members_at]) for st, total, members_at in pieces], B)
    slab, n = [0] * len(skips), 0
    for _, _, members_at in pieces:
        for _, members in members_at:
            for m in members:
                slab[m] = n
            n += 1
    return final, slab


def block_rows(skips: Sequence, inputs: Sequence[int], B: int, num_blocks: int) -> int:
    """Block-row evaluations `sweep` makes: at block i, B rows per distinct (input, what happened before i, what
    happens at i) among the variants that do not skip block i."""
    plans = [as_plan(s) for s in skips]
    return sum(B * len({(k, frozenset((j, a) for j, a in p.items() if j < i), p.get(i))
                        for p, k in zip(plans, inputs) if p.get(i) != SKIP})
               for i in range(num_blocks))
