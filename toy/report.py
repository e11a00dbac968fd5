"""Tables of the held-out-seed protocol (toy.experiment.run_protocol): what was selected on the tuning seeds,
every method and control on the held-out seeds (mean ± std over seeds), and the paired differences that
answer the questions of experiments/toy/README.md."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import figures
from .metrics import METRICS

# (A, B, question): per held-out seed A - B, paired (same model, same noise).
COMPARISONS = [
    ("s2", "cfg", "S² vs CFG, each at its tuned setting"),
    ("naive_s2", "s2", "naive S² (N masks) vs S² (one mask), S²'s tuned setting"),
    ("s2", "conditional", "tuned S² vs no guidance"),
    ("cfg", "conditional", "tuned CFG vs no guidance"),
    ("autoguidance", "cfg", "Autoguidance vs CFG, both tuned"),
    ("fix:s2", "fix:cfg", "at λ_fix: what the S² term adds to CFG"),
    ("fix:s2", "fix:cfg_matched", "at λ_fix: S² vs CFG at λ_eff = λ − ω·κ (a retuned λ?)"),
    ("fix:s2", "fix:s2_placebo", "at λ_fix: S² vs noise of the same norm (information or randomness?)"),
    ("fix:s2", "fix:s2_negative_omega", "at λ_fix: S² vs ω < 0 (does the sign matter?)"),
    ("fix:s2", "fix:fixed_block", "at λ_fix: random masks vs one fixed dropped block"),
    ("fix:naive_s2", "fix:s2", "at λ_fix: naive S² (N masks) vs S² (one mask)"),
    ("fix:cfg", "fix:exact_cfg", "at λ_fix: trained vs exact model under CFG"),
]
ORDER = ["exact_conditional", "conditional", "cfg", "autoguidance", "s2", "naive_s2", "cfgpp", "apg",
         "cfg_zero_star", "fix:exact_cfg", "fix:cfg", "fix:cfg_matched", "fix:s2", "fix:naive_s2",
         "fix:s2_placebo", "fix:s2_negative_omega", "fix:fixed_block"]


def _pm(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def _order(name: str):
    if name in ORDER:
        return (ORDER.index(name), 0.0)
    if name.startswith("cfg@"):  # the CFG curve, after the tuned methods
        return (ORDER.index("cfg_zero_star") + 0.5, float(name[4:]))
    return (len(ORDER), name)


def _panels(rows):
    return sorted({(r["regime"], int(r["dim"])) for r in rows}, key=lambda p: (p[1], p[0]))


def write(rows: list[dict], toy_cfg, run_dir: Path) -> None:
    run_dir = Path(run_dir)
    tests = [r for r in rows if r["stage"] == "test"]
    metrics = list(METRICS)
    seeds = sorted({r["seed"] for r in tests})
    md = [f"# Toy held-out protocol\n\nTuned on training seeds {list(toy_cfg.protocol.tune_seeds)} "
          f"(objective: {toy_cfg.protocol.objective}, the same number of settings per method), reported on "
          f"held-out seeds {seeds}: mean ± std over seeds. Samples per class: "
          f"{dict(toy_cfg.protocol.n_per_class)}; Euler, {toy_cfg.sampling.steps} steps; paired noise.\n"]
    summary = []
    for regime, dim in _panels(tests):
        sub = [r for r in tests if r["regime"] == regime and int(r["dim"]) == dim]
        names = sorted({r["method"] for r in sub}, key=_order)
        md.append(f"\n## {regime} model, {dim}-D\n\n")
        table = []
        for name in names:
            rs = [r for r in sub if r["method"] == name]
            row = dict(regime=regime, dim=dim, method=name, setting=rs[0]["setting"], seeds=len(rs))
            for k in metrics:
                row[k] = _pm([r[k] for r in rs])
            if "effective_scale" in rs[0] and rs[0].get("effective_scale") not in (None, ""):
                row["setting"] += f" (κ = {_pm([r['kappa'] for r in rs])}, λ_eff = {_pm([r['effective_scale'] for r in rs])})"
            table.append(row)
        summary += table
        md.append(figures.markdown(table, ["method", "setting", *metrics]))
        md.append("\nPaired differences A − B over held-out seeds (mean ± std; `A<B` = seeds where A is lower):\n\n")
        diffs = []
        s2 = [r for r in sub if r["method"] == "s2"]
        pairs = list(COMPARISONS)
        if s2:  # tuned S² against CFG at S²'s own λ (the tuned pair can differ in λ as well as in the S² term)
            lam = json.loads(s2[0]["spec"])["scale"]
            pairs.insert(1, ("s2", f"cfg@{lam:g}", "tuned S² vs CFG at the same λ"))
        for a, b, question in pairs:
            ra = {r["seed"]: r for r in sub if r["method"] == a}
            rb = {r["seed"]: r for r in sub if r["method"] == b}
            common = sorted(set(ra) & set(rb))
            if not common:
                continue
            d = {k: np.array([ra[s][k] - rb[s][k] for s in common]) for k in ("w1", "shift", "std_ratio")}
            diffs.append({"A − B": f"{a} − {b}", "question": question,
                          "ΔW1": _pm(d["w1"]), "A<B (W1)": f"{int((d['w1'] < 0).sum())}/{len(common)}",
                          "Δshift": _pm(d["shift"]), "Δstd ratio": _pm(d["std_ratio"])})
        md.append(figures.markdown(diffs, ["A − B", "question", "ΔW1", "A<B (W1)", "Δshift", "Δstd ratio"]))
    md.append("\nColumns: " + "; ".join(f"{k} = {v[0]} ({v[1]})" for k, v in METRICS.items()) + "\n")
    sel = [r for r in rows if r["stage"] == "selected"]
    md.append("\n## Selected on the tuning seeds\n\n")
    md.append(figures.markdown(sel, ["regime", "dim", "method", "setting"]))
    (run_dir / "heldout.md").write_text("".join(md))
    figures.write_csv(summary, run_dir / "heldout.csv")
    figures.write_csv([dict(r, spec=json.loads(r["spec"])) for r in sel], run_dir / "selected.csv")
    figures.pareto(tests, run_dir / "pareto")
