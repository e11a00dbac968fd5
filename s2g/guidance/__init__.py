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
    return guider_class(spec.pop("_target_", None))(**spec)


__all__ = ["APG", "AutoGuidance", "CFG", "CFGPlusPlus", "CFGZeroStar", "Conditional", "S2Guidance", "SkipLayerGuidance",
           "PerturbedAttentionGuidance", "SmoothedEnergyGuidance", "TCFG", "FDG",
           "Guider", "Pass", "Step", "Estimate", "COND", "UNCOND", "from_spec", "guider_class"]
