"""Guidance methods over one shared algebra (base.py). Adding a method = one module here + one yaml in
configs/guidance/ whose `_target_` names its class (README.md); `from_spec` builds any guider from such a spec."""
from .apg import APG
from .autoguidance import AutoGuidance
from .base import COND, UNCOND, Estimate, Guider, Pass, Step
from .cfg import CFG, Conditional
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .fdg import FDG
from .pag import PerturbedAttentionGuidance
from .s2 import S2Guidance
from .seg import SmoothedEnergyGuidance
from .slg import SkipLayerGuidance
from .tcfg import TCFG

def guider_class(target: str) -> type:
    """The Guider class a `_target_` path names (any importable module: a new guider needs no registration)."""
    import importlib

    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Guider)):
        raise ValueError(f"unknown guider {target!r}: `_target_` must name a Guider class, e.g. s2g.guidance.CFG")
    return cls


def from_spec(spec, **arguments) -> Guider:
    """The one way a guider is built from a name: a `_target_` spec, the form of configs/guidance/*.yaml
    ({"_target_": "s2g.guidance.CFG", "scale": 4.0} -> CFG(scale=4.0)); `arguments` add to or replace the spec's.
    The scripts (through s2g.config), experiments/claims and the toy build guiders this way, or call the class."""
    spec = {**dict(spec), **arguments}
    cls = guider_class(spec.pop("_target_", None))
    check_arguments(cls, spec)
    return cls(**spec)


_TYPES = {float: ("a number", (int, float)), int: ("an integer", (int,)), bool: ("true or false", (bool,)),
          str: ("a string", (str,))}


def check_arguments(cls: type, spec: dict) -> None:
    """ValueError, naming the key, for an argument `cls` does not take or of the wrong type (by the annotations of
    its __init__: float, int, bool, str, or one of those or None), so that `guidance.scale=abc` is refused when
    the guider is built, not as a bare TypeError from inside the first sampling step."""
    import inspect
    import types
    import typing

    sig = inspect.signature(cls.__init__)
    params = {n for n, p in sig.parameters.items()
              if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        unknown = [k for k in spec if k not in params]
        if unknown:
            raise ValueError(f"{unknown[0]}: {cls.__name__} has no such parameter; it takes "
                             f"{', '.join(sorted(params))}")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an unresolvable annotation checks nothing; the guider's own checks remain
        return
    for key, value in spec.items():
        hint = hints.get(key)
        options = list(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) \
            else [hint]
        if value is None and type(None) in options:
            continue
        known = [_TYPES[o] for o in options if o in _TYPES]
        if not known or len(known) != len([o for o in options if o is not type(None)]):
            continue  # a type this check does not know (a tuple, a class): the guider checks it
        # bool is an int to Python, but `scale=true` is a typo, not a number
        if not any(isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)) for _, kinds in known):
            want = " or ".join(w for w, _ in known) + (" or null" if type(None) in options else "")
            raise ValueError(f"{key}={value!r}: {cls.__name__} takes {want} for {key}")


__all__ = ["APG", "AutoGuidance", "CFG", "CFGPlusPlus", "CFGZeroStar", "Conditional", "S2Guidance", "SkipLayerGuidance",
           "PerturbedAttentionGuidance", "SmoothedEnergyGuidance", "TCFG", "FDG",
           "Guider", "Pass", "Step", "Estimate", "COND", "UNCOND", "from_spec", "guider_class", "check_arguments"]
