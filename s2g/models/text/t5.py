"""T5-v1.1 encoder (SD3 uses the XXL one: 24 layers, d_model 4096, 64 heads).

HF-transformers key names (`encoder.block.N.layer.0.SelfAttention.q` ...). Three T5 peculiarities matter for
parity: attention logits are *not* scaled by 1/sqrt(d) (the scale is folded into the trained weights); a learned
relative-position bias is computed once from block 0's table and added in every block; the norms are RMS norms
with no mean subtraction and no bias. The FFN is gated: wo(gelu_tanh(wi_0 x) * wi_1 x).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loading import check_keys, read_state_dict


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    num_buckets: int = 32
    max_distance: int = 128  # not visible in the weights; 128 for every T5-v1.1
    embed_key: str = "shared.weight"  # or "encoder.embed_tokens.weight": files differ in which they store


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)  # in fp32 even for bf16 weights, as trained
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half the buckets per direction; within each, exact for small distances and
    logarithmically spaced up to max_distance (everything farther shares the last bucket)."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    n = relative.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        inner = cfg.heads * cfg.d_kv
        self.heads, self.d_kv = cfg.heads, cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads)

    def forward(self, x, bias):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class AttentionLayer(nn.Module):  # layer.0
    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, has_bias_table)
        self.layer_norm = RMSNorm(cfg.d_model)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class GatedFFN(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class FFLayer(nn.Module):  # layer.1
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = GatedFFN(cfg)
        self.layer_norm = RMSNorm(cfg.d_model)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, first: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg, has_bias_table=first), FFLayer(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class Stack(nn.Module):  # `encoder.*`
    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.embed_key == "encoder.embed_tokens.weight":
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.block = nn.ModuleList(Block(cfg, first=i == 0) for i in range(cfg.layers))
        self.final_layer_norm = RMSNorm(cfg.d_model)


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        if cfg.embed_key == "shared.weight":
            self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)

    @property
    def embedding(self) -> nn.Embedding:
        return self.shared if hasattr(self, "shared") else self.encoder.embed_tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.final_layer_norm.weight.dtype

    def position_bias(self, n: int, device) -> torch.Tensor:
        """[1, heads, n, n] additive attention bias from block 0's bucket table (reused by every block)."""
        pos = torch.arange(n, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.num_buckets,
                                           self.config.max_distance)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1)[None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B,L] long -> last hidden state after the final RMS norm [B,L,d_model]. No padding mask: SD3
        attends to the pad tokens too."""
        x = self.embedding(ids)
        bias = self.position_bias(ids.shape[1], ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def infer_config(sd: dict[str, torch.Tensor]) -> T5Config:
    embed_key = next((k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in sd), None)
    table = sd.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if embed_key is None or table is None:
        raise ValueError("not a T5 encoder: expected shared.weight or encoder.embed_tokens.weight and "
                         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in sd:
        raise ValueError("not a T5-v1.1 encoder: no gated FFN (encoder.block.0.layer.1.DenseReluDense.wi_0)")
    vocab, d_model = sd[embed_key].shape
    num_buckets, heads = table.shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return T5Config(vocab_size=vocab, d_model=d_model, layers=max(layers) + 1, heads=heads, d_kv=inner // heads,
                    d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                    num_buckets=num_buckets, embed_key=embed_key)


def load_t5(source, *, dtype: torch.dtype | None = None, device=None, name: str = "T5") -> T5Encoder:
    """Build the T5 encoder from a `.safetensors` path or a state dict; the decoder half of a full T5 file,
    if present, is ignored. Prefer fp32 or bf16: T5 activations overflow fp16."""
    sd = {k: v for k, v in read_state_dict(source).items() if not k.startswith(("decoder.", "lm_head."))}
    cfg = infer_config(sd)
    # HF ties shared.weight and encoder.embed_tokens.weight; keep one copy, whichever the file has.
    other = "encoder.embed_tokens.weight" if cfg.embed_key == "shared.weight" else "shared.weight"
    sd.pop(other, None)
    return check_keys(T5Encoder, cfg, sd, name=name, dtype=dtype, device=device)
