"""Figures and tables for the toy (matplotlib, saved as PNG and PDF; markdown/CSV tables).

fig3: the paper's Fig. 3 (samples of each method over the true density, 1-D and 2-D); fig9: 1-D trajectories;
fig10: naive vs single-mask S² in 2-D over sampling seeds; blocks: the per-block deviation diagnostic;
sweep: metric vs swept parameter for a Hydra multirun; pareto: held-out-seed W1 vs shift per method.
"""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

from .metrics import METRICS  # noqa: E402

LIM = 9.0
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
TITLES = {"conditional": "(a) conditional", "cfg": "(b) CFG", "autoguidance": "(c) Autoguidance",
          "naive_s2": "(d) naive S²", "s2": "(e) S²"}


FORMATS = ["png", "pdf"]  # scripts/toy.py sets this from toy.figures.formats


def save(fig, stem: Path) -> list[Path]:
    paths = [Path(f"{stem}.{ext}") for ext in FORMATS]
    for p in paths:
        fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def _title(name: str, m: dict | None) -> str:
    t = TITLES.get(name, name.replace("_", " "))
    return t if m is None else f"{t}\nW1 {m['w1']:.3f}  shift {m['shift']:+.2f}  std× {m['std_ratio']:.2f}"


def _panel_1d(ax, gmm, x, labels):
    grid = np.linspace(-LIM, LIM, 600)
    means = gmm.means[:, 0].numpy()
    for c in range(gmm.num_classes):  # truth: each class's share of the mixture, semi-transparent
        ax.fill_between(grid, norm.pdf(grid, means[c], gmm.std) / gmm.num_classes, color=COLORS[c], alpha=0.18, lw=0)
    bins = np.linspace(-LIM, LIM, 121)
    for c in range(gmm.num_classes):
        xc = np.clip(x[labels == c, 0], -LIM, LIM)
        ax.hist(xc, bins=bins, weights=np.full(len(xc), 1 / (len(x) * (bins[1] - bins[0]))), histtype="step",
                color=COLORS[c], lw=1.2)
    ax.set_xlim(-LIM, LIM)
    ax.set_ylim(0, 0.45)
    ax.set_yticks([])


def _panel_2d(ax, gmm, x, labels):
    g = np.linspace(-LIM, LIM, 300)
    xx, yy = np.meshgrid(g, g)
    dens = sum(norm.pdf(xx, m[0], gmm.std) * norm.pdf(yy, m[1], gmm.std) for m in gmm.means.numpy())
    peak = norm.pdf(0, 0, gmm.std) ** 2
    # filled at the 1σ and 2σ density levels of one component
    ax.contourf(xx, yy, dens, levels=[peak * np.exp(-2), peak * np.exp(-0.5), 10 * peak], colors=["0.88", "0.75"])
    for c in range(gmm.num_classes):
        xc = x[labels == c]
        ax.scatter(xc[:, 0], xc[:, 1], s=1.5, color=COLORS[c], alpha=0.35, lw=0, rasterized=True)
    ax.set_xlim(-LIM, LIM)
    ax.set_ylim(-LIM, LIM)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def fig3(suite: dict, names: list[str], stem: Path) -> list[Path]:
    """One column per method, a 1-D row (histograms over the true class densities) and a 2-D row (scatter over
    the true density's 1σ/2σ regions)."""
    dims = sorted(suite)
    fig, axes = plt.subplots(len(dims), len(names), figsize=(3.0 * len(names), 3.1 * len(dims)), squeeze=False)
    for i, dim in enumerate(dims):
        r = suite[dim]
        for j, name in enumerate(names):
            ax = axes[i, j]
            (_panel_1d if dim == 1 else _panel_2d)(ax, r["world"].gmm, r["samples"][name], r["labels"])
            ax.set_title(_title(name, r["metrics"][name]), fontsize=8)
        axes[i, 0].set_ylabel(f"{dim}-D")
    fig.subplots_adjust(hspace=0.35)
    return save(fig, stem)


def fig9(suite_1d: dict, names: list[str], stem: Path) -> list[Path]:
    """1-D denoising trajectories: the state x_σ (x axis) against the step (y axis, noise at the top)."""
    gmm, lab = suite_1d["world"].gmm, suite_1d["traj_labels"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        states = suite_1d["states"][name][:, :, 0]  # [steps + 1, k]
        steps = np.arange(states.shape[0])
        for k in range(states.shape[1]):
            ax.plot(states[:, k], steps, color=COLORS[lab[k]], lw=0.5, alpha=0.35)
        for m in gmm.means[:, 0].numpy():
            ax.axvline(m, color="k", ls=":", lw=0.8)
        ax.set_xlim(-LIM, LIM)
        ax.set_ylim(steps[-1], 0)
        ax.set_title(_title(name, suite_1d["metrics"][name]), fontsize=8)
        ax.set_xlabel("x_σ")
    axes[0, 0].set_ylabel("step (σ = 1 at the top)")
    return save(fig, stem)


def fig10(suite_2d: dict, names: list[str], seeds: list[int], stem: Path) -> list[Path]:
    """Naive S² (N masks per step) vs S² (one mask) in 2-D: one column per sampling seed (noise and masks)."""
    gmm = suite_2d["world"].gmm
    fig, axes = plt.subplots(len(names), len(seeds), figsize=(2.8 * len(seeds), 2.9 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, s in enumerate(seeds):
            x, lab, m = suite_2d["fig10"][(name, s)]
            _panel_2d(axes[i, j], gmm, x, lab)
            axes[i, j].set_title(f"{TITLES.get(name, name)}, seed {s}\nSW1 {m['w1']:.3f} shift {m['shift']:+.2f}",
                                 fontsize=8)
    return save(fig, stem)


def blocks(suite: dict, sigmas, stem: Path) -> list[Path]:
    """Per-block deviation ratio ‖D̂_b - D_c‖ / ‖D_c - D_u‖ (block b skipped alone), per σ."""
    dims = sorted(suite)
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.2), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        dev = suite[dim]["blocks"]
        for j, s in enumerate(sigmas):
            ax.semilogy(np.arange(dev.shape[0]), dev[:, j], "o-", ms=3, label=f"σ = {s:g}")
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.set_xlabel("skipped block")
        ax.set_title(f"{dim}-D", fontsize=9)
    axes[0, 0].set_ylabel("‖D̂ − D_c‖ / ‖D_c − D_u‖")
    axes[0, -1].legend(fontsize=7)
    return save(fig, stem)


def sweep(rows: list[dict], params: list[str], stem: Path, metrics=("w1", "shift", "std_ratio")) -> list[Path]:
    """Metric (rows of the grid) vs each swept parameter (columns), one line per value of the other swept
    parameters and per dimension. A swept `seed` is averaged over (mean, with ± std bars)."""
    dims = sorted({int(r["dim"]) for r in rows})
    params = [p for p in params if p != "seed"] or ["seed"]
    fig, axes = plt.subplots(len(metrics), len(params), figsize=(4.2 * len(params), 2.8 * len(metrics)),
                             squeeze=False)
    for j, p in enumerate(params):
        others = [q for q in params if q != p]
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            for dim in dims:
                sub = [r for r in rows if int(r["dim"]) == dim]
                groups = sorted({tuple(r[q] for q in others) for r in sub}, key=str)
                for gi, gkey in enumerate(groups):
                    pts = [r for r in sub if tuple(r[q] for q in others) == gkey]
                    xs = sorted({_num(r[p]) for r in pts})
                    vals = [[float(r[metric]) for r in pts if _num(r[p]) == x] for x in xs]
                    label = f"{dim}-D" + "".join(f", {q.split('.')[-1]}={v}" for q, v in zip(others, gkey))
                    ax.errorbar(xs, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals],
                                fmt="o-" if dim == 1 else "s--", ms=3, capsize=2, label=label,
                                color=plt.cm.viridis(gi / max(1, len(groups) - 1)) if len(groups) > 1 else None)
            ax.set_xlabel(p)
            ax.set_ylabel(METRICS[metric][0], fontsize=8)
        axes[0, j].legend(fontsize=6)
    fig.tight_layout()
    return save(fig, stem)


def pareto(rows: list[dict], stem: Path, curve: str = "cfg@") -> list[Path]:
    """Held-out seeds, one column per (regime, dim). Top: W1 against the outward shift; bottom: the shift
    against the std ratio, where the truth is (1, 0) and the CFG scale grid (`curve`) is drawn as a line.
    Large markers are means over seeds, small ones single seeds."""
    panels = sorted({(r["regime"], int(r["dim"])) for r in rows}, key=lambda p: (p[1], p[0]))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 8.0), squeeze=False)
    for j, (regime, dim) in enumerate(panels):
        sub = [r for r in rows if r["regime"] == regime and int(r["dim"]) == dim]
        names = [n for n in dict.fromkeys(r["method"] for r in sub) if not n.startswith(curve)]
        for k, name in enumerate(names):
            pts = np.array([[float(r["shift"]), float(r["w1"]), float(r["std_ratio"])]
                            for r in sub if r["method"] == name])
            color, marker = plt.cm.tab20(k % 20), "o" if not name.startswith("fix:") else "D"
            for i, (a, b) in enumerate([(0, 1), (2, 0)]):
                axes[i, j].scatter(pts[:, a], pts[:, b], s=5, color=color, alpha=0.35)
                axes[i, j].scatter(pts[:, a].mean(), pts[:, b].mean(), s=40, color=color, marker=marker,
                                   edgecolor="k", label=name, zorder=3)
        cv = sorted({float(r["method"][len(curve):]) for r in sub if r["method"].startswith(curve)})
        mean = lambda lam, key: np.mean([float(r[key]) for r in sub if r["method"] == f"{curve}{lam:g}"])  # noqa: E731
        for i, (a, b) in enumerate([("shift", "w1"), ("std_ratio", "shift")]):
            xs, ys = [mean(v, a) for v in cv], [mean(v, b) for v in cv]
            axes[i, j].plot(xs, ys, "k-", lw=0.8, zorder=2, label="CFG, λ grid")
            for v, x_, y_ in zip(cv, xs, ys):
                axes[i, j].annotate(f"{v:g}", (x_, y_), fontsize=6, xytext=(2, 2), textcoords="offset points")
        axes[1, j].scatter([1.0], [0.0], marker="*", s=120, color="gold", edgecolor="k", zorder=4, label="truth")
        axes[0, j].set_xlabel("outward mode shift")
        axes[0, j].set_ylabel("W1" if dim == 1 else "sliced W1")
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("std ratio")
        axes[1, j].set_ylabel("outward mode shift")
        axes[0, j].set_title(f"{regime.replace('_', ' ')} model, {dim}-D (held-out seeds)", fontsize=9)
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save(fig, stem)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


# -- tables -----------------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> Path:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "x", newline="") as f:  # "x": never overwrite an earlier result
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown(rows: list[dict], columns: list[str], floatfmt: str = ".3f") -> str:
    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
