"""Checkpoint reading: safetensors only, refusals with one-line errors, the SD3 single-file split."""
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from s2g.models.checkpoint import load_state_dict, split_components


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_roundtrip_values_and_dict_passthrough(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int64),
          "c": torch.randn(2, dtype=torch.float64, generator=g).to(torch.bfloat16)}
    save_file(sd, tmp_path / "m.safetensors")
    out = load_state_dict(tmp_path / "m.safetensors")
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k])
    assert load_state_dict(sd)["b"] is sd["b"]
    # A folder of shards (diffusers) is merged.
    save_file({"x": torch.ones(2)}, tmp_path / "m2.safetensors")
    assert set(load_state_dict(tmp_path)) == {"a.weight", "b", "c", "x"}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_memory_mapped_no_second_copy(tmp_path):
    def rss_anon_mb():
        return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    save_file({f"w{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, tmp_path / "big.safetensors")
    before = rss_anon_mb()
    sd = load_state_dict(tmp_path / "big.safetensors")
    total = sum(float(t.sum()) for t in sd.values())  # touch every page
    assert total == sum(i * 1024 * 1024 for i in range(16))
    assert rss_anon_mb() - before < 24, "a 64 MB file should be served from the page cache, not copied"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_state_dict(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in _one_line(e)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_suffix_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError) as e:
        load_state_dict(path)
    msg = _one_line(e)
    assert "pickle" in msg and "never loaded" in msg and "safetensors" in msg and str(path) in msg


def test_pickle_content_refused_whatever_the_name(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: called.append(1))
    monkeypatch.setattr(torch, "load", lambda *a, **k: called.append(1))
    zipped = tmp_path / "zip.safetensors"
    torch.save({"w": torch.ones(2)}, zipped)  # zip container
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    for path in (zipped, raw):
        with pytest.raises(ValueError, match="never loaded"):
            load_state_dict(path)
    assert not called


def test_truncated_and_corrupt(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "head.safetensors").write_bytes(data[:20])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("trunc", "head", "junk", "empty"):
        with pytest.raises(ValueError) as e:
            load_state_dict(tmp_path / f"{name}.safetensors")
        assert f"{name}.safetensors" in _one_line(e)


def test_split_components():
    t = {k: torch.tensor([float(i)]) for i, k in enumerate([
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        "model.diffusion_model.pos_embed",
        "first_stage_model.decoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight",
        "text_encoders.t5xxl.logit_scale",
    ])}
    parts = split_components(t)
    assert set(parts["mmdit"]) == {"joint_blocks.0.x_block.attn.qkv.weight", "pos_embed"}
    assert list(parts["vae"]) == ["decoder.conv_in.weight"]
    assert list(parts["clip_l"]) == ["text_model.final_layer_norm.weight"]
    assert list(parts["clip_g"]) == ["text_projection.weight"]
    assert list(parts["t5xxl"]) == ["encoder.final_layer_norm.weight"]
    assert list(parts["other"]) == ["text_encoders.t5xxl.logit_scale"]
    assert parts["clip_g"]["text_projection.weight"] is t["text_encoders.clip_g.transformer.text_projection.weight"]
    assert parts["mmdit"]["pos_embed"].item() == 1.0


# ------------------------------------------------------------------------------------------------ load_mmdit
from s2g.models import MMDiT, load_mmdit  # noqa: E402
from s2g.models.checkpoint import describe_mmdit  # noqa: E402
from s2g.models.mmdit import CONFIGS, MMDiTConfig  # noqa: E402


def spec_original_shapes(depth, D, P, qk_norm, dual=(), C=16, ctx=4096, pooled=2048, p=2, head_dim=64):
    """Meta tensors shaped as the original single-file keys of Stability-AI/sd3.5 `mmditx.py` (independent of
    MMDiT)."""
    s = {"pos_embed": (1, P * P, D), "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
         "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
         "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
         "y_embedder.mlp.0.weight": (D, pooled), "y_embedder.mlp.0.bias": (D,),
         "y_embedder.mlp.2.weight": (D, D), "y_embedder.mlp.2.bias": (D,),
         "context_embedder.weight": (D, ctx), "context_embedder.bias": (D,),
         "final_layer.linear.weight": (p * p * C, D), "final_layer.linear.bias": (p * p * C,),
         "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for n in range(depth):
        for stream in ("context_block", "x_block"):
            pre = f"joint_blocks.{n}.{stream}."
            pre_only = stream == "context_block" and n == depth - 1
            is_dual = stream == "x_block" and n in dual
            attns = ["attn", "attn2"] if is_dual else ["attn"]
            for a in attns:
                s[pre + f"{a}.qkv.weight"], s[pre + f"{a}.qkv.bias"] = (3 * D, D), (3 * D,)
                if qk_norm:
                    s[pre + f"{a}.ln_q.weight"] = s[pre + f"{a}.ln_k.weight"] = (head_dim,)
                if not pre_only:
                    s[pre + f"{a}.proj.weight"], s[pre + f"{a}.proj.bias"] = (D, D), (D,)
            if not pre_only:
                s[pre + "mlp.fc1.weight"], s[pre + "mlp.fc1.bias"] = (4 * D, D), (4 * D,)
                s[pre + "mlp.fc2.weight"], s[pre + "mlp.fc2.bias"] = (D, 4 * D), (D,)
            rows = 2 * D if pre_only else 9 * D if is_dual else 6 * D
            s[pre + "adaLN_modulation.1.weight"], s[pre + "adaLN_modulation.1.bias"] = (rows, D), (rows,)
    return {k: torch.empty(v, device="meta", dtype=torch.bfloat16) for k, v in s.items()}


RELEASED = {  # name: (spec shapes kwargs, original key count, parameters without pos_embed; counted on the
    # released configurations)
    "sd3_medium": (dict(depth=24, D=1536, P=192, qk_norm=False), 491, 2.028e9),
    "sd35_medium": (dict(depth=24, D=1536, P=384, qk_norm=True, dual=range(13)), 665, 2.243e9),
    "sd35_large": (dict(depth=38, D=2432, P=192, qk_norm=True), 923, 8.057e9),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_describe_and_load_released_shapes_on_meta(name):
    kwargs, n_keys, n_params = RELEASED[name]
    sd = spec_original_shapes(**kwargs)
    assert len(sd) == n_keys
    for source in (sd, {f"model.diffusion_model.{k}": v for k, v in sd.items()}):
        info = describe_mmdit(source)
        c = info.config
        assert (info.layout, info.preset) == ("original", name)
        assert (c.depth, c.hidden, c.heads, c.pos_embed_max_size, c.qk_norm) == (
            kwargs["depth"], kwargs["D"], kwargs["D"] // 64, kwargs["P"], kwargs["qk_norm"])
        assert c.dual_attention_blocks == tuple(kwargs.get("dual", ()))
        assert (c.patch, c.in_channels, c.out_channels, c.context_dim, c.pooled_dim, c.mlp_ratio) == (
            2, 16, 16, 4096, 2048, 4.0)
        assert round(info.num_params / 1e9, 3) == n_params / 1e9
        assert f"{n_params / 1e9:.3f}B params" in str(info) and "\n" not in str(info)
    model = load_mmdit(sd)  # meta in, meta out: the full model without allocating a byte
    assert model.config == CONFIGS[name] and model.num_blocks == kwargs["depth"]
    assert model.pos_embed.is_meta and all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("name", list(RELEASED))
def test_describe_diffusers_layout_of_released_configs(name):
    diffusers = pytest.importorskip("diffusers")
    kwargs, _, n_params = RELEASED[name]
    D, depth = kwargs["D"], kwargs["depth"]
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
            num_attention_heads=D // 64, joint_attention_dim=4096, caption_projection_dim=D,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=kwargs["P"],
            dual_attention_layers=tuple(kwargs.get("dual", ())), qk_norm="rms_norm" if kwargs["qk_norm"] else None)
    info = describe_mmdit(ref.state_dict())
    assert (info.layout, info.preset, info.config) == ("diffusers", name, CONFIGS[name])
    assert round(info.num_params / 1e9, 3) == n_params / 1e9


TINY = MMDiTConfig(depth=3, hidden=64, heads=1, in_channels=4, out_channels=4, context_dim=16, pooled_dim=8,
                   pos_embed_max_size=4)


def tiny_state_dict(seed=0):
    torch.manual_seed(seed)
    model = MMDiT(TINY)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_is_zero_copy_and_converts_dtype_on_request():
    sd = tiny_state_dict()
    model = load_mmdit(sd)
    assert model.config == TINY and not model.training
    for k, t in model.state_dict().items():
        assert t.data_ptr() == sd[k].data_ptr(), f"{k} was copied"
    half = load_mmdit({f"model.diffusion_model.{k}": v for k, v in sd.items()}, dtype=torch.bfloat16)
    for k, t in half.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, sd[k].to(torch.bfloat16))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_load_from_file_is_memory_mapped(tmp_path):
    def rss_anon_mb():
        return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    cfg = MMDiTConfig(depth=2, hidden=512, heads=8, in_channels=4, out_channels=4, context_dim=64, pooled_dim=64,
                      pos_embed_max_size=8)
    with torch.device("meta"):
        shapes = MMDiT(cfg).state_dict()
    save_file({k: torch.full(v.shape, 0.01) for k, v in shapes.items()}, tmp_path / "m.safetensors")
    size_mb = (tmp_path / "m.safetensors").stat().st_size / 2**20
    assert size_mb > 40
    before = rss_anon_mb()
    model = load_mmdit(tmp_path / "m.safetensors")
    assert sum(float(p.sum()) for p in model.parameters()) > 0  # touch every page
    assert rss_anon_mb() - before < size_mb / 4


def _error(source, **kwargs):
    with pytest.raises(ValueError) as e:
        load_mmdit(source, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_other_architectures_are_named(tmp_path):
    vae = {"encoder.down.0.block.0.conv1.weight": torch.zeros(2), "decoder.up.0.block.0.conv1.weight": torch.zeros(2)}
    save_file(vae, tmp_path / "vae.safetensors")
    msg = _error(tmp_path / "vae.safetensors")
    assert "vae.safetensors: not an SD3/SD3.5 MMDiT checkpoint (looks like a VAE" in msg
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}
    assert "looks like a UNet" in _error(unet)
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}
    assert "looks like a Flux transformer" in _error(flux)
    assert "unknown architecture" in _error({"foo": torch.zeros(1)})


def test_missing_unexpected_and_misshapen_tensors_are_named():
    sd = tiny_state_dict()
    missing = {k: v for k, v in sd.items() if k != "joint_blocks.1.x_block.mlp.fc2.bias"}
    msg = _error(missing)
    assert "missing 1 tensors: joint_blocks.1.x_block.mlp.fc2.bias" in msg and "unexpected" not in msg
    extra = {**sd, "joint_blocks.0.x_block.attn.ln_q.bias": torch.ones(64), "joint_blocks.2.extra": torch.ones(1)}
    msg = _error(extra)
    assert "unexpected 2 tensors: joint_blocks.0.x_block.attn.ln_q.bias, joint_blocks.2.extra" in msg
    many = {k: v for k, v in sd.items() if ".context_block.mlp." not in k}
    assert "missing 8 tensors: " in _error(many) and "(+3 more)" in _error(many)
    bad = {**sd, "joint_blocks.2.x_block.mlp.fc1.weight": torch.zeros(100, 64)}
    assert "joint_blocks.2.x_block.mlp.fc1.weight has shape [100, 64], expected [256, 64]" in _error(bad)
    no_final = {k: v for k, v in sd.items() if k != "final_layer.linear.weight"}
    assert "missing tensor 'final_layer.linear.weight'" in _error(no_final)
    gap = {k: v for k, v in sd.items() if not k.startswith("joint_blocks.1.")}
    assert "not 0..N-1" in _error(gap)


def test_diffusers_incomplete_qkv_is_reported():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
                                          pos_embed_max_size=4, qk_norm="rms_norm")
    sd = {k: v for k, v in ref.state_dict().items() if k != "transformer_blocks.0.attn.to_k.weight"}
    msg = _error(sd)
    assert "missing 1 tensors: joint_blocks.0.x_block.attn.qkv.weight" in msg
    assert "unexpected 2 tensors: transformer_blocks.0.attn.to_q.weight, transformer_blocks.0.attn.to_v.weight" in msg
    assert "contradicts" in _error(ref.state_dict(), heads=4)


def test_pickle_and_truncated_files_through_load_mmdit(tmp_path):
    torch.save(tiny_state_dict(), tmp_path / "sd3.ckpt")
    assert "pickle checkpoints are never loaded" in _error(tmp_path / "sd3.ckpt")
    save_file(tiny_state_dict(), tmp_path / "sd3.safetensors")
    data = (tmp_path / "sd3.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "cut.safetensors: not a readable safetensors file" in _error(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_mmdit(tmp_path / "gone.safetensors")
