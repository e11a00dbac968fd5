"""Bad input and faults at the entry points (scripts/sample.py, scripts/evaluate.py): each is one line on stderr,
exit code 2, and no run dir left behind. Subprocesses; none of these samples more than a step."""
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


def test_compare_run_dir_is_named_after_its_guiders_and_no_empty_sample_log(tmp_path):
    p = script("sample.py", "compare=[cfg,s2]", "steps=1", "samples_per_prompt=1", "prompt=a red circle",
               "progress=false", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (run,) = (tmp_path / "outputs" / "sample").iterdir()
    assert run.name.endswith("_cfg-s2") and (run / "samples.png").is_file()
    assert not (run / "sample.log").exists()  # nothing logs through Hydra's file handler: no empty file


def test_an_empty_prompt_is_refused_unless_asked_for(tmp_path):
    common = ["steps=1", "samples_per_prompt=1", "progress=false", "guidance=cfg"]
    for prompt in ('prompt=""', 'prompt=[a red circle,"  "]'):
        p = script("sample.py", f"hydra.run.dir={tmp_path / 'bad'}", prompt, *common)
        assert "prompt_unconditional=true" in one_line(p) and not (tmp_path / "bad").exists()
    p = script("sample.py", f"hydra.run.dir={tmp_path / 'ok'}", 'prompt=""', "prompt_unconditional=true", *common)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "ok" / "samples.png").is_file()


def _run(tmp_path, name, items):
    rows = [{"seed": s, "prompt": p, "prompt_index": i, "all": 1.0} for i, (s, p) in enumerate(items)]
    return {"dir": tmp_path / name, "rows": rows, "metrics": {}, "config": {}}


def test_pair_says_how_many_items_it_dropped_and_why(tmp_path, monkeypatch, capsys):
    from s2g.eval import report

    a = _run(tmp_path, "a", [(s, p) for s in (0, 1) for p in ("p1", "p2", "p3")])
    b = _run(tmp_path, "b", [(s, p) for s in (0, 1) for p in ("p1", "p2")])
    for r in (a, b):
        r["dir"].mkdir()
    runs = {"a": a, "b": b}
    monkeypatch.setattr(report, "load_run", lambda d: runs[Path(d).name])
    monkeypatch.setattr(report, "paired", lambda x, y, *args: {"n_pairs": 4})
    report.pair([str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "pair: dropped 2 of A's 6 items and 0 of B's 4" in out
    assert "prompts: A has 1 that B lacks, B has 0 that A lacks" in out and "seeds" not in out.split("\n")[0]
    assert "paired on the 4 they share" in out
    assert report._dropped(a, _run(tmp_path, "same", [(r["seed"], r["prompt"]) for r in a["rows"]])) is None
    swapped = _run(tmp_path, "x", [(0, "p1"), (1, "p2")])
    assert "other combinations" in report._dropped(swapped, _run(tmp_path, "y", [(1, "p1"), (0, "p2")]))
