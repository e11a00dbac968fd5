"""One sweep over a network's blocks for many variants at once: the batched form of the Denoiser seam.

A *variant* is one prediction: an input (the stacked inputs of a step, e.g. [cond; uncond], each B rows) and a
set of blocks to skip. Variants travel as one batch while they agree on which blocks ran so far; a variant forks
from its group at the first block it skips (keeping its activations by reference, no copy) and rejoins the batch
at the next block it runs. So a step of S² is one sweep: cond, uncond and sub-network rows share every block
batch, and the sub-network costs only the blocks after its first dropped one.

Each row's result equals a separate pass up to float rounding (a batch of different size may round differently).
Any model with blocks can use it: it supplies a state (a tuple of row-aligned tensors, None allowed) and
`run_block(i, state) -> state`; see `MMDiT.forward_shared` and `toy.model.ToyMLP.forward_shared`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

State = tuple  # row-aligned tensors (or None), all with K·B rows for K slabs of B rows


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


def sweep(state: State, skips: Sequence[frozenset], inputs: Sequence[int], K: int, B: int, num_blocks: int,
          run_block: Callable[[int, State], State]) -> tuple[State, list[int]]:
    """Run every variant through the blocks it keeps. Returns (final state, slab): variant j's final rows are
    slab[j]·B ... slab[j]·B + B of the final state (variants with the same history share a slab)."""
    if not skips:
        return state, []
    # A piece: (state, number of slabs in it, [(slab position, variants sharing that slab)]).
    slabs = [(k, [j for j, i in enumerate(inputs) if i == k]) for k in range(K)]
    pieces = [(state, K, [s for s in slabs if s[1]])]
    for i in range(num_blocks):
        kept, run_parts, run_members = [], [], []
        for st, total, members_at in pieces:
            keep, run_pos = [], []
            for pos, members in members_at:
                skipping = [m for m in members if i in skips[m]]
                running = [m for m in members if i not in skips[m]]
                if skipping:
                    keep.append((pos, skipping))
                if running:
                    run_pos.append(pos)
                    run_members.append(running)
            if keep:
                kept.append((st, total, keep))
            if run_pos:
                run_parts.append((st, total, run_pos))
        if run_parts:
            out = run_block(i, _gather(run_parts, B))
            kept.append((out, len(run_members), list(enumerate(run_members))))
        pieces = kept
    final = _gather([(st, total, [p for p, _ in members_at]) for st, total, members_at in pieces], B)
    slab, n = [0] * len(skips), 0
    for _, _, members_at in pieces:
        for _, members in members_at:
            for m in members:
                slab[m] = n
            n += 1
    return final, slab


def block_rows(skips: Sequence[frozenset], inputs: Sequence[int], B: int, num_blocks: int) -> int:
    """Block-row evaluations `sweep` makes: at block i, B rows per distinct (input, blocks skipped before i)
    among the variants that run block i."""
    return sum(B * len({(k, frozenset(j for j in s if j < i)) for s, k in zip(skips, inputs) if i not in s})
               for i in range(num_blocks))
