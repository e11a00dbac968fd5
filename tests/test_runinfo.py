"""What the Hydra entry points share: building a model from its config group (s2g/config.py), the revision and
regional compilation (s2g/runinfo.py)."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from s2g.config import build_model
from s2g.runinfo import compile_regions, git_revision

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("compile_", [False, True])
def test_build_model_returns_script_keys_and_compiles_blocks_on_request(compile_):
    cfg = OmegaConf.load(ROOT / "configs" / "model" / "tiny.yaml")
    cfg.compile = compile_
    pipe, extras = build_model(cfg)
    assert extras["default_prompts"][0] == "a red circle" and extras["grid"]["samples_per_prompt"] == 4
    for denoiser in (pipe.denoiser, pipe.weak):  # XPrediction around an MMDiT, the weak model too
        blocks = denoiser.net.joint_blocks
        assert all((b._compiled_call_impl is not None) == compile_ for b in blocks)


def test_compile_needs_an_mmdit_and_revision_is_named():
    with pytest.raises(ValueError, match="no MMDiT inside"):
        compile_regions(object())
    assert git_revision() == "unknown" or len(git_revision()) >= 40


def test_named_embedded_checkpoint_resolves_to_assets():
    """model=tiny_early inherits tiny.yaml and names its file as embedded:<name> (s2g/assets/<name>.safetensors)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("evaluate", overrides=["model=tiny_early"])
    assert cfg.model.checkpoint == "embedded:tiny_early" and cfg.model.weak_checkpoint is None
    assert cfg.model.grid.samples_per_prompt == 4  # the rest comes from tiny.yaml
    pipe, _ = build_model(cfg.model)
    assert pipe.weak is None and tuple(pipe.latent_shape) == (3, 32, 32)
    cfg.model.checkpoint = "embedded:no_such_asset"
    from hydra.errors import InstantiationException

    with pytest.raises((FileNotFoundError, InstantiationException), match="no_such_asset.safetensors"):
        build_model(cfg.model)


def test_guidance_defaults_of_the_model_apply_unless_the_command_line_sets_the_key():
    from s2g.config import apply_guidance_defaults

    model = OmegaConf.create({"guidance_defaults": {"s2": {"scale": 4.0, "omega": 1.0}}})
    g = OmegaConf.create({"scale": 7.5, "omega": 0.25, "drop_ratio": 0.1})
    assert apply_guidance_defaults(model, "s2", g, ["guidance.omega=0.5", "seed=3"]) == {"scale": 4.0}
    assert g.scale == 4.0 and g.omega == 0.25 and g.drop_ratio == 0.1  # omega is the command line's (set later)
    assert apply_guidance_defaults(model, "cfg", g, []) == {}  # no defaults for that guider: untouched
    assert apply_guidance_defaults(OmegaConf.create({}), "s2", g, []) == {}  # SD3 configs have none
