"""Text-to-image and text-to-video sampling with any guider (Hydra). Writes a PNG grid (videos: an animated GIF grid
or an MP4 per video, and a PNG of first, middle and last frames), the resolved config, seed and git revision into
the run dir.

    python scripts/sample.py guidance=s2                                   # embedded tiny model
    python scripts/sample.py guidance=cfg guidance.scale=5 prompt="a red circle" seed=1 steps=20
    python scripts/sample.py compare=[cfg,apg,s2]                          # columns = guiders, same noise
    python scripts/sample.py guidance=autoguidance                         # weak model from model.weak_checkpoint
    python scripts/sample.py logger=wandb                                  # + grid and config to wandb (offline)
    python scripts/sample.py model=tiny_video guidance=s2                  # samples.gif + samples.png
    python scripts/sample.py model=wan21_t2v_1_3b model.checkpoint=...     # samples_<prompt>_<sample>.mp4 + PNG

Grid layout: rows = prompts, columns = samples (seeds); with `compare`, rows = (prompt, sample) and columns =
guiders, every column starting from the same noise. A `guidance.<key>=...` override also applies to every compared
guider that has that key. Videos: the GIF grid has that layout; its PNG shows each clip as three tiles (first, middle,
last frame); with `video=mp4` (the default for latent models, Wan) each video is its own MP4. No file is written over:
every output name is checked before the first step.
"""
from __future__ import annotations

from s2g import cli  # first: sets the thread defaults before torch is imported (s2g/cli.py)

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


def guider_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """{column name: guidance config}: the selected guider, or one per `compare` entry (composed like the main
    config, with the command line's guidance.* overrides applied where the guider has that key)."""
    from s2g.config import apply_guidance_defaults

    overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("guidance.")]
    if not cfg.compare:
        name = HydraConfig.get().runtime.choices.get("guidance", "guidance")
        _report(name, apply_guidance_defaults(cfg.model, name, cfg.guidance, overrides))
        return {name: cfg.guidance}
    names = [cfg.compare] if isinstance(cfg.compare, str) else list(cfg.compare)
    out = {}
    for name in names:
        try:
            composed = hydra.compose(config_name="config", overrides=[f"guidance={name}", f"seed={cfg.seed}"])
        except Exception as e:  # Hydra's MissingConfigException lists the available options
            raise ValueError(f"compare: no guidance config {name!r} ({str(e).splitlines()[0]})") from None
        g = composed.guidance
        for o in overrides:
            key, value = o[len("guidance."):].split("=", 1)
            if OmegaConf.select(g, key) is not None or key in g:
                OmegaConf.update(g, key, _parse(value))
        _report(name, apply_guidance_defaults(cfg.model, name, g, overrides))
        out[name] = g
    return out


def _report(name: str, applied: dict) -> None:
    if applied:
        print(f"{name}: the model config's guidance_defaults {applied} (override with guidance.<key>=...)")


def _parse(value: str):
    """A command-line override value as YAML would read it (5 -> int, [0.1,0.9] -> list, s -> str)."""
    import yaml
    return yaml.safe_load(value)


def run(cfg: DictConfig, out_dir: Path) -> Path:
    from s2g.config import check_mandatory

    _check_prompts(cfg)  # first: before torch loads (seconds)
    cli.check_counts(cfg, ("batch_size", "samples_per_prompt", "upscale", "steps"))
    check_mandatory(cfg.model, "model")
    import torch

    from s2g.config import build_model
    from s2g.guidance import from_spec
    from s2g.video import TextToVideo

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out_path = out_dir / cfg.output
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; outputs are never overwritten (choose output=...)")
    guider_cfgs = guider_configs(cfg)  # unknown names and bad guider parameters fail here, before loading
    guiders = {name: from_spec(OmegaConf.to_container(g, resolve=True)) for name, g in guider_cfgs.items()}
    if cfg.video not in ("auto", "gif", "mp4"):
        raise ValueError(f"video must be auto, gif or mp4, got {cfg.video!r}")

    pipe, extras = build_model(cfg.model)
    default_prompts, grid_defaults = extras.get("default_prompts"), extras.get("grid") or {}
    # samples_per_prompt / batch_size / upscale: the command line, else the model config's `grid` defaults
    layout = {k: cfg[k] if cfg[k] is not None else grid_defaults.get(k, 1)
              for k in ("samples_per_prompt", "batch_size", "upscale")}
    prompts = cfg.prompt if cfg.prompt is not None else default_prompts
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts: set prompt=... or model.default_prompts")
    cli.check_counts(layout, layout)  # the model config's `grid` defaults too
    n = int(layout["samples_per_prompt"])
    batch = [p for p in prompts for _ in range(n)]  # prompt-major: row i = prompt i
    video = isinstance(pipe, TextToVideo)
    mode = _video_mode(cfg.video, pipe) if video else "png"
    files = _outputs(out_path, mode, list(guiders), len(prompts), n, bool(cfg.compare))
    clash = [str(f) for f in files if f.exists()]
    if clash:  # every file this run would write, checked before any sampling
        raise FileExistsError(f"{clash[0]} exists; outputs are never overwritten (choose output=...)")
    pipe.conditioning(batch)  # out-of-vocabulary words fail now, not after the first guider has run

    t0 = time.time()
    noise = pipe.noise(len(batch), cfg.seed)  # one draw, shared by every column
    samples = {name: pipe(batch, g, seed=cfg.seed, steps=cfg.steps, shift=cfg.shift, sampler=cfg.sampler.name,
                          batch_size=layout["batch_size"], noise=noise, progress=cfg.progress)
               for name, g in guiders.items()}
    seconds = time.time() - t0

    upscale = int(layout["upscale"])
    if video:
        fps = float(cfg.fps) if cfg.fps is not None else (GIF_FPS if mode == "gif" else float(pipe.fps))
        _write_videos(samples, prompts, n, bool(cfg.compare), mode, files, out_path, upscale, fps)
    else:
        _write_images(samples, prompts, n, bool(cfg.compare), out_path, upscale)

    from s2g.runinfo import git_revision

    record = {"seed": cfg.seed, "git_revision": git_revision(), "prompts": prompts, **layout,
              "guiders": {k: repr(g) for k, g in guiders.items()}, "sampling_seconds": round(seconds, 2),
              "output": str(out_path), "command": " ".join(["python", "scripts/sample.py", *sys.argv[1:]])}
    if video:
        record.update(video=mode, fps=fps, files=[str(f) for f in files])
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out_dir / "run.json").write_text(json.dumps(record, indent=2))
    logger = cli.wandb_logger(cfg.logger, out_dir, {**OmegaConf.to_container(cfg, resolve=True), **record})
    if logger is not None:
        import wandb

        logged = {"grid": wandb.Image(str(out_path), caption=" | ".join(prompts))}
        if video and mode == "gif":
            logged["clips"] = wandb.Video(str(files[0]), caption=" | ".join(prompts))
        logger.log(logged)
        logger.finish()
    what = "videos" if video else "images"
    print(f"wrote {files[0] if video else out_path}{f' (+ {len(files) - 1} more)' if len(files) > 1 else ''} "
          f"({len(batch)} {what} x {len(guiders)} guider(s), {seconds:.1f}s sampling)")
    return out_path


def _check_prompts(cfg: DictConfig) -> None:
    """An empty prompt samples unconditionally: refused unless asked for (prompt_unconditional=true)."""
    prompts = cfg.prompt if cfg.prompt is not None else []
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not cfg.get("prompt_unconditional", False) and any(not str(p).strip() for p in prompts):
        raise ValueError("prompt: an empty prompt samples unconditionally; set prompt_unconditional=true to ask "
                         "for that, or give the prompt")


def _run_name(choice: str, compare) -> str:
    """The run dir's suffix: the guider (configs/guidance) or, with `compare`, every compared guider."""
    if compare is None:
        return str(choice)
    names = [compare] if isinstance(compare, str) else list(compare)
    return "-".join(str(n) for n in names) or str(choice)


OmegaConf.register_new_resolver("s2g_run_name", _run_name, replace=True)


GIF_FPS = 4.0  # the animated grid's default frame rate: the tiny model's 8 frames in 2 s


def _video_mode(choice: str, pipe) -> str:
    """gif (one animated grid) or mp4 (a file per video); auto: gif for a pixel-space model (the embedded one's
    32x32 clips), mp4 for a latent one (Wan: 81 frames of 480x832)."""
    if choice != "auto":
        return choice
    return "gif" if pipe.latent_shape[0] == 3 else "mp4"


def _outputs(out_path: Path, mode: str, guiders: list[str], n_prompts: int, n: int, compare: bool) -> list[Path]:
    """Every file the run writes: the PNG; for videos also the GIF grid, or one MP4 per (guider,) prompt and
    sample, named <stem>[_<guider>]_<prompt>_<sample>.mp4."""
    if mode == "png":
        return [out_path]
    if mode == "gif":
        return [out_path.with_suffix(".gif"), out_path]
    stem = out_path.with_suffix("")
    return [Path(f"{stem}{f'_{g}' if compare else ''}_{i:02d}_{j:02d}.mp4")
            for g in guiders for i in range(n_prompts) for j in range(n)] + [out_path]


def _write_images(images: dict, prompts: list[str], n: int, compare: bool, out_path: Path, upscale: int) -> None:
    import torch

    from s2g.images import image_grid, save_png

    tile = next(iter(images.values())).shape[-1] * upscale  # decoded width (a latent is 8x smaller for SD3)
    if compare:
        names = list(images)
        stacked = torch.stack([images[k] for k in names], 1).flatten(0, 1)  # (prompt, sample) rows x guiders
        grid = image_grid(stacked, len(prompts) * n, len(names), scale=upscale)
        rows = [p if j == 0 else "" for p in prompts for j in range(n)]
        save_png(grid, out_path, row_labels=rows, col_labels=names, tile=tile)
    else:
        (imgs,) = images.values()
        grid = image_grid(imgs, len(prompts), n, scale=upscale)
        save_png(grid, out_path, row_labels=prompts, tile=tile)


def _write_videos(videos: dict, prompts: list[str], n: int, compare: bool, mode: str, files: list[Path],
                  out_path: Path, upscale: int, fps: float) -> None:
    """gif: an animated grid (rows = prompts, columns = samples; with `compare`, rows = (prompt, sample), columns
    = guiders) and a PNG of the same layout, each clip as its first, middle and last frames, rows labelled with
    the prompts. mp4: one MP4 per video and a PNG strip, one row per video."""
    import torch

    from s2g.images import image_grid, save_png
    from s2g.video import save_frame_strip, save_gif, save_mp4, strip_indices, video_grid

    names = list(videos)
    if compare:  # [(prompt, sample) rows x guiders, F, 3, H, W]
        cells, cols, n_rows = torch.stack([videos[k] for k in names], 1).flatten(0, 1), names, len(prompts) * n
        labels = [p if j == 0 else "" for p in prompts for j in range(n)]
    else:
        cells, cols, n_rows, labels = videos[names[0]], [f"#{j}" for j in range(n)], len(prompts), prompts
    if mode == "mp4":
        for f, clip in zip(files, [v for g in names for v in videos[g]]):
            save_mp4(clip, f, fps=fps)
        strip_labels = [f"{p}{f' [{g}]' if compare else ''}{f' #{j}' if n > 1 else ''}"
                        for g in names for p in prompts for j in range(n)]
        save_frame_strip(torch.cat([videos[g] for g in names]), out_path, row_labels=strip_labels, scale=upscale)
        return
    save_gif(video_grid(cells, n_rows, len(cols), scale=upscale), files[0], fps=fps)
    idx = strip_indices(cells.shape[1])
    tiles = cells[:, idx].flatten(0, 1)  # each cell's first, middle and last frames, side by side
    frame_cols = [f"{c} f{i}" for c in cols for i in idx]
    grid = image_grid(tiles, n_rows, len(frame_cols), scale=upscale)
    save_png(grid, out_path, row_labels=labels, col_labels=frame_cols, tile=cells.shape[-1] * upscale)


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # the user's input (also what Hydra wraps), not a bug: one line, exit code 2, and no run dir left for it
    with cli.user_errors(cleanup=lambda: _remove_if_unused(out_dir)):
        run(cfg, out_dir)


HYDRA_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}


def _remove_if_unused(out_dir: Path) -> None:
    """Removes a run dir that holds only what Hydra writes at the start (.hydra/ and an empty sample.log): a run
    that failed before writing anything. A dir with any other file is left alone."""
    import shutil

    if not out_dir.is_dir():
        return
    files = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if not p.is_dir()}
    log = out_dir / "sample.log"
    if files - HYDRA_FILES - {"sample.log"} or (log.is_file() and log.stat().st_size):
        return
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    from s2g.config import check_config_choices, check_run_dir_unused

    check_config_choices(Path(__file__).resolve().parent.parent / "configs", "config")  # before Hydra composes
    check_run_dir_unused()  # before Hydra writes .hydra/ over an earlier run's
    main()
