"""Evaluation on the embedded model's scenes: the scene evaluator, GenEval-style adherence, Fréchet distance,
precision/recall, bootstrap intervals and paired comparisons (`scripts/evaluate.py` runs them)."""
from .adherence import ATTRIBUTES, relation_holds, score
from .evaluator import EVALUATOR_CHECKPOINT, Detection, SceneEvaluator, SceneNet, render_batch
from .harness import item_noise, item_seed, work_items
from .prompts import FAMILIES, family, grammar_prompts, prompt_set
from .stats import (Interval, bootstrap_mean, bootstrap_statistic, frechet_distance, frechet_from_stats,
                    gaussian_stats, paired_difference, precision_recall)

__all__ = ["ATTRIBUTES", "relation_holds", "score", "EVALUATOR_CHECKPOINT", "Detection", "SceneEvaluator",
           "SceneNet", "render_batch", "item_noise", "item_seed", "work_items", "FAMILIES", "family",
           "grammar_prompts", "prompt_set", "Interval", "bootstrap_mean", "bootstrap_statistic", "frechet_distance",
           "frechet_from_stats", "gaussian_stats", "paired_difference", "precision_recall"]
