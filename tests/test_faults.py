"""Bad input and faults at the entry points (scripts/sample.py, scripts/evaluate.py): each is one line on stderr,
exit code 2, and no run dir left behind (issue 22). Subprocesses; none of these samples more than a step."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script(name, *args, cwd=ROOT):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # also without `pip -e`
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def one_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr)
    return lines[0]


@pytest.mark.parametrize("name", ["sample.py", "evaluate.py"])
@pytest.mark.parametrize("args, group, value", [
    (["guidance=s3"], "guidance", "s3"),
    (["sampler=foo"], "sampler", "foo"),
    (["model=bar"], "model", "bar"),
    (["-m", "guidance=cfg,nope"], "guidance", "nope"),  # a multirun sweep: every value is checked
])
def test_unknown_group_option_is_one_line_with_the_options_and_no_run_dir(tmp_path, name, args, group, value):
    p = script(name, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args)
    line = one_line(p)
    options = sorted(f.stem for f in (ROOT / "configs" / group).glob("*.yaml"))
    assert line.startswith(f"error: {group}={value}: no such config") and f"available: {', '.join(options)}" in line
    assert list(tmp_path.iterdir()) == []  # refused before Hydra made a run dir


def test_known_group_options_still_compose(tmp_path):
    p = script("sample.py", "guidance=cfg", "sampler=heun", "model=tiny", "+logger@extra=none", "--cfg", "job")
    assert p.returncode == 0, p.stderr
    assert "scale:" in p.stdout


@pytest.mark.parametrize("name", ["sample.py", "evaluate.py"])
def test_a_mandatory_model_key_left_unset_is_one_line_naming_it(tmp_path, name):
    p = script(name, f"hydra.run.dir={tmp_path / 'run'}", "model=sd3_medium", "progress=false")
    line = one_line(p)
    assert line.startswith("error: model.checkpoint: not set") and "model.clip_vocab" in line
    assert list(tmp_path.iterdir()) == []  # no junk run dir (.hydra/, an empty sample.log)
    p = script(name, f"hydra.run.dir={tmp_path / 'run'}", "model=sd3_medium", "model.checkpoint=/none.safetensors",
               "model.clip_merges=/none.txt", "progress=false")
    assert one_line(p).startswith("error: model.clip_vocab: not set")


def test_check_mandatory_names_nested_keys_in_order():
    from omegaconf import OmegaConf

    from s2g.config import check_mandatory

    check_mandatory(OmegaConf.create({"a": 1, "b": None, "c": {"d": "x"}}), "model")  # nothing missing
    cfg = OmegaConf.create({"a": 1, "b": {"c": "???", "d": None}, "e": "???"})
    with pytest.raises(ValueError, match=r"^model\.b\.c: not set; .*\(also not set: model\.e\)$"):
        check_mandatory(cfg, "model")
