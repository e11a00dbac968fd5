"""Checkpoint reading: safetensors only, the SD3 single-file split, and the MMDiT loader.

Weights are read through `safetensors` memory maps, so a loaded model's parameters are views of the file's pages
rather than a second copy in RAM. Pickle files (.ckpt/.pt/.pth/.bin) are refused outright: unpickling runs code.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}

# Prefixes of the single-file SD3 / SD3.5 checkpoints (sd3_medium_incl_clips_t5xxlfp16.safetensors etc.).
COMPONENT_PREFIXES = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header length (u64, little endian) and then the JSON header.
    size = path.stat().st_size
    looks_safetensors = len(head) == 9 and int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"
    # torch.save writes a zip (PK\x03\x04) or, in legacy mode, a raw pickle (protocol >= 2 starts with 0x80).
    is_pickle = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
    if path.suffix.lower() in PICKLE_SUFFIXES or (is_pickle and not looks_safetensors):
        raise ValueError(
            f"{path}: pickle checkpoints are never loaded (unpickling can run arbitrary code); convert it once, "
            f"in an environment you trust, with "
            f"safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers / short files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {msg}") from None


def _read_index(index: Path) -> dict[str, torch.Tensor]:
    """The shards named by a `*.safetensors.index.json` ({"weight_map": {tensor: shard file}}), next to it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (no readable weight_map: {e})") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index}: shard files missing: {', '.join(missing[:3])}")
    state = {}
    for shard in shards:
        state.update(_read_safetensors(index.parent / shard))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise ValueError(f"{index}: {len(absent)} tensors listed in the index are in no shard: {absent[:3]}")
    return state


def load_state_dict(source) -> dict[str, torch.Tensor]:
    """Return a flat {name: tensor} dict from a `.safetensors` path, a `*.safetensors.index.json` (its shards), a
    folder of `.safetensors` shards (through its index when it has exactly one), or a dict.

    Tensors from files are memory-mapped (no second copy is materialised)."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or a state dict, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    if path.name.endswith(".safetensors.index.json"):
        return _read_index(path)
    if path.is_dir() and len(indices := list(path.glob("*.safetensors.index.json"))) == 1:
        return _read_index(indices[0])
    if path.is_dir():  # diffusers folder: one file or `*-0000k-of-0000n.safetensors` shards
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            hint = f" (found pickle files {pickles[:3]}, which are never loaded)" if pickles else ""
            raise FileNotFoundError(f"no .safetensors file in directory {path}{hint}")
        state = {}
        for f in files:
            state.update(_read_safetensors(f))
        return state
    return _read_safetensors(path)


def split_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a full single-file SD3 checkpoint by prefix, stripping the prefix.

    Returns {"mmdit", "vae", "clip_l", "clip_g", "t5xxl", "other"} (each possibly empty); "other" holds keys that
    match no known prefix, unchanged (e.g. a bare MMDiT file lands there in full)."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (*COMPONENT_PREFIXES, "other")}
    for key, value in state_dict.items():
        for name, prefix in COMPONENT_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            parts["other"][key] = value
    return parts


# ------------------------------------------------------------------------------------------------ MMDiT loading
ORIGINAL_PREFIX = COMPONENT_PREFIXES["mmdit"]

# diffusers name -> original name, for tensors that map one to one (the inverse of diffusers'
# `convert_sd3_transformer_checkpoint_to_diffusers` in `loaders/single_file_utils.py`).
_DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped
}
_DIFFUSERS_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # halves swapped in the last block
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
# diffusers' separate q, k, v projections -> (fused original qkv, row block): rows are [q | k | v].
_DIFFUSERS_QKV = {
    f"{attn}.{name}": (target, i)
    for attn, names, target in [("attn", ("to_q", "to_k", "to_v"), "x_block.attn.qkv"),
                                ("attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "context_block.attn.qkv"),
                                ("attn2", ("to_q", "to_k", "to_v"), "x_block.attn2.qkv")]
    for i, name in enumerate(names)
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): diffusers' AdaLayerNormContinuous chunks the other way round."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `SD3Transformer2DModel` state dict to the original single-file MMDiT layout.
    Keys it does not know (and incomplete q/k/v triples) keep their diffusers name, so they are reported."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}  # fused target key -> [(diffusers key, tensor) or None] * 3
    hidden = sd["pos_embed.proj.weight"].shape[0] if "pos_embed.proj.weight" in sd else None
    for key, t in sd.items():
        stem, _, leaf = key.rpartition(".")
        block, n, sub = stem.split(".", 2) if stem.count(".") >= 2 else ("", "", "")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = t
        elif stem in _DIFFUSERS_TOP:
            out[f"{_DIFFUSERS_TOP[stem]}.{leaf}"] = _swap_halves(t) if stem == "norm_out.linear" else t
        elif block == "transformer_blocks" and n.isdigit() and sub in _DIFFUSERS_BLOCK:
            if sub == "norm1_context.linear" and t.shape[0] == 2 * hidden:  # last block: pre-only, 2 chunks
                t = _swap_halves(t)
            out[f"joint_blocks.{n}.{_DIFFUSERS_BLOCK[sub]}.{leaf}"] = t
        elif block == "transformer_blocks" and n.isdigit() and sub in _DIFFUSERS_QKV:
            target, i = _DIFFUSERS_QKV[sub]
            qkv.setdefault(f"joint_blocks.{n}.{target}.{leaf}", [None] * 3)[i] = (key, t)
        else:
            out[key] = t
    for target, parts in qkv.items():
        if all(parts):
            out[target] = torch.cat([t for _, t in parts], dim=0)
        else:
            out.update(p for p in parts if p)
    return out


def _guess_architecture(keys: list[str]) -> str:
    def has(*prefixes):
        return any(k.startswith(prefixes) for k in keys)
    if has("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.", "first_stage_model."):
        return "looks like a VAE"
    if has("input_blocks.", "down_blocks.", "model.diffusion_model.input_blocks."):
        return "looks like a UNet"
    if has("double_blocks.", "single_blocks.", "single_transformer_blocks."):
        return "looks like a Flux transformer"
    if has("text_model.", "encoder.block.", "shared.", "text_encoders."):
        return "looks like a text encoder"
    if has("blocks.0.self_attn.", "blocks.0.attn1.", "model.diffusion_model.blocks.0.self_attn."):
        return "looks like a Wan DiT: load it with load_wan"
    return "unknown architecture"


def _to_original_layout(sd: Mapping[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], str]:
    """Return (MMDiT tensors in the original bare layout, layout name); VAE/text parts of a full file are dropped."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in sd):
        sd = split_components(sd)["mmdit"]
    if any(k.startswith("joint_blocks.") for k in sd):
        return dict(sd), "original"
    if "pos_embed.proj.weight" in sd and any(k.startswith("transformer_blocks.") for k in sd):
        return diffusers_to_original(sd), "diffusers"
    keys = list(sd)
    raise ValueError(f"{name}: not an SD3/SD3.5 MMDiT checkpoint ({_guess_architecture(keys)}; "
                     f"{len(keys)} tensors, first keys: {', '.join(keys[:3]) or 'none'})")


def _indices(sd: Mapping[str, torch.Tensor], marker: str = "") -> list[int]:
    """Sorted block indices n of `joint_blocks.n.*` keys that contain `marker`."""
    return sorted({int(k.split(".")[1]) for k in sd
                   if k.startswith("joint_blocks.") and k.split(".")[1].isdigit() and marker in k})


def infer_config(sd: Mapping[str, torch.Tensor], heads: int | None = None, name: str = "state dict"):
    """MMDiTConfig from tensor shapes alone (original layout, bare keys): patch, width and input channels
    from `x_embedder.proj.weight`, depth from the highest `joint_blocks.N`, the position grid from `pos_embed`,
    qk-norm (and then the head count) from `ln_q`, the dual-attention blocks from `attn2` keys.

    The head count is not visible in the shapes of a model without qk-norm: `heads` (default hidden/64, the
    head size of every released model) fills that gap."""
    from .mmdit import FREQ_DIM, MMDiTConfig

    def need(key):
        if key not in sd:
            raise ValueError(f"{name}: cannot infer the MMDiT configuration, missing tensor {key!r}")
        return sd[key].shape

    D, in_ch, p, _ = need("x_embedder.proj.weight")
    if need("t_embedder.mlp.0.weight")[1] != FREQ_DIM:
        raise ValueError(f"{name}: t_embedder.mlp.0.weight takes {sd['t_embedder.mlp.0.weight'].shape[1]} "
                         f"timestep features, this MMDiT uses {FREQ_DIM}")
    n_pos = need("pos_embed")[1]
    P = math.isqrt(n_pos)
    if P * P != n_pos:
        raise ValueError(f"{name}: pos_embed has {n_pos} positions, not a square table")
    depth = _indices(sd)
    if not depth or depth != list(range(depth[-1] + 1)):
        raise ValueError(f"{name}: joint_blocks indices are not 0..N-1: {depth[:5]}...")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
    if qk_norm:
        heads_from_shape = D // sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0]
        if heads is not None and heads != heads_from_shape:
            raise ValueError(f"{name}: heads={heads} contradicts the qk-norm size (heads {heads_from_shape})")
        heads = heads_from_shape
    elif heads is None:
        if D % 64:
            raise ValueError(f"{name}: hidden size {D} is not a multiple of 64; pass heads= explicitly")
        heads = D // 64
    return MMDiTConfig(
        depth=len(depth), hidden=D, heads=heads, patch=p, in_channels=in_ch,
        out_channels=need("final_layer.linear.weight")[0] // (p * p),
        context_dim=need("context_embedder.weight")[1], pooled_dim=need("y_embedder.mlp.0.weight")[1],
        pos_embed_max_size=P, qk_norm=qk_norm, dual_attention_blocks=tuple(_indices(sd, ".x_block.attn2.")),
        mlp_ratio=need("joint_blocks.0.x_block.mlp.fc1.weight")[0] / D,
    )


def _source_name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "state dict"


def _preset_name(config) -> str | None:
    from .mmdit import CONFIGS
    return next((k for k, v in CONFIGS.items() if v == config), None)


@dataclass(frozen=True)
class MMDiTInfo:
    layout: str  # "original" or "diffusers"
    config: object  # MMDiTConfig
    num_params: int  # parameters, excluding the pos_embed buffer
    preset: str | None  # name in mmdit.CONFIGS when the config is a released one

    def __str__(self):
        c = self.config
        dual = f"{c.dual_attention_blocks[0]}..{c.dual_attention_blocks[-1]}" if c.dual_attention_blocks else "none"
        return (f"MMDiT {self.preset or 'custom'} ({self.layout} layout): {self.num_params / 1e9:.3f}B params, "
                f"depth {c.depth}, hidden {c.hidden}, heads {c.heads}, patch {c.patch}, pos table "
                f"{c.pos_embed_max_size}^2, qk_norm {c.qk_norm}, dual attention {dual}, "
                f"channels {c.in_channels}->{c.out_channels}, context {c.context_dim}, pooled {c.pooled_dim}")


def describe_mmdit(source, *, heads: int | None = None) -> MMDiTInfo:
    """Layout, inferred configuration and size of an MMDiT checkpoint (path or state dict; meta tensors work)."""
    name = _source_name(source)
    sd, layout = _to_original_layout(load_state_dict(source), name)
    config = infer_config(sd, heads, name)
    params = sum(t.numel() for k, t in sd.items() if k != "pos_embed")
    return MMDiTInfo(layout, config, params, _preset_name(config))


def _first(names, n=5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def build_with_weights(make, sd: dict[str, torch.Tensor], *, what: str, dtype=None, device=None,
                       keep_fp32: tuple[str, ...] = ()):
    """`make()` built on the meta device, then given exactly the tensors of `sd` (every key, every shape).

    Tensors are assigned, not copied, so a memory-mapped file is not duplicated when dtype and device already
    match. Tensors whose name contains one of `keep_fp32` become fp32 instead of `dtype`. `what` starts each
    error message. Returned frozen, in eval mode."""
    with torch.device("meta"):
        model = make()
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing or unexpected:
        parts = [f"missing {len(missing)} tensors: {_first(missing)}" if missing else "",
                 f"unexpected {len(unexpected)} tensors: {_first(unexpected)}" if unexpected else ""]
        raise ValueError(f"{what} ({'; '.join(p for p in parts if p)})")
    for key, ref in expected.items():
        if sd[key].shape != ref.shape:
            raise ValueError(f"{what}: tensor {key} has shape {list(sd[key].shape)}, expected {list(ref.shape)}")
    dtype = dtype or next(t.dtype for t in sd.values() if t.is_floating_point())
    sd = {k: t.to(device=device, dtype=torch.float32 if any(m in k for m in keep_fp32) else dtype)
          if t.is_floating_point() else t.to(device=device) for k, t in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def load_mmdit(source, *, dtype: torch.dtype | None = None, device=None, heads: int | None = None):
    """Build an `MMDiT` from a checkpoint whose layout and hyper-parameters are read off its tensors.

    `source`: a `.safetensors` file (bare MMDiT, `model.diffusion_model.`-prefixed single file with or without
    VAE/text encoders, or a diffusers transformer file / shard folder) or a state dict. `dtype` defaults to the
    stored one. The model is built on the meta device and takes the (memory-mapped) tensors as they are, so
    no second copy is made unless a dtype/device change asks for one. Returned frozen, in eval mode."""
    from .mmdit import MMDiT

    name = _source_name(source)
    sd, _ = _to_original_layout(load_state_dict(source), name)
    config = infer_config(sd, heads, name)
    return build_with_weights(lambda: MMDiT(config), sd, what=f"{name}: checkpoint does not match the inferred MMDiT",
                              dtype=dtype or sd["x_embedder.proj.weight"].dtype, device=device)


# -------------------------------------------------------------------------------------------------- Wan loading
# diffusers WanTransformer3DModel module -> original Wan module. Every tensor maps one to one (no reshape, no
# chunk swap): the inverse of diffusers' `convert_wan_transformer_to_diffusers` (loaders/single_file_utils.py).
# diffusers calls the cross-attention norm `norm2` where Wan says `norm3` (Wan's norm2 is the FFN's, no weights).
WAN_DIFFUSERS_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "patch_embedding": "patch_embedding",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
WAN_DIFFUSERS_BLOCK = {
    **{f"attn{n}.{a}": f"{attn}.{b}" for n, attn in ((1, "self_attn"), (2, "cross_attn"))
       for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"),
                    ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
# Image-to-video / first-last-frame parts (CLIP image tokens), which this T2V model does not have.
_WAN_I2V_MARKERS = ("img_emb.", ".k_img.", ".v_img.", ".norm_k_img.", "image_embedder.", ".add_k_proj.",
                    ".add_v_proj.", ".norm_added_k.")


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """`name` with its leading module renamed by `table` (whole dotted components only), or None."""
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def wan_diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `WanTransformer3DModel` state dict to the original Wan layout; unknown keys keep their
    name (so they are reported)."""
    out = {}
    for key, t in sd.items():
        block, n, rest = key.split(".", 2) if key.count(".") >= 2 else ("", "", "")
        if block == "blocks" and n.isdigit() and (new := _rename(rest, WAN_DIFFUSERS_BLOCK)):
            out[f"blocks.{n}.{new}"] = t
        else:
            out[_rename(key, WAN_DIFFUSERS_TOP) or key] = t
    return out


def _wan_original_layout(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Wan DiT tensors in the original bare layout, from either layout. A `model.diffusion_model.` prefix (ComfyUI
    repackaged files) is stripped and other components in the file dropped."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in sd):
        sd = split_components(sd)["mmdit"]
    keys = list(sd)
    if any(k.startswith(("joint_blocks.", "transformer_blocks.")) for k in keys):
        raise ValueError(f"{name}: not a Wan DiT checkpoint (looks like an SD3/SD3.5 MMDiT: load it with "
                         f"load_mmdit)")
    i2v = sorted(k for k in keys if any(m in f".{k}" for m in _WAN_I2V_MARKERS))
    if i2v:
        raise ValueError(f"{name}: a Wan image-to-video checkpoint ({len(i2v)} image-conditioning tensors, e.g. "
                         f"{i2v[0]}); only the text-to-video DiT is supported")
    if "head.modulation" in sd and any(k.startswith("blocks.") and ".self_attn." in k for k in keys):
        return dict(sd)
    if "condition_embedder.time_proj.weight" in sd and any(k.startswith("blocks.") and ".attn1." in k for k in keys):
        return wan_diffusers_to_original(sd)
    raise ValueError(f"{name}: not a Wan DiT checkpoint ({_guess_architecture(keys)}; {len(keys)} tensors, "
                     f"first keys: {', '.join(keys[:3]) or 'none'})")


def infer_wan_config(sd: Mapping[str, torch.Tensor], heads: int | None = None, text_len: int | None = 512,
                     name: str = "state dict"):
    """WanConfig from tensor shapes (original layout, bare keys): width, input channels and the 3-D patch from
    `patch_embedding.weight`, text and time-feature widths from the embeddings, depth from the highest
    `blocks.N`, ffn width from `blocks.0.ffn.0`, output channels from `head.head`, qk-norm and the cross-attention
    norm from the presence of their weights.

    Two things are not in the tensors: the head count (the qk-norm spans all heads) — `heads` (default dim/128,
    the head size of both released models) — and the text length the contexts are padded to (`text_len`, Wan:
    512; None: no padding)."""
    from .wan import WanConfig

    def need(key):
        if key not in sd:
            raise ValueError(f"{name}: cannot infer the Wan configuration, missing tensor {key!r}")
        return sd[key].shape

    shape = need("patch_embedding.weight")
    if len(shape) != 5:
        raise ValueError(f"{name}: patch_embedding.weight has shape {list(shape)}, expected a Conv3d (5 dims)")
    D, in_dim, *patch = shape
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks or blocks != list(range(blocks[-1] + 1)):
        raise ValueError(f"{name}: blocks indices are not 0..N-1: {blocks[:5]}...")
    if heads is None:
        if D % 128:
            raise ValueError(f"{name}: dim {D} is not a multiple of 128 (Wan's head size); pass heads= explicitly")
        heads = D // 128
    if D % heads:
        raise ValueError(f"{name}: dim {D} is not divisible by heads={heads}")
    return WanConfig(
        dim=D, num_layers=len(blocks), num_heads=heads, ffn_dim=need("blocks.0.ffn.0.weight")[0], in_dim=in_dim,
        out_dim=need("head.head.weight")[0] // math.prod(patch), text_dim=need("text_embedding.0.weight")[1],
        freq_dim=need("time_embedding.0.weight")[1], patch_size=tuple(patch), text_len=text_len,
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd)


def load_wan(source, *, dtype: torch.dtype | None = None, device=None, heads: int | None = None,
             text_len: int | None = 512):
    """Build a `WanDiT` (Wan 2.1 text-to-video) from a checkpoint whose layout and hyper-parameters are read off
    its tensors.

    `source`: a `.safetensors` file (original Wan names, bare or under `model.diffusion_model.`, or diffusers
    `WanTransformer3DModel` names), a `*.safetensors.index.json` or a folder of shards, or a state dict.
    `heads` / `text_len`: see `infer_wan_config`. `dtype` defaults to the stored one; the time embedding,
    modulation tables, cross-attention norm and head stay fp32 (`WanDiT.keep_fp32`). Returned frozen, in eval
    mode, built on the meta device and given the (memory-mapped) tensors without a second copy where possible."""
    from .wan import WanDiT

    name = _source_name(source)
    sd = _wan_original_layout(load_state_dict(source), name)
    config = infer_wan_config(sd, heads, text_len, name)
    return build_with_weights(lambda: WanDiT(config), sd, what=f"{name}: checkpoint does not match the inferred "
                              f"Wan DiT", dtype=dtype or sd["patch_embedding.weight"].dtype, device=device,
                              keep_fp32=WanDiT.keep_fp32)


# ---------------------------------------------------------------------------------------------- Wan VAE loading
# diffusers AutoencoderKLWan -> original Wan VAE names (the inverse of diffusers' `convert_wan_vae_to_diffusers`).
# Layers renamed whole; then the blocks that hold residual blocks (whose parts are renamed too): the encoder's flat
# `down_blocks` list keeps its indices, the decoder's nested `up_blocks.k.{resnets.j, upsamplers.0}` become one
# flat `upsamples` list, `mid_block.resnets.{0,1}` become `middle.{0,2}` around the attention `middle.1`.
_WAN_VAE_LAYERS = {
    "quant_conv": "conv1", "post_quant_conv": "conv2",
    **{f"{part}.{a}": f"{part}.{b}" for part in ("encoder", "decoder")
       for a, b in (("conv_in", "conv1"), ("norm_out", "head.0"), ("conv_out", "head.2"),
                    ("mid_block.attentions.0", "middle.1"))},
}
_WAN_VAE_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                     "conv_shortcut": "shortcut"}
_WAN_VAE_MARKERS = {"original": "decoder.middle.0.residual.0.gamma",
                    "diffusers": "decoder.mid_block.resnets.0.norm1.gamma"}


def wan_vae_diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKLWan` state dict to the original Wan VAE layout (level sizes read off the
    keys); unknown keys keep their name, so they are reported."""
    import re

    counts: dict[int, list[int]] = {}  # decoder level k -> [res blocks, upsamplers]
    for key in sd:
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.", key):
            c, j = counts.setdefault(int(m.group(1)), [0, 0]), m.group(2)
            if j is None:
                c[1] = 1
            else:
                c[0] = max(c[0], int(j) + 1)
    start, n = {}, 0
    for k in sorted(counts):
        start[k], n = n, n + sum(counts[k])
    out = {}
    for key, t in sd.items():
        if (new := _rename(key, _WAN_VAE_LAYERS)) is not None:
            out[new] = t
            continue
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", key):
            block, rest = f"encoder.downsamples.{m.group(1)}", m.group(2)
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$", key):
            block, rest = f"{m.group(1)}.middle.{2 * int(m.group(2))}", m.group(3)
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            block, rest = f"decoder.upsamples.{start[int(m.group(1))] + int(m.group(2))}", m.group(3)
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
            k = int(m.group(1))
            block, rest = f"decoder.upsamples.{start[k] + counts[k][0]}", m.group(2)
        else:
            out[key] = t
            continue
        out[f"{block}.{_rename(rest, _WAN_VAE_RESIDUAL) or rest}"] = t
    return out


def _wan_vae_original_layout(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Wan VAE tensors in the original bare layout, from either layout, under any prefix (the part of the file
    under the prefix of the layout's marker key is kept)."""
    for layout, marker in _WAN_VAE_MARKERS.items():
        key = next((k for k in sd if k.endswith(marker)), None)
        if key is not None:
            prefix = key[:-len(marker)]
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            return part if layout == "original" else wan_vae_diffusers_to_original(part)
    keys = list(sd)
    hint = "an SD3-style 2-D VAE: load it with load_vae" if any(
        k.startswith(("decoder.up.", "decoder.up_blocks.", "first_stage_model.")) for k in keys) else (
        _guess_architecture(keys))
    raise ValueError(f"{name}: not a Wan 2.1 VAE checkpoint ({hint}; {len(keys)} tensors, first keys: "
                     f"{', '.join(keys[:3]) or 'none'})")


def infer_wan_vae_config(sd: Mapping[str, torch.Tensor], *, latents_mean=None, latents_std=None,
                         name: str = "state dict"):
    """WanVAEConfig from an original-layout state dict: the decoder's flat `upsamples` list gives the levels
    (split at its resampling layers, temporal where they have a `time_conv`), the res blocks per level and the
    level widths; `decoder.conv1` the latent channels; `encoder.conv1` the base width. The encoder is optional.

    The latent mean / std are not in the weights: Wan 2.1's 16-channel constants unless given."""
    import re

    from .wan_vae import LATENTS_MEAN, LATENTS_STD, WanVAEConfig

    def need(key):
        if key not in sd:
            raise ValueError(f"{name}: cannot infer the Wan VAE configuration, missing tensor {key!r}")
        return sd[key].shape

    kinds: dict[int, set[str]] = {}
    for key in sd:
        if m := re.match(r"decoder\.upsamples\.(\d+)\.([a-z_]+)", key):
            kinds.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not kinds or sorted(kinds) != list(range(len(kinds))):
        raise ValueError(f"{name}: decoder.upsamples indices are missing or not 0..N-1")
    if any("to_qkv" in v for v in kinds.values()):
        raise ValueError(f"{name}: attention inside the decoder levels; the Wan 2.1 VAE has it only in the middle")
    levels, temporal, res = [], [], []  # levels: index of each level's first res block
    for i in range(len(kinds)):
        if "resample" in kinds[i]:
            temporal.append("time_conv" in kinds[i])
            levels.append(res)
            res = []
        else:
            res.append(i)
    levels.append(res)
    sizes = {len(r) for r in levels}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"{name}: decoder levels hold different numbers of res blocks: {[len(r) for r in levels]}")
    widths = [need(f"decoder.upsamples.{r[0]}.residual.2.weight")[0] for r in levels]  # deepest first
    z_dim = need("decoder.conv1.weight")[1]
    has_encoder = any(k.startswith("encoder.") for k in sd)
    dim = need("encoder.conv1.weight")[0] if has_encoder else widths[-1]
    rgb_in = need("encoder.conv1.weight")[1] if has_encoder else 3
    if need("decoder.head.2.weight")[0] != 3 or rgb_in != 3 or any(w % dim for w in widths):
        raise ValueError(f"{name}: not a Wan 2.1 VAE (input/output channels {rgb_in}/"
                         f"{sd['decoder.head.2.weight'].shape[0]}, {z_dim} latent channels; Wan 2.2's VAE, with 48 "
                         f"and patchified frames, is not supported)")
    if latents_mean is None and latents_std is None:
        if z_dim != len(LATENTS_MEAN):
            raise ValueError(f"{name}: {z_dim} latent channels; Wan 2.1's latent mean/std have "
                             f"{len(LATENTS_MEAN)}: pass latents_mean= and latents_std=")
        latents_mean, latents_std = LATENTS_MEAN, LATENTS_STD
    elif latents_mean is None or latents_std is None:
        raise ValueError("pass both latents_mean and latents_std, or neither")
    return WanVAEConfig(dim=dim, dim_mult=tuple(w // dim for w in reversed(widths)), num_res_blocks=len(res) - 1,
                        temporal_downsample=tuple(reversed(temporal)), z_dim=z_dim, has_encoder=has_encoder,
                        latents_mean=tuple(float(v) for v in latents_mean),
                        latents_std=tuple(float(v) for v in latents_std))


def load_wan_vae(source, *, dtype: torch.dtype | None = torch.float32, device=None, latents_mean=None,
                 latents_std=None):
    """Build a `WanVAE` (Wan 2.1) from a checkpoint whose layout and hyper-parameters are read off its tensors.

    `source`: a `.safetensors` file or a state dict, in the original Wan names (`Wan2.1_VAE.pth` converted to
    safetensors, or the repackaged `wan_2.1_vae.safetensors`; bare or under a prefix) or diffusers'
    `AutoencoderKLWan` names (its `vae/` folder or file). A decoder-only file loads (`encode` then raises).
    `dtype`: fp32 by default, as Wan runs its VAE; None keeps the stored one. `latents_mean` / `latents_std`: see
    `infer_wan_vae_config`. Returned frozen, in eval mode."""
    from .wan_vae import WanVAE

    name = _source_name(source)
    sd = _wan_vae_original_layout(load_state_dict(source), name)
    cfg = infer_wan_vae_config(sd, latents_mean=latents_mean, latents_std=latents_std, name=name)
    return build_with_weights(lambda: WanVAE(cfg), sd, what=f"{name}: checkpoint does not match the inferred Wan "
                              f"VAE", dtype=dtype or sd["decoder.conv1.weight"].dtype, device=device)


# ------------------------------------------------------------------------------------------------- umT5 loading
# Wan's own umT5 names (wan/modules/t5.py; `models_t5_umt5-xxl-enc-bf16.pth` once converted to safetensors) ->
# transformers' UMT5EncoderModel names, which the encoder uses. All one to one.
UMT5_WAN_BLOCK = {
    "norm1": "layer.0.layer_norm",
    "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0",  # the GELU branch
    "ffn.fc1": "layer.1.DenseReluDense.wi_1",
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}
UMT5_WAN_TOP = {"token_embedding": "shared", "norm": "encoder.final_layer_norm"}
_UMT5_MARKERS = {"hf": "encoder.block.0.layer.0.SelfAttention.q.weight", "wan": "blocks.0.attn.q.weight"}


def umt5_wan_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan's umT5 state dict to transformers' `UMT5EncoderModel` layout; unknown keys keep their name."""
    out = {}
    for key, t in sd.items():
        block, n, rest = key.split(".", 2) if key.count(".") >= 2 else ("", "", "")
        if block == "blocks" and n.isdigit() and (new := _rename(rest, UMT5_WAN_BLOCK)):
            out[f"encoder.block.{n}.{new}"] = t
        else:
            out[_rename(key, UMT5_WAN_TOP) or key] = t
    return out


def _umt5_hf_layout(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """umT5 encoder tensors in the transformers layout with the embedding as `shared.weight`, from either layout,
    under any prefix; a full encoder-decoder file's decoder and LM head are dropped."""
    for layout, marker in _UMT5_MARKERS.items():
        key = next((k for k in sd if k.endswith(marker)), None)
        if key is None:
            continue
        prefix = key[:-len(marker)]
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if layout == "wan":
            return umt5_wan_to_hf(part)
        part = {k: v for k, v in part.items() if not k.startswith(("decoder.", "lm_head."))}
        embed = part.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight in transformers
        if "shared.weight" not in part and embed is not None:
            part["shared.weight"] = embed
        return part
    keys = list(sd)
    raise ValueError(f"{name}: not a umT5 encoder checkpoint ({_guess_architecture(keys)}; {len(keys)} tensors, "
                     f"first keys: {', '.join(keys[:3]) or 'none'})")


def infer_umt5_config(sd: Mapping[str, torch.Tensor], name: str = "state dict"):
    """T5Config of a umT5 encoder (transformers layout): vocabulary and width from `shared`, heads and buckets
    from a bias table, which every block must have (a T5-v1.1 file has one only in block 0), depth from the
    highest block, d_kv and d_ff from the projections. max_distance (128) is not in the tensors."""
    import re

    from .text.t5 import T5Config

    def need(key):
        if key not in sd:
            raise ValueError(f"{name}: cannot infer the umT5 configuration, missing tensor {key!r}")
        return sd[key].shape

    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    if not layers or layers != list(range(layers[-1] + 1)):
        raise ValueError(f"{name}: encoder.block indices are not 0..N-1: {layers[:5]}")
    table = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    if len(layers) > 1 and table.format(1) not in sd and table.format(0) in sd:
        raise ValueError(f"{name}: a T5-v1.1 encoder (relative position bias in block 0 only), not umT5: load it "
                         f"with s2g.models.text.load_t5")
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in sd:
        raise ValueError(f"{name}: no gated FFN (encoder.block.0.layer.1.DenseReluDense.wi_0): not umT5")
    vocab, d_model = need("shared.weight")
    num_buckets, heads = need(table.format(0))
    return T5Config(vocab_size=vocab, d_model=d_model, layers=len(layers), heads=heads,
                    d_kv=need("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
                    d_ff=need("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0], num_buckets=num_buckets)


def load_umt5(source, *, dtype: torch.dtype | None = None, device=None):
    """Build a `UMT5Encoder` (Wan 2.1's text encoder) from a checkpoint whose layout and size are read off its
    tensors.

    `source`: a `.safetensors` file, a folder of shards or its index, or a state dict, in transformers'
    `UMT5EncoderModel` names (the diffusers repos' `text_encoder/`, the repackaged `umt5_xxl_fp16.safetensors`;
    an encoder-decoder file's decoder is ignored) or Wan's own (`models_t5_umt5-xxl-enc-bf16.pth` converted to
    safetensors), bare or under a prefix. `dtype` None keeps the stored one, except that fp16 becomes bf16
    (T5 activations overflow fp16; Wan runs umT5 in bf16). Returned frozen, in eval mode."""
    from .text.umt5 import UMT5Encoder

    name = _source_name(source)
    sd = _umt5_hf_layout(load_state_dict(source), name)
    cfg = infer_umt5_config(sd, name)
    dtype = dtype or sd["shared.weight"].dtype
    return build_with_weights(lambda: UMT5Encoder(cfg), sd, what=f"{name}: checkpoint does not match the inferred "
                              f"umT5 encoder", dtype=torch.bfloat16 if dtype == torch.float16 else dtype,
                              device=device)
