"""Tokenizers for the SD3 text stack: CLIP's byte-level BPE (written here) and T5's SentencePiece.

CLIPTokenizer reads the user's `vocab.json` + `merges.txt` (the OpenAI CLIP BPE files; diffusers' `tokenizer/`
and `tokenizer_2/` folders hold the same pair) and reproduces transformers' CLIPTokenizer:
NFC -> collapse whitespace -> lower-case -> split with CLIP's pattern -> bytes to printable unicode -> BPE with a
`</w>` end-of-word marker -> [BOS] + ids[:max_length-2] + [EOS] + padding.

CLIP's split pattern needs Unicode classes (`\\p{L}`, `\\p{N}`) that Python's `re` lacks. Instead of a regex
we scan the text once with `unicodedata.category`, trying the pattern's alternatives in its order; that is the
same leftmost-first matching, with exact Unicode classes (up to the Unicode version of Python's tables).
Known gaps (none occur in ordinary prompts): `<|startoftext|>`/`<|endoftext|>` typed inside a prompt are matched
after lower-casing (transformers matches them case-sensitively, before normalisation); `\\s` is `str.isspace`.

UMT5Tokenizer (Wan 2.1's umT5) is the SentencePiece tokenizer after Wan's prompt cleaning (`wan_clean`), padded to
512 tokens, with the attention mask on request.
"""
from __future__ import annotations

import html
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters (so BPE works on str)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'O' anything else (the classes of CLIP's pattern)."""
    if ch.isspace():
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "O"


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation of already normalised text: findall of
    <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"""
    kinds = [_kind(c) for c in text]
    words, i, n = [], 0, len(text)
    while i < n:
        special = next((t for t in (BOS_TOKEN, EOS_TOKEN) if text.startswith(t, i)), None)
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if special or contraction:
            j = i + len(special or contraction)
        elif kinds[i] == "S":  # matched by no alternative: skipped
            i += 1
            continue
        elif kinds[i] == "N":  # numbers are split into single characters
            j = i + 1
        else:  # a maximal run of letters, or of "other" characters
            j = i + 1
            while j < n and kinds[j] == kinds[i]:
                j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """CLIP byte-level BPE. `pad_id=None` pads with EOS (CLIP-L in SD3); SD3's CLIP-G pads with id 0 ("!")."""

    def __init__(self, vocab_file, merges_file, *, max_length: int = 77, pad_id: int | None = None):
        for f in (vocab_file, merges_file):
            if not Path(f).is_file():
                raise FileNotFoundError(f"CLIP tokenizer file not found: {f}")
        try:
            self.vocab: dict[str, int] = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{vocab_file}: not a JSON vocabulary ({e})") from None
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        pairs = [tuple(line.split()) for line in lines if line.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"{merges_file}: every merge line must hold two symbols separated by a space")
        self.ranks = {p: r for r, p in enumerate(pairs)}
        missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in self.vocab]
        if missing:
            raise ValueError(f"{vocab_file}: not a CLIP vocabulary (no {missing[0]} token)")
        self.bos_id, self.eos_id = self.vocab[BOS_TOKEN], self.vocab[EOS_TOKEN]
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.max_length = max_length
        self.byte_chars = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    def normalize(self, text: str) -> str:
        return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()

    def bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair until none is in the merge table; the last symbol carries `</w>`."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            rank, i = min((self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(symbols, symbols[1:])))
            if rank == float("inf"):
                break
            first, second = symbols[i], symbols[i + 1]
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the pair, left to right
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        if word in (BOS_TOKEN, EOS_TOKEN):
            return [self.vocab[word]]
        if word not in self._cache:
            chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
            # with CLIP's vocab every single byte symbol exists; an unknown piece maps to EOS (the unk token)
            self._cache[word] = [self.vocab.get(piece, self.eos_id) for piece in self.bpe(chars)]
        return self._cache[word]

    def tokenize(self, text: str) -> list[int]:
        """Text -> BPE ids, without BOS/EOS, untruncated."""
        return [i for word in split_words(self.normalize(text)) for i in self._word_ids(word)]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> [B, max_length] long: BOS, ids truncated to max_length-2, EOS, pad."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for text in prompts:
            ids = [self.bos_id, *self.tokenize(text)[: self.max_length - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class T5Tokenizer:
    """SentencePiece tokenisation with the user's `spiece.model`, + EOS (1), padded with 0 / truncated to
    `max_length` (EOS kept). SD3 uses the T5-v1.1 model (`google/t5-v1_1-xxl/spiece.model`)."""

    def __init__(self, spiece_file, *, max_length: int = 256, eos_id: int = 1, pad_id: int = 0):
        import sentencepiece  # imported here so the CLIP-only path needs no sentencepiece

        if not Path(spiece_file).is_file():
            raise FileNotFoundError(f"T5 SentencePiece model not found: {spiece_file}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{spiece_file}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.max_length, self.eos_id, self.pad_id = max_length, eos_id, pad_id

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for text in prompts:
            ids = [*self.tokenize(text)[: self.max_length - 1], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# Unicode White_Space (what Wan's `regex` `\s` matches; Python's `re` `\s` also matches U+001C..U+001F).
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_warned_ftfy = False


def wan_clean(text: str) -> str:
    """Wan 2.1's prompt cleaning (wan/modules/tokenizers.py, clean='whitespace'): ftfy.fix_text, HTML entities
    unescaped twice, whitespace runs collapsed to one space, stripped.

    ftfy matters: it turns fullwidth punctuation into ASCII (Wan's Chinese default negative prompt is full of
    fullwidth commas) and straightens curly quotes. Without the `ftfy` package that step is skipped, with a
    warning (diffusers' WanPipeline skips it silently)."""
    global _warned_ftfy
    try:
        import ftfy
    except ImportError:
        if not _warned_ftfy:
            import warnings
            warnings.warn("ftfy is not installed: Wan's prompt cleaning runs without ftfy.fix_text, so e.g. "
                          "fullwidth commas stay fullwidth and the tokens differ from Wan's (pip install ftfy)",
                          stacklevel=2)
            _warned_ftfy = True
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer(T5Tokenizer):
    """Wan 2.1's text tokenisation: `wan_clean`, then umT5's SentencePiece (the user's `spiece.model` from
    google/umt5-xxl), EOS (1) appended, truncated (EOS kept) and padded with 0 to `max_length` (Wan: 512).
    `return_mask=True` also gives the attention mask (1 on the prompt's tokens and its EOS). Known gap: the
    `<extra_id_N>` sentinels that transformers adds as special tokens are not matched inside a prompt."""

    def __init__(self, spiece_file, *, max_length: int = 512, clean: bool = True, eos_id: int = 1,
                 pad_id: int = 0):
        super().__init__(spiece_file, max_length=max_length, eos_id=eos_id, pad_id=pad_id)
        self.clean = clean

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(wan_clean(text) if self.clean else text)

    def __call__(self, prompts: str | list[str], *, return_mask: bool = False):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [[*self.tokenize(text)[: self.max_length - 1], self.eos_id] for text in prompts]
        ids = torch.tensor([r + [self.pad_id] * (self.max_length - len(r)) for r in rows], dtype=torch.long)
        if not return_mask:
            return ids
        mask = torch.tensor([[1] * len(r) + [0] * (self.max_length - len(r)) for r in rows], dtype=torch.long)
        return ids, mask
