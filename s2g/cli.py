"""What every entry point (scripts/, experiments/, the toy) shares: thread settings, user errors, the wandb logger.

Import this module before anything that imports torch: OpenMP reads OMP_WAIT_POLICY once, when torch loads it.
Threads that spin while they wait make torch many times slower on a shared or busy CPU (measured here: 2 threads,
4.5 s against 0.34 s per MMDiT forward), so the default here is PASSIVE; a value set in the environment wins.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # the user's input, not a bug


def one_blas_thread() -> None:
    """numpy's BLAS on one thread (the metrics' 128-d covariances: 10x faster than two on a busy 2-core machine).
    Takes effect only when called before numpy is imported (an entry point's first lines)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def fail(message) -> None:
    """One line on stderr and exit code 2: what a user error looks like, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _cause(e: BaseException) -> BaseException:
    """The user error behind `e`: `e` itself, or the error it was raised from (Hydra's instantiate wraps what a
    loader or guider raises that way)."""
    if not isinstance(e, USER_ERRORS) and isinstance(e.__cause__, USER_ERRORS):
        return e.__cause__
    return e


@contextmanager
def user_errors(cleanup=None):
    """Turns a user error (USER_ERRORS, also one wrapped by Hydra) raised in the block into `fail`; `cleanup()`
    runs first (e.g. removing a run dir that never got its files). Anything else propagates: a bug."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's
        cause = _cause(e)
        if not isinstance(cause, USER_ERRORS):
            raise
        if cleanup is not None:
            cleanup()
        fail(cause)


def check_config_choices(config_dir, config_name: str, argv=None) -> None:
    """`fail` on a command-line group override (`guidance=s3`, `-m sampler=euler,foo`) that names no file in
    `config_dir/<group>/`, with the available options in the line. Call it before the `@hydra.main` function:
    Hydra composes before that function runs, and its own message is many lines with exit code 1 (and no run dir
    is made for a run that cannot start). Only the groups of `config_name`'s defaults list are checked; what this
    cannot read (a glob or range sweep, a deletion, an extra search path, an unparsable override) is left to Hydra."""
    from pathlib import Path

    import yaml

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


def wandb_logger(logger_cfg, run_dir, config: dict):
    """An initialised wandb run when the `logger` config group is wandb (its project, entity, mode, tags), with
    `config` recorded and its files under `run_dir`; None for logger=none."""
    if logger_cfg is None or logger_cfg.get("name") != "wandb":
        return None
    import wandb

    return wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"), mode=logger_cfg.get("mode"),
                      tags=list(logger_cfg.get("tags") or []), dir=str(run_dir), config=config)


def flat_metrics(d: dict, prefix: str = "") -> dict:
    """Nested metrics -> {"a/b/c": number} (what wandb plots)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out
