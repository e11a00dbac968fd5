"""The two kinds of evaluation: scenes (text-to-image) and clips (text-to-video). One object per kind holds what
differs between them; `evaluate` (run.py) and the comparisons (report.py) call its methods and name neither kind.

A kind says
- which prompt sets it reads (`prompt_set`): scenes `test` | `val`, clips `video_test` | `video_val`, or a text
  file with one prompt per line; a set of the other kind is refused with one line, before any model loads;
- whether its evaluator can read a pipeline's samples (`readable`) and the prompts (`check_prompts`, `in_grammar`);
- how samples become per-sample rows and evaluator features (`read`), what the real references are (`reference`:
  renders of the same (prompt, seed) items), and the summary (`adherence`, `fidelity`: means with bootstrap
  intervals over prompts, the Fréchet distance with its sampling floor, precision / recall);
- how its samples are written (`save_sample`, `write_grid`) and summarised in one line.

A run's kind is recorded in metrics.json (`"kind": "video"`; scene runs carry no key, so the files of every
earlier image run read as they always did) and `kind_of(metrics)` gives it back.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .harness import (Item, _mean_interval, adherence_summary, check_scene_prompts, fidelity_summary, image_rows,
                      item_seed, reference_renders)


def _in(check, prompts) -> bool:
    try:
        check(prompts)
        return True
    except ValueError:
        return False


def _load_scene_evaluator(evaluator, min_area: int):
    from .evaluator import EVALUATOR_CHECKPOINT, SceneEvaluator

    if isinstance(evaluator, SceneEvaluator):
        return evaluator
    path = EVALUATOR_CHECKPOINT if evaluator == "embedded" else Path(str(evaluator))
    return SceneEvaluator.load(path, min_area=int(min_area))


class SceneKind:
    """Images of the scene grammar, read by the scene evaluator (s2g/eval/evaluator.py): GenEval-style adherence,
    Fréchet distance on its 128-d features."""

    name = "scene"
    unit = "image"  # metrics.json: n_images, nfe_per_image, seconds_per_image
    short = "img"  # gather's s/<short> column
    rows_file = "per_image.csv"
    sample_suffix = ".png"  # save_sample's file type
    prompt_sets = ("test", "val")
    paired_metrics = ("all", "count", "color", "shape", "relation")
    table_metrics = ("all", "count", "color", "shape", "relation", "relation_given_found", "flipped_given_found")
    table_head = ["all", "count", "color", "shape", "relation", "rel. given found", "flipped given found"]
    deltas = ("all", "relation", "shape")  # gather's paired columns; the first two are shown

    # ---------------------------------------------------------------------------------------------- prompts

    def prompt_set(self, name: str, num_prompts: int | None = None) -> list[str]:
        from .prompts import prompt_set

        if name in VideoKind.prompt_sets:
            raise ValueError(f"prompts={name} is a video prompt set, but this model makes images: use prompts="
                             f"{' or '.join(self.prompt_sets)} (or a file of scene prompts)")
        return prompt_set(name, num_prompts)

    def check_prompts(self, prompts: list[str]) -> None:
        check_scene_prompts(prompts)

    def in_grammar(self, prompts: list[str]) -> bool:
        return _in(self.check_prompts, prompts)

    def grammar_only(self, latent_shape) -> bool:
        """Whether every prompt is checked before sampling even with the metrics off (scenes: the text encoder
        checks its words when a batch is encoded)."""
        return False

    def readable(self, latent_shape) -> str | None:
        """None when the evaluator reads this pipeline's samples, else why not."""
        if tuple(latent_shape) != (3, 32, 32):
            return (f"scene_metrics=true needs the embedded 32x32 scene model; this model makes "
                    f"{tuple(latent_shape)} latents")
        return None

    # -------------------------------------------------------------------------------------------- reading

    def load_evaluator(self, evaluator, min_area: int):
        return _load_scene_evaluator(evaluator, min_area)

    def read(self, evaluator, items: list[Item], samples: torch.Tensor):
        """(rows, features [n, D] tensor) of the samples of `items`."""
        detections, feats = evaluator.read(samples)
        return image_rows(items, detections), feats

    def header(self, sample_shape) -> dict:
        return {}

    def reference(self, evaluator, items: list[Item], reference_seed: int, sample_shape=None) -> np.ndarray:
        return evaluator.features(reference_renders(items, int(reference_seed))).numpy()

    def adherence(self, rows: list[dict], boot: dict) -> dict:
        return adherence_summary(rows, int(boot["n"]), float(boot["level"]), int(boot["seed"]))

    def fidelity(self, feats: np.ndarray, ref: np.ndarray, ref2: np.ndarray, rows: list[dict], boot: dict) -> dict:
        clusters = np.array([int(r["prompt_index"]) for r in rows])
        return fidelity_summary(feats, ref, ref2, clusters, n_boot=int(boot["fd_n"]),
                                seeds=np.array([int(r["seed"]) for r in rows]), level=float(boot["level"]),
                                seed=int(boot["seed"]), n_halves=int(boot["pr_halves"]))

    # -------------------------------------------------------------------------------------------- writing

    def save_sample(self, sample: torch.Tensor, path_stem: Path, fps: float) -> None:
        from ..images import save_png

        save_png(sample, Path(f"{path_stem}{self.sample_suffix}"))

    def grid_files(self) -> tuple[str, ...]:
        return ("samples.png",)

    def write_grid(self, run_dir: Path, samples: torch.Tensor, prompts: list[str]) -> None:
        """samples.png: up to 8 columns, row-major."""
        from ..images import image_grid, save_png

        imgs = samples
        cols = 8 if len(imgs) >= 8 else len(imgs)
        rows_n = (len(imgs) + cols - 1) // cols
        pad = torch.full((rows_n * cols - len(imgs), *imgs.shape[1:]), 0.5)
        scale = max(1, 96 // imgs.shape[-1])
        save_png(image_grid(torch.cat([imgs, pad]), rows_n, cols, scale=scale), run_dir / "samples.png")

    def summary_parts(self, m: dict) -> list[str]:
        from .report import interval

        parts = []
        if m.get("adherence"):
            o = m["adherence"]["overall"]
            parts += [f"all {interval(o['all'])}"]
            parts += [f"{k} {o[k]['mean']:.3f}" for k in ("count", "color", "shape", "relation") if k in o]
        return parts


class VideoKind(SceneKind):
    """Clips of the clip grammar (s2g/data/clips.py), read by the video evaluator (s2g/eval/video.py): its per-clip
    dimensions, per family, and the Fréchet video distance analog on its 128 + 18 F features, against renders of
    the same prompts; samples are [F, 3, H, W]."""

    name = "video"
    unit = "clip"  # metrics.json: n_clips, nfe_per_clip, seconds_per_clip
    short = "clip"
    rows_file = "per_clip.csv"
    sample_suffix = ".mp4"
    prompt_sets = ("video_test", "video_val")
    paired_metrics = ("all", "found", "count_stable", "color", "object_class", "multiple_objects", "direction",
                      "dynamic_degree", "motion_smoothness", "subject_consistency", "temporal_flickering")
    table_metrics = ("all", "direction", "motion_smoothness", "dynamic_degree", "count_stable", "color",
                     "object_class", "subject_consistency", "temporal_flickering")
    table_head = ["all", "direction", "motion smoothness", "dynamic degree", "count stable", "colour",
                  "object class", "subject consistency", "temporal flickering"]
    deltas = ("all", "direction", "motion_smoothness")
    LISTS = ("counts", "displacement_px", "law_residual_px")  # per-frame / per-object values: JSON text in the CSV

    def prompt_set(self, name: str, num_prompts: int | None = None) -> list[str]:
        from ..data.clips import video_prompt_set
        from .prompts import prompt_set

        if name in SceneKind.prompt_sets:
            raise ValueError(f"prompts={name} is an image prompt set, but this model makes videos: use prompts="
                             f"{' or '.join(self.prompt_sets)} (or a file of video prompts)")
        if name in self.prompt_sets:
            return video_prompt_set(name[len("video_"):], num_prompts)
        return prompt_set(name, num_prompts)  # a file: its lines are checked against the grammar by check_prompts

    def check_prompts(self, prompts: list[str]) -> None:
        from ..data.clips import parse_video_prompt

        for p in prompts:
            parse_video_prompt(p)  # one clear ValueError naming what is outside the grammar

    def grammar_only(self, latent_shape) -> bool:
        """A pixel-space model (the embedded one) knows only the clip grammar: its prompts are checked first,
        every one, whether or not the metrics are on."""
        return len(latent_shape) == 4 and latent_shape[0] == 3

    def readable(self, latent_shape) -> str | None:
        shape = tuple(latent_shape)
        if len(shape) != 4 or shape[0] != 3 or shape[2] != shape[3]:
            return (f"scene_metrics=true needs square pixel-space clips, as the embedded video model's; this model "
                    f"makes {shape} latents")
        return None

    def load_evaluator(self, evaluator, min_area: int):
        from .video import VideoEvaluator

        if isinstance(evaluator, VideoEvaluator):
            return evaluator
        return VideoEvaluator(_load_scene_evaluator(evaluator, min_area))

    def read(self, evaluator, items: list[Item], samples: torch.Tensor):
        rows, feats = evaluator.read(samples, [it.prompt for it in items])
        out = []
        for it, row in zip(items, rows):
            row = {k: (json.dumps(v) if k in self.LISTS else v) for k, v in row.items() if k != "prompt"}
            out.append({"index": it.index, "seed": it.seed, "prompt_index": it.prompt_index, "prompt": it.prompt,
                        **row})
        return out, torch.from_numpy(np.asarray(feats, dtype=np.float32))

    def header(self, sample_shape) -> dict:
        f, _, h, w = sample_shape
        return {"kind": self.name, "num_frames": int(f), "frame_size": [int(h), int(w)]}

    def reference(self, evaluator, items: list[Item], reference_seed: int, sample_shape=None) -> np.ndarray:
        """Real clips of each item's prompt, a layout and motion drawn from (reference_seed, seed, prompt), rendered
        at the samples' frame count and size."""
        from ..data.clips import clip_for_prompt, render_clips

        f, _, h, w = sample_shape
        if h != w:
            raise ValueError(f"the video evaluator reads square clips, got {h}x{w}")
        clips = [clip_for_prompt(it.prompt, np.random.default_rng(item_seed(f"ref{reference_seed}:{it.seed}",
                                                                            it.prompt)), int(f))
                 for it in items]
        return evaluator.features(render_clips(clips, int(h)))

    def adherence(self, rows: list[dict], boot: dict) -> dict:
        """Every dimension, overall, per family and for the two physics families together, as mean and bootstrap
        interval over prompts (a prompt's seeds stay together); and all correct per seed."""
        from ..data.clips import FAMILIES, PHYSICS
        from .video import ATTRIBUTES

        kw = dict(n_boot=int(boot["n"]), level=float(boot["level"]), seed=int(boot["seed"]))

        def block(sub):
            out = {}
            clusters = np.array([r["prompt_index"] for r in sub])
            for a in ATTRIBUTES:
                keep = [i for i, r in enumerate(sub) if r[a] is not None]
                if keep:
                    out[a] = _mean_interval(np.array([sub[i][a] for i in keep], dtype=float), clusters[keep], **kw)
            out["n_clips"] = len(sub)
            out["n_prompts"] = len(set(clusters.tolist()))
            return out

        summary = {"overall": block(rows), "families": {}}
        for fam in FAMILIES:
            sub = [r for r in rows if r["family"] == fam]
            if sub:
                summary["families"][fam] = block(sub)
        physics = [r for r in rows if r["family"] in PHYSICS]
        if physics:
            summary["families"]["physics"] = block(physics)
        summary["per_seed_all"] = {str(s): float(np.mean([r["all"] for r in rows if r["seed"] == s]))
                                   for s in sorted({r["seed"] for r in rows})}
        return summary

    def fidelity(self, feats: np.ndarray, ref: np.ndarray, ref2: np.ndarray, rows: list[dict], boot: dict) -> dict:
        """`fidelity_summary` on the clip features (FD with its interval and floor, precision / recall), plus the
        FD of each block (appearance: the first 128 columns; motion: the rest) and their floors."""
        from .video import frechet_video_distance

        out = super().fidelity(feats, ref, ref2, rows, boot)
        blocks, floor = frechet_video_distance(ref, feats), frechet_video_distance(ref, ref2)
        out["blocks"] = {k: {"frechet": blocks[k], "floor": floor[k]} for k in ("appearance", "motion")}
        return out

    def save_sample(self, sample: torch.Tensor, path_stem: Path, fps: float) -> None:
        from ..video import save_mp4

        save_mp4(sample, Path(f"{path_stem}{self.sample_suffix}"), fps=fps)

    def grid_files(self) -> tuple[str, ...]:
        return ("samples.gif", "samples.png")

    def write_grid(self, run_dir: Path, samples: torch.Tensor, prompts: list[str]) -> None:
        """samples.gif: the clips animated, up to 8 columns, row-major; samples.png: each clip's first, middle and
        last frames, one row per clip, labelled with its prompt."""
        from ..video import save_frame_strip, save_gif, video_grid

        cols = 8 if len(samples) >= 8 else len(samples)
        rows_n = (len(samples) + cols - 1) // cols
        pad = torch.full((rows_n * cols - len(samples), *samples.shape[1:]), 0.5)
        scale = max(1, 96 // samples.shape[-1])
        save_gif(video_grid(torch.cat([samples, pad]), rows_n, cols, scale=scale), run_dir / "samples.gif")
        save_frame_strip(samples, run_dir / "samples.png", row_labels=prompts, scale=scale)

    def summary_parts(self, m: dict) -> list[str]:
        from .report import interval

        parts = []
        if m.get("adherence"):
            o = m["adherence"]["overall"]
            parts += [f"all {interval(o['all'])}"]
            parts += [f"{k} {o[k]['mean']:.3f}" for k in ("direction", "motion_smoothness", "dynamic_degree",
                                                           "count_stable") if k in o]
        return parts


SCENE, VIDEO = SceneKind(), VideoKind()
KINDS = {SCENE.name: SCENE, VIDEO.name: VIDEO}


def kind_for_pipe(pipe) -> SceneKind:
    """The kind of a pipeline's samples: clips for a TextToVideo, scenes otherwise."""
    from ..video import TextToVideo

    return VIDEO if isinstance(pipe, TextToVideo) else SCENE


def kind_of(metrics: dict) -> SceneKind:
    """The kind of a finished run, from its metrics.json (scene runs have no `kind` key)."""
    name = metrics.get("kind", SCENE.name)
    if name not in KINDS:
        raise ValueError(f"unknown evaluation kind {name!r} in metrics.json; known: {', '.join(KINDS)}")
    return KINDS[name]


def kind_named(name: str) -> SceneKind:
    return KINDS[name]
