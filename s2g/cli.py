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


def check_counts(cfg, keys) -> None:
    """ValueError for the first of `keys` in `cfg` (a mapping) that is set but not an integer >= 1 (batch_size=-1
    would otherwise sample nothing and fail in torch.cat, batch_size=0 in range()); None means the default."""
    for key in keys:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


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
