"""umT5-XXL, Wan 2.1's text encoder, and Wan's text conditioning (prompts -> [B, 512, 4096] context).

umT5 is the T5-v1.1 encoder of t5.py (RMS norms, unscaled attention logits, gated tanh-GELU FFN) with two
differences: every layer has its *own* relative-position bias table (T5 computes it once, from block 0), and a
256k multilingual vocabulary. Padding keys are masked (SD3's T5 attends to its pads; Wan's umT5 does not). The
blocks are t5.py's, so the names are those of transformers' `UMT5EncoderModel` (`encoder.block.N.layer.0.
SelfAttention.q` ...); checkpoint.py maps Wan's own names (`blocks.N.attn.q` ...) onto them.

Wan's conditioning (wan/modules/t5.py `T5EncoderModel`, wan/text2video.py): tokenise to 512 (`UMT5Tokenizer`),
encode with the mask, keep each prompt's rows up to and including its EOS, zero the rest. The unconditional input
is a prompt too (Wan's default negative prompt, or ""), encoded the same way.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .t5 import Block, RMSNorm, T5Config, relative_position_bucket
from .tokenizers import UMT5Tokenizer

UMT5_XXL = T5Config(vocab_size=256384, d_model=4096, layers=24, heads=64, d_kv=64, d_ff=10240)

# Wan 2.1's default negative prompt, the unconditional text whenever none is given (wan/configs/shared_config.py
# `sample_neg_prompt`). diffusers' WanPipeline uses "" instead, which gives different samples.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸"
    "形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class UMT5Stack(nn.Module):  # `encoder.*`
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(Block(cfg, first=True) for _ in range(cfg.layers))  # a bias table in each
        self.final_layer_norm = RMSNorm(cfg.d_model)


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: T5Config = UMT5_XXL):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = UMT5Stack(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.final_layer_norm.weight.device

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B,L] long, mask [B,L] (1 = token, 0 = padding; None = all tokens) -> last hidden state after the
        final RMS norm [B,L,d_model]. Padding keys get the dtype's minimum as bias, so the rows of real tokens do
        not depend on the padding (nor on how much of it there is); padding rows themselves are meaningless."""
        cfg = self.config
        x = self.shared(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], cfg.num_buckets, cfg.max_distance)
        pad = None
        if mask is not None:
            pad = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
            pad = pad.masked_fill(mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]  # [B,1,1,L]
        for block in self.encoder.block:
            table = block.layer[0].SelfAttention.relative_attention_bias
            bias = table(buckets).permute(2, 0, 1)[None].float()  # [1, heads, L, L]
            if pad is not None:
                bias = (bias + pad).clamp(min=torch.finfo(x.dtype).min)  # stays finite in bf16 too
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


class WanTextConditioner(nn.Module):
    """prompts -> context [B, text_len, d_model]: umT5 on the prompt's tokens, rows past each prompt's EOS zero
    (Wan cuts them off and the DiT pads with zeros; here they are zeros already, so the DiT's padding is a no-op).

    The encoder runs only up to the longest prompt of the batch: with the pads masked the real rows are the same
    as on the full 512 (the tests check it), and a short prompt costs a fraction of the compute."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: UMT5Tokenizer):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.text_len = tokenizer.max_length

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(prompts, return_mask=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        n = int(mask.sum(1).max())
        h = self.encoder(ids[:, :n], mask[:, :n])
        context = h.new_zeros(ids.shape[0], self.text_len, h.shape[-1])
        context[:, :n] = h * mask[:, :n, None].to(h.dtype)
        return context

    def cond(self, prompts: str | list[str]) -> dict[str, torch.Tensor]:
        """The same, as the sampler's cond dict {"context"}."""
        return {"context": self.encode(prompts)}


def load_wan_text(*, umt5, spiece, text_len: int = 512, dtype: torch.dtype | None = None,
                  device=None) -> WanTextConditioner:
    """Wan's conditioner from the user's files: `umt5` a `.safetensors` path or state dict (see
    `s2g.models.checkpoint.load_umt5` for the layouts), `spiece` umT5's `spiece.model` (google/umt5-xxl).
    dtype None keeps the stored one, except fp16, which becomes bf16 (T5 activations overflow fp16; Wan runs umT5
    in bf16)."""
    from ..checkpoint import load_umt5

    return WanTextConditioner(load_umt5(umt5, dtype=dtype, device=device),
                              UMT5Tokenizer(spiece, max_length=text_len)).eval()
