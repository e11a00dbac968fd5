"""Push two words' embeddings apart in a training state, to resume from it (the left/right saddle).

    python experiments/tiny_video/separate_words.py OLD_STATE NEW_STATE --words left right --distance 0.6

Why: the clips are symmetric under a horizontal flip that swaps "left" and "right", so a model that starts with
the two embeddings close sits at a saddle where both words mean "horizontal", and the loss gradient keeps them
there. In the embedded run they were 0.17 apart at step 6000, closer than two untrained embeddings (about
0.23 at N(0, 0.02^2) in 64 dims), while every word the model uses had moved 0.45-0.63 from its neighbour. The
vertical pair escaped because falling and bouncing break that symmetry (gravity points down). This sets both
rows of the token embedding, in the weights and in the EMA, to their mean ± half of `distance` along their
present difference; everything else, Adam's moments included, is kept. The header records it in its command
list. The embedded run went through this once, at the step in experiments/tiny_video/README.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from s2g.data.clips import WORDS
from s2g.models.tiny_text import SPECIALS

KEY = "tok_embed.weight"  # [vocabulary, dim]: SPECIALS then the grammar's WORDS


def separate_words(old: Path, new: Path, a: str, b: str, distance: float) -> tuple[int, float, float]:
    """Returns (step, distance before, distance after) of the weights' rows."""
    if Path(new).exists():
        raise FileExistsError(f"{new} exists; outputs are never overwritten")
    vocab = [*SPECIALS, *WORDS]
    for w in (a, b):
        if w not in vocab:
            raise ValueError(f"{w!r} is not a word of the video grammar: {' '.join(WORDS)}")
    if a == b or not distance > 0:
        raise ValueError("give two different words and a positive distance")
    with safe_open(str(old), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    i, j = vocab.index(a), vocab.index(b)
    before = (tensors[f"text.{KEY}"][i] - tensors[f"text.{KEY}"][j]).norm().item()
    for prefix in ("text", "ema_text"):
        w = tensors[f"{prefix}.{KEY}"].clone()
        if w.shape[0] != len(vocab):
            raise ValueError(f"{old}: {prefix}.{KEY} has {w.shape[0]} rows, the grammar's vocabulary {len(vocab)}")
        mean, diff = (w[i] + w[j]) / 2, w[i] - w[j]
        w[i], w[j] = mean + diff / diff.norm() * distance / 2, mean - diff / diff.norm() * distance / 2
        tensors[f"{prefix}.{KEY}"] = w
    step = int(meta["step"])
    commands = json.loads(meta.get("commands", "[]"))
    meta["commands"] = json.dumps([*commands, f"python experiments/tiny_video/separate_words.py --words {a} {b} "
                                              f"--distance {distance} (at step {step}, from {before:.3f})"])
    save_file(tensors, str(new), metadata=meta)
    return step, before, (tensors[f"text.{KEY}"][i] - tensors[f"text.{KEY}"][j]).norm().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--words", nargs=2, default=["left", "right"])
    ap.add_argument("--distance", type=float, default=0.6)
    args = ap.parse_args()
    step, before, after = separate_words(args.old, args.new, *args.words, args.distance)
    print(f"{args.new}: step {step}, {args.words[0]} <-> {args.words[1]} {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
