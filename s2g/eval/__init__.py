"""Evaluation on the embedded models' scenes and clips: the scene and video evaluators, GenEval-style adherence, Fréchet distance,
precision/recall, bootstrap intervals and paired comparisons (`scripts/evaluate.py` runs them)."""
from .adherence import ATTRIBUTES, relation_holds, score
from .evaluator import EVALUATOR_CHECKPOINT, Detection, SceneEvaluator, SceneNet, render_batch
from .harness import item_noise, item_seed, work_items
from .prompts import FAMILIES, family, grammar_prompts, prompt_set
from .stats import (Interval, bootstrap_mean, bootstrap_statistic, frechet_distance, frechet_from_stats,
                    gaussian_stats, paired_difference, precision_recall)
from .video import ATTRIBUTES as VIDEO_ATTRIBUTES
from .video import VideoEvaluator, clip_features, frechet_video_distance, score_clips

__all__ = ["ATTRIBUTES", "relation_holds", "score", "EVALUATOR_CHECKPOINT", "Detection", "SceneEvaluator",
           "SceneNet", "render_batch", "item_noise", "item_seed", "work_items", "FAMILIES", "family",
           "grammar_prompts", "prompt_set", "Interval", "bootstrap_mean", "bootstrap_statistic", "frechet_distance",
           "frechet_from_stats", "gaussian_stats", "paired_difference", "precision_recall",
           "VIDEO_ATTRIBUTES", "VideoEvaluator", "clip_features", "frechet_video_distance", "score_clips"]
