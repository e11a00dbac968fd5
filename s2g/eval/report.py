"""Comparing and reporting finished runs (run.py writes them): load a run dir, paired A − B differences, rescore a
run's fidelity from its saved features, `gather` a sweep into one table and one plot; and the one home of the
interval format, markdown tables and the adherence-against-FD plot that every table here and in
experiments/claims uses.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from . import stats
from .harness import Item, _half_sample_ok, reference_renders
from .kinds import kind_of

TABLE_METRICS = ("all", "count", "color", "shape", "relation", "relation_given_found", "flipped_given_found")


# ---------------------------------------------------------------------------------------------- formatting


def interval(d: dict | None, digits: int = 3, signed: bool = False) -> str:
    """`mean [lo, hi]` of an interval dict (mean alone when it has no interval; "" for none)."""
    if not d:
        return ""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if d.get("lo") is None:
        return f.format(d["mean"])
    return f"{f.format(d['mean'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in body])


def plot_adherence_fd(points: list[tuple], path: Path, title: str = "", deltas: list[tuple] | None = None) -> None:
    """Left: all correct against the Fréchet distance, one point per (label, all, fd) with its own intervals
    (interval dicts). Right, when `deltas` (label, Δ all, Δ FD) are given: the paired differences to a baseline,
    with their paired intervals, which are far narrower, since both runs share prompts and noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deltas = list(deltas or [])
    fig, axes = plt.subplots(1, 2 if deltas else 1, figsize=(12 if deltas else 6.5, 4.5), squeeze=False)
    colour = {label: plt.get_cmap("tab20")(i % 20) for i, (label, *_) in enumerate(points)}  # same in both panels

    def err(d):
        lo = d["mean"] if d.get("lo") is None else d["lo"]
        hi = d["mean"] if d.get("hi") is None else d["hi"]
        return [[d["mean"] - lo], [hi - d["mean"]]]

    def panel(ax, rows):
        for label, a, f in rows:
            ax.errorbar(f["mean"], a["mean"], yerr=err(a), xerr=err(f), fmt="o", capsize=2, color=colour.get(label))
            ax.annotate(label, (f["mean"], a["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.grid(alpha=0.3)

    ax = axes[0, 0]
    panel(ax, points)
    ax.set_xlabel("Fréchet distance to real renders (lower is better)")
    ax.set_ylabel("all correct (higher is better)")
    ax.set_title(title, fontsize=9)
    if deltas:
        ax = axes[0, 1]
        panel(ax, deltas)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("Δ Fréchet distance, paired (left of 0: better)")
        ax.set_ylabel("Δ all correct, paired (above 0: better)")
        ax.set_title("paired difference to the baseline (same prompts, same noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- paired / gather


def load_run(path: Path) -> dict:
    import yaml
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "metrics.json").is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (not a finished evaluate.py run)")
    metrics = json.loads((path / "metrics.json").read_text())
    with open(path / kind_of(metrics).rows_file, newline="") as f:
        rows = list(csv.DictReader(f))
    config = (yaml.safe_load((path / "config.yaml").read_text()) or {}) if (path / "config.yaml").is_file() else {}
    return {"dir": path, "metrics": metrics, "rows": rows, "config": config,
            "features": load_file(str(path / "features.safetensors"))["features"].double().numpy(),
            "run": json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}}


def paired(a: dict, b: dict, n_boot: int = 2000, level: float = 0.95, seed: int = 0, fd_boot: int = 200,
           pr_halves: int = 100) -> dict:
    """A - B on the (prompt, seed) items both runs share: every adherence metric of the runs' kind (mean
    difference, cluster bootstrap interval over prompts, sign-flip p-value), and, when both runs have evaluator
    features, the Fréchet distance difference FD(A, ref) - FD(B, ref) against the same real renders of those
    items, on a shared bootstrap of prompts, and the precision and recall differences on a shared delete-half
    jackknife. Runs of different kinds (images, clips) are refused."""
    kind = kind_of(a["metrics"])
    if kind is not kind_of(b["metrics"]):
        raise ValueError(f"{a['dir']} is a {kind.name} run and {b['dir']} a {kind_of(b['metrics']).name} run; "
                         f"pair compares runs of one kind")
    key = lambda r: (r["seed"], r["prompt"])  # noqa: E731
    ib = {key(r): i for i, r in enumerate(b["rows"])}
    pairs = [(i, ib[key(r)]) for i, r in enumerate(a["rows"]) if key(r) in ib]
    if not pairs:
        raise ValueError(f"{a['dir']} and {b['dir']} share no (prompt, seed) items")
    ia, jb = (np.array(x) for x in zip(*pairs))
    clusters = np.array([a["rows"][i]["prompt"] for i in ia])
    out = {"a": str(a["dir"]), "b": str(b["dir"]), "n_pairs": len(pairs)}
    for m in kind.paired_metrics:
        va = [a["rows"][i].get(m, "") for i in ia]
        vb = [b["rows"][j].get(m, "") for j in jb]
        keep = [k for k in range(len(va)) if va[k] != "" and vb[k] != ""]
        if keep:
            d = stats.paired_difference(np.array([float(va[k]) for k in keep]), np.array([float(vb[k]) for k in keep]),
                                        clusters[keep], n_boot=n_boot, level=level, seed=seed)
            out[m] = d.as_dict()
    fa, fb = a["features"][ia], b["features"][jb]
    if fa.shape[1] and fb.shape[1] and a["metrics"].get("fidelity") and len(set(clusters.tolist())) > 1:
        items = [Item(k, int(a["rows"][i]["seed"]), int(a["rows"][i]["prompt_index"]), a["rows"][i]["prompt"])
                 for k, i in enumerate(ia)]
        ref_seed = int(a["config"].get("reference_seed", 0))
        ref = np.asarray(_reference(kind, a, items, ref_seed), dtype=np.float64)
        diff = lambda x, y, r: stats.frechet_distance(x, r) - stats.frechet_distance(y, r)  # noqa: E731
        d = stats.bootstrap_statistic(diff, fa, fb, ref, clusters=clusters, n_boot=fd_boot, level=level,
                                      seed=seed).as_dict()
        d["mean"] = diff(fa, fb, ref)
        out["frechet"] = d
        k = int(a["metrics"]["fidelity"].get("k", 3))
        if _half_sample_ok(clusters, k):
            pr_diff = lambda x, y, r: np.subtract(stats.precision_recall(r, x, k=k),  # noqa: E731
                                                  stats.precision_recall(r, y, k=k))
            dp, dr = stats.half_sample_interval(pr_diff, fa, fb, ref, clusters=clusters, level=level,
                                                n_halves=pr_halves, seed=seed)
            out["precision"], out["recall"] = dp.as_dict(), dr.as_dict()
    return out


def _sample_shape(run: dict):
    """[F, 3, H, W] of a clip run's samples (from its metrics.json), None for images."""
    m = run["metrics"]
    return (m["num_frames"], 3, *m["frame_size"]) if "num_frames" in m else None


def _reference(kind, run: dict, items: list[Item], reference_seed: int):
    """The real-render features of `items` for a finished run of `kind` (the shipped evaluator)."""
    from .evaluator import SceneEvaluator

    if kind.name == "scene":  # as ever: features of the renders, in float64
        return SceneEvaluator.load().features(reference_renders(items, reference_seed)).double().numpy()
    return kind.reference(kind.load_evaluator(SceneEvaluator.load(), 10), items, reference_seed, _sample_shape(run))


def rescore_fidelity(run: dict) -> dict:
    """A finished run's fidelity block recomputed from its saved features by today's fidelity summary (with the
    run's own reference seed and bootstrap settings): for runs written before a statistic was added."""
    if not run["features"].shape[1]:
        raise ValueError(f"{run['dir']}: no evaluator features (scene_metrics was off); nothing to rescore")
    kind = kind_of(run["metrics"])
    rows, cfg = run["rows"], run["config"]
    items = [Item(int(r["index"]), int(r["seed"]), int(r["prompt_index"]), r["prompt"]) for r in rows]
    ref_seed, boot = int(cfg.get("reference_seed", 0)), cfg.get("bootstrap", {})
    boot = {"fd_n": int(boot.get("fd_n", 200)), "level": float(boot.get("level", 0.95)),
            "seed": int(boot.get("seed", 0)), "pr_halves": int(boot.get("pr_halves", 100))}
    ref, ref2 = (_reference(kind, run, items, s) for s in (ref_seed, ref_seed + 1))
    return kind.fidelity(run["features"], ref, ref2, rows, boot)


def pair(dirs, n_boot: int = 2000, level: float = 0.95, seed: int = 0, fd_boot: int = 200,
         pr_halves: int = 100) -> dict:
    """Paired A − B of two finished run dirs, written next to A as paired_vs_<B's name>.json and printed."""
    if dirs is None or len(dirs) != 2:
        raise ValueError(f"pair needs two run dirs: pair=[<run A>,<run B>], got {dirs}")
    a, b = (load_run(Path(str(d))) for d in dirs)
    out_path = a["dir"] / f"paired_vs_{Path(str(dirs[1])).name}.json"
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; outputs are never overwritten")
    res = paired(a, b, n_boot, level, seed, fd_boot, pr_halves)
    dropped = _dropped(a, b)
    if dropped:
        print(dropped)
    out_path.write_text(json.dumps(res, indent=1))
    for m in (*kind_of(a["metrics"]).paired_metrics, "frechet", "precision", "recall"):
        if m in res:
            r = res[m]
            p = f"  p = {r['p_value']:.3g}" if r.get("p_value") is not None else ""
            print(f"{m:9s} A-B {r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{p}")
    print(f"wrote {out_path} ({res['n_pairs']} paired {kind_of(a['metrics']).unit}s)")
    return res


def _dropped(a: dict, b: dict) -> str | None:
    """What `paired` left out, and why, when the two runs do not cover the same (prompt, seed) items; None when
    they do."""
    items = [{(str(r["seed"]), r["prompt"]) for r in run["rows"]} for run in (a, b)]
    shared = items[0] & items[1]
    only = [len(x - shared) for x in items]
    if not any(only):
        return None
    why = []
    prompts = [{p for _, p in x} for x in items]
    seeds = [{s for s, _ in x} for x in items]
    for name, (x, y) in (("prompts", prompts), ("seeds", seeds)):
        if x != y:
            why.append(f"{name}: A has {len(x - y)} that B lacks, B has {len(y - x)} that A lacks")
    if not why:
        why.append("the same prompts and seeds, in other combinations")
    return (f"pair: dropped {only[0]} of A's {len(items[0])} items and {only[1]} of B's {len(items[1])}: the runs "
            f"cover different (prompt, seed) items ({'; '.join(why)}); paired on the {len(shared)} they share")


def gather(sweep: Path, baseline: str | None = None) -> list[dict]:
    """Every finished run under `sweep` -> summary.csv, summary.md and summary.png (adherence against Fréchet
    distance, one point per run, with intervals), plus paired differences to `baseline` if given. Never
    overwrites: with a baseline, beside an existing summary the files are summary_vs_<baseline>.*; files already
    there are refused, naming them and what would write elsewhere."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"gather: not a directory: {sweep}")
    names = lambda stem: [sweep / f"{stem}{ext}" for ext in (".csv", ".md", ".png")]  # noqa: E731
    outs = names("summary")
    if baseline is not None and any(p.exists() for p in outs):
        outs = names(f"summary_vs_{Path(str(baseline)).name}")
    held = [p.name for p in outs if p.exists()]
    if held:
        other = ("gather with baseline=<run> writes summary_vs_<run>.* beside them" if baseline is None else
                 "remove them to gather against this baseline again")
        raise FileExistsError(f"{sweep} already holds {', '.join(held)}; outputs are never overwritten ({other})")
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    if not runs:
        raise FileNotFoundError(f"gather: no runs with metrics.json under {sweep}")
    base = None
    if baseline is not None:
        if not (sweep / str(baseline) / "metrics.json").is_file():
            raise ValueError(f"baseline {baseline!r} is not a finished run under {sweep}")
        base = load_run(sweep / str(baseline))
    records = {d: json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {} for d in runs}
    kinds = {d: kind_of(json.loads((d / "metrics.json").read_text())) for d in runs}
    if len({k.name for k in kinds.values()}) > 1:
        names = ", ".join(f"{k}: {d}" for k, d in {k.name: d.name for d, k in kinds.items()}.items())
        raise ValueError(f"gather: {sweep} holds runs of more than one kind ({names}); gather a sweep of one kind")
    kind = next(iter(kinds.values()))
    unit = kind.unit
    runs.sort(key=lambda d: (records[d].get("guidance", ""), d.name))  # one guider's runs together
    # Hydra writes a multirun's bools as True, a single run's as typed: compare case-blind
    common = set.intersection(*({o.lower() for o in r.get("overrides", [])} for r in records.values()))
    table = []
    for d in runs:
        m = json.loads((d / "metrics.json").read_text())
        swept = [o for o in records[d].get("overrides", []) if o.lower() not in common]  # what differs
        row = {"run": d.name, "guidance": m.get("guidance"), "overrides": " ".join(swept)}
        o = (m.get("adherence") or {}).get("overall", {})
        for k in kind.table_metrics:
            if k in o:
                row[k], row[f"{k}_lo"], row[f"{k}_hi"] = o[k]["mean"], o[k]["lo"], o[k]["hi"]
        f = m.get("fidelity")
        if f:
            row.update(frechet=f["frechet"]["mean"], frechet_lo=f["frechet"]["lo"], frechet_hi=f["frechet"]["hi"],
                       frechet_floor=f["frechet_floor"], precision=f["precision"], recall=f["recall"])
            for k in ("precision", "recall"):  # runs written before these intervals show the value alone
                row[f"{k}_lo"], row[f"{k}_hi"] = (f.get(f"{k}_interval", {}).get(b) for b in ("lo", "hi"))
        row.update({"nfe": m["cost"][f"nfe_per_{unit}"], f"seconds_per_{unit}": m["cost"][f"seconds_per_{unit}"],
                    f"n_{unit}s": m[f"n_{unit}s"]})
        if base is not None and d.name != str(baseline):
            p = paired(load_run(d), base)
            for k in kind.deltas:
                if k in p:
                    row[f"d_{k}"], row[f"d_{k}_lo"], row[f"d_{k}_hi"] = p[k]["mean"], p[k]["lo"], p[k]["hi"]
        table.append(row)
    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(outs[0], "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(table)
    iv = lambda r, k, **kw: interval(_iv(r, k), **kw) if k in r else ""  # noqa: E731
    shown = kind.deltas[:2]
    head = ["run", *kind.table_head, "FD (floor)", "P", "R", "NFE", f"s/{kind.short}"] + \
        ([f"Δ {k.replace('_', ' ')}" for k in shown] if base else [])
    body = []
    for r in table:
        cells = [f"{r['run']} ({r['overrides']})" if r["overrides"] else r["run"],
                 *[iv(r, k) for k in kind.table_metrics],
                 f"{r['frechet']:.2f} ({r['frechet_floor']:.2f})" if "frechet" in r else "",
                 iv(r, "precision"), iv(r, "recall"), f"{r['nfe']:.0f}", f"{r[f'seconds_per_{unit}']:.3f}"]
        if base:
            cells += [iv(r, f"d_{k}", signed=True) or "—" for k in shown]
        body.append(cells)
    lines = [f"# {sweep}", "", "95% bootstrap intervals over prompts." +
             (f" Δ = paired difference to `{baseline}` (same prompts, same noise)." if base else ""), "",
             markdown_table(head, body)]
    outs[1].write_text("\n".join(lines) + "\n")
    points = [(r["overrides"] or r["run"], _iv(r, "all"), _iv(r, "frechet")) for r in table
              if "all" in r and "frechet" in r]
    plot_adherence_fd(points, outs[2], title=str(sweep.name))
    print("\n".join(lines))
    print(f"wrote {outs[0]}, {outs[1].name}, {outs[2].name}")
    return table


def _iv(row: dict, key: str) -> dict:
    return {"mean": row[key], "lo": row[f"{key}_lo"], "hi": row[f"{key}_hi"]}
