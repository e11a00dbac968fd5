"""SD3 text conditioning: prompts -> (context [B, 77+L_t5, 4096], pooled [B, 2048]) (as Stability-AI/sd3.5
`sd3_impls.py` and diffusers' `StableDiffusion3Pipeline` build it).

    lg      = concat(CLIP-L penultimate, CLIP-G penultimate)        [B, 77, 768+1280]
    context = concat(zero-pad(lg, to 4096 features), T5 hidden)     [B, 77+L_t5, 4096]   (tokens axis)
    pooled  = concat(CLIP-L pooled (unprojected), CLIP-G pooled (projected))              [B, 2048]

Without T5 the T5 part is zeros of the same shape (as diffusers). The unconditional / negative input is the
empty prompt "" encoded through all encoders (both reference implementations do this; it is not zeros).
All widths come from the loaded weights, so tiny random encoders work the same way.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loading import read_state_dict
from .clip import CLIPTextEncoder, load_clip
from .t5 import T5Encoder, load_t5
from .tokenizers import CLIPTokenizer, T5Tokenizer


class SD3TextConditioner(nn.Module):
    def __init__(self, clip_l: CLIPTextEncoder, clip_g: CLIPTextEncoder, tokenizer_l: CLIPTokenizer,
                 tokenizer_g: CLIPTokenizer, t5: T5Encoder | None = None, tokenizer_t5: T5Tokenizer | None = None,
                 *, t5_length: int = 256, context_dim: int | None = None):
        super().__init__()
        if (t5 is None) != (tokenizer_t5 is None):
            raise ValueError("T5 needs both its weights and its tokenizer (spiece.model), or neither")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        if tokenizer_t5 is not None and tokenizer_t5.max_length != t5_length:
            raise ValueError(f"t5_length {t5_length} differs from the T5 tokenizer's max_length "
                             f"{tokenizer_t5.max_length}")
        self.t5_length = t5_length
        self.context_dim = context_dim or (t5.config.d_model if t5 is not None else 4096)
        lg_width = clip_l.config.width + clip_g.config.width
        if lg_width > self.context_dim or (t5 is not None and t5.config.d_model != self.context_dim):
            raise ValueError(f"text widths do not fit the context: CLIP-L+G {lg_width}, "
                             f"T5 {t5.config.d_model if t5 is not None else '-'}, context {self.context_dim}")

    @property
    def device(self) -> torch.device:
        return self.clip_l.text_model.final_layer_norm.weight.device

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (context [B, 77+t5_length, context_dim], pooled [B, L_pool+G_pool]), in CLIP's dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        dev = self.device
        h_l, pool_l = self.clip_l(self.tokenizer_l(prompts).to(dev))
        h_g, pool_g = (t.to(h_l.dtype) for t in self.clip_g(self.tokenizer_g(prompts).to(dev)))  # files may differ
        lg = torch.cat([h_l, h_g], dim=-1)
        lg = F.pad(lg, (0, self.context_dim - lg.shape[-1]))  # zero features up to the T5 width
        if self.t5 is not None:
            t5 = self.t5(self.tokenizer_t5(prompts).to(dev)).to(lg.dtype)
        else:
            t5 = lg.new_zeros(len(prompts), self.t5_length, self.context_dim)
        return torch.cat([lg, t5], dim=1), torch.cat([pool_l, pool_g], dim=-1)

    def cond(self, prompts: str | list[str]) -> dict[str, torch.Tensor]:
        """The same, as the sampler's cond dict {"context", "pooled"}."""
        context, pooled = self.encode(prompts)
        return {"context": context, "pooled": pooled}


def load_sd3_text(*, clip_l, clip_g, clip_vocab, clip_merges, t5=None, t5_spiece=None, t5_length: int = 256,
                  context_dim: int | None = None, dtype: torch.dtype | None = None,
                  t5_dtype: torch.dtype | None = None, device=None) -> SD3TextConditioner:
    """Build the SD3 conditioner from the user's files (or state dicts).

    clip_l / clip_g / t5: `.safetensors` paths or state dicts (HF key names; e.g. SD3's `text_encoders/clip_l.
    safetensors`, or the parts `split_components` cuts out of a single-file checkpoint). clip_vocab /
    clip_merges: CLIP's `vocab.json` / `merges.txt` (the same pair serves L and G). t5_spiece: T5's
    `spiece.model`. t5=None gives the no-T5 mode. dtype None keeps the stored dtype, except that T5 never runs in
    fp16 (its activations overflow there): an fp16 file or request gives bf16 for T5."""
    if (t5 is None) != (t5_spiece is None):
        raise ValueError("T5 needs both weights (t5) and tokenizer (t5_spiece), or neither")
    enc_l = load_clip(clip_l, act="quick_gelu", project=False, dtype=dtype, device=device, name="CLIP-L")
    enc_g = load_clip(clip_g, act="gelu", project=True, dtype=dtype, device=device, name="CLIP-G")
    max_len = enc_l.config.max_positions
    tok_l = CLIPTokenizer(clip_vocab, clip_merges, max_length=max_len)  # pads with EOS
    tok_g = CLIPTokenizer(clip_vocab, clip_merges, max_length=max_len, pad_id=0)  # pads with "!" (id 0)
    enc_t5 = tok_t5 = None
    if t5 is not None:
        t5 = read_state_dict(t5)  # memory-mapped; read first to see the stored dtype
        t5_dtype = t5_dtype or dtype or next(v.dtype for v in t5.values() if v.is_floating_point())
        if t5_dtype == torch.float16:
            t5_dtype = torch.bfloat16  # T5 activations overflow fp16 (HF transformers clamps them in fp16)
        enc_t5 = load_t5(t5, dtype=t5_dtype, device=device)
        tok_t5 = T5Tokenizer(t5_spiece, max_length=t5_length)
    return SD3TextConditioner(enc_l, enc_g, tok_l, tok_g, enc_t5, tok_t5, t5_length=t5_length,
                              context_dim=context_dim).eval()
