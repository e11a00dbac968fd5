"""Cheap probes of an embedded tiny model's grasp of word order, for checkpoints along a training run.

    python scripts/probe_tiny.py outputs/train_tiny/<run>                     # every exports/*.safetensors in it
    python scripts/probe_tiny.py a.safetensors b.safetensors --out probes.jsonl --no-sample

1. slot swap (text encoder only). "a red circle left of a blue square" against "a blue square left of a red
   circle": relative L2 distance of the context vector of the same word in its two slots (a bag-of-words encoder
   gives ~0; v1 gave 0.025-0.038), and of the two pooled vectors (v1: 0.003), next to the pooled distance when
   only a colour changes (blue -> green) as the scale of a change the model does tell apart.
2. x̂0 layout at σ = 0.9 (one network pass). Over 64 noise draws of x = 0.9·ε + 0.1·(-1) (an empty black scene at
   σ = 0.9), take the red-dominant mass of x̂0 (R - B, clamped at 0) and its share in the left half for "a red
   circle left of a blue square" and for the swapped prompt, and its share in the top half for "... above ...".
   A model that knows the relation gives a share that flips with the order (the flip is orig - swapped).
3. order gap (training loss, paired). On the relational scenes of the prompt set, noised at σ = 0.9 and 0.6 (two
   draws each), the x̂0 error with the swapped prompt ("a blue square left of a red circle" for a scene of "a red
   circle left of a blue square") against the error with the true prompt, on the same noisy input: relative gap
   (swapped - true) / true, and the share of scenes where the true prompt is better ("win", chance 0.5). An
   order-blind model gives gap 0 and win ~0.5; it moves long before sampled layouts do.
4. sampled images (28 Euler steps, CFG λ = 4 and no guidance by default) on a fixed prompt set: 96 relational
   prompts with two different colours, 48 single objects. A centroid judge (not learned; palette chromaticity
   for the colour, bounding-box fill ratio for the shape) reads them: "found" = both colours present,
   "relation | found" (chance 0.5), and shape accuracy of single objects. The same judge on the real renders of
   the same scenes is printed as its ceiling. This is a probe, not the evaluator (s2g/eval/).
"""
from __future__ import annotations

from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from s2g.data.scenes import COLORS, describe, random_scenes, render  # noqa: E402
from s2g.guidance import CFG, Conditional  # noqa: E402
from s2g.tiny import describe_checkpoint, load_tiny  # noqa: E402

SWAP = ("a red circle left of a blue square", "a blue square left of a red circle")
# slot of each word (token index, <bos> = 0) in SWAP[0] and in SWAP[1]
SLOTS = {"red": (2, 7), "circle": (3, 8), "blue": (7, 2), "square": (8, 3)}
LAYOUT = {"left": SWAP, "top": ("a red circle above a blue square", "a blue square above a red circle")}
PALETTE = torch.tensor(list(COLORS.values()))  # [6, 3]
NAMES = list(COLORS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@torch.no_grad()
def slot_swap(text) -> dict:
    ctx = text.encode(list(SWAP))["context"]
    out = {f"swap_{w}": _rel(ctx[0, i], ctx[1, j]) for w, (i, j) in SLOTS.items()}
    pooled = text.encode([*SWAP, SWAP[0].replace("blue", "green")])["pooled"]
    out["swap_pooled"] = _rel(pooled[0], pooled[1])
    out["colour_pooled"] = _rel(pooled[0], pooled[2])
    return out


@torch.no_grad()
def layout_shares(pipe, sigma: float = 0.9, draws: int = 64, seed: int = 0) -> dict:
    """Share of the red-dominant x̂0 mass in the left (top) half, for each prompt of LAYOUT."""
    eps = torch.randn((draws, *pipe.latent_shape), generator=torch.Generator().manual_seed(seed))
    x = sigma * eps + (1 - sigma) * -1.0  # an empty black scene at σ
    s = torch.full((draws,), sigma)
    out = {}
    for axis, prompts in LAYOUT.items():
        for tag, prompt in zip(("orig", "swapped"), prompts):
            c = pipe.text_encoder.encode([prompt] * draws)
            v = pipe.denoiser(x, s, c["context"], c["pooled"])
            img = ((x - sigma * v + 1) / 2).clamp(0, 1)  # x̂0 in [0, 1]
            red = (img[:, 0] - img[:, 2]).clamp(min=0).mean(0)  # [H, W], mean over draws
            H, W = red.shape
            half = red[:, : W // 2] if axis == "left" else red[: H // 2]
            out[f"{axis}_{tag}"] = (half.sum() / red.sum().clamp(min=1e-8)).item()
        out[f"{axis}_flip"] = out[f"{axis}_orig"] - out[f"{axis}_swapped"]
    return out


@torch.no_grad()
def order_gap(pipe, scenes, sigmas=(0.9, 0.6), draws: int = 2, seed: int = 0) -> dict:
    rel = [s for s in scenes if s.relation not in (None, "and")]
    x0 = render(rel, pipe.latent_shape[-1]) * 2 - 1
    true = pipe.text_encoder.encode([s.prompt for s in rel])
    swapped = pipe.text_encoder.encode([f"{describe(s.objects[1])} {s.relation} {describe(s.objects[0])}" for s in rel])
    gen, out = torch.Generator().manual_seed(seed), {}
    for sigma in sigmas:
        err = {"true": 0.0, "swapped": 0.0}
        for _ in range(draws):
            x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen)
            s = torch.full((len(rel),), sigma)
            for tag, c in (("true", true), ("swapped", swapped)):
                x0_hat = x - sigma * pipe.denoiser(x, s, c["context"], c["pooled"])
                err[tag] = err[tag] + (x0_hat - x0).square().mean((1, 2, 3))
        out[f"gap_{sigma}"] = ((err["swapped"].mean() - err["true"].mean()) / err["true"].mean()).item()
        out[f"win_{sigma}"] = (err["true"] < err["swapped"]).float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------------- the judge


def colour_masks(img: torch.Tensor, bright: float = 0.3) -> torch.Tensor:
    """[6, H, W] bool: bright pixels by nearest palette chromaticity (anti-aliased edges keep their hue)."""
    fg = img.amax(0) > bright
    chroma = img / img.sum(0, keepdim=True).clamp(min=1e-6)
    pal = PALETTE / PALETTE.sum(1, keepdim=True)
    nearest = (chroma.permute(1, 2, 0)[:, :, None] - pal).norm(dim=-1).argmin(-1)  # [H, W]
    return torch.stack([fg & (nearest == k) for k in range(len(NAMES))])


def shape_of(mask: torch.Tensor) -> str:
    """Fill ratio of the bounding box: square ~1, circle ~0.79, triangle ~0.5."""
    ys, xs = mask.nonzero(as_tuple=True)
    fill = mask.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
    return "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"


def judge(images: torch.Tensor, scenes, min_pixels: int = 8) -> dict:
    """found / relation | found on two-object scenes, shape accuracy on single ones."""
    found = rel_ok = n_rel = shape_ok = n_single = 0
    for img, scene in zip(images, scenes):
        masks = colour_masks(img)
        objs = [masks[NAMES.index(o.color)] for o in scene.objects]
        present = [m.sum().item() >= min_pixels for m in objs]
        if scene.relation is None:
            n_single += 1
            shape_ok += present[0] and shape_of(objs[0]) == scene.objects[0].shape
            continue
        n_rel += 1
        if not all(present):
            continue
        found += 1
        (y1, x1), (y2, x2) = [m.nonzero().float().mean(0).tolist() for m in objs]
        rel_ok += {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}[scene.relation]
    return {"found": found / max(1, n_rel), "relation_found": rel_ok / max(1, found),
            "shape_single": shape_ok / max(1, n_single)}


def prompt_set(n_rel: int = 96, n_single: int = 48, seed: int = 20261130):
    """Fixed scenes: relational ones with two different colours, and single objects (their renders: the ceiling)."""
    rel, single = [], []
    for s in random_scenes(4000, seed):
        if s.relation is None and len(single) < n_single:
            single.append(s)
        elif s.relation not in (None, "and") and s.objects[0].color != s.objects[1].color and len(rel) < n_rel:
            rel.append(s)
    return rel + single


@torch.no_grad()
def sampled(pipe, scenes, guiders: dict, steps: int = 28, seed: int = 0) -> dict:
    out = {}
    for name, guider in guiders.items():
        images = pipe([s.prompt for s in scenes], guider, seed=seed, steps=steps)
        out.update({f"{name}_{k}": v for k, v in judge(images, scenes).items()})
    return out


def probe(path, sample: bool = True, scenes=None) -> dict:
    pipe = load_tiny(path, weak_checkpoint=None)
    rec = {"checkpoint": str(path), "step": int(describe_checkpoint(path).get("steps", -1))}
    rec.update(slot_swap(pipe.text_encoder))
    rec.update(layout_shares(pipe))
    scenes = scenes or prompt_set()
    rec.update(order_gap(pipe, scenes))
    if sample:
        rec.update(sampled(pipe, scenes, {"none": Conditional(), "cfg4": CFG(scale=4.0)}))
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="tiny checkpoints, or run dirs (their exports/*.safetensors)")
    ap.add_argument("--out", help="append one JSON line per checkpoint here")
    ap.add_argument("--no-sample", action="store_true", help="probes 1-3 only (seconds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-done", action="store_true", help="skip checkpoints already in --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = []
    for p in map(Path, args.paths):
        paths += sorted((p / "exports").glob("*.safetensors")) if p.is_dir() else [p]
    done = set()
    if args.skip_done and args.out and Path(args.out).exists():
        done = {json.loads(line)["checkpoint"] for line in Path(args.out).read_text().splitlines() if line.strip()}
    scenes = prompt_set()
    if not args.no_sample:
        print("judge on real renders:", json.dumps(judge(render(scenes, 32), scenes)), flush=True)
    for path in paths:
        if str(path) in done:
            continue
        t = time.time()
        rec = probe(path, sample=not args.no_sample, scenes=scenes)
        rec["probe_seconds"] = round(time.time() - t, 1)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.exit(main())
