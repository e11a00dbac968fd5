"""Evaluate one guider on a named prompt set and seeds (Hydra; torchrun shards the work).

    python scripts/evaluate.py guidance=cfg guidance.scale=4 num_prompts=100
    python scripts/evaluate.py -m guidance=cfg,s2 guidance.scale=2,4,6
    torchrun --nproc_per_node=2 scripts/evaluate.py guidance=s2 seeds=[0,1,2]
    python scripts/evaluate.py gather=multirun/evaluate/<stamp> [baseline=<subdir>]
    python scripts/evaluate.py pair=[<run A>,<run B>]

A run writes into its run dir: metrics.json (adherence per family and overall with bootstrap intervals over
prompts, Fréchet distance / precision / recall against real renders of the same prompts, NFE and seconds per
image), per_image.csv (one row per (prompt, seed)), features.safetensors (evaluator features, for paired
Fréchet comparisons), samples.png, config.yaml and run.json. Under torchrun every rank generates its share of
the (prompt, seed) pairs, rank 0 gathers them and computes the metrics once: the same numbers as one process.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall a shared CPU
# numpy's BLAS for the metrics (128-d covariances): one thread is 10x faster than two on a busy 2-core machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _launch_stamp() -> str:
    """A run-dir timestamp that every torchrun rank agrees on: the start time of their common parent (the
    torchrun agent) when launched by torchrun, else now."""
    t = time.time()
    if "LOCAL_RANK" in os.environ:
        try:
            ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
            boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                        if line.startswith("btime"))
            t = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(t))


OmegaConf.register_new_resolver("s2g_stamp", _launch_stamp, use_cache=True, replace=True)


@hydra.main(config_path="../configs", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.errors import InstantiationException

    from s2g.eval import run as evaluation

    user_errors = (ValueError, FileNotFoundError, FileExistsError)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.gather is not None:
            evaluation.gather(Path(cfg.gather), baseline=cfg.baseline)
        elif cfg.pair is not None:
            evaluation.pair(cfg.pair, cfg.bootstrap)
        else:
            from s2g.runinfo import apply_guidance_defaults

            overrides = list(HydraConfig.get().overrides.task)
            name = HydraConfig.get().runtime.choices.get("guidance", "guidance")
            applied = apply_guidance_defaults(cfg.model, name, cfg.guidance, overrides)
            if applied:  # recorded in run.json's command, so that the command alone reproduces the run
                print(f"{name}: the model config's guidance_defaults {applied} (override with guidance.<key>=...)")
                overrides += [f"guidance.{k}={v}" for k, v in applied.items()]
            evaluation.evaluate(cfg, run_dir, overrides=overrides, guidance_name=name)
            return
        _remove_if_empty(run_dir)  # gather / pair write next to their inputs, not into a fresh run dir
    except (*user_errors, InstantiationException) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) else e
        if not isinstance(cause, user_errors):
            raise
        _remove_if_empty(run_dir)  # a fresh run dir that Hydra made for a run that never started
        print(f"error: {cause}", file=sys.stderr)  # the user's input, not a bug: one line, no traceback
        sys.exit(2)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    main()
