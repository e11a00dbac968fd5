"""Networks and their checkpoint loaders (SD3 MMDiT, Wan 2.1 DiT, VAE, text encoders, the embedded tiny model).

Imports are lazy so that `import s2g.models` stays cheap and one missing optional part never breaks another.
"""
import importlib

_EXPORTS = {
    "MMDiT": ".mmdit",
    "load_mmdit": ".checkpoint",
    "load_state_dict": ".checkpoint",
    "WanDiT": ".wan",
    "WanConfig": ".wan",
    "load_wan": ".checkpoint",
    "VAE": ".vae",
    "load_vae": ".vae",
    "WanVAE": ".wan_vae",
    "WanVAEConfig": ".wan_vae",
    "load_wan_vae": ".checkpoint",
    "UMT5Encoder": ".text.umt5",
    "load_umt5": ".checkpoint",
    "WanTextConditioner": ".text.umt5",
    "load_wan_text": ".text.umt5",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 's2g.models' has no attribute {name!r}")


__all__ = list(_EXPORTS)
