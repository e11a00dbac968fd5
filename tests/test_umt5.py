"""umT5 (Wan 2.1's text encoder) against transformers' UMT5EncoderModel on a tiny random config, from every layout
(transformers, Wan's own names, under a prefix, an encoder-decoder file); the tokenizer against transformers' on a
SentencePiece model trained here; Wan's conditioning (clean, tokenise to 512, encode with the mask, zero past the
EOS) against diffusers' WanPipeline prompt encoding; bad files. Tolerance: max |diff| <= 1e-5 in fp32."""
import types

import pytest
import torch
from safetensors.torch import save_file

from s2g.models import UMT5Encoder, load_umt5, load_wan_text
from s2g.models.checkpoint import infer_umt5_config
from s2g.models.text import UMT5Tokenizer
from s2g.models.text.tokenizers import wan_clean
from s2g.models.text.umt5 import UMT5_XXL, WAN_NEGATIVE_PROMPT

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # measured: encoder 1.0e-6, conditioning 1.1e-6 (hidden states up to ~4)
VOCAB = 128
NEG = WAN_NEGATIVE_PROMPT  # Chinese, with fullwidth commas
CORPUS = ("a red fox runs through the snow in slow motion, cinematic lighting, the camera pans left. two cats play "
          "with a ball of yarn on a wooden floor; close-up, shallow depth of field. " + NEG + " 3.14 café naïve")
PROMPTS = [
    "a red fox runs through the snow",
    "  Extra   spaces\tand\nnewlines  ",
    "html &amp;amp; entities &lt;b&gt; and “curly” quotes",
    NEG,
    "",
    "two cats play with a ball of yarn, cinematic " * 40,  # > 512 tokens: truncated, EOS kept
]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("umt5_tok")
    (d / "corpus.txt").write_text("\n".join([CORPUS] * 20))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=VOCAB,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   character_coverage=1.0)
    return d


def randomize(model, scale=0.2):
    """Every tensor random (norm weights around 1), so swapped or missing weights cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn_like(p))
    return model.eval()


def tiny_config(**kw):
    return transformers.UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                   relative_attention_max_distance=128, **kw)


@pytest.fixture(scope="module")
def hf_umt5():
    torch.manual_seed(0)
    return randomize(transformers.UMT5EncoderModel(tiny_config()))


def to_wan_names(sd):
    """transformers UMT5EncoderModel -> Wan's umT5 names (wan/modules/t5.py T5Encoder), written out here by hand."""
    part = {"layer.0.layer_norm": "norm1", "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k",
            "layer.0.SelfAttention.v": "attn.v", "layer.0.SelfAttention.o": "attn.o",
            "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
            "layer.1.layer_norm": "norm2", "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
            "layer.1.DenseReluDense.wi_1": "ffn.fc1", "layer.1.DenseReluDense.wo": "ffn.fc2"}
    out = {}
    for key, t in sd.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = t
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = t
        elif key.startswith("encoder.block."):
            _, _, n, rest = key.split(".", 3)
            stem, leaf = rest.rsplit(".", 1)
            out[f"blocks.{n}.{part[stem]}.{leaf}"] = t
    return out


def ids_and_mask(length=300, valid=(300, 170)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(valid), length), generator=g)
    mask = torch.zeros(len(valid), length, dtype=torch.long)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def assert_encoder_parity(ours, hf):
    ids, mask = ids_and_mask()  # longer than max_distance 128: the log buckets and the clamp are used
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).last_hidden_state
        plain = hf(ids).last_hidden_state
    got = ours(ids, mask)
    valid = mask.bool()
    assert want[valid].abs().max() > 0.5
    assert (got - want)[valid].abs().max() <= TOL
    assert (ours(ids) - plain).abs().max() <= TOL  # no mask: every position attends everywhere


def test_encoder_parity_hf_layout(hf_umt5):
    ours = load_umt5(hf_umt5.state_dict())
    assert ours.config == UMT5_XXL.__class__(vocab_size=VOCAB, d_model=32, layers=2, heads=4, d_kv=8, d_ff=48)
    assert_encoder_parity(ours, hf_umt5)
    # every layer has its own bias table: using layer 0's everywhere (T5-v1.1's rule) is a real difference
    ids, mask = ids_and_mask()
    shared = load_umt5(hf_umt5.state_dict())
    for block in shared.encoder.block:
        block.layer[0].SelfAttention.relative_attention_bias = shared.encoder.block[0].layer[0].SelfAttention.\
            relative_attention_bias
    assert (shared(ids, mask) - ours(ids, mask))[mask.bool()].abs().max() > 1e-3


def test_encoder_parity_files(hf_umt5, tmp_path):
    sd = hf_umt5.state_dict()
    # a transformers file stores the tied embedding once or twice; under either name
    save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / "both.safetensors"))
    only_embed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in sd.items()
                  if k != "encoder.embed_tokens.weight"}
    wan = {f"text_encoder.{k}": v.contiguous() for k, v in to_wan_names(sd).items()}
    assert len(wan) == 2 + 2 * 10
    save_file(wan, str(tmp_path / "umt5_wan.safetensors"))
    for source in (tmp_path / "both.safetensors", only_embed, tmp_path / "umt5_wan.safetensors"):
        assert_encoder_parity(load_umt5(source), hf_umt5)
    # an encoder-decoder UMT5Model: the decoder and LM head are ignored
    torch.manual_seed(4)
    full = randomize(transformers.UMT5ForConditionalGeneration(tiny_config(num_decoder_layers=1)))
    enc = transformers.UMT5EncoderModel(tiny_config()).eval()
    enc.load_state_dict({k: v for k, v in full.state_dict().items() if k.startswith(("shared.", "encoder."))})
    assert_encoder_parity(load_umt5(full.state_dict()), enc)


def test_tokenizer_matches_transformers(spiece):
    """Wan tokenises with transformers after its cleaning (padding to max_length, truncation, EOS)."""
    hf = transformers.T5Tokenizer.from_pretrained(spiece, extra_ids=0)
    ours = UMT5Tokenizer(spiece / "spiece.model")
    cleaned = [wan_clean(p) for p in PROMPTS]
    ref = hf(cleaned, padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
             return_attention_mask=True, return_tensors="pt")
    ids, mask = ours(PROMPTS, return_mask=True)
    assert ids.shape == (len(PROMPTS), 512)
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    assert mask[-1].all() and ids[-1, -1] == 1  # truncated, EOS kept
    assert torch.equal(ours(PROMPTS[:2]), ids[:2])


def test_wan_clean():
    pipeline_wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    for p in PROMPTS:
        assert wan_clean(p) == pipeline_wan.prompt_clean(p)  # the same cleaning (ftfy too, when installed)
    assert wan_clean("  a \u3000 b\n\n c  ") == "a b c"


def test_wan_clean_ftfy():
    """Wan fixes the text with ftfy first: fullwidth punctuation (its own negative prompt's commas) and curly
    quotes become ASCII."""
    pytest.importorskip("ftfy")
    assert wan_clean("静态，字幕 &amp;amp; “x”") == '静态,字幕 & "x"'


def test_conditioning_matches_diffusers(hf_umt5, spiece):
    """Wan's text path: tokens to 512 with a mask, umT5, rows past each prompt's EOS zero (diffusers' WanPipeline
    does the same as wan/modules/t5.py + the DiT's zero padding)."""
    from diffusers import WanPipeline

    hf_tok = transformers.T5Tokenizer.from_pretrained(spiece, extra_ids=0)
    pipe = types.SimpleNamespace(tokenizer=hf_tok, text_encoder=hf_umt5)
    with torch.no_grad():
        want = WanPipeline._get_t5_prompt_embeds(pipe, PROMPTS, max_sequence_length=512, device=torch.device("cpu"),
                                                 dtype=torch.float32)
    cond = load_wan_text(umt5=hf_umt5.state_dict(), spiece=spiece / "spiece.model")
    got = cond.encode(PROMPTS)
    assert got.shape == want.shape == (len(PROMPTS), 512, 32)
    _, mask = cond.tokenizer(PROMPTS, return_mask=True)
    assert (got[~mask.bool()] == 0).all() and got[mask.bool()].abs().min() > 0
    assert (got - want).abs().max() <= TOL
    # the encoder runs up to the longest prompt only: the same rows as a batch padded to the full 512
    short = cond.encode(PROMPTS[:3])
    assert (short - want[:3]).abs().max() <= TOL
    assert cond.cond(PROMPTS[:1])["context"].shape == (1, 512, 32)


def test_full_size_config():
    cfg = transformers.UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                  num_heads=64, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        sd = transformers.UMT5EncoderModel(cfg).state_dict()
    sd.pop("encoder.embed_tokens.weight", None)
    assert infer_umt5_config(sd) == UMT5_XXL
    with torch.device("meta"):
        assert set(UMT5Encoder(UMT5_XXL).state_dict()) == set(sd)


def test_bad_files(tmp_path, hf_umt5, spiece):
    (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"PK\x03\x04 not read")
    with pytest.raises(ValueError, match="weights_only=True") as err:
        load_umt5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    assert "\n" not in str(err.value)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48,
                                                           num_layers=2, num_heads=4,
                                                           feed_forward_proj="gated-gelu"))
    with pytest.raises(ValueError, match="load_t5"):
        load_umt5(t5.state_dict())
    with pytest.raises(ValueError, match="not a umT5 encoder"):
        load_umt5({"decoder.conv1.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="SentencePiece"):
        load_wan_text(umt5=hf_umt5.state_dict(), spiece=tmp_path / "missing.model")
