"""Evaluation on the embedded models' scenes and clips: the scene and video evaluators, GenEval-style adherence, Fréchet distance,
precision/recall, bootstrap intervals and paired comparisons. Running: `evaluate(pipe, make_guider, items, ...)`
-> results, `write_run(run_dir, results, ...)` (run.py); comparing finished runs: `load_run`, `paired`, `gather`
(report.py); what differs between images and clips: one object per kind (kinds.py). `scripts/evaluate.py` turns
its config into those arguments."""
from .adherence import ATTRIBUTES, relation_holds, score
from .evaluator import EVALUATOR_CHECKPOINT, Detection, SceneEvaluator, SceneNet, render_batch
from .harness import item_noise, item_seed, work_items
from .prompts import FAMILIES, family, grammar_prompts, prompt_set
from .report import gather, load_run, paired, rescore_fidelity
from .run import evaluate, write_run
from .stats import (Interval, bootstrap_mean, bootstrap_statistic, frechet_distance, frechet_from_stats,
                    gaussian_stats, paired_difference, precision_recall)
from .video import ATTRIBUTES as VIDEO_ATTRIBUTES
from .video import VideoEvaluator, clip_features, frechet_video_distance, score_clips

__all__ = ["ATTRIBUTES", "relation_holds", "score", "EVALUATOR_CHECKPOINT", "Detection", "SceneEvaluator",
           "SceneNet", "render_batch", "item_noise", "item_seed", "work_items", "FAMILIES", "family",
           "grammar_prompts", "prompt_set", "Interval", "bootstrap_mean", "bootstrap_statistic", "frechet_distance",
           "frechet_from_stats", "gaussian_stats", "paired_difference", "precision_recall",
           "VIDEO_ATTRIBUTES", "VideoEvaluator", "clip_features", "frechet_video_distance", "score_clips",
           "evaluate", "write_run", "gather", "load_run", "paired", "rescore_fidelity"]
