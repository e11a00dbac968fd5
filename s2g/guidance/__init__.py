"""Guidance methods over one shared algebra (base.py). Adding a method = one module here + one yaml in
configs/guidance/ (+ a line in GUIDERS below so `build_guider` knows its name)."""
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

GUIDERS = {
    "none": Conditional,
    "cfg": CFG,
    "cfgpp": CFGPlusPlus,
    "apg": APG,
    "cfg_zero_star": CFGZeroStar,
    "autoguidance": AutoGuidance,
    "slg": SkipLayerGuidance,
    "pag": PerturbedAttentionGuidance,
    "seg": SmoothedEnergyGuidance,
    "tcfg": TCFG,
    "fdg": FDG,
    "s2": S2Guidance,
}


def build_guider(name: str, **kwargs) -> Guider:
    if name not in GUIDERS:
        raise ValueError(f"unknown guider {name!r}; known: {', '.join(sorted(GUIDERS))}")
    return GUIDERS[name](**kwargs)


__all__ = ["APG", "AutoGuidance", "CFG", "CFGPlusPlus", "CFGZeroStar", "Conditional", "S2Guidance", "SkipLayerGuidance",
           "PerturbedAttentionGuidance", "SmoothedEnergyGuidance", "TCFG", "FDG",
           "Guider", "Pass", "Step", "Estimate", "COND", "UNCOND", "GUIDERS", "build_guider"]
