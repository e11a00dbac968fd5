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
