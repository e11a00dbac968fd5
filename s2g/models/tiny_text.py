"""Tiny text encoder for the embedded model: word vocabulary, learned embeddings, a small transformer.

It has the SD3 text stack's interface: `encode(prompts) -> {"context": [B, L, C], "pooled": [B, P]}`, the empty
prompt "" being the unconditional input (as SD3's negative prompt). Prompts are lower-cased and split on
whitespace; a word outside the vocabulary is a ValueError that lists the known words, never a silent <unk>.

Every sequence is [<bos>, words..., <eos>, <pad>...] of fixed length L; like SD3's padded T5/CLIP tokens, the
pad tokens are part of the context (the MMDiT attends without a mask). The pooled vector is read at <bos> after
the transformer (CLIP pools at a special token too).
"""

from __future__ import annotations

import json

import torch
from torch import nn

SPECIALS = ("<pad>", "<bos>", "<eos>")


class Block(nn.Module):
    """Pre-LN transformer encoder layer (bidirectional self-attention + GELU MLP)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x = x + self.proj(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyTextEncoder(nn.Module):
    def __init__(self, words: list[str] | tuple[str, ...], dim: int = 64, depth: int = 2, heads: int = 2,
                 max_len: int = 12, pooled_dim: int = 64):
        super().__init__()
        if len(set(words)) != len(words) or any(w in SPECIALS or not w or w.split() != [w] for w in words):
            raise ValueError("vocabulary words must be unique, non-empty, without spaces, and not special tokens")
        self.vocab = [*SPECIALS, *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.config = dict(dim=dim, depth=depth, heads=heads, max_len=max_len, pooled_dim=pooled_dim)
        self.max_len = max_len
        # Words and positions start at one scale (std 0.02, as GPT-2). With PyTorch's default N(0, 1) for the
        # words, the order signal started 50x weaker than the word signal and stayed so: the output was a bag of
        # words and relations sat at chance (v1; experiments/tiny_model/README.md). Init only: loading is unchanged.
        self.tok_embed = nn.Embedding(len(self.vocab), dim)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, pooled_dim)

    @property
    def words(self) -> list[str]:
        return self.vocab[len(SPECIALS):]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """[B, max_len] token ids. Unknown words or over-long prompts raise ValueError."""
        ids = []
        for p in prompts:
            words = p.lower().split()
            unknown = [w for w in words if w not in self.index or w in SPECIALS]
            if unknown:
                raise ValueError(f"unknown word(s) {', '.join(map(repr, unknown))} in prompt {p!r}; "
                                 f"the tiny model knows: {' '.join(self.words)}")
            if len(words) + 2 > self.max_len:
                raise ValueError(f"prompt {p!r} has {len(words)} words; the tiny model takes at most "
                                 f"{self.max_len - 2}")
            row = [self.index["<bos>"], *(self.index[w] for w in words), self.index["<eos>"]]
            ids.append(row + [self.index["<pad>"]] * (self.max_len - len(row)))
        return torch.tensor(ids, dtype=torch.long, device=self.pos_embed.device)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.tok_embed(ids) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return {"context": x, "pooled": self.pool(x[:, 0])}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self(self.tokenize(list(prompts)))

    def check(self, prompts: list[str]) -> None:
        """ValueError for the first prompt with a word outside the vocabulary (or too long), without encoding:
        what a run checks of every prompt before its first sampling step."""
        self.tokenize(list(prompts))

    # The vocabulary and sizes travel in the safetensors header next to the weights.
    def metadata(self) -> dict[str, str]:
        return {"tiny_text.vocab": json.dumps(self.words), "tiny_text.config": json.dumps(self.config)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> "TinyTextEncoder":
        if "tiny_text.vocab" not in metadata or "tiny_text.config" not in metadata:
            raise ValueError("checkpoint header lacks tiny_text.vocab / tiny_text.config: not a tiny-model file")
        model = cls(json.loads(metadata["tiny_text.vocab"]), **json.loads(metadata["tiny_text.config"]))
        model.load_state_dict(state)
        return model
