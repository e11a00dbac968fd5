"""Bad input and faults at the entry points (scripts/sample.py, scripts/evaluate.py): each bad input is one line on
stderr, exit code 2, before any sampling, and no run dir left behind; nothing is overwritten; an interrupted
evaluation (SIGINT, a SIGKILLed torchrun rank) resumes to the results of an uninterrupted one. Mostly subprocesses
on the embedded tiny model at a few steps; the table of rows is tests/README.md."""
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


# ------------------------------------------------------------------------------ bad input, refused before sampling

@pytest.mark.parametrize("name, value", [("sample.py", -1), ("evaluate.py", -1), ("evaluate.py", 0)])
def test_a_batch_size_below_one_is_one_line_before_anything_loads(tmp_path, name, value):
    p = script(name, f"hydra.run.dir={tmp_path / 'run'}", f"batch_size={value}", "progress=false")
    assert one_line(p) == f"error: batch_size must be an integer >= 1, got {value}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["sample.py", "evaluate.py"])
def test_a_guider_parameter_of_the_wrong_type_is_refused_when_the_guider_is_built(tmp_path, name):
    p = script(name, f"hydra.run.dir={tmp_path / 'run'}", "guidance=cfg", "guidance.scale=abc", "progress=false")
    assert one_line(p) == "error: scale='abc': CFG takes a number for scale"
    assert list(tmp_path.iterdir()) == []


def test_guider_arguments_are_checked_by_name_and_type():
    from s2g.guidance import S2Guidance, from_spec

    assert from_spec({"_target_": "s2g.guidance.S2Guidance", "scale": 6, "num_blocks": None}).scale == 6.0
    for spec, message in [({"scael": 6}, r"^scael: S2Guidance has no such parameter; it takes .*drop_ratio"),
                          ({"num_subnetworks": 1.5}, r"^num_subnetworks=1.5: S2Guidance takes an integer"),
                          ({"scale": True}, r"^scale=True: S2Guidance takes a number"),
                          ({"num_blocks": "x"}, r"^num_blocks='x': S2Guidance takes an integer or null")]:
        with pytest.raises(ValueError, match=message):
            from_spec({"_target_": "s2g.guidance.S2Guidance", **spec})
    assert isinstance(from_spec({"_target_": "s2g.guidance.S2Guidance"}, seed=3), S2Guidance)


def test_model_dtype_on_the_tiny_model_is_a_dtype_name():
    import torch
    from hydra import compose, initialize_config_dir

    from s2g.guidance import CFG
    from s2g.tiny import load_tiny

    with initialize_config_dir(str(ROOT / "configs"), version_base=None):  # model.dtype=... without a `+`
        assert compose("config", overrides=["model.dtype=float16"]).model.dtype == "float16"
    torch.set_num_threads(1)
    prompts = ["a red circle", "a blue square left of a green triangle"]
    images = {d: load_tiny(dtype=d)(prompts, CFG(scale=6), steps=3) for d in ("float32", "float16")}
    assert images["float16"].dtype == torch.float32  # the sampler steps in float32 whatever the weights
    diff = (images["float16"] - images["float32"]).abs()  # half precision: the same images, rounded differently
    # a shape's edge pixel can flip either way, by how much depends on the CPU's half kernels (max 0.21 on one 2-core
    # EPYC VM, under 0.15 on another); the mean and the share of changed pixels say "the same images"
    assert 0 < diff.mean() < 0.002 and diff.max() < 0.5 and (diff > 0.01).float().mean() < 0.02
    with pytest.raises(ValueError, match=r"^model\.dtype 'float8' not understood; use one of auto, float32"):
        load_tiny(dtype="float8")  # a ValueError: the entry points' one line


def test_a_prompt_file_with_a_bad_last_line_fails_before_any_image_naming_the_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\na blue square\n# a comment\n\na red circle left of a blue square\n"
                 "a green circle\na red dog\n")
    p = script("evaluate.py", f"hydra.run.dir={tmp_path / 'run'}", f"prompts={f}", "steps=2", "seeds=[0]",
               "batch_size=1", "progress=true")  # a bar, had sampling begun, would be on stderr too
    assert one_line(p) == (f"error: {f}, line 7: unknown word(s) 'dog' in prompt 'a red dog'; the tiny model "
                           f"knows: a and left right of above below red green blue yellow purple white circle "
                           f"square triangle")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_pipe():
    import torch

    from s2g.tiny import load_tiny

    torch.set_num_threads(1)
    return load_tiny()


def test_a_run_too_small_for_fidelity_says_so_and_keeps_adherence(tiny_pipe, capsys):
    from s2g.eval import evaluate, prompt_set, work_items
    from s2g.eval.harness import fidelity_shortfall
    from s2g.guidance import CFG

    assert fidelity_shortfall([0, 1, 0, 1]) is None and fidelity_shortfall([0, 0, 0, 0, 0]) is not None
    kw = dict(steps=1, bootstrap={"n": 20, "fd_n": 5, "pr_halves": 5}, progress=False, scene_metrics=True)
    small = evaluate(tiny_pipe, lambda s: CFG(scale=6), work_items(prompt_set("val", 3), [0]), **kw)["metrics"]
    assert small["fidelity_skipped"] == ("fidelity (Fréchet distance, precision, recall) needs at least 4 samples "
                                         "of at least 2 prompts; this run has 3 of 3")
    assert "fidelity" not in small and small["adherence"]["overall"]["all"]["n"] == 3
    assert "metrics.json gets adherence only" in capsys.readouterr().out  # said before sampling
    four = evaluate(tiny_pipe, lambda s: CFG(scale=6), work_items(prompt_set("val", 4), [0]), **kw)["metrics"]
    f = four["fidelity"]  # 4 prompts: a half of 2 samples has no 3rd neighbour, so P / R come without interval
    assert f["n_generated"] == 4 and "precision_interval" not in f and 0 <= f["precision"] <= 1


def test_padding_is_bounded_by_the_run_and_images_do_not_depend_on_it(tiny_pipe):
    import torch

    from s2g.eval import prompt_set, work_items
    from s2g.eval.harness import call_rows, generate
    from s2g.guidance import S2Guidance

    items = work_items(prompt_set("val", 8), [0, 1])
    assert call_rows(items, 4096) == 8 and call_rows(items, 3) == 3 and call_rows(items[:3], 4096) == 3
    calls = []
    real_call = type(tiny_pipe).__call__

    def counting(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real_call(self, prompts, *args, **kwargs)

    make = lambda seed: S2Guidance(scale=4, omega=1.0, seed=seed)  # noqa: E731 - masks follow the seed
    kw = dict(steps=2, shift=3.0, sampler="euler", progress=False)
    type(tiny_pipe).__call__ = counting
    try:
        wide, _, _ = generate(tiny_pipe, make, items, batch_size=4096, rows=call_rows(items, 4096), **kw)
    finally:
        type(tiny_pipe).__call__ = real_call
    assert calls == [8, 8]  # one call per seed, no row beyond the 8 prompts
    narrow, _, _ = generate(tiny_pipe, make, items, batch_size=4, rows=call_rows(items, 4), **kw)
    assert torch.equal(wide, narrow)


def test_a_batch_that_would_not_fit_in_memory_is_refused_with_an_estimate(tiny_pipe):
    from s2g.eval.run import call_memory, check_call_memory

    one = call_memory(tiny_pipe, 1, 1)  # 64 tokens x (6 x 96 + 2 x 384) values, in float32
    assert one == 64 * (6 * 96 + 2 * 384) * 4 and call_memory(tiny_pipe, 10, 3) == 30 * one
    check_call_memory(tiny_pipe, 1000, 3, 4096, available=3000 * one)  # fits: nothing said
    with pytest.raises(ValueError, match=r"^batch_size=4096: a sampling call of 1000 rows x 3 passes needs about "
                                         r"1\.0 GiB of activations \(a rough estimate from the model config\), "
                                         r"more than the 0\.3 GiB available; use batch_size=333 or less$"):
        check_call_memory(tiny_pipe, 1000, 3, 4096, available=1000 * one)


# ----------------------------------------------------------------------------- interrupted, resumed, never overwritten

RESUMABLE = ["prompts=val", "num_prompts=6", "seeds=[0,1]", "steps=6", "batch_size=2", "bootstrap.n=100",
             "bootstrap.fd_n=10", "bootstrap.pr_halves=10", "guidance=s2", "progress=false"]


def _env():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0",
            "PYTHONPATH": path}


def _start(run_dir, torchrun: int = 0):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.Popen([*launch, str(ROOT / "scripts" / "evaluate.py"), *RESUMABLE, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint():
    """In the child, before exec: SIGINT back to its default. A shell that starts a job in the background (`.ci/run
    &`) makes it ignore SIGINT, an ignored signal stays ignored across exec, and Python then installs no
    KeyboardInterrupt handler: Ctrl-C would do nothing, and the interrupt test would see a run that finished."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _first_batch(run_dir, proc, timeout=120):
    import time

    t0 = time.time()
    while not list((Path(run_dir) / "partial").glob("*.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def _results(run_dir):
    import csv
    import json

    from safetensors.torch import load_file

    with open(run_dir / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    m = json.loads((run_dir / "metrics.json").read_text())
    return rows, load_file(str(run_dir / "features.safetensors")), {k: m[k] for k in ("adherence", "fidelity")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sweep") / "0_reference"
    p = _start(run_dir)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return run_dir


def _assert_same(run_dir, reference):
    import torch

    rows, feats, metrics = _results(run_dir)
    rows0, feats0, metrics0 = _results(reference)
    assert rows == rows0 and len(rows) == 12 and metrics == metrics0
    assert torch.equal(feats["features"], feats0["features"]) and torch.equal(feats["index"], feats0["index"])
    assert not (run_dir / "partial").exists()  # the finished run's own files hold everything


def test_sigint_says_where_it_stopped_and_the_same_command_resumes_to_equal_results(uninterrupted):
    import shlex
    import signal

    run_dir = uninterrupted.parent / "1_resumed"
    p = _start(run_dir)
    _first_batch(run_dir, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 130 and len(lines) == 1 and "Traceback" not in err, (p.returncode, err)
    (line,) = lines
    done, total = line.split("interrupted: ")[1].split(" items")[0].split(" of ")
    assert 1 <= int(done) < int(total) == 12 and f"saved in {run_dir / 'partial'}" in line
    command = shlex.split(line.split("to resume, run: ")[1])  # quoted for a shell: seeds=[0,1] as one word
    assert command[:2] == ["python", "scripts/evaluate.py"] and f"hydra.run.dir={run_dir}" in command

    from omegaconf import OmegaConf

    from s2g.eval.run import open_run_dir

    saved = (run_dir / "partial" / "config.yaml").read_text()
    other = OmegaConf.create(saved)
    other.guidance.scale, other.progress = 4, True  # progress changes no result: not compared
    files = sorted(run_dir.rglob("*"))
    with pytest.raises(ValueError, match=rf"^{run_dir} holds an interrupted run with other settings: guidance\.scale "
                                         rf"was 6, this command has 4; resume it with its own settings"):
        open_run_dir(run_dir, OmegaConf.to_yaml(other))  # what evaluate.py calls before the model loads
    assert sorted(run_dir.rglob("*")) == files and (run_dir / "partial" / "config.yaml").read_text() == saved
    again = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} of 12 items already finished" in again.stdout
    _assert_same(run_dir, uninterrupted)


def test_a_sigkilled_rank_stops_its_peer_and_two_ranks_resume_to_the_one_process_results(uninterrupted):
    import signal
    import time

    run_dir = uninterrupted.parent / "2_two_ranks"
    p = _start(run_dir, torchrun=2)
    _first_batch(run_dir, p)
    workers = []
    for child in Path("/proc").iterdir():  # the agent's workers: RANK=1 in their environment
        try:
            env = (child / "environ").read_bytes().split(b"\0")
            parent = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == p.pid and b"RANK=1" in env:
            workers.append(int(child.name))
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.time()
    p.communicate(timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 60  # the peer does not wait for a rank that is gone
    assert list((run_dir / "partial").glob("*.safetensors"))  # what finished is kept
    again = _start(run_dir, torchrun=2)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "resuming:" in out
    _assert_same(run_dir, uninterrupted)


def test_gather_with_a_baseline_writes_beside_an_existing_summary(uninterrupted):
    from s2g.eval.report import gather

    sweep = uninterrupted.parent
    if not (sweep / "1_resumed" / "metrics.json").is_file():
        pytest.skip("needs the resumed run of the SIGINT test")
    gather(sweep)
    before = (sweep / "summary.md").read_bytes()
    gather(sweep, baseline="0_reference")
    assert (sweep / "summary.md").read_bytes() == before
    table = (sweep / "summary_vs_0_reference.md").read_text()
    assert "Δ all" in table and "+0.000 [+0.000, +0.000]" in table  # the resumed run equals its reference
    with pytest.raises(FileExistsError, match="already holds summary_vs_0_reference.csv, summary_vs_0_reference.md"):
        gather(sweep, baseline="0_reference")
    with pytest.raises(FileExistsError, match=r"summary.csv, summary.md, summary.png; .*\(gather with baseline"):
        gather(sweep)


def test_save_images_into_a_dir_with_images_overwrites_none(tmp_path):
    images = tmp_path / "run" / "images"
    images.mkdir(parents=True)
    (images / "seed0_00001.png").write_bytes(b"an earlier run's image")
    p = script("evaluate.py", f"hydra.run.dir={tmp_path / 'run'}", "prompts=val", "num_prompts=2", "seeds=[0]",
               "steps=1", "save_images=true", "progress=false")
    assert one_line(p) == (f"error: {images / 'seed0_00001.png'} exists; outputs are never overwritten (choose "
                           f"another run dir)")
    assert (images / "seed0_00001.png").read_bytes() == b"an earlier run's image"
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["images", "seed0_00001.png"]


def test_sample_into_the_dir_of_an_earlier_run_keeps_its_hydra_files(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"the first run's {name}\n")
    p = script("sample.py", f"hydra.run.dir={run}", "steps=1", "output=other.png", "progress=false")
    assert one_line(p) == (f"error: {run} already holds a run (.hydra/); outputs are never overwritten (choose "
                           f"another hydra.run.dir)")
    assert [(run / ".hydra" / n).read_text() for n in ("config.yaml", "overrides.yaml")] == \
        ["the first run's config.yaml\n", "the first run's overrides.yaml\n"]
    assert sorted(p.name for p in run.rglob("*")) == [".hydra", "config.yaml", "overrides.yaml"]
