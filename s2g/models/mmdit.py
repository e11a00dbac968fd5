"""MMDiT: the Stable Diffusion 3 / 3.5 diffusion transformer (SD3-medium, SD3.5-medium "MMDiT-X", SD3.5-large).

One file, read top to bottom: embedders, one stream of a joint block, the joint block, the final layer, the model.
Parameter names follow the original single-file checkpoints (`joint_blocks.N.x_block.attn.qkv.weight`, ...), so
those load with no renaming; checkpoint.py maps the diffusers layout onto them. The forward follows
Stability-AI/sd3.5 `mmditx.py` and diffusers `models/transformers/transformer_sd3.py`; the details that break
parity when wrong: every LayerNorm is affine-free with eps 1e-6, the MLP uses the tanh GELU, the timestep
features are cos-then-sin in fp32, and adaLN chunks come in the order shift, scale, gate (the final layer's
shift before scale).

The call is the Denoiser seam: `model(x, sigma, context, pooled, skip=())` -> velocity v = eps - x0, where
x_sigma = (1 - sigma) x0 + sigma eps and the network sees the timestep 1000 * sigma. `skip` is a set of blocks
run as identity, or a plan {block: Perturbation} (sweep.py) that may also make a block's attention the identity
(PAG) or blur its image queries (SEG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .sweep import Perturbation, check_plan, check_variants, sweep


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24
    hidden: int = 1536
    heads: int = 24
    patch: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096
    pooled_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: bool = False  # RMSNorm on q and k per head (SD3.5)
    dual_attention_blocks: tuple[int, ...] = field(default=())  # MMDiT-X: blocks with an extra image self-attention
    mlp_ratio: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_blocks", tuple(sorted(int(i) for i in self.dual_attention_blocks)))
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if (self.hidden // self.heads) % 2 or self.hidden % 4:
            raise ValueError(f"hidden {self.hidden} must be a multiple of 4 and head_dim even")
        bad = [i for i in self.dual_attention_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dual_attention_blocks {bad} outside [0, {self.depth})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# The released models (their diffusers config.json files); heads = depth, head_dim 64 in all three.
CONFIGS = {
    "sd3_medium": MMDiTConfig(depth=24, hidden=1536, heads=24, pos_embed_max_size=192),
    "sd35_medium": MMDiTConfig(depth=24, hidden=1536, heads=24, pos_embed_max_size=384, qk_norm=True,
                               dual_attention_blocks=tuple(range(13))),
    "sd35_large": MMDiTConfig(depth=38, hidden=2432, heads=38, pos_embed_max_size=192, qk_norm=True),
}

FREQ_DIM = 256  # width of the sinusoidal timestep features


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def timestep_embedding(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i/half), computed in fp32 (cos first, as SD3)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(hidden: int, grid: int, device=None) -> Tensor:
    """(grid*grid, hidden) table; first half encodes the column, second half the row (reference layout)."""
    pos = torch.arange(grid, dtype=torch.float64, device=device)
    omega = 1.0 / 10000 ** (torch.arange(hidden // 4, dtype=torch.float64, device=device) / (hidden / 4))

    def embed_1d(p):  # (grid*grid,) -> (grid*grid, hidden/2)
        a = p[:, None] * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)  # row-major token order
    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major


class MLPEmbedder(nn.Module):
    """Linear-SiLU-Linear; used for the timestep features (t_embedder) and the pooled text vector (y_embedder)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Fused qkv projection (+ optional per-head RMS qk-norm) and output projection. The attention itself is done
    by the caller, because in a joint block it runs over both streams at once."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        if qk_norm:
            self.ln_q = RMSNorm(hidden // heads)
            self.ln_k = RMSNorm(hidden // heads)
        if not pre_only:
            self.proj = nn.Linear(hidden, hidden)

    def qkv_heads(self, x: Tensor, smooth=None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v each (B, L, heads, head_dim). `smooth(q)` (SEG) acts on the projected queries
        before the qk-norm, where diffusers hooks its blur (on `to_q`'s output)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        if smooth is not None:
            q = smooth(q)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor, split: list[int] | None = None, mask: Tensor | None = None):
    """(B, L, heads, hd) x3 -> (B, L, heads*hd), or a tuple of such split along L; softmax attention (a boolean
    `mask`: True = may attend), scale 1/sqrt(hd). Splitting before merging the heads leaves each part contiguous
    for its projection."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    if split is None:
        return out.transpose(1, 2).flatten(2)
    return tuple(o.transpose(1, 2).flatten(2) for o in out.split(split, dim=2))


def gaussian_blur_tokens(q: Tensor, grid: tuple[int, int], sigma: float) -> Tensor:
    """SEG's query smoothing: (B, h*w, ...) tokens in row-major order, blurred over the h x w grid per channel.
    sigma > 9999 (SEG's "infinite" blur) gives every token the mean query. Otherwise a normalised Gaussian of
    ceil(6 sigma) + 1 taps made odd and cut to the grid (at most n + 1 taps for an even side, n for an odd one,
    as diffusers), reflect padding. Official SEG semantics: diffusers 0.42 swaps its two branches."""
    B, L, *rest = q.shape
    h, w = grid
    if sigma > 9999:
        return q.mean(1, keepdim=True).expand_as(q)
    flat = q.reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, C, h, w)
    taps = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2

    def kernel(n):
        k = min(taps, n + 1 - n % 2)
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float32)
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        return pdf / pdf.sum()

    kh, kw = kernel(h), kernel(w)
    weight = (kh[:, None] * kw[None, :]).to(q).expand(flat.shape[1], 1, len(kh), len(kw))
    padded = F.pad(flat, (len(kw) // 2, len(kw) // 2, len(kh) // 2, len(kh) // 2), mode="reflect")
    out = F.conv2d(padded, weight, groups=flat.shape[1])
    return out.permute(0, 2, 3, 1).reshape(q.shape)


class StreamBlock(nn.Module):
    """One stream (image `x_block` or text `context_block`) of a joint block: adaLN-Zero modulation, the qkv that
    enter the joint attention, and the residual updates. `pre_only` (text stream of the last block) contributes
    q, k, v only. `dual` (MMDiT-X image stream) adds an image-only self-attention `attn2` fed by the same norm."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool,
                 pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, qk_norm, pre_only)
        if dual:
            self.attn2 = Attention(hidden, heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.n_mod = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.n_mod * hidden))

    def pre_attention(self, x: Tensor, c: Tensor, smooth=None, identity_attention: bool = False):
        """`smooth` / `identity_attention` perturb the image-only attention `attn2` here (MMDiT-X); the joint
        attention is the caller's."""
        # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]
        mod = self.adaLN_modulation(c)[:, None].chunk(self.n_mod, dim=-1)
        h = self.norm1(x)
        qkv = self.attn.qkv_heads(modulate(h, mod[0], mod[1]), smooth)
        if self.pre_only:
            return qkv, None
        x2 = None
        if self.dual:
            q2, k2, v2 = self.attn2.qkv_heads(modulate(h, mod[6], mod[7]), smooth)
            # Identity self-attention map: each token's output is its own value (PAG).
            x2 = v2.flatten(2) if identity_attention else attention(q2, k2, v2)
        return qkv, (x, mod, x2)

    def post_attention(self, attn_out: Tensor, x: Tensor, mod: tuple[Tensor, ...], x2: Tensor | None) -> Tensor:
        x = torch.addcmul(x, mod[2], self.attn.proj(attn_out))
        if x2 is not None:
            x = torch.addcmul(x, mod[8], self.attn2.proj(x2))
        return torch.addcmul(x, mod[5], self.mlp(modulate(self.norm2(x), mod[3], mod[4])))


class JointBlock(nn.Module):
    """Text and image streams with separate weights, joined in one attention over [context ; x] tokens."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool, last: bool, dual: bool):
        super().__init__()
        self.context_block = StreamBlock(hidden, heads, mlp_ratio, qk_norm, pre_only=last)
        self.x_block = StreamBlock(hidden, heads, mlp_ratio, qk_norm, dual=dual)

    def forward(self, context: Tensor, x: Tensor, c: Tensor, perturbation: Perturbation | None = None,
                grid: tuple[int, int] | None = None) -> tuple[Tensor | None, Tensor]:
        """`perturbation` (never skip, which the caller does): identity_attention masks the joint attention so
        that each image token attends to itself and to the text tokens only (text rows unchanged), as diffusers'
        PAGJointAttnProcessor2_0; smoothed_attention blurs the image queries over the `grid` (h, w) of tokens."""
        kind = perturbation.kind if perturbation is not None else None
        smooth = (lambda q: gaussian_blur_tokens(q, grid, perturbation.sigma)) if kind == "smoothed_attention" else None
        ctx_qkv, ctx_rest = self.context_block.pre_attention(context, c)
        x_qkv, x_rest = self.x_block.pre_attention(x, c, smooth, kind == "identity_attention")
        Lc, Lx = context.shape[1], x.shape[1]
        mask = None
        if kind == "identity_attention":
            mask = torch.ones(Lc + Lx, Lc + Lx, dtype=torch.bool, device=x.device)
            mask[Lc:, Lc:] = torch.eye(Lx, dtype=torch.bool, device=x.device)
        ctx_out, x_out = attention(*(torch.cat(pair, dim=1) for pair in zip(ctx_qkv, x_qkv)), split=[Lc, Lx],
                                   mask=mask)
        context = None if ctx_rest is None else self.context_block.post_attention(ctx_out, *ctx_rest)
        return context, self.x_block.post_attention(x_out, *x_rest)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # shift first (original layout)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """`MMDiT("sd35_medium")`, `MMDiT(MMDiTConfig(...))` or `MMDiT("sd3_medium", depth=4)`; random DiT-style init.
    Real weights come through `checkpoint.load_mmdit`, which infers the config from the tensors."""

    def __init__(self, config: MMDiTConfig | str = "sd3_medium", **overrides):
        super().__init__()
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown MMDiT config {config!r}; choose from {sorted(CONFIGS)}")
            config = CONFIGS[config]
        if overrides:
            config = replace(config, **overrides)
        self.config = cfg = config
        D, P = cfg.hidden, cfg.pos_embed_max_size
        self.x_embedder = PatchEmbed(cfg.patch, cfg.in_channels, D)
        self.t_embedder = MLPEmbedder(FREQ_DIM, D)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.register_buffer("pos_embed", torch.zeros(1, P * P, D))  # stored in checkpoints: always load it
        dual = set(cfg.dual_attention_blocks)
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, last=i == cfg.depth - 1, dual=i in dual)
            for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT-style init for training from scratch (the embedded tiny model): xavier linears, sin-cos positions,
        zeroed adaLN and output so that every block starts as the identity. Skipped on the meta device, where a
        checkpoint's tensors replace every one (`checkpoint.build_with_weights`): there nn.init.normal_ would only
        cost the first call's import of torch._dynamo (2 s measured here)."""
        if self.pos_embed.is_meta:
            return

        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.t_embedder, self.y_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
                nn.init.zeros_(stream.adaLN_modulation[1].bias)
        for m in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        P = self.config.pos_embed_max_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.config.hidden, P, device=self.pos_embed.device)[None])

    # ----------------------------------------------------------------------------------------- Denoiser seam
    @property
    def num_blocks(self) -> int:
        return len(self.joint_blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.joint_blocks

    def compile(self, **kwargs) -> None:
        """Regional compilation (torch.compile kwargs): each joint block, the embedders and the final layer on
        their own. The loop over blocks, the skip sets and the sweep's forks stay eager, so S²'s fresh masks
        every step never retrace; blocks share code, so a compile serves every block of the same kind, and row
        counts (2, 3, 2 + N slabs) cost at most one dynamic-batch recompile per kind."""
        for module in (*self.joint_blocks, self.x_embedder, self.t_embedder, self.y_embedder,
                       self.context_embedder, self.final_layer):
            module.compile(**kwargs)

    perturbations = ("skip", "identity_attention", "smoothed_attention")  # what a plan may ask of a block

    def _skip_set(self, skip) -> dict:
        return check_plan(skip, self.num_blocks, self.perturbations, "MMDiT")

    def _embed(self, x: Tensor, sigma, context: Tensor, pooled: Tensor):
        cfg, dtype = self.config, self.pos_embed.dtype
        B, C, H, W = x.shape
        p, P = cfg.patch, cfg.pos_embed_max_size
        if C != cfg.in_channels:
            raise ValueError(f"latent has {C} channels, the model expects {cfg.in_channels}")
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        if h > P or w > P:
            raise ValueError(f"latent size {H}x{W} ({h}x{w} patches) exceeds the position table {P}x{P} patches "
                             f"(largest latent {P * p}x{P * p})")
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"context must be [{B}, L, {cfg.context_dim}], got {list(context.shape)}")
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be [{B}, {cfg.pooled_dim}], got {list(pooled.shape)}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)

        top, left = (P - h) // 2, (P - w) // 2  # centre crop of the table
        pos = self.pos_embed.view(1, P, P, -1)[:, top:top + h, left:left + w].flatten(1, 2)
        tokens = self.x_embedder(x.to(dtype)) + pos
        c = self.t_embedder(timestep_embedding(1000 * sigma).to(dtype)) + self.y_embedder(pooled.to(dtype))
        return tokens, self.context_embedder(context.to(dtype)), c, (h, w)

    def _head(self, tokens: Tensor, c: Tensor, h: int, w: int) -> Tensor:
        p, C = self.config.patch, self.config.out_channels
        out = self.final_layer(tokens, c).view(-1, h, w, p, p, C)  # feature index (pi*p + pj)*C + c
        return torch.einsum("nhwpqc->nchpwq", out).reshape(-1, C, h * p, w * p)

    def forward(self, x: Tensor, sigma, context: Tensor, pooled: Tensor, skip=None) -> Tensor:
        """x [B,C,H,W], sigma [B] (or scalar) in [0,1], context [B,L,context_dim], pooled [B,pooled_dim];
        blocks in `skip` are the identity for both streams (or `skip` is a plan, sweep.py). Returns the velocity
        in x's dtype."""
        plan = self._skip_set(skip)
        tokens, ctx, c, (h, w) = self._embed(x, sigma, context, pooled)
        for i, block in enumerate(self.joint_blocks):
            p = plan.get(i)
            if p is None:
                ctx, tokens = block(ctx, tokens, c)
            elif p.kind != "skip":
                ctx, tokens = block(ctx, tokens, c, p, (h, w))
        return self._head(tokens, c, h, w).to(x.dtype)

    def forward_shared(self, x: Tensor, sigma, context: Tensor, pooled: Tensor, skips,
                       inputs=None) -> list[Tensor]:
        """`[self(x_k, sigma_k, context_k, pooled_k, skip=s) for (k, s) in zip(inputs, skips)]` in one sweep.

        x, sigma, context and pooled may stack K inputs of B rows each ([cond; uncond] for CFG); `inputs[j]` is
        the one variant j reads (default: all 0, a single input). Variants run as one batch while they agree on
        which blocks ran; a variant forks at the first block it skips (sweep.py). So cond, uncond and an S²
        sub-network are one batched pass, and the sub-network costs only the blocks after its first dropped one."""
        skips = [self._skip_set(s) for s in skips]
        inputs, K, B = check_variants(skips, inputs, x.shape[0])
        tokens, ctx, c, (h, w) = self._embed(x, sigma, context, pooled)

        def run_block(i, state, perturbation):
            tokens, ctx, c = state
            if perturbation is None:  # the plain call, as before plans existed (compiled graphs stay the same)
                ctx, tokens = self.joint_blocks[i](ctx, tokens, c)
            else:
                ctx, tokens = self.joint_blocks[i](ctx, tokens, c, perturbation, (h, w))
            return tokens, ctx, c

        (tokens, _, c), slab = sweep((tokens, ctx, c), skips, inputs, K, B, self.num_blocks, run_block)
        out = self._head(tokens, c, h, w).to(x.dtype).split(B)
        return [out[n] for n in slab]
