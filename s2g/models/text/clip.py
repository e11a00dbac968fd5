"""CLIP text transformer: OpenAI CLIP-L/14 and OpenCLIP bigG/14, as SD3 uses them.

Parameter names are the HF-transformers ones (`text_model.encoder.layers.N.self_attn.q_proj` ...), which is how
SD3's `clip_l.safetensors` / `clip_g.safetensors` and diffusers' `text_encoder(_2)` folders store them.
SD3 reads two things: the *penultimate* layer's hidden states (no final LayerNorm) and a pooled vector (final
LayerNorm at the EOS token, projected by `text_projection` for bigG, left unprojected for L).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loading import check_keys, read_state_dict


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    max_positions: int = 77
    projection_dim: int | None = None  # bigG: 1280; None = pooled is not projected
    act: str = "quick_gelu"  # CLIP-L: quick_gelu; bigG: gelu (exact). Not visible in the weights.


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # causal, no padding mask (as trained)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = Attention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = MLP(cfg.width, cfg.mlp, cfg.act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))


class TextModel(nn.Module):
    """`text_model.*` of the HF layout."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextModel(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B,L] long -> (penultimate hidden [B,L,width], pooled [B,projection_dim or width]).

        Pooling reads the EOS position, found as the argmax of the ids (EOS has the largest id in the CLIP vocab,
        and argmax returns the first EOS when it is also the pad token)."""
        x = self.text_model.embeddings(ids)
        layers = self.text_model.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        penultimate = x
        x = self.text_model.final_layer_norm(layers[-1](x))
        pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return penultimate, pooled


# Keys that may sit in CLIP files (old transformers buffers, a full vision+text CLIP) but carry nothing we need.
_IGNORED = ("text_model.embeddings.position_ids", "logit_scale", "vision_model.", "visual_projection.")


_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def infer_config(sd: dict[str, torch.Tensor], act: str, project: bool) -> CLIPConfig:
    tok = sd.get("text_model.embeddings.token_embedding.weight")
    if tok is None:
        raise ValueError("not a CLIP text encoder: no text_model.embeddings.token_embedding.weight")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    if not layers:
        raise ValueError("not a CLIP text encoder: no text_model.encoder.layers.N weights")
    width = tok.shape[1]
    if width % 64:
        raise ValueError(f"CLIP width {width} is not a multiple of the head size 64")
    proj = sd.get("text_projection.weight")
    if project and proj is None:
        raise ValueError("this CLIP file has no text_projection.weight, which the projected pooled output needs")
    return CLIPConfig(
        vocab_size=tok.shape[0],
        width=width,
        layers=max(layers) + 1,
        heads=width // 64,
        mlp=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_positions=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=proj.shape[0] if project else None,
        act=act,
    )


def load_clip(source, *, act: str, project: bool, dtype: torch.dtype | None = None, device=None,
              name: str = "CLIP") -> CLIPTextEncoder:
    """Build a CLIP text encoder from a `.safetensors` path or a state dict (HF-transformers key names).

    `act` ("quick_gelu" for CLIP-L, "gelu" for bigG) and `project` (SD3: False for L, True for G) are not
    recorded in the weights; everything else is read from tensor shapes."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    sd = read_state_dict(source)
    if "embeddings.token_embedding.weight" in sd:  # transformers >= 5 saves CLIPTextModel without `text_model.`
        sd = {(f"text_model.{k}" if k.startswith(_TEXT_MODEL_PARTS) else k): v for k, v in sd.items()}
    cfg = infer_config(sd, act, project)
    ignored = _IGNORED if project else (*_IGNORED, "text_projection.")  # SD3 pools CLIP-L unprojected
    sd = {k: v for k, v in sd.items() if not k.startswith(ignored)}
    return check_keys(CLIPTextEncoder, cfg, sd, name=name, dtype=dtype, device=device)
