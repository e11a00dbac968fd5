"""Running guiders on the toy: trained worlds, paired noise, one method → samples + metrics, and the three
experiments scripts/toy.py offers (the method suite, one row for sweeps, the held-out-seed protocol).

Every method goes through `s2g.sampling` with a guider from `s2g.guidance` (or a control from s2g.guidance.controls),
so what is measured here is the project's code, not a copy of it. Methods are given as guider specs: dicts with
a `_target_` class path and its arguments, as in configs/guidance/*.yaml.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from s2g.guidance import S2Guidance, from_spec, guider_class
from s2g.sampling import GuidedDenoiser, SAMPLERS, uniform_sigmas

from s2g.guidance.controls import KappaProbe
from .metrics import sample_metrics
from .mixture import ExactDenoiser, GaussianMixture, mixture
from .model import train_or_load


# -- worlds: the exact mixture and the networks trained on it --------------------------------------------------
@dataclass
class World:
    dim: int
    seed: int
    gmm: GaussianMixture
    model: torch.nn.Module
    weak: torch.nn.Module
    exact: ExactDenoiser


def _cached(cache_dir: Path, role: str, gmm: GaussianMixture, seed: int, settings: dict, progress: bool):
    """Train (or load) one network; the file name carries a hash of every setting that shapes the weights."""
    key = dict(settings, dim=gmm.dim, std=gmm.std, means=gmm.means.tolist(), seed=seed)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cache_dir) / f"{role}_{gmm.dim}d_seed{seed}_{digest}.safetensors"
    return train_or_load(path, gmm, seed=seed, progress=progress, **settings)


def make_world(toy_cfg, dim: int, seed: int, cache_dir: Path, progress: bool = True, **model_overrides) -> World:
    """The exact mixture plus the main and weak (Autoguidance) networks for one training seed.

    model_overrides replace entries of toy_cfg.model (the quality knob: iterations, width)."""
    gmm = mixture(dim, std=float(toy_cfg.std), offset=float(toy_cfg.offset))
    main = dict(toy_cfg.model, **model_overrides)
    weak = dict(main, width=max(1, round(main["width"] * toy_cfg.weak.width_factor)),
                iterations=max(1, round(main["iterations"] * toy_cfg.weak.iteration_factor)))
    model = _cached(cache_dir, "main", gmm, seed, main, progress)
    weak_model = _cached(cache_dir, "weak", gmm, seed, weak, progress)
    return World(dim, seed, gmm, model, weak_model, ExactDenoiser(gmm))


# -- sampling ----------------------------------------------------------------------------------------------------
def paired_noise(gmm: GaussianMixture, n_per_class: int, seed: int):
    """The same initial noise for every method of a seed (paired comparisons), n per class, classes in blocks."""
    g = torch.Generator().manual_seed(10_000 + seed)  # its own stream, apart from training and the S² masks
    labels = torch.arange(gmm.num_classes).repeat_interleave(n_per_class)
    return torch.randn(len(labels), gmm.dim, generator=g), labels


def toy_guider(spec: dict, world: World | None = None, seed: int | None = None):
    """s2g.guidance.from_spec on the toy: the world's weak network goes to a guider that needs one (Autoguidance),
    and S²-family guiders get `seed` unless the spec pins one."""
    spec = {k: list(v) if hasattr(v, "__iter__") and not isinstance(v, (str, dict)) else v  # yaml lists
            for k, v in dict(spec).items()}                                              # arrive as ListConfig
    cls = guider_class(spec.get("_target_"))
    if getattr(cls, "needs_weak_model", False):
        spec["weak"] = world.weak if world is not None else None
    if issubclass(cls, S2Guidance) and seed is not None:
        spec.setdefault("seed", seed)
    return from_spec(spec)


def generate(denoiser, guider, noise: torch.Tensor, labels: torch.Tensor, null_label: int, steps: int,
             record: bool = False):
    """Euler over a uniform σ grid through s2g.sampling; returns x0 (and the states x_σ per step if record)."""
    guider.reset(getattr(denoiser, "num_blocks", None))
    guided = GuidedDenoiser(denoiser, guider, {"label": labels}, {"label": torch.full_like(labels, null_label)})
    states = []

    def recording(x, step):
        states.append(x.clone())
        return guided(x, step)

    x = SAMPLERS["euler"](recording if record else guided, noise.clone(), uniform_sigmas(steps), progress=False)
    if record:
        return x, torch.stack(states + [x])
    return x


def evaluate(world: World, spec: dict, noise, labels, steps: int, exact: bool = False, record: bool = False,
             seed: int | None = None):
    """Run one method; returns (samples [n, d] float64 numpy, metrics dict, the guider, states or None).
    S² masks are seeded with `seed` (default: the world's training seed)."""
    guider = toy_guider(spec, world, seed=world.seed if seed is None else seed)
    denoiser = world.exact if exact else world.model
    t0 = time.perf_counter()
    out = generate(denoiser, guider, noise, labels, world.gmm.null_label, steps, record)
    x, states = out if record else (out, None)
    x = x.double().numpy()
    metrics = sample_metrics(x, labels.numpy(), world.gmm)
    metrics["seconds"] = time.perf_counter() - t0
    if isinstance(guider, KappaProbe):
        metrics.update(kappa=guider.kappa, effective_scale=guider.effective_scale)
    return x, metrics, guider, states


def spec_label(spec: dict) -> str:
    """A short human-readable description of a spec's arguments (for tables)."""
    skip = {"_target_", "seed", "interval", "interval_unit", "protected_blocks", "form", "allow_negative_omega", "start", "stop"}
    return ", ".join(f"{k}={_short(v)}" for k, v in spec.items() if k not in skip)


def _short(v):
    if isinstance(v, float):
        return f"{v:g}"
    if hasattr(v, "__iter__") and not isinstance(v, str):
        return "[" + ",".join(_short(u) for u in v) + "]"
    return str(v)


@torch.no_grad()
def block_deviation(world: World, sigmas=(0.1, 0.3, 0.5, 0.7, 0.9), n_per_class: int = 500) -> np.ndarray:
    """[num_blocks, len(sigmas)]: mean‖D̂_b - D_c‖ / mean‖D_c - D_u‖ with block b alone skipped, on noised
    ground-truth samples. How far one sub-network lands from the full model, in units of the CFG direction;
    the blocks where it is large are the "key" blocks S² should protect (the paper: block 0)."""
    gmm, model = world.gmm, world.model
    g = torch.Generator().manual_seed(20_000 + world.seed)
    labels = torch.arange(gmm.num_classes).repeat_interleave(n_per_class)
    x0 = torch.cat([gmm.sample(n_per_class, c, g) for c in range(gmm.num_classes)]).float()
    out = np.zeros((model.num_blocks, len(sigmas)))
    for j, sigma in enumerate(sigmas):
        x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
        sig = torch.full((len(x),), sigma)
        v_c = model(x, sig, label=labels)
        v_u = model(x, sig, label=torch.full_like(labels, gmm.null_label))
        cfg_norm = (v_c - v_u).norm(dim=1).mean()
        for b in range(model.num_blocks):
            out[b, j] = float((model(x, sig, skip={b}, label=labels) - v_c).norm(dim=1).mean() / cfg_norm)
    return out


# -- the method suite (python scripts/toy.py) and one method (sweeps) -------------------------------------------
def run_suite(toy_cfg, seed: int, cache_dir: Path, progress: bool = True) -> dict:
    """Every method of toy_cfg.methods (and toy_cfg.exact_methods on the exact denoiser) on one training seed,
    for each dimension; also the Fig. 10 runs and the block-deviation diagnostic. Returns everything the
    figures and the table need: {dim: {"world", "labels", "samples": {name: x}, "states": {...},
    "metrics": {name: dict}, "fig10": {(name, seed): x}, "blocks": array}}."""
    steps, n = int(toy_cfg.sampling.steps), int(toy_cfg.sampling.n_per_class)
    out = {}
    for dim in toy_cfg.dims:
        world = make_world(toy_cfg, dim, seed, cache_dir, progress)
        noise, labels = paired_noise(world.gmm, n, seed)
        jobs = [(name, spec, False) for name, spec in toy_cfg.methods.items()]
        jobs += [(f"exact_{name}", spec, True) for name, spec in toy_cfg.exact_methods.items()]
        traj = torch.arange(0, len(labels), max(1, n // int(toy_cfg.figures.trajectories_per_class)))
        res = dict(world=world, labels=labels.numpy(), samples={}, states={}, metrics={}, specs={}, fig10={},
                   traj_labels=labels[traj].numpy())
        for name, spec, exact in tqdm(jobs, desc=f"{dim}-D methods", disable=not progress):
            x, m, _, states = evaluate(world, dict(spec), noise, labels, steps, exact=exact, record=dim == 1)
            res["samples"][name], res["metrics"][name], res["specs"][name] = x, m, dict(spec)
            if states is not None:
                res["states"][name] = states[:, traj].numpy()
        if dim == 2:  # Fig. 10: naive vs single-mask S² over sampling seeds (noise and masks)
            f10 = [(name, s) for name in toy_cfg.figures.fig10_methods for s in toy_cfg.figures.fig10_seeds]
            for name, s in tqdm(f10, desc="Fig. 10 runs", disable=not progress):
                nz, lb = paired_noise(world.gmm, int(toy_cfg.figures.fig10_n_per_class), s)
                x, m, _, _ = evaluate(world, dict(toy_cfg.methods[name]), nz, lb, steps, seed=s)
                res["fig10"][(name, s)] = (x, lb.numpy(), m)
        res["blocks"] = block_deviation(world)
        out[dim] = res
    return out


def run_single(toy_cfg, spec: dict, seed: int, cache_dir: Path, progress: bool = True) -> list[dict]:
    """One guider spec on every dimension: one metrics row per dimension (for Hydra sweeps)."""
    rows = []
    for dim in toy_cfg.dims:
        world = make_world(toy_cfg, dim, seed, cache_dir, progress)
        noise, labels = paired_noise(world.gmm, int(toy_cfg.sampling.n_per_class), seed)
        _, m, _, _ = evaluate(world, spec, noise, labels, int(toy_cfg.sampling.steps))
        rows.append(dict(dim=dim, seed=seed, **m))
    return rows


# -- the held-out-seed protocol ------------------------------------------------------------------------------------
def expand_grid(spec: dict) -> list[dict]:
    """{..., grid: {scale: [a, b], omega: [c, d]}} → the specs of the Cartesian product, in grid order."""
    spec = dict(spec)
    grid = dict(spec.pop("grid", {}))
    keys = list(grid)
    return [dict(spec, **dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]


def json_spec(spec: dict) -> str:
    return json.dumps({k: (list(v) if hasattr(v, "__iter__") and not isinstance(v, (str, dict)) else v)
                       for k, v in spec.items()}, sort_keys=True)


def select(rows: list[dict], objective: str) -> dict:
    """The spec with the lowest mean objective over the tuning seeds (ties → the first in grid order)."""
    by_spec: dict[str, list] = {}
    for r in rows:
        by_spec.setdefault(r["spec"], []).append(r[objective])
    return json.loads(min(by_spec, key=lambda k: np.mean(by_spec[k])))


def fixed_scale_study(s2_spec: dict, fixed_block: int, naive_n: int) -> dict[str, dict]:
    """The controls around one S² setting (λ, ω): CFG at the same λ, S² with the sub-network deviation reversed
    (ω < 0), replaced by noise of the same norm, averaged over N masks, or from one fixed block."""
    lam, omega = float(s2_spec["scale"]), float(s2_spec["omega"])
    base = {k: v for k, v in s2_spec.items() if k != "_target_"}
    return {
        "fix:cfg": {"_target_": "s2g.guidance.CFG", "scale": lam},
        "fix:s2": dict(base, _target_="s2g.guidance.controls.KappaProbe"),  # S², also measuring κ for fix:cfg_matched
        "fix:naive_s2": dict(base, _target_="s2g.guidance.S2Guidance", num_subnetworks=naive_n),
        "fix:s2_placebo": dict(base, _target_="s2g.guidance.controls.PlaceboS2"),
        "fix:s2_negative_omega": dict(base, _target_="s2g.guidance.S2Guidance", omega=-omega,
                                      allow_negative_omega=True),
        "fix:fixed_block": {"_target_": "s2g.guidance.SkipLayerGuidance", "scale": lam, "skip_scale": omega,
                            "layers": [fixed_block], "start": 0.0, "stop": 1.0,
                            "interval": list(s2_spec.get("interval", [0.1, 0.9])),
                            "interval_unit": s2_spec.get("interval_unit", "steps")},
    }


def matched_cfg(s2_spec: dict, effective_scale: float) -> dict:
    """CFG at λ_eff inside S²'s interval (λ outside): S²'s strength along D_c - D_u, without the sub-network."""
    return {"_target_": "s2g.guidance.controls.IntervalCFG", "scale": float(s2_spec["scale"]),
            "inner_scale": float(effective_scale), "interval": list(s2_spec.get("interval", [0.1, 0.9])),
            "interval_unit": s2_spec.get("interval_unit", "steps")}


def run_protocol(toy_cfg, cache_dir: Path, progress: bool = True):
    """configs/toy/heldout.yaml. Per model regime and dimension:
    1. tuning seeds: every setting of every method's grid (all grids the same size);
    2. held-out seeds: each method at its selected setting (naive S² at S²'s, with N masks), the whole CFG grid
       (the reference curve), and the controls at a fixed strength λ_fix with S²'s best ω there.
    Yields one dict per run (stage tune / selected / test) as it goes."""
    p = toy_cfg.protocol
    grids = {name: expand_grid(dict(spec)) for name, spec in p.methods.items()}
    sizes = {name: len(g) for name, g in grids.items()}
    if len({n for n in sizes.values() if n > 1}) > 1:
        raise ValueError(f"unequal tuning budgets (settings per method): {sizes}")
    steps = int(toy_cfg.sampling.steps)
    for regime, overrides in p.regimes.items():
        for dim in toy_cfg.dims:
            worlds, done = {}, {}

            def world(seed):
                if seed not in worlds:
                    worlds[seed] = make_world(toy_cfg, dim, seed, cache_dir, progress, **overrides)
                return worlds[seed]

            def run(stage, seed, name, spec, n, exact=False):
                key = (seed, n, json_spec(spec), exact)  # a setting that appears twice runs once
                if key not in done:
                    w = world(seed)
                    noise, labels = paired_noise(w.gmm, n, seed)
                    done[key] = evaluate(w, spec, noise, labels, steps, exact=exact)[1]
                return dict(stage=stage, regime=regime, dim=dim, seed=seed, method=name, spec=json_spec(spec),
                            setting=spec_label(spec), **done[key])

            # 1) tuning seeds
            n = int(p.tune_n_per_class[f"{dim}d"])
            tune = []
            jobs = [(s, name, spec) for s in p.tune_seeds for name, g in grids.items() for spec in g]
            for seed, name, spec in tqdm(jobs, desc=f"tune {regime} {dim}-D", disable=not progress):
                tune.append(run("tune", seed, name, spec, n))
                yield tune[-1]
            selected = {name: select([r for r in tune if r["method"] == name], p.objective) for name in grids}
            at_fixed = [r for r in tune if r["method"] == p.s2_method
                        and float(json.loads(r["spec"])["scale"]) == float(p.fixed_scale)]
            if not at_fixed:
                raise ValueError(f"the {p.s2_method} grid has no setting at fixed_scale={p.fixed_scale}")
            s2_fixed = select(at_fixed, p.objective)
            for name, spec in [*selected.items(), ("fix:s2", s2_fixed)]:
                yield dict(stage="selected", regime=regime, dim=dim, method=name, spec=json_spec(spec),
                           setting=spec_label(spec))
            # 2) held-out seeds
            tests = dict(selected)
            tests["naive_s2"] = dict(selected[p.s2_method], num_subnetworks=int(p.naive_n))
            tests.update({f"cfg@{spec['scale']:g}": spec for spec in grids[p.curve_method]})
            tests.update(fixed_scale_study(s2_fixed, int(p.fixed_block), int(p.naive_n)))
            n = int(p.n_per_class[f"{dim}d"])
            jobs = [(s, name) for s in p.test_seeds for name in [*tests, "fix:cfg_matched", "fix:exact_cfg",
                                                                    "exact_conditional"]]
            effective = {}
            for seed, name in tqdm(jobs, desc=f"held-out {regime} {dim}-D", disable=not progress):
                if name == "fix:cfg_matched":  # uses κ from this seed's fix:s2 run, which comes earlier
                    row = run("test", seed, name, matched_cfg(s2_fixed, effective[seed]), n)
                elif name == "fix:exact_cfg":
                    row = run("test", seed, name, tests["fix:cfg"], n, exact=True)
                elif name == "exact_conditional":
                    row = run("test", seed, name, {"_target_": "s2g.guidance.Conditional"}, n, exact=True)
                else:
                    row = run("test", seed, name, tests[name], n)
                if name == "fix:s2":
                    effective[seed] = row["effective_scale"]
                yield row
            worlds.clear()
