"""s2g on diffusers: any supported diffusers transformer as an s2g denoiser, and S² as a diffusers guider.

    from s2g.integrations.diffusers import DiffusersDenoiser, StochasticSelfGuidance

`DiffusersDenoiser(transformer)` presents an `SD3Transformer2DModel` (SD3, SD3.5), a `FluxTransformer2DModel`
(its 19 double-stream and 38 single-stream blocks as one list of 57) or a `WanTransformer3DModel` (Wan 2.1) as
an s2g denoiser: `denoiser(x, sigma, skip=plan, **cond) -> velocity`, with `num_blocks` and the same
skip/perturbation plans as s2g's own MMDiT and Wan (`s2g/models/sweep.py`): a set of blocks run as identity (S²,
SLG), `identity_attention` (PAG), `smoothed_attention(σ)` (SEG). So every s2g guider and sampler runs on it
unchanged. The perturbations are hooks of this module's own, put on the chosen blocks for one call and taken off
after it (also when the call fails): a skipped block returns its inputs in the order that block returns its
outputs (SD3's and Flux's blocks return (encoder, hidden), Wan's the hidden states alone).

`StochasticSelfGuidance` is S² (Chen et al., arXiv 2508.12880, Algorithm 1) as a `diffusers.guiders.BaseGuidance`:
it plugs into a modular pipeline with `pipe.update_components(guider=StochasticSelfGuidance(...))`.

Importing this module imports diffusers; `import s2g` never does. See `s2g/integrations/README.md`.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import diffusers

from ..guidance.base import as_generator, check_interval, check_interval_unit
from ..guidance.s2 import FORMS, num_dropped
from ..models.mmdit import gaussian_blur_tokens
from ..models.sweep import SKIP, Perturbation, check_plan

__all__ = ["DiffusersDenoiser", "StochasticSelfGuidance", "SUPPORTED", "transformer_blocks", "perturbed"]

TESTED_WITH = "0.42.1"


# ------------------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class _Family:
    """How one diffusers transformer class is driven: its block stacks (concatenated, in the order the forward
    runs them), each block class's output order, the attention modules a perturbation acts on, where the image
    tokens sit in a joint attention, and the forward call."""

    cls_name: str
    stacks: tuple[str, ...]
    call: Callable  # (denoiser, x, sigma fp32 [B], cond) -> velocity
    image_tokens: Callable  # x -> (number of image tokens, grid for SEG: (h, w) or (f, h, w))
    text_first: bool  # joint attention over [text; image] (Flux) or [image; text] (SD3)
    attentions: tuple[str, ...]  # self/joint attention submodules of a block (those present are used)
    keys: tuple[str, ...]  # the conditioning keywords the call needs (s2g names)
    optional: tuple[str, ...] = ()  # and those it may take


# Each block class's return order: (index of the hidden states, index of the encoder states or None), and the
# names of those two arguments. Checked against each forward by the tests; diffusers' TransformerBlockRegistry
# says the same for these classes (its skip hook ignores it and returns (hidden, encoder): the 0.42.1 bug).
_BLOCK_OUTPUTS = {
    "JointTransformerBlock": (1, 0),  # (encoder, hidden); the last one (context_pre_only) (None, hidden)
    "FluxTransformerBlock": (1, 0),
    "FluxSingleTransformerBlock": (1, 0),
    "WanTransformerBlock": (0, None),
    "QwenImageTransformerBlock": (1, 0),
}


def _sd3_call(d, x, sigma, cond):
    t = d.transformer
    return t(hidden_states=x.to(t.dtype), timestep=1000 * sigma, encoder_hidden_states=cond["context"].to(t.dtype),
             pooled_projections=cond["pooled"].to(t.dtype), return_dict=False)[0]


def _sd3_tokens(d, x):
    p = d.transformer.config.patch_size
    return (x.shape[-2] // p) * (x.shape[-1] // p), (x.shape[-2] // p, x.shape[-1] // p)


def _wan_call(d, x, sigma, cond):
    t = d.transformer
    return t(hidden_states=x.to(t.dtype), timestep=1000 * sigma, encoder_hidden_states=cond["context"].to(t.dtype),
             return_dict=False)[0]


def _wan_tokens(d, x):
    grid = tuple(s // p for s, p in zip(x.shape[-3:], d.transformer.config.patch_size))
    return math.prod(grid), grid


def pack_flux_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] latents -> Flux's [B, (H/2)(W/2), 4C] tokens (2x2 patches, row-major), as FluxPipeline."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_flux_latents(tokens: Tensor, H: int, W: int) -> Tensor:
    B, L, D = tokens.shape
    return tokens.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


def flux_image_ids(h: int, w: int, device=None) -> Tensor:
    """Flux's image position ids for an h x w token grid: (0, row, column) per token, row-major."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def _flux_call(d, x, sigma, cond):
    t = d.transformer
    if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"Flux takes latents [B, C, H, W] with even H and W, got {list(x.shape)}")
    B, C, H, W = x.shape
    if 4 * C != t.config.in_channels:
        raise ValueError(f"latent has {C} channels, this Flux expects {t.config.in_channels // 4}")
    context = cond["context"]
    kwargs = {}
    if t.config.guidance_embeds:
        if d.guidance is None:
            raise ValueError("this Flux embeds a guidance scale (FLUX.1-dev): DiffusersDenoiser(transformer, "
                             "guidance=3.5)")
        kwargs["guidance"] = torch.full((B,), float(d.guidance), device=x.device, dtype=torch.float32)
    out = t(hidden_states=pack_flux_latents(x).to(t.dtype), encoder_hidden_states=context.to(t.dtype),
            pooled_projections=cond["pooled"].to(t.dtype), timestep=sigma,
            img_ids=flux_image_ids(H // 2, W // 2, x.device), txt_ids=torch.zeros(context.shape[1], 3, device=x.device),
            return_dict=False, **kwargs)[0]
    return unpack_flux_latents(out, H, W)


def _flux_tokens(d, x):
    return (x.shape[-2] // 2) * (x.shape[-1] // 2), (x.shape[-2] // 2, x.shape[-1] // 2)


def _qwen_call(d, x, sigma, cond):
    t = d.transformer
    if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"Qwen-Image takes latents [B, C, H, W] with even H and W, got {list(x.shape)}")
    B, C, H, W = x.shape
    if 4 * C != t.config.in_channels:
        raise ValueError(f"latent has {C} channels, this Qwen-Image expects {t.config.in_channels // 4}")
    mask = cond.get("context_mask")
    out = t(hidden_states=pack_flux_latents(x).to(t.dtype), encoder_hidden_states=cond["context"].to(t.dtype),
            encoder_hidden_states_mask=mask, timestep=sigma, img_shapes=[[(1, H // 2, W // 2)]] * B,
            return_dict=False)[0]
    return unpack_flux_latents(out, H, W)


FAMILIES = {
    f.cls_name: f for f in (
        _Family("SD3Transformer2DModel", ("transformer_blocks",), _sd3_call, _sd3_tokens, False, ("attn", "attn2"),
                ("context", "pooled")),
        _Family("FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), _flux_call,
                _flux_tokens, True, ("attn",), ("context", "pooled")),
        _Family("WanTransformer3DModel", ("blocks",), _wan_call, _wan_tokens, False, ("attn1",), ("context",)),
        _Family("QwenImageTransformer2DModel", ("transformer_blocks",), _qwen_call, _flux_tokens, True, ("attn",),
                ("context",), ("context_mask",)),
    )
}
SUPPORTED = tuple(FAMILIES)


def _family(transformer) -> _Family:
    for cls in type(transformer).__mro__:
        if cls.__name__ in FAMILIES and cls.__module__.startswith("diffusers"):
            return FAMILIES[cls.__name__]
    raise TypeError(f"{type(transformer).__name__} is not supported; supported diffusers transformers: "
                    f"{', '.join(SUPPORTED)}")


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    """The transformer's blocks as one list, in the order its forward runs them (Flux: double, then single)."""
    return [b for name in _family(transformer).stacks for b in getattr(transformer, name)]


# ------------------------------------------------------------------------------------------------ hooks


_MISSING = object()


class _ForwardOverride:
    """Replaces `module.forward` by an instance attribute for as long as it is installed; `remove()` puts back
    exactly what was there (the class's forward, or a forward someone else had installed)."""

    def __init__(self, module: torch.nn.Module, forward: Callable):
        self.module, self.forward = module, forward
        self._previous = module.__dict__.get("forward", _MISSING)
        self._inner = module.forward  # what this override wraps (bound)
        module.forward = self._call

    def _call(self, *args, **kwargs):
        return self.forward(self._inner, *args, **kwargs)

    def remove(self) -> None:
        if self._previous is _MISSING:
            del self.module.__dict__["forward"]
        else:
            self.module.forward = self._previous


def _skip_forward(block: torch.nn.Module):
    """The identity in the block's own output order."""
    name = type(block).__name__
    if name not in _BLOCK_OUTPUTS:
        raise TypeError(f"no known output order for block class {name}; known: {', '.join(_BLOCK_OUTPUTS)}")
    hidden_at, encoder_at = _BLOCK_OUTPUTS[name]
    signature = inspect.signature(type(block).forward)

    def forward(inner, *args, **kwargs):
        bound = signature.bind(block, *args, **kwargs)
        hidden = bound.arguments["hidden_states"]
        if encoder_at is None:
            return hidden
        out = [None, None]
        out[hidden_at], out[encoder_at] = hidden, bound.arguments.get("encoder_hidden_states")
        return tuple(out)

    return forward


class _IdentityAttentionMode(torch.overrides.TorchFunctionMode):
    """Inside one self/joint attention: each image token attends only to itself among the image tokens and still
    to every text token; text queries unchanged (PAG, as s2g's MMDiT and diffusers' PAGJointAttnProcessor2_0)."""

    def __init__(self, image_tokens: int, text_first: bool, seen: list):
        super().__init__()
        self.image_tokens, self.text_first, self.seen = image_tokens, text_first, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen[0] += 1
            q = kwargs.get("query", args[0] if args else None)
            L, Lx = q.shape[-2], self.image_tokens
            start = L - Lx if self.text_first else 0
            mask = torch.ones(L, L, dtype=torch.bool, device=q.device)
            mask[start:start + Lx, start:start + Lx] = torch.eye(Lx, dtype=torch.bool, device=q.device)
            if len(args) > 3:
                args, kwargs = args[:3], {**kwargs, "attn_mask": args[3]}
            given = kwargs.get("attn_mask")  # e.g. Qwen-Image's text padding mask: keep it
            if given is not None:
                mask = mask & given if given.dtype == torch.bool else given.masked_fill(~mask, float("-inf"))
            kwargs = {**kwargs, "attn_mask": mask}
        return func(*args, **kwargs)


@contextmanager
def perturbed(denoiser: "DiffusersDenoiser", plan: dict, x: Tensor):
    """The transformer with `plan` ({block: Perturbation}) applied for the duration of the block; every hook is
    removed on exit, leaving the model exactly as it was. A PAG or SEG hook that never fired (another attention
    backend than torch's sdpa, fused qkv projections) stops with one line instead of doing nothing."""
    removers: list[Callable] = []
    fired: dict[int, list] = {}  # block -> [number of times its perturbation acted]
    fam, blocks = denoiser.family, denoiser.blocks
    try:
        if plan:
            Lx, grid = fam.image_tokens(denoiser, x)
        for i, p in sorted(plan.items()):
            block = blocks[i]
            if p == SKIP:
                removers.append(_ForwardOverride(block, _skip_forward(block)).remove)
                continue
            attns = [getattr(block, a) for a in fam.attentions if getattr(block, a, None) is not None]
            seen = fired[i] = [0]
            if p.kind == "identity_attention":
                def forward(inner, *args, _seen=seen, **kwargs):
                    with _IdentityAttentionMode(Lx, fam.text_first, _seen):
                        return inner(*args, **kwargs)
                removers += [_ForwardOverride(a, forward).remove for a in attns]
            elif p.kind == "smoothed_attention":
                for a in attns:
                    hook = _blur_hook(Lx, grid, p.sigma, fam.text_first, seen)
                    removers.append(a.to_q.register_forward_hook(hook).remove)
        yield
        for i, seen in fired.items():
            if not seen[0]:
                raise RuntimeError(f"{plan[i].kind} on block {i} of {fam.cls_name} never acted: it needs the "
                                   "native attention backend (torch's scaled_dot_product_attention) and unfused "
                                   "q/k/v projections")
    finally:
        for remove in reversed(removers):
            remove()


def _blur_hook(Lx: int, grid: tuple, sigma: float, text_first: bool, seen: list):
    """SEG: the image queries (the output of `to_q`, before any qk-norm) blurred over their token grid (each
    frame's (h, w) grid for a video), the text queries of a single-stream block left alone."""
    hw = grid[-2:]

    def hook(module, args, q):
        seen[0] += 1
        L = q.shape[1]
        start = L - Lx if text_first else 0
        img = q[:, start:start + Lx]
        blurred = gaussian_blur_tokens(img.reshape(-1, hw[0] * hw[1], q.shape[-1]), hw, sigma).reshape(img.shape)
        if L == Lx:
            return blurred
        parts = [q[:, :start], blurred] if text_first else [blurred, q[:, Lx:]]
        return torch.cat(parts, dim=1)

    return hook


# ------------------------------------------------------------------------------------------------ denoiser


class DiffusersDenoiser:
    """A diffusers transformer as an s2g denoiser: `denoiser(x, sigma, skip=None, **cond) -> velocity`.

    x: latents [B, C, H, W] (SD3, Flux: unpacked, FluxPipeline's 2x2 packing is done here) or [B, C, F, H, W]
    (Wan); sigma: [B] or a scalar in [0, 1] (the network sees 1000·σ); cond: s2g's names, `context` (the text
    encoder rows) and `pooled` (SD3, Flux). `skip`: a set of block indices run as identity, or a plan
    {block: Perturbation}. Blocks are numbered as `transformer_blocks(transformer)` lists them. Returns the
    velocity in x's dtype. One call per requested pass (no `forward_shared`: see the README).
    """

    perturbations = ("skip", "identity_attention", "smoothed_attention")

    def __init__(self, transformer: torch.nn.Module, *, guidance: float | None = None):
        self.family = _family(transformer)
        self.transformer = transformer
        self.guidance = guidance  # Flux-dev's embedded guidance scale
        self.blocks = transformer_blocks(transformer)
        for b in {type(b).__name__ for b in self.blocks} - set(_BLOCK_OUTPUTS):
            raise TypeError(f"{self.family.cls_name} has blocks of class {b}, whose output order is not known; "
                            f"known: {', '.join(_BLOCK_OUTPUTS)}")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def check_plan(self, skip) -> dict[int, Perturbation]:
        return check_plan(skip, self.num_blocks, self.perturbations, self.family.cls_name)

    def __call__(self, x: Tensor, sigma, skip=None, **cond) -> Tensor:
        plan = self.check_plan(skip)
        fam = self.family
        missing = [k for k in fam.keys if k not in cond]
        unknown = sorted(set(cond) - set(fam.keys) - set(fam.optional))
        if missing or unknown:
            optional = f" (optional: {', '.join(fam.optional)})" if fam.optional else ""
            raise ValueError(f"{fam.cls_name} takes the conditioning {', '.join(fam.keys)}{optional}; "
                             f"missing {missing}, unknown {unknown}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        with perturbed(self, plan, x):
            v = self.family.call(self, x, sigma, cond)
        return v.to(x.dtype)

    def __repr__(self) -> str:
        return f"DiffusersDenoiser({self.family.cls_name}, {self.num_blocks} blocks)"


# ------------------------------------------------------------------------------------------------ the guider


def require_guider_api(module=diffusers):
    """diffusers' `BaseGuidance` class, or an ImportError of one line saying which diffusers is needed."""
    base = None
    try:
        if module is diffusers:
            from diffusers.guiders import BaseGuidance as base  # noqa: N813
        else:
            base = getattr(getattr(module, "guiders", None), "BaseGuidance", None)
    except ImportError:
        base = None
    if base is None:
        raise ImportError(f"StochasticSelfGuidance needs diffusers' guider API (diffusers.guiders.BaseGuidance, "
                          f"tested with diffusers {TESTED_WITH}); installed: diffusers "
                          f"{getattr(module, '__version__', '?')}. pip install -e \".[diffusers]\"")
    return base


def _check_blocks(protected: list[int], drop_ratio: float, num_blocks: int) -> list[int]:
    """The droppable blocks, or one line naming the valid range."""
    bad = sorted(b for b in protected if not 0 <= b < num_blocks)
    if bad:
        raise ValueError(f"protected_blocks {bad} out of range: valid block indices are 0..{num_blocks - 1} "
                         f"({num_blocks} blocks)")
    droppable = [b for b in range(num_blocks) if b not in set(protected)]
    k = num_dropped(drop_ratio, num_blocks)
    if k > len(droppable):
        hi = (len(droppable) + 0.5) / num_blocks
        raise ValueError(f"drop_ratio {drop_ratio} drops {k} of {num_blocks} blocks, but only {len(droppable)} are "
                         f"not protected: no sub-network left to draw; valid range: 0 < drop_ratio < {hi:.4g}")
    return droppable


try:
    _BaseGuidance = require_guider_api()
except ImportError as _err:  # the denoiser works without it; the guider says what is missing when asked for
    _GUIDER_ERROR = _err
    _BaseGuidance = None

if _BaseGuidance is not None:
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg

    class StochasticSelfGuidance(_BaseGuidance):
        """S²-Guidance (Chen et al., arXiv 2508.12880) as a diffusers guider.

        At each step inside the S² window it asks for one more conditional batch per sub-network (`num_subnetworks`
        N: 1 is S², more is naive S²), each with a fresh random `round(drop_ratio·#blocks)` of the transformer's
        blocks run as identity (never a `protected_blocks` one; block 0 by default), and combines

            difference (Algorithm 1):  pred = pred_cfg - s2_scale · mean_i(pred_skip_i - pred_cond)
            appendix:                  D = D_cfg - s2_scale · mean_i(D̂_i),  D = x - σ·v  (flow matching)

        with pred_cfg diffusers' CFG at `guidance_scale` (`use_original_formulation`, `guidance_rescale` as in
        `ClassifierFreeGuidance`; CFG's own window is `start`/`stop`). Outside the S² window it is plain CFG.
        Window: `s2_start`/`s2_stop` as step fractions, int(s2_start·N) <= i < int(s2_stop·N) (diffusers'
        rule; `interval_unit="steps"`, default, the paper's central 80%), or as σ = timestep /
        `num_train_timesteps` in [s2_start, s2_stop] (`interval_unit="sigma"`).

        Masks come from the guider's own generator, seeded with `seed` at step 0 of every run: one mask per
        sub-network and step for the whole batch, drawn as s2g's `S2Guidance` draws them (same seed, same masks,
        step for step). The skipped blocks are hooked for their batch in `prepare_models` and unhooked in
        `cleanup_models`; blocks are numbered as `transformer_blocks(transformer)` lists them (Flux: 19 double
        then 38 single).
        """

        _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_skip"]

        @register_to_config
        def __init__(self, guidance_scale: float = 7.5, s2_scale: float = 0.25, num_subnetworks: int = 1,
                     drop_ratio: float = 0.1, protected_blocks: list[int] | None = None, s2_start: float = 0.1,
                     s2_stop: float = 0.9, interval_unit: str = "steps", form: str = "difference", seed: int = 0,
                     num_blocks: int | None = None, num_train_timesteps: int = 1000, guidance_rescale: float = 0.0,
                     use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                     enabled: bool = True):
            super().__init__(start, stop, enabled)
            self.guidance_scale = float(guidance_scale)
            if not math.isfinite(s2_scale) or s2_scale < 0:
                raise ValueError(f"s2_scale must be a finite number >= 0, got {s2_scale}")
            self.s2_scale = float(s2_scale)
            if int(num_subnetworks) != num_subnetworks or num_subnetworks < 1:
                raise ValueError(f"num_subnetworks must be an integer >= 1, got {num_subnetworks}")
            self.num_subnetworks = int(num_subnetworks)
            if not 0.0 < drop_ratio < 1.0:
                raise ValueError(f"drop_ratio must be in the range (0, 1), got {drop_ratio}")
            self.drop_ratio = float(drop_ratio)
            self.protected_blocks = [0] if protected_blocks is None else sorted({int(b) for b in protected_blocks})
            if any(b < 0 for b in self.protected_blocks):
                raise ValueError(f"protected_blocks must be block indices >= 0, got {self.protected_blocks}")
            self.s2_start, self.s2_stop = check_interval((s2_start, s2_stop))
            self.interval_unit = check_interval_unit(interval_unit)
            if form not in FORMS:
                raise ValueError(f"form must be one of {FORMS}, got {form!r}")
            self.form, self.seed = form, int(seed)
            self.num_train_timesteps = num_train_timesteps
            self.guidance_rescale = guidance_rescale
            self.use_original_formulation = use_original_formulation
            self._droppable, self._block_count = None, None
            if num_blocks is not None:
                self._droppable = _check_blocks(self.protected_blocks, self.drop_ratio, int(num_blocks))
                self._block_count = int(num_blocks)
            self._generator = None
            self.masks: list[frozenset] | None = None  # this step's sub-networks (the blocks each one skips)
            self._latents = None
            self._hooks: list[Callable] = []

        # -- state ------------------------------------------------------------------------------------------
        def set_state(self, step, num_inference_steps, timestep) -> None:
            self.cleanup_models(None)  # hooks left by a batch whose forward raised
            super().set_state(step, num_inference_steps, timestep)
            if step == 0 or self._generator is None:
                self._generator = as_generator(self.seed)
            self.masks = None

        def get_state(self):
            return {**super().get_state(), "s2_active": self._is_s2_enabled(), "masks": self.masks}

        def _is_cfg_enabled(self) -> bool:
            if not self._enabled:
                return False
            in_range = True
            if self._num_inference_steps is not None:
                n = self._num_inference_steps
                in_range = int(self._start * n) <= self._step < int(self._stop * n)
            one = 0.0 if self.use_original_formulation else 1.0
            return in_range and not math.isclose(self.guidance_scale, one)

        def _is_s2_enabled(self) -> bool:
            if not self._enabled or self.s2_scale == 0:
                return False
            if self._num_inference_steps is None:
                return True
            if self.interval_unit == "steps":
                n = self._num_inference_steps
                return int(self.s2_start * n) <= self._step < int(self.s2_stop * n)
            sigma = float(torch.as_tensor(self._timestep).float().reshape(-1)[0]) / self.num_train_timesteps
            return self.s2_start <= sigma <= self.s2_stop

        @property
        def num_conditions(self) -> int:
            return 1 + int(self._is_cfg_enabled()) + (self.num_subnetworks if self._is_s2_enabled() else 0)

        def _predictions(self) -> tuple[list[int], list[str]]:
            names, idx = ["pred_cond"], [0]
            if self._is_cfg_enabled():
                names.append("pred_uncond")
                idx.append(1)
            if self._is_s2_enabled():
                names += [f"pred_cond_skip_{j}" for j in range(self.num_subnetworks)]
                idx += [0] * self.num_subnetworks
            return idx, names

        @property
        def is_conditional(self) -> bool:
            # _count_prepared is the 1-based index of the batch being run; the uncond batch is the second.
            return not (self._is_cfg_enabled() and self._count_prepared == 2)

        # -- inputs -----------------------------------------------------------------------------------------
        def prepare_inputs(self, data: dict) -> list:
            latents = data.get("hidden_states", data.get("latents"))
            self._latents = latents[0] if isinstance(latents, tuple) else latents
            return [self._prepare_batch(data, i, name) for i, name in zip(*self._predictions())]

        def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
            self._latents = getattr(data, "latents", None)
            return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                    for i, name in zip(*self._predictions())]

        # -- models -----------------------------------------------------------------------------------------
        def _draw(self, denoiser) -> None:
            n = len(transformer_blocks(denoiser))
            if self.config.num_blocks is not None and self.config.num_blocks != n:
                raise ValueError(f"the guider was built for num_blocks={self.config.num_blocks}, but "
                                 f"{type(denoiser).__name__} has {n} blocks")
            if self._droppable is None or self._block_count != n:
                self._droppable, self._block_count = _check_blocks(self.protected_blocks, self.drop_ratio, n), n
            droppable, k = torch.tensor(self._droppable), num_dropped(self.drop_ratio, n)
            self.masks = [frozenset(droppable[torch.randperm(len(droppable), generator=self._generator)[:k]].tolist())
                          for _ in range(self.num_subnetworks)]

        def prepare_models(self, denoiser: torch.nn.Module) -> None:
            self.cleanup_models(denoiser)
            self._count_prepared += 1
            first_skip = 1 + int(self._is_cfg_enabled())  # 0-based index of the first sub-network batch
            j = self._count_prepared - 1 - first_skip
            if self._is_s2_enabled() and j >= 0:
                if self.masks is None:
                    self._draw(denoiser)
                blocks = transformer_blocks(denoiser)
                self._hooks = [_ForwardOverride(blocks[b], _skip_forward(blocks[b])).remove
                               for b in sorted(self.masks[j])]

        def cleanup_models(self, denoiser: torch.nn.Module) -> None:
            for remove in reversed(self._hooks):
                remove()
            self._hooks = []

        # -- combination ------------------------------------------------------------------------------------
        def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None, **skipped: Tensor) -> GuiderOutput:
            pred = pred_cond
            if self._is_cfg_enabled():
                base = pred_cond if self.use_original_formulation else pred_uncond
                pred = base + self.guidance_scale * (pred_cond - pred_uncond)
            subs = [skipped[f"pred_cond_skip_{j}"] for j in range(len(skipped))]
            if subs:
                sub = torch.stack(subs).mean(0)
                if self.form == "difference":
                    pred = pred - self.s2_scale * (sub - pred_cond)
                else:  # D_cfg - ω·D̂ with D = x - σ·v, back to v: v_cfg + ω·(x - σ·v̂)/σ
                    if self._latents is None:
                        raise ValueError("form='appendix' needs the latents: pass hidden_states (or a block state "
                                         "with latents) to prepare_inputs")
                    sigma = torch.as_tensor(self._timestep, dtype=torch.float32).reshape(-1)[0].item()
                    sigma /= self.num_train_timesteps
                    x = self._latents.to(pred.dtype)
                    pred = pred + self.s2_scale * (x - sigma * sub) / sigma
            if self.guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


def __getattr__(name):
    if name == "StochasticSelfGuidance":  # only reached when the guider API is missing
        raise _GUIDER_ERROR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
