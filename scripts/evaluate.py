"""Evaluate one guider on a named prompt set and seeds (Hydra; torchrun shards the work).

    python scripts/evaluate.py guidance=cfg guidance.scale=4 num_prompts=100
    python scripts/evaluate.py -m guidance=cfg,s2 guidance.scale=2,4,6
    torchrun --nproc_per_node=2 scripts/evaluate.py guidance=s2 seeds=[0,1,2]
    python scripts/evaluate.py gather=multirun/evaluate/<stamp> [baseline=<subdir>]
    python scripts/evaluate.py pair=[<run A>,<run B>]
    python scripts/evaluate.py model=tiny_video guidance=s2 prompts=video_test      # clips: the video evaluator

A run writes into its run dir: metrics.json (adherence per family and overall with bootstrap intervals over
prompts, Fréchet distance / precision / recall against real renders of the same prompts, NFE and seconds per
image), per_image.csv (one row per (prompt, seed)), features.safetensors (evaluator features, for paired
Fréchet comparisons), samples.png, config.yaml and run.json. A video model (model=tiny_video, Wan) runs the video
prompt sets (video_test | video_val) with the video evaluator's dimensions and the Fréchet video distance analog:
per_clip.csv instead of per_image.csv, samples.gif beside samples.png (s2g/eval/README_video.md). Under torchrun
every rank generates its share of the (prompt, seed) pairs, rank 0 gathers them and computes the metrics once: the
same numbers as one process.

While it runs, every finished batch is saved under <run dir>/partial/ (atomically). A stopped run (Ctrl-C, a killed
rank) resumes when the same command runs into the same dir (Ctrl-C prints that command, with its hydra.run.dir); a
dir whose saved settings differ is refused, naming the first key that differs. Bad input: tests/README.md.
"""
from __future__ import annotations

from s2g import cli  # first: sets the thread defaults before torch is imported (s2g/cli.py)

cli.one_blas_thread()
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


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


def _test_set(target: str) -> str:
    """The default of `prompts`: the test set of the model's kind (s2g.config.model_kind): `test` for an image
    model, `video_test` for a video model."""
    from s2g.config import model_kind

    return "video_test" if model_kind({"_target_": target}) == "video" else "test"


OmegaConf.register_new_resolver("s2g_stamp", _launch_stamp, use_cache=True, replace=True)
OmegaConf.register_new_resolver("s2g_test_set", _test_set, use_cache=True, replace=True)


@hydra.main(config_path="../configs", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with cli.user_errors(cleanup=lambda: _remove_unstarted(run_dir)):  # a run dir made for a run that never started
        if cfg.gather is not None or cfg.pair is not None:
            from s2g.eval import report
        if cfg.gather is not None:
            report.gather(Path(cfg.gather), baseline=cfg.baseline)
        elif cfg.pair is not None:
            b = cfg.bootstrap
            report.pair(cfg.pair, int(b.n), float(b.level), int(b.seed), int(b.fd_n), int(b.pr_halves))
        else:
            try:
                run(cfg, run_dir)
            except KeyboardInterrupt:
                _interrupted(run_dir)
            return
        _remove_if_empty(run_dir)  # gather / pair write next to their inputs, not into a fresh run dir


def _interrupted(run_dir: Path) -> None:
    """Ctrl-C: where the run stopped and the command that resumes it, one line on stderr (rank 0), exit 130."""
    import shlex
    import sys

    from s2g.eval.run import PARTIAL, finished_items

    if os.environ.get("RANK", "0") == "0":
        args = sys.argv[1:]
        if not any(a.startswith("hydra.run.dir=") for a in args):  # the default dir is named after the time
            args.append(f"hydra.run.dir={run_dir}")
        world = os.environ.get("WORLD_SIZE")
        launcher = f"torchrun --nproc_per_node={world}" if world else "python"
        print(f"\ninterrupted: {finished_items(run_dir)} of {_TOTAL.get('items', '?')} items finished and saved in "
              f"{run_dir / PARTIAL}; to resume, run: {launcher} scripts/evaluate.py {shlex.join(args)}",
              file=sys.stderr)
    sys.exit(130)


_TOTAL: dict = {}  # the run's item count, for the interrupt message


def run(cfg: DictConfig, run_dir: Path) -> None:
    """The config as library arguments: a pipeline, a guider factory, (prompt, seed) items; then the run dir."""
    from s2g.config import (apply_guidance_defaults, build_model, check_mandatory, guider_factory, instantiate,
                            model_kind)

    cli.check_counts(cfg, ("batch_size", "steps", "num_prompts"))  # first: before torch loads (seconds)
    check_mandatory(cfg.model, "model")
    from s2g.eval import work_items
    from s2g.eval.kinds import kind_named
    from s2g.eval.run import PARTIAL, evaluate, open_run_dir, write_run

    overrides = list(HydraConfig.get().overrides.task)
    name = HydraConfig.get().runtime.choices.get("guidance", "guidance")
    applied = apply_guidance_defaults(cfg.model, name, cfg.guidance, overrides)
    if applied:  # recorded in run.json's command, so that the command alone reproduces the run
        print(f"{name}: the model config's guidance_defaults {applied} (override with guidance.<key>=...)")
        overrides += [f"guidance.{k}={v}" for k, v in applied.items()]
    seeds = list(cfg.seeds) if OmegaConf.is_list(cfg.seeds) else [cfg.seeds]
    kind = kind_named(model_kind(cfg.model))  # images or clips: which prompt sets, evaluator and summary
    items = work_items(kind.prompt_set(str(cfg.prompts), cfg.num_prompts), seeds)
    _TOTAL["items"] = len(items)
    make_guider = guider_factory(cfg.guidance)
    make_guider(items[0].seed)  # bad guider parameters fail before the model loads
    config = OmegaConf.to_yaml(cfg, resolve=True)
    # a finished dir, or an interrupted one of other settings, is refused; one of the same settings resumes
    open_run_dir(run_dir, config, write=os.environ.get("RANK", "0") == "0")
    extra = {k: instantiate(c) for k, c in (cfg.extra_metrics or {}).items()}
    pipe, _ = build_model(cfg.model)
    results = evaluate(pipe, make_guider, items, batch_size=int(cfg.batch_size), steps=int(cfg.steps),
                       shift=float(cfg.shift), sampler=cfg.sampler.name, scene_metrics=cfg.scene_metrics,
                       evaluator=cfg.evaluator, min_area=int(cfg.min_area), reference_seed=int(cfg.reference_seed),
                       bootstrap=OmegaConf.to_container(cfg.bootstrap), extra_metrics=extra, grid=int(cfg.grid),
                       save_images=cfg.save_images, images_dir=run_dir / "images", prompt_set=str(cfg.prompts),
                       guidance_name=name, threads=int(cfg.threads), progress=bool(cfg.progress),
                       work_dir=run_dir / PARTIAL)
    if results is None:  # a torchrun rank other than 0: rank 0 writes
        return
    record = write_run(run_dir, results, config=config, overrides=overrides)
    shutil.rmtree(run_dir / PARTIAL, ignore_errors=True)  # every result is in the run's own files now
    logger = cli.wandb_logger(cfg.logger, run_dir, {**OmegaConf.to_container(cfg, resolve=True), **record})
    if logger is not None:
        import wandb

        logged = {"metrics": cli.flat_metrics(results["metrics"]), "samples": wandb.Image(str(run_dir / "samples.png"))}
        if (run_dir / "samples.gif").is_file():  # a video run's animated grid
            logged["clips"] = wandb.Video(str(run_dir / "samples.gif"))
        logger.log(logged)
        logger.finish()


def _remove_unstarted(run_dir: Path) -> None:
    if not (run_dir / "partial").exists():  # s2g.eval.run.PARTIAL; importing it loads torch (seconds)
        _remove_if_empty(run_dir)
        return
    from s2g.eval.run import remove_unstarted

    remove_unstarted(run_dir)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    from s2g.config import check_config_choices

    check_config_choices(Path(__file__).resolve().parent.parent / "configs", "evaluate")  # before Hydra composes
    main()
