"""Training data generated on the fly (no downloads): procedural compositional scenes for the tiny model."""
from .scenes import COLORS, RELATIONS, SHAPES, WORDS, Scene, SceneBatch, SceneObject, parse_prompt, random_scenes, render, sample_scenes

__all__ = ["COLORS", "RELATIONS", "SHAPES", "WORDS", "Scene", "SceneBatch", "SceneObject", "parse_prompt",
           "random_scenes", "render", "sample_scenes"]
