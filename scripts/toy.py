"""The Gaussian-mixture toy of S²-Guidance (Fig. 3 / 9 / 10), with exact ground truth and numbers.

    python scripts/toy.py                        every method, 1-D and 2-D, the figures and a one-seed table
    python scripts/toy.py toy=heldout            tuned on seeds 0-1, reported on held-out seeds, with controls
    python scripts/toy.py -m guidance=s2 guidance.omega=0.5,1,2,4   one metrics row per run and dimension
    python scripts/toy.py gather=multirun/toy/<stamp>               the sweep's rows → one table + one figure

Everything a run produces goes into its Hydra run dir: the resolved config, the git revision, the trained
weights (safetensors; a sweep shares them in <sweep dir>/models), samples, metrics, tables and figures.
"""
from __future__ import annotations

from s2g import cli  # first: sets the thread defaults before torch is imported (s2g/cli.py)

import json  # noqa: E402
import subprocess
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]

from s2g_toy import experiment, figures  # noqa: E402 - the toy/ folder, installed as s2g_toy (toy/README.md)
from s2g_toy.metrics import METRICS  # noqa: E402

METRIC_COLUMNS = list(METRICS)


def record_run(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config and the git revision (with a dirty flag) next to the outputs."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "toy", "scripts/toy.py", "configs/toy.yaml",
                                "configs/toy", "configs/guidance", "s2g/guidance", "s2g/sampling"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev, dirty = "unknown", ""
    (run_dir / "git.txt").write_text(f"{rev}{' (dirty)' if dirty else ''}\n{dirty}\n")


def guard_fresh(run_dir: Path, names) -> None:
    """Never overwrite the outputs of an earlier run that used the same directory."""
    clash = [n for n in names if (run_dir / n).exists()]
    if clash:
        raise FileExistsError(f"{run_dir} already holds {', '.join(clash)}; choose another hydra.run.dir")


def suite(cfg: DictConfig, run_dir: Path, cache_dir: Path) -> None:
    t0 = time.perf_counter()
    guard_fresh(run_dir, ["metrics.csv"])
    res = experiment.run_suite(cfg.toy, cfg.seed, cache_dir, cfg.progress)
    rows = []
    for dim, r in res.items():
        np.savez_compressed(run_dir / f"samples_{dim}d.npz", labels=r["labels"], **r["samples"])
        for name, m in r["metrics"].items():
            rows.append(dict(dim=dim, method=name, setting=experiment.spec_label(r["specs"][name]),
                             **{k: m[k] for k in METRIC_COLUMNS}, seconds=round(m["seconds"], 2)))
    figures.write_csv(rows, run_dir / "metrics.csv")
    md = [f"# Toy, training seed {cfg.seed}: {cfg.toy.model.iterations} iterations, width {cfg.toy.model.width}, "
          f"{cfg.toy.sampling.n_per_class} samples per class, Euler {cfg.toy.sampling.steps} steps\n"]
    for dim in res:
        md.append(f"\n## {dim}-D\n\n")
        md.append(figures.markdown([r for r in rows if r["dim"] == dim], ["method", "setting", *METRIC_COLUMNS]))
    md.append("\nColumns: " + "; ".join(f"{k} = {v[0]} ({v[1]})" for k, v in METRICS.items()) + "\n")
    (run_dir / "metrics.md").write_text("".join(md))
    fc = cfg.toy.figures
    figures.fig3(res, list(fc.fig3), run_dir / "fig3")
    figures.fig3(res, [n for n in res[max(res)]["samples"]], run_dir / "fig3_all_methods")
    if 1 in res:
        figures.fig9(res[1], list(fc.fig9), run_dir / "fig9")
    if 2 in res:
        figures.fig10(res[2], list(fc.fig10_methods), list(fc.fig10_seeds), run_dir / "fig10")
    figures.blocks(res, (0.1, 0.3, 0.5, 0.7, 0.9), run_dir / "block_deviation")
    print((run_dir / "metrics.md").read_text())
    print(f"wrote {run_dir} in {time.perf_counter() - t0:.0f} s")


def single(cfg: DictConfig, run_dir: Path, cache_dir: Path) -> None:
    """One guider (cfg.guidance) → row.csv with one row per dimension, for Hydra sweeps."""
    guard_fresh(run_dir, ["row.csv"])
    spec = OmegaConf.to_container(cfg.guidance, resolve=True)
    rows = experiment.run_single(cfg.toy, spec, cfg.seed, cache_dir, cfg.progress)
    params = {f"guidance.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in spec.items()}
    knobs = {"toy.model.iterations": cfg.toy.model.iterations, "toy.model.width": cfg.toy.model.width}
    rows = [dict(**params, **knobs, **r) for r in rows]
    figures.write_csv(rows, run_dir / "row.csv")
    for r in rows:
        print(" ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in
                       ["dim", *METRIC_COLUMNS]))


def gather(cfg: DictConfig, run_dir: Path) -> None:
    """Collect <sweep>/*/row.csv into one table and plot each metric against every swept knob. Given the run
    dir of a held-out protocol instead, rebuild its tables and figure from its protocol.jsonl."""
    sweep_dir = Path(cfg.gather)
    if not sweep_dir.is_absolute():
        sweep_dir = Path(hydra.utils.get_original_cwd()) / sweep_dir
    if (sweep_dir / "protocol.jsonl").is_file():
        from s2g_toy import report

        guard_fresh(run_dir, ["heldout.md"])
        rows = [json.loads(line) for line in open(sweep_dir / "protocol.jsonl")]
        report.write(rows, OmegaConf.load(sweep_dir / "config.yaml").toy, run_dir)
        print((run_dir / "heldout.md").read_text())
        return
    files = sorted(sweep_dir.glob("*/row.csv"), key=lambda p: (len(p.parent.name), p.parent.name))
    if not files:
        raise FileNotFoundError(f"no */row.csv under {sweep_dir} (is it a multirun dir of scripts/toy.py?)")
    guard_fresh(run_dir, ["sweep.csv"])
    rows = [r for f in files for r in figures.read_csv(f)]
    # The swept knobs: the overridden keys of the runs whose values differ between runs.
    overrides = [OmegaConf.load(f.parent / ".hydra" / "overrides.yaml") for f in files]
    keys = list(dict.fromkeys(o.split("=", 1)[0].lstrip("+~") for ov in overrides for o in ov))
    swept = [k for k in keys if k in rows[0] and len({r[k] for r in rows}) > 1]
    if not swept:
        raise ValueError(f"the runs under {sweep_dir} do not differ in any column of their rows")
    figures.write_csv(rows, run_dir / "sweep.csv")
    table = sorted(rows, key=lambda r: (int(r["dim"]), *[figures._num(r[k]) for k in swept]))
    for r in table:
        for k in METRIC_COLUMNS:
            r[k] = float(r[k])
    (run_dir / "sweep.md").write_text(f"# Sweep {sweep_dir.name}: {', '.join(swept)}\n\n" + figures.markdown(
        table, ["dim", *swept, "seed", *METRIC_COLUMNS]))
    figures.sweep(rows, swept, run_dir / "sweep")
    print((run_dir / "sweep.md").read_text())
    print(f"wrote {run_dir}")


def heldout(cfg: DictConfig, run_dir: Path, cache_dir: Path) -> None:
    """The protocol of configs/toy/heldout.yaml: rows as they come, then the tables and the Pareto figure."""
    from s2g_toy import report

    guard_fresh(run_dir, ["protocol.csv"])
    t0 = time.perf_counter()
    rows = []
    with open(run_dir / "protocol.jsonl", "x") as log:  # streamed, so a killed run keeps what it measured
        for row in experiment.run_protocol(cfg.toy, cache_dir, cfg.progress):
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
    figures.write_csv(rows, run_dir / "protocol.csv")
    report.write(rows, cfg.toy, run_dir)
    print((run_dir / "heldout.md").read_text())
    print(f"wrote {run_dir} in {time.perf_counter() - t0:.0f} s")


@hydra.main(config_path="../configs", config_name="toy", version_base=None)
def main(cfg: DictConfig) -> None:
    with cli.user_errors():  # the user's input, not a bug: one line, exit code 2
        run(cfg)


def run(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    figures.FORMATS[:] = list(cfg.toy.figures.formats)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if cfg.cache_dir:
        cache_dir = Path(cfg.cache_dir)
    elif hc.mode == RunMode.MULTIRUN:
        cache_dir = Path(hc.sweep.dir) / "models"
    else:
        cache_dir = run_dir / "models"
    record_run(cfg, run_dir)
    if cfg.gather:
        gather(cfg, run_dir)
    elif cfg.get("guidance") is not None:
        single(cfg, run_dir, cache_dir)
    elif cfg.toy.get("protocol") is not None:
        heldout(cfg, run_dir, cache_dir)
    else:
        suite(cfg, run_dir, cache_dir)


if __name__ == "__main__":
    main()
