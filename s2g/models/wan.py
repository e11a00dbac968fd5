"""Wan 2.1: the text-to-video diffusion transformer (T2V 1.3B and 14B), the network and nothing else.

One file, read top to bottom: norms and embeddings, 3-D RoPE, the two attentions, the block, the head, the model.
Parameter names follow the original Wan release (Wan2.1 wan/modules/model.py), so those files load with no
renaming; checkpoint.py maps the diffusers layout (WanTransformer3DModel) onto them.

The call is the Denoiser seam: `model(x, sigma, context, skip=None)` -> velocity v = eps - x0, where
x_sigma = (1 - sigma) x0 + sigma eps. x is a latent video [B, C, F, H, W]; context the text encoder's rows
[B, L, text_dim]. The network sees the timestep t = 1000 * sigma as a float, per sample. Wan's own sampler feeds
int64(1000 * sigma) (truncated) from its shifted grid; a sampler that wants those integers passes
sigma = t / 1000 (they come back to within one fp32 ulp). `skip` is a set of blocks run as identity, or a plan {block: Perturbation} (sweep.py) that may
also make a block's self-attention the identity (PAG) or blur its video queries (SEG).

Precision follows Wan, whatever the parameter dtype: the time embedding, the modulation sums, the head, all
LayerNorms and the RMS qk-norm statistics are computed in fp32, and the residual stream is fp32 (in Wan,
`x + y * gate` with an fp32 gate promotes it from the first block on); only the projections, the FFN and the
attention itself run in the parameter dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .mmdit import gaussian_blur_tokens
from .sweep import Perturbation, check_plan, check_variants, sweep


@dataclass(frozen=True)
class WanConfig:
    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, columns) per token
    text_len: int | None = 512  # contexts are zero-padded to this many rows, as Wan does; None: used as given
    qk_norm: bool = True
    cross_attn_norm: bool = True  # affine LayerNorm (norm3) before the cross-attention
    eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (frames, rows, columns), got {self.patch_size}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.text_len is not None and self.text_len < 1:
            raise ValueError(f"text_len must be positive or None, got {self.text_len}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# The released text-to-video models (Wan2.1 wan/configs/wan_t2v_1_3B.py, wan_t2v_14B.py); head_dim 128 in both.
CONFIGS = {
    "t2v_1.3b": WanConfig(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960),
    "t2v_14b": WanConfig(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[cos(t f_j) | sin(t f_j)], f_j = 10000^(-j/half). float64 as in Wan: at t ~ 1000 fp32 angles are off by
    ~1e-4 rad; the features are cast to fp32 afterwards."""
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def rope_table(grid: tuple[int, int, int], head_dim: int, device=None) -> Tensor:
    """(f*h*w, head_dim/2) complex64 rotations for the token grid in (f, h, w) row-major order. The head dim is
    split as Wan does: the first d - 4*(d//6) channels rotate with the frame index, the next 2*(d//6) with the
    row, the last 2*(d//6) with the column; channel pair j of an axis chunk of size n turns at 10000^(-2j/n).
    Angles in float64 (as Wan's table), rotations applied in fp32."""
    d = head_dim
    sizes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    angles = []
    for axis, (n, size) in enumerate(zip(grid, sizes)):
        inv = 10000.0 ** (-torch.arange(0, size, 2, dtype=torch.float64, device=device) / size)
        a = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)  # (n, size/2)
        shape = [1, 1, 1, -1]
        shape[axis] = n
        angles.append(a.view(shape).expand(*grid, -1))
    angles = torch.cat(angles, dim=-1).reshape(math.prod(grid), d // 2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x (B, L, heads, hd): adjacent channel pairs (2j, 2j+1) are (real, imag), rotated by `rope` (L, hd/2)."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rope[:, None]
    return torch.view_as_real(z).flatten(-2).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """Wan's WanLayerNorm: computed in fp32 whatever the parameter dtype; the result stays fp32."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """Over the full width, i.e. all heads at once (one weight of size dim), statistics in fp32 (Wan's
    WanRMSNorm; diffusers' "rms_norm_across_heads")."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class CrossAttention(nn.Module):
    """Video queries, text keys and values; qk-norm, no RoPE, no mask (Wan attends to every padded text row)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, L, heads, hd) q and (B, S, heads, hd) k, v -> (B, L, dim) after the output projection."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        n = self.heads
        q = self.norm_q(self.q(x)).unflatten(-1, (n, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (n, -1))
        return self.attend(q, k, self.v(context).unflatten(-1, (n, -1)))


class SelfAttention(CrossAttention):
    """Over the video tokens, with 3-D RoPE on the normed q and k. Perturbations (never skip, the caller's):
    identity_attention makes each token attend only to itself (output = W_o v, as diffusers' PAG identity
    processor); smoothed_attention blurs the projected queries, before the qk-norm (where diffusers hooks SEG:
    on `to_q`'s output), over each frame's (h, w) token grid separately. Per frame rather than over (f, h, w):
    SEG smooths the spatial energy landscape, and frames are 4 video frames apart in the latent, so a temporal
    blur would mix motion; a one-frame latent gets exactly the image-model blur. sigma > 9999 gives every
    token its frame's mean query."""

    def forward(self, x: Tensor, rope: Tensor, perturbation: Perturbation | None = None,
                grid: tuple[int, int, int] | None = None) -> Tensor:
        kind = perturbation.kind if perturbation is not None else None
        if kind == "identity_attention":
            return self.o(self.v(x))
        n = self.heads
        q = self.q(x)
        if kind == "smoothed_attention":
            f, h, w = grid
            q = gaussian_blur_tokens(q.reshape(-1, h * w, q.shape[-1]), (h, w), perturbation.sigma).reshape(q.shape)
        q = apply_rope(self.norm_q(q).unflatten(-1, (n, -1)), rope)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (n, -1)), rope)
        return self.attend(q, k, self.v(x).unflatten(-1, (n, -1)))


class Block(nn.Module):
    """Self-attention, cross-attention, FFN, with a learned (1, 6, dim) modulation table added to the projected
    time embedding; chunks shift/scale/gate for the self-attention, then shift/scale/gate for the FFN. Wan's
    names: norm1 (self-attn, no affine), norm3 (cross-attn, affine), norm2 (FFN, no affine)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = LayerNorm(D, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(D, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(D, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope: Tensor,
                perturbation: Perturbation | None = None, grid: tuple[int, int, int] | None = None) -> Tensor:
        """x (B, L, dim) fp32 residual stream; e0 (B, 6, dim) fp32 projected time embedding; context (B, S, dim)
        embedded text; rope the table of `grid`."""
        dtype = self.ffn[0].weight.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)
        y = self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa).to(dtype), rope, perturbation, grid)
        x = torch.addcmul(x, y.float(), gate_sa)
        x = x + self.cross_attn(self.norm3(x).to(dtype), context).float()
        y = self.ffn(modulate(self.norm2(x), shift_ff, scale_ff).to(dtype))
        return torch.addcmul(x, y.float(), gate_ff)


class Head(nn.Module):
    """Its own (1, 2, dim) modulation (shift, scale) added to the time embedding before its projection; fp32."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return self.head(modulate(self.norm(x), shift, scale).to(self.head.weight.dtype)).float()


class WanDiT(nn.Module):
    """`WanDiT("t2v_1.3b")`, `WanDiT(WanConfig(...))` or `WanDiT("t2v_1.3b", num_layers=4)`; Wan's random init
    (for training from scratch). Real weights come through `checkpoint.load_wan`, which reads the config off
    the tensors."""

    # Small and precision-sensitive: the loader keeps them in fp32 whatever dtype the rest gets (Wan runs
    # them under an fp32 autocast; diffusers keeps the same modules in fp32).
    keep_fp32 = ("time_embedding.", "time_projection.", "modulation", "norm3.", "head.")

    def __init__(self, config: WanConfig | str = "t2v_1.3b", **overrides):
        super().__init__()
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown Wan config {config!r}; choose from {sorted(CONFIGS)}")
            config = CONFIGS[config]
        if overrides:
            config = replace(config, **overrides)
        self.config = cfg = config
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """Wan's init_weights: xavier linears with zero bias, xavier patch embedding, N(0, 0.02) text and time
        embeddings, zero output projection weight (modulation tables keep their randn / sqrt(dim)). Skipped on the
        meta device, where a checkpoint's tensors replace every one: nn.init.normal_ would only cost the import of
        torch._dynamo it triggers (2 s measured here)."""
        if self.head.head.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # ----------------------------------------------------------------------------------------- Denoiser seam
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def compile(self, **kwargs) -> None:
        """Regional compilation (torch.compile kwargs), as `MMDiT.compile`: each block, the embeddings and the
        head on their own; the loop over blocks and the sweep's forks stay eager."""
        for module in (*self.blocks, self.patch_embedding, self.text_embedding, self.time_embedding,
                       self.time_projection, self.head):
            module.compile(**kwargs)

    perturbations = ("skip", "identity_attention", "smoothed_attention")  # what a plan may ask of a block

    def _skip_set(self, skip) -> dict:
        return check_plan(skip, self.num_blocks, self.perturbations, "Wan")

    def _embed(self, x: Tensor, sigma, context: Tensor):
        """-> fp32 tokens (B, f*h*w, dim), embedded context, e (B, dim), e0 (B, 6, dim), rope table, grid."""
        cfg, dtype = self.config, self.patch_embedding.weight.dtype
        if x.ndim != 5:
            raise ValueError(f"x must be a latent video [B, C, F, H, W], got shape {list(x.shape)}")
        B, C, *size = x.shape
        if C != cfg.in_dim:
            raise ValueError(f"latent has {C} channels, the model expects {cfg.in_dim}")
        if any(s % p for s, p in zip(size, cfg.patch_size)):
            raise ValueError(f"latent size {'x'.join(map(str, size))} (F x H x W) is not a multiple of the patch "
                             f"size {'x'.join(map(str, cfg.patch_size))}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [{B}, L, {cfg.text_dim}], got {list(context.shape)}")
        L = context.shape[1]
        if cfg.text_len is not None and L > cfg.text_len:
            raise ValueError(f"context has {L} rows, more than the model's text_len {cfg.text_len}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() not in (1, B):
            raise ValueError(f"sigma must be a scalar or [{B}], got {sigma.numel()} values")

        grid = tuple(s // p for s, p in zip(size, cfg.patch_size))
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).float().contiguous()
        t_dtype = self.time_embedding[0].weight.dtype
        # 1000 * sigma formed in fp32, as diffusers' pipelines do; sigma = t / 1000 gives Wan's integer t back
        # to within one fp32 ulp (3e-5), a float64 product of the fp32 sigma no closer.
        features = sinusoidal_embedding(1000 * sigma.expand(B), cfg.freq_dim)
        e = self.time_embedding(features.to(t_dtype)).float()
        e0 = self.time_projection(e.to(t_dtype)).float().unflatten(1, (6, cfg.dim))
        if cfg.text_len is not None and L < cfg.text_len:  # Wan pads with zero rows and attends to them
            context = F.pad(context, (0, 0, 0, cfg.text_len - L))
        ctx = self.text_embedding(context.to(dtype))
        return tokens, ctx, e, e0, rope_table(grid, cfg.head_dim, x.device), grid

    def _head(self, tokens: Tensor, e: Tensor, grid: tuple[int, int, int]) -> Tensor:
        (pt, ph, pw), C = self.config.patch_size, self.config.out_dim
        out = self.head(tokens, e).view(-1, *grid, pt, ph, pw, C)  # feature index ((i*ph + j)*pw + k)*C + c
        f, h, w = grid
        return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(-1, C, f * pt, h * ph, w * pw)

    def forward(self, x: Tensor, sigma, context: Tensor, skip=None) -> Tensor:
        """x [B,C,F,H,W], sigma [B] (or scalar) in [0,1], context [B,L,text_dim]; blocks in `skip` are the
        identity (or `skip` is a plan, sweep.py). Returns the velocity in x's dtype."""
        plan = self._skip_set(skip)
        tokens, ctx, e, e0, rope, grid = self._embed(x, sigma, context)
        for i, block in enumerate(self.blocks):
            p = plan.get(i)
            if p is None:
                tokens = block(tokens, e0, ctx, rope)
            elif p.kind != "skip":
                tokens = block(tokens, e0, ctx, rope, p, grid)
        return self._head(tokens, e, grid).to(x.dtype)

    def forward_shared(self, x: Tensor, sigma, context: Tensor, skips, inputs=None) -> list[Tensor]:
        """`[self(x_k, sigma_k, context_k, skip=s) for (k, s) in zip(inputs, skips)]` in one sweep, as
        `MMDiT.forward_shared`: x, sigma and context may stack K inputs of B rows each ([cond; uncond]);
        `inputs[j]` is the one variant j reads (default all 0). Variants fork at their first perturbed block."""
        skips = [self._skip_set(s) for s in skips]
        inputs, K, B = check_variants(skips, inputs, x.shape[0])
        tokens, ctx, e, e0, rope, grid = self._embed(x, sigma, context)

        def run_block(i, state, perturbation):
            tokens, ctx, e0, e = state
            if perturbation is None:  # the plain call (compiled graphs stay the same)
                tokens = self.blocks[i](tokens, e0, ctx, rope)
            else:
                tokens = self.blocks[i](tokens, e0, ctx, rope, perturbation, grid)
            return tokens, ctx, e0, e

        (tokens, _, _, e), slab = sweep((tokens, ctx, e0, e), skips, inputs, K, B, self.num_blocks, run_block)
        out = self._head(tokens, e, grid).to(x.dtype).split(B)
        return [out[n] for n in slab]
