"""Training data generated on the fly (no downloads): procedural scenes (images) and clips (videos) with exact
ground truth, for the embedded models and their evaluators."""
from .clips import (Clip, ClipBatch, ClipObject, clip_for_prompt, parse_video_prompt, random_clips,
                    random_video_prompts, render_clips, render_prompts, sample_clips, video_family,
                    video_grammar_prompts, video_prompt_set)
from .scenes import COLORS, RELATIONS, SHAPES, WORDS, Scene, SceneBatch, SceneObject, parse_prompt, random_scenes, render, sample_scenes

__all__ = ["COLORS", "RELATIONS", "SHAPES", "WORDS", "Scene", "SceneBatch", "SceneObject", "parse_prompt",
           "random_scenes", "render", "sample_scenes", "Clip", "ClipBatch", "ClipObject", "clip_for_prompt",
           "parse_video_prompt", "random_clips", "random_video_prompts", "render_clips", "render_prompts",
           "sample_clips", "video_family", "video_grammar_prompts", "video_prompt_set"]
