"""SD3 text stack vs transformers / diffusers oracles: CLIP-L, CLIP-G, T5 (random weights, tiny configs), the
CLIP BPE and T5 SentencePiece tokenizers (small vocabularies built here), and the SD3 conditioning vs
diffusers' StableDiffusion3Pipeline.encode_prompt. Tolerance: max |diff| <= 1e-5 in fp32."""
import collections
import json
import types

import pytest
import torch
from safetensors.torch import save_file

from s2g.models.text import CLIPTokenizer, SD3TextConditioner, T5Tokenizer, load_clip, load_sd3_text, load_t5
from s2g.models.text.tokenizers import bytes_to_unicode, split_words

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)
TOL = 1e-5

PROMPTS = [
    "A photo of an astronaut riding a horse on Mars",
    "  Extra   spaces\tand\nnewlines  ",
    "it's don't we're they've I'm you'll he'd 'tis rock'n'roll",
    "numbers 1234 and 3.14, 50% off",
    "UPPER case MiXeD",
    "unicode: café naïve 日本語 emoji 🚀🎨 ß Ωμέγα",
    '(a:1.2) [b] {c} <d> "quoted" --- ... ,,',
    "hyphen-ated e-mail@example.com #hashtag $5",
    "",
    "x²+y½ Ⅻ ٣ decomposed e\u0301 ﬁ ĳ İstanbul ǅ a\u00a0b\u2003c",
    "<|endoftext|> in text",
    "a painting of a cat in the style of van gogh, highly detailed " * 8,  # > 75 tokens: truncated
]
CORPUS = ("a photo of an astronaut riding a horse on mars the quick brown fox jumps over the lazy dog painting of "
          "a cat in the style of van gogh highly detailed it's don't we're they've i'm you'll he'd 1234 3.14 !!! "
          "... café naïve 日本語 🚀 rock'n'roll e-mail@example.com")


def randomize(model, scale=0.2):
    """Every tensor random (norm weights around 1), so swapped or missing weights cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn_like(p))
    return model.eval()


def train_bpe(corpus: str, n_merges: int = 300):
    """A small CLIP-style vocabulary: 256 byte symbols, the same with </w>, learned merges, BOS/EOS last."""
    b2u = bytes_to_unicode()
    printable = [b for b in range(256) if b2u[b] == chr(b)]
    base = [b2u[b] for b in printable + [b for b in range(256) if b not in printable]]  # CLIP order: "!" = 0
    words = collections.Counter()
    for w in corpus.lower().split():
        chars = "".join(b2u[b] for b in w.encode())
        words[(*chars[:-1], chars[-1] + "</w>")] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    vocab = [*base, *(b + "</w>" for b in base), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_clip_tokenizer(d) -> int:
    """vocab.json + merges.txt of a small BPE trained on CORPUS, in CLIP's file format; returns the vocab size."""
    vocab, merges = train_bpe(CORPUS)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_tok")
    return d, write_clip_tokenizer(d)


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("t5_tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS.split(" i'm ")) * 20)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return d


# --- tokenizers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_clip_tokenizers(clip_files):
    d, _ = clip_files
    tok_l = transformers.CLIPTokenizer.from_pretrained(d, model_max_length=77)
    tok_g = transformers.CLIPTokenizer.from_pretrained(d, model_max_length=77, pad_token="!")  # diffusers' tokenizer_2
    return tok_l, tok_g


def test_clip_tokenizer_matches_transformers(clip_files, hf_clip_tokenizers):
    d, _ = clip_files
    hf_l, hf_g = hf_clip_tokenizers
    ours_l = CLIPTokenizer(d / "vocab.json", d / "merges.txt")
    ours_g = CLIPTokenizer(d / "vocab.json", d / "merges.txt", pad_id=0)
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours_l(PROMPTS), hf_l(PROMPTS, **kw).input_ids)
    assert torch.equal(ours_g(PROMPTS), hf_g(PROMPTS, **kw).input_ids)
    ids = ours_l(PROMPTS)
    assert ids[0, 0] == ours_l.bos_id and (ids[8, 1:] == ours_l.eos_id).all()  # "" = BOS, EOS, EOS-pad
    assert (ours_g(PROMPTS)[8, 2:] == 0).all() and ids[-1, -1] == ours_l.eos_id  # truncated rows keep EOS


def test_clip_split_uses_unicode_classes():
    # \p{N} is one character per word (including non-decimal numbers), \p{L} runs, contractions first
    assert split_words("x²+y½ ⅻ3.14 it's") == ["x", "²", "+", "y", "½", "ⅻ", "3", ".", "1", "4", "it", "'s"]
    assert split_words("!!'s ok'd") == ["!!'", "s", "ok", "'d"]


def test_clip_g_bang_differs_from_diffusers_pad_token(clip_files, hf_clip_tokenizers):
    """Documented gap: diffusers' tokenizer_2 makes "!" (its pad token) a special token, so "wow!" tokenizes
    differently there; we follow the reference implementation (plain BPE, only *padding* uses id 0)."""
    d, _ = clip_files
    hf_l, hf_g = hf_clip_tokenizers
    ours_g = CLIPTokenizer(d / "vocab.json", d / "merges.txt", pad_id=0)
    assert ours_g.tokenize("wow!") == hf_l("wow!", add_special_tokens=False).input_ids
    assert ours_g.tokenize("wow!") != hf_g("wow!", add_special_tokens=False).input_ids


def test_t5_tokenizer_matches_transformers(spiece_dir):
    hf = transformers.T5Tokenizer.from_pretrained(spiece_dir, extra_ids=0)
    ours = T5Tokenizer(spiece_dir / "spiece.model", max_length=40)
    ref = hf(PROMPTS, padding="max_length", max_length=40, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(PROMPTS), ref)
    assert ours([""])[0, 0] == 1 and (ours([""])[0, 1:] == 0).all()


def test_tokenizer_bad_files(tmp_path, clip_files):
    d, _ = clip_files
    with pytest.raises(FileNotFoundError, match="merges"):
        CLIPTokenizer(d / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON vocabulary"):
        CLIPTokenizer(tmp_path / "vocab.json", d / "merges.txt")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        T5Tokenizer(tmp_path / "bad.model")


# --- encoders --------------------------------------------------------------------------------------------------

def clip_config(vocab_size, act, layers=3, width=64):
    return transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act, projection_dim=48,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


@pytest.fixture(scope="module")
def hf_clip_l(clip_files):
    torch.manual_seed(0)
    return randomize(transformers.CLIPTextModelWithProjection(clip_config(clip_files[1], "quick_gelu", width=64)))


@pytest.fixture(scope="module")
def hf_clip_g(clip_files):
    torch.manual_seed(1)
    return randomize(transformers.CLIPTextModelWithProjection(clip_config(clip_files[1], "gelu", width=128)))


@pytest.fixture(scope="module")
def hf_t5():
    torch.manual_seed(2)
    cfg = transformers.T5Config(vocab_size=60, d_model=256, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                relative_attention_max_distance=128)
    return randomize(transformers.T5EncoderModel(cfg), scale=0.1)  # T5 has no 1/sqrt(d): keep logits moderate


def test_clip_l_parity(clip_files, hf_clip_l, tmp_path):
    d, n = clip_files
    ids = CLIPTokenizer(d / "vocab.json", d / "merges.txt")(PROMPTS[:4])
    # CLIPTextModel (no projection) as saved by transformers >= 5: keys without the `text_model.` prefix
    plain = transformers.CLIPTextModel(clip_config(n, "quick_gelu", width=64)).eval()
    plain.load_state_dict({k.removeprefix("text_model."): v for k, v in hf_clip_l.state_dict().items()
                           if k != "text_projection.weight"})
    save_file(plain.state_dict(), str(tmp_path / "clip_l.safetensors"))
    assert "embeddings.token_embedding.weight" in plain.state_dict()
    ours = load_clip(tmp_path / "clip_l.safetensors", act="quick_gelu", project=False)
    with torch.no_grad():
        out = plain(ids, output_hidden_states=True)
    hidden, pooled = ours(ids)
    assert out.hidden_states[-2].abs().max() > 1.0
    assert (hidden - out.hidden_states[-2]).abs().max() <= TOL
    assert (pooled - out.pooler_output).abs().max() <= TOL
    # a file that has a text_projection also loads as CLIP-L: SD3 ignores it (pooled stays unprojected)
    hidden2, pooled2 = load_clip(hf_clip_l.state_dict(), act="quick_gelu", project=False)(ids)
    assert torch.equal(hidden2, hidden) and torch.equal(pooled2, pooled)


def test_clip_g_parity(clip_files, hf_clip_g):
    d, _ = clip_files
    ids = CLIPTokenizer(d / "vocab.json", d / "merges.txt", pad_id=0)(PROMPTS[:4])
    ours = load_clip(hf_clip_g.state_dict(), act="gelu", project=True)
    assert ours.config.width == 128 and ours.config.heads == 2 and ours.config.projection_dim == 48
    with torch.no_grad():
        out = hf_clip_g(ids, output_hidden_states=True)
    hidden, pooled = ours(ids)
    assert (hidden - out.hidden_states[-2]).abs().max() <= TOL
    assert (pooled - out.text_embeds).abs().max() <= TOL
    # quick_gelu instead of gelu is a real difference (the activation is not in the weights)
    wrong, _ = load_clip(hf_clip_g.state_dict(), act="quick_gelu", project=True)(ids)
    assert (wrong - hidden).abs().max() > 1e-3


@pytest.mark.parametrize("embed_key", ["shared.weight", "encoder.embed_tokens.weight", "both"])
def test_t5_parity(hf_t5, embed_key):
    sd = hf_t5.state_dict()
    if embed_key != "both":
        sd = {k: v for k, v in sd.items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
        sd[embed_key] = hf_t5.shared.weight
    ours = load_t5(sd)
    assert (ours.config.heads, ours.config.d_kv, ours.config.layers) == (4, 16, 3)
    torch.manual_seed(3)
    ids = torch.randint(0, 60, (2, 160))  # longer than max_distance 128: every bucket kind is used
    with torch.no_grad():
        ref = hf_t5(ids).last_hidden_state
    assert (ours(ids) - ref).abs().max() <= TOL


# --- SD3 conditioning ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_oracle(clip_files, spiece_dir, hf_clip_l, hf_clip_g, hf_t5, hf_clip_tokenizers):
    from diffusers import StableDiffusion3Pipeline

    with torch.no_grad():  # diffusers reads CLIP-L's pooled through its projection: make it the identity
        hf_clip_l.text_projection = torch.nn.Linear(64, 64, bias=False)
        hf_clip_l.text_projection.weight.copy_(torch.eye(64))
    return StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=hf_clip_l, tokenizer=hf_clip_tokenizers[0],
        text_encoder_2=hf_clip_g, tokenizer_2=hf_clip_tokenizers[1],
        text_encoder_3=hf_t5, tokenizer_3=transformers.T5Tokenizer.from_pretrained(spiece_dir, extra_ids=0))


@pytest.fixture(scope="module")
def conditioner_files(tmp_path_factory, hf_clip_l, hf_clip_g, hf_t5):
    d = tmp_path_factory.mktemp("encoders")
    for name, model in (("clip_l", hf_clip_l), ("clip_g", hf_clip_g), ("t5", hf_t5)):
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(d / f"{name}.safetensors"))
    return d


def test_sd3_conditioning_matches_diffusers(sd3_oracle, conditioner_files, clip_files, spiece_dir):
    d, (tok, _) = conditioner_files, clip_files
    prompts = [p for p in PROMPTS if "!" not in p][:3]  # "!" is special in diffusers' tokenizer_2 (see above)
    cond = load_sd3_text(clip_l=d / "clip_l.safetensors", clip_g=d / "clip_g.safetensors", t5=d / "t5.safetensors",
                         clip_vocab=tok / "vocab.json", clip_merges=tok / "merges.txt",
                         t5_spiece=spiece_dir / "spiece.model", t5_length=40)
    context, pooled = cond.encode(prompts)
    neg_context, neg_pooled = cond.encode([""] * len(prompts))
    with torch.no_grad():
        ref = sd3_oracle.encode_prompt(prompts, None, None, device="cpu", max_sequence_length=40,
                                       do_classifier_free_guidance=True, negative_prompt="")
    assert context.shape == (3, 77 + 40, 256) and pooled.shape == (3, 64 + 48)
    for ours, theirs in zip((context, neg_context, pooled, neg_pooled), ref):
        assert (ours - theirs).abs().max() <= TOL
    assert (context[:, :77, 192:] == 0).all()  # CLIP-L (64) + CLIP-G (128) zero-padded to the T5 width
    assert cond.cond(prompts)["pooled"].shape == pooled.shape


def test_sd3_conditioning_without_t5(sd3_oracle, conditioner_files, clip_files):
    d, (tok, _) = conditioner_files, clip_files
    cond = load_sd3_text(clip_l=d / "clip_l.safetensors", clip_g=d / "clip_g.safetensors",
                         clip_vocab=tok / "vocab.json", clip_merges=tok / "merges.txt", t5_length=40)
    prompts = PROMPTS[:2]
    context, pooled = cond.encode(prompts)
    # diffusers' no-T5 mode: zeros of (B, max_sequence_length, transformer.config.joint_attention_dim)
    t5_model = sd3_oracle.text_encoder_3
    sd3_oracle.text_encoder_3 = None
    sd3_oracle.transformer = types.SimpleNamespace(config=types.SimpleNamespace(joint_attention_dim=4096))
    try:
        with torch.no_grad():
            ref = sd3_oracle.encode_prompt(prompts, None, None, device="cpu", max_sequence_length=40,
                                           do_classifier_free_guidance=False)
    finally:
        sd3_oracle.text_encoder_3, sd3_oracle.transformer = t5_model, None
    assert context.shape == ref[0].shape == (2, 77 + 40, 4096)
    assert (context - ref[0]).abs().max() <= TOL and (pooled - ref[2]).abs().max() <= TOL
    assert (context[:, 77:] == 0).all()


def test_conditioner_rejects_mismatched_parts(conditioner_files, clip_files, spiece_dir):
    d, (tok, _) = conditioner_files, clip_files
    kw = dict(clip_l=d / "clip_l.safetensors", clip_g=d / "clip_g.safetensors", clip_vocab=tok / "vocab.json",
              clip_merges=tok / "merges.txt")
    with pytest.raises(ValueError, match="t5_spiece"):
        load_sd3_text(**kw, t5=d / "t5.safetensors")
    with pytest.raises(ValueError, match="text widths"):
        load_sd3_text(**kw, context_dim=100)
    parts = load_sd3_text(**kw)
    with pytest.raises(ValueError, match="max_length"):
        SD3TextConditioner(parts.clip_l, parts.clip_g, parts.tokenizer_l, parts.tokenizer_g,
                           load_t5(d / "t5.safetensors"), T5Tokenizer(spiece_dir / "spiece.model", max_length=10),
                           t5_length=40)


# --- bad input -------------------------------------------------------------------------------------------------

def test_bad_encoder_files(tmp_path, hf_clip_g, hf_t5):
    corrupt = tmp_path / "clip_g.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        load_clip(corrupt, act="gelu", project=True)
    with pytest.raises(ValueError, match="not a CLIP text encoder"):
        load_clip(hf_t5.state_dict(), act="gelu", project=True)
    with pytest.raises(ValueError, match="not a T5"):
        load_t5(hf_clip_g.state_dict())
    sd = {k: v for k, v in hf_clip_g.state_dict().items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match="missing 1 tensors: text_model.encoder.layers.1.mlp.fc2.bias"):
        load_clip(sd, act="gelu", project=True)
    with pytest.raises(ValueError, match="no text_projection"):
        load_clip({k: v for k, v in hf_clip_g.state_dict().items() if k != "text_projection.weight"},
                  act="gelu", project=True)
    extra = dict(hf_t5.state_dict(), **{"encoder.block.0.layer.2.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected 1 tensors: encoder.block.0.layer.2.weight"):
        load_t5(extra)
    with pytest.raises(ValueError, match="unknown activation"):
        load_clip(hf_clip_g.state_dict(), act="relu", project=True)


def test_released_shapes_infer_released_configs():
    """CLIP-L, bigG and T5-v1.1-XXL shaped state dicts (meta device: nothing allocated) -> the released configs."""
    with torch.device("meta"):
        clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu"))
        clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu"))
        t5 = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu"))
    ours_l = load_clip(clip_l.state_dict(), act="quick_gelu", project=False)
    ours_g = load_clip(clip_g.state_dict(), act="gelu", project=True)
    ours_t5 = load_t5(t5.state_dict())
    assert (ours_l.config.layers, ours_l.config.width, ours_l.config.heads, ours_l.config.mlp) == (12, 768, 12, 3072)
    assert (ours_g.config.layers, ours_g.config.heads, ours_g.config.projection_dim) == (32, 20, 1280)
    t5_cfg = ours_t5.config
    assert (t5_cfg.layers, t5_cfg.heads, t5_cfg.d_kv, t5_cfg.d_ff) == (24, 64, 64, 10240)
    for ours, ref in ((ours_l, clip_l), (ours_g, clip_g), (ours_t5, t5)):
        n_ref = sum(p.numel() for p in ref.parameters())  # T5: shared and embed_tokens are one tied tensor
        assert sum(p.numel() for p in ours.parameters()) == n_ref
