"""The one place where Hydra configs become library arguments (scripts/ call it; the library never imports Hydra).

`build_model(cfg.model)` calls the model config's loader (`_target_`); `guider_factory(cfg.guidance)` gives the
`make_guider(seed)` that s2g.eval.evaluate takes (through s2g.guidance.from_spec); `apply_guidance_defaults`
applies a model config's own guider settings; `model_kind` says whether a model config makes images or videos
(before anything loads); `instantiate` builds any other `_target_` node (user metrics).
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from . import ASSETS
from .runinfo import compile_regions

SCRIPT_KEYS = ("default_prompts", "grid", "guidance_defaults")  # model-config keys that only the scripts read


def instantiate(node):
    """A `_target_` config node -> the object it names (Hydra's instantiate)."""
    import hydra

    return hydra.utils.instantiate(node)


def build_model(model_cfg: DictConfig):
    """(model, script keys): the config's loader (`_target_`) called without the keys only scripts read, which
    come back as a dict; "embedded" checkpoints mean the weights shipped in s2g/assets (the loader's default),
    "embedded:<name>" the file s2g/assets/<name>.safetensors."""
    check_mandatory(model_cfg, "model")
    args = OmegaConf.to_container(model_cfg, resolve=True)
    extras = {k: args.pop(k) for k in SCRIPT_KEYS if k in args}
    compile_ = bool(args.pop("compile", False))
    for key in ("checkpoint", "weak_checkpoint"):
        if args.get(key) == "embedded":
            args.pop(key)
        elif isinstance(args.get(key), str) and args[key].startswith("embedded:"):
            args[key] = str(ASSETS / f"{args[key][len('embedded:'):]}.safetensors")
    model = instantiate(args)
    if compile_:
        for denoiser in (model.denoiser, model.weak):
            if denoiser is not None:
                compile_regions(denoiser)
    return model, extras


def check_mandatory(cfg: DictConfig, prefix: str) -> None:
    """ValueError naming the first key of `cfg` still at `???` (OmegaConf's mandatory value), and the others, so
    that an unset path is one line before anything loads, not OmegaConf's MissingMandatoryValue traceback."""
    def walk(node, path):
        for k in node:
            if OmegaConf.is_missing(node, k):
                yield f"{path}.{k}"
            elif OmegaConf.is_dict(child := node._get_node(k)) and not child._is_none() and not child._is_missing():
                yield from walk(child, f"{path}.{k}")

    missing = list(walk(cfg, prefix))
    if missing:
        more = f" (also not set: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ValueError(f"{missing[0]}: not set; give it on the command line, e.g. {missing[0]}=...{more}")


def guider_factory(guidance_cfg: DictConfig):
    """make_guider(seed) -> the configured guider (s2g.guidance.from_spec), its own generator (S² masks) seeded
    with `seed` when the config has one."""
    from .guidance import from_spec

    def make_guider(seed: int):
        g = OmegaConf.to_container(guidance_cfg, resolve=False)
        if "seed" in g:
            g["seed"] = seed  # the guider's own generator (S² masks) follows the image's seed
        return from_spec(OmegaConf.to_container(OmegaConf.create(g), resolve=True))

    return make_guider


def apply_guidance_defaults(model_cfg: DictConfig, name: str, guidance_cfg: DictConfig, overrides) -> dict:
    """The model config's own settings for guider `name` (`guidance_defaults: {name: {key: value}}`, e.g. the
    embedded model's val-selected scale) written into `guidance_cfg`, except the keys the command line sets
    (`guidance.<key>=...` in `overrides`). Returns {key: value} of what was applied."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = (model_cfg.get("guidance_defaults") or {}).get(name) or {}
    applied = {k: v for k, v in defaults.items() if f"guidance.{k}" not in given}
    for k, v in applied.items():
        OmegaConf.update(guidance_cfg, k, v, force_add=True)
    return OmegaConf.to_container(OmegaConf.create(applied)) if applied else {}


def model_kind(model_cfg: DictConfig) -> str:
    """"video" when the model config's loader (`_target_`) returns a TextToVideo (the tiny video model, Wan), else
    "scene": read off the loader's return annotation, so that nothing loads and no name list is kept."""
    import typing

    from hydra.utils import get_method

    from .video import TextToVideo

    target = model_cfg.get("_target_") if model_cfg is not None else None
    if not target:
        return "scene"
    try:
        returns = typing.get_type_hints(get_method(str(target))).get("return")
    except Exception:  # noqa: BLE001 - an unresolvable annotation says nothing; the loader's own errors come later
        return "scene"
    return "video" if isinstance(returns, type) and issubclass(returns, TextToVideo) else "scene"


def check_config_choices(config_dir, config_name: str, argv=None) -> None:
    """`fail` on a command-line group override (`guidance=s3`, `-m sampler=euler,foo`) that names no file in
    `config_dir/<group>/`, with the available options in the line. Call it before the `@hydra.main` function:
    Hydra composes before that function runs, and its own message is many lines with exit code 1 (and no run dir
    is made for a run that cannot start). Only the groups of `config_name`'s defaults list are checked; what this
    cannot read (a glob or range sweep, a deletion, an extra search path, an unparsable override) is left to Hydra."""
    from pathlib import Path

    import yaml

    from .cli import fail

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=", 1)[0] in ("--config-dir", "-cd", "--config-path", "-cp") or a.startswith("hydra.searchpath")
           for a in args):
        return  # options may come from another directory
    config_dir = Path(config_dir)
    try:
        defaults = (yaml.safe_load((config_dir / f"{config_name}.yaml").read_text()) or {}).get("defaults") or []
    except (OSError, yaml.YAMLError):
        return
    groups = {k for d in defaults if isinstance(d, dict) for k in d if not k.startswith("override ") and "/" not in k}
    groups = {g.split("@", 1)[0] for g in groups}
    candidates = [a for a in args if "=" in a and not a.startswith("-") and a.lstrip("+").split("=", 1)[0]
                  .split("@", 1)[0] in groups]
    if not candidates:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return
    for o in overrides:
        group = o.key_or_group
        if o.is_delete() or (o.is_sweep_override() and not o.is_choice_sweep()):
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        available = sorted(f.stem for f in (config_dir / group).glob("*.yaml"))
        for value in values:
            if value is None or not isinstance(value, str) or value in available:
                continue
            fail(f"{group}={value}: no such config in configs/{group}/; available: {', '.join(available)}")


def check_run_dir_unused(argv=None, subdir: str = ".hydra") -> None:
    """`fail` when the command line's `hydra.run.dir=<dir>` already holds a run's Hydra files (`<dir>/<subdir>`):
    Hydra would write its config.yaml and overrides.yaml over the first run's before the task starts, so the
    check must come before the `@hydra.main` function, as `check_config_choices`. A multirun, or a dir given by
    an interpolation, is left alone (its dirs are made per job); `hydra.output_subdir=<name>` is followed."""
    from pathlib import Path

    from .cli import fail

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-m", "--multirun") for a in args):
        return
    dirs = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    subdirs = [a.split("=", 1)[1] for a in args if a.startswith("hydra.output_subdir=")]
    if subdirs:
        subdir = subdirs[-1].strip("'\"")
    if not dirs or "${" in dirs[-1] or subdir in ("null", "None", ""):  # output_subdir=null: Hydra writes none
        return
    held = Path(dirs[-1].strip("'\"")).expanduser() / subdir
    if held.exists():
        fail(f"{held.parent} already holds a run ({subdir}/); outputs are never overwritten (choose another "
             f"hydra.run.dir)")
