"""One batched sweep per network per step (s2g/models/sweep.py): cond, uncond and sub-network rows travel
together and equal separate passes; the cost counters count what really runs."""
import pytest
import torch

import s2g.guidance as G
from s2g.guidance.base import Step
from s2g.models.mmdit import MMDiT, MMDiTConfig
from s2g.models.sweep import block_rows
from s2g.pipeline import XPrediction
from s2g.sampling import GuidedDenoiser, sample, uniform_sigmas
from s2g_toy.model import ToyMLP

DEPTH = 8


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the training inits zero the adaLN / fc2: make every block matter
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _mmdit(depth=DEPTH, seed=0):
    return _randomise(MMDiT(MMDiTConfig(depth=depth, hidden=32, heads=2, patch=2, in_channels=4, out_channels=4,
                                        context_dim=8, pooled_dim=8, pos_embed_max_size=8, qk_norm=True,
                                        dual_attention_blocks=(1,))), seed)


def _mmdit_inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 6, 4, generator=g)
    cond = {"context": torch.randn(B, 5, 8, generator=g), "pooled": torch.randn(B, 8, generator=g)}
    uncond = {"context": torch.zeros(B, 5, 8), "pooled": torch.zeros(B, 8)}
    return x, cond, uncond


def _toy():
    return _randomise(ToyMLP(dim=2, num_classes=3, width=16, num_blocks=DEPTH, mlp_ratio=2))


def _toy_inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, generator=g), {"label": torch.tensor([0, 1, 2])}, {"label": torch.full((B,), 3)}


MODELS = {"mmdit": (_mmdit, _mmdit_inputs), "toy": (_toy, _toy_inputs)}


def _block_batches(model):
    """Hooks recording (block index, rows) of every block call."""
    calls = []
    hooks = [b.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, args[0].shape[0])))
             for i, b in enumerate(model.blocks)]
    return calls, hooks


def _stack(x, sig, conds):
    return torch.cat([x] * len(conds)), torch.cat([sig] * len(conds)), {
        k: torch.cat([c[k] for c in conds]) for k in conds[0]}


@pytest.mark.parametrize("kind", ["mmdit", "toy"])
@pytest.mark.parametrize("with_cfg_rows", [True, False])
@pytest.mark.parametrize("dropped", [{1, 4}, {5, 6}, {DEPTH - 1}, {1}])  # first skipped early, late, the last
def test_one_sweep_equals_separate_passes(kind, with_cfg_rows, dropped):
    make, make_inputs = MODELS[kind]
    model = make()
    x, cond, uncond = make_inputs()
    B = x.shape[0]
    sig = torch.linspace(0.3, 0.8, B)
    conds = [cond, uncond] if with_cfg_rows else [cond]
    variants = [(0, frozenset()), (0, frozenset(dropped)), (0, frozenset({2, DEPTH - 1}))]
    if with_cfg_rows:
        variants.insert(1, (1, frozenset()))
    xs, sigs, stacked = _stack(x, sig, conds)
    calls, hooks = _block_batches(model)
    with torch.no_grad():
        outs = model.forward_shared(xs, sigs, skips=[s for _, s in variants], inputs=[k for k, _ in variants],
                                    **stacked)
        sweep_calls = list(calls)
        calls.clear()
        separate = [model(x, sig, skip=s, **conds[k]) for k, s in variants]
    for h in hooks:
        h.remove()
    for (k, s), a, b in zip(variants, outs, separate):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"input {k} skip {set(s)}")
    assert (outs[0] - outs[-1]).abs().max() > 1e-2  # skipping blocks changes the output: the test can fail
    # One batched call per block: every row running block i goes through it together.
    assert [i for i, _ in sweep_calls] == list(range(DEPTH))
    skips, inputs = [s for _, s in variants], [k for k, _ in variants]
    assert sum(r for _, r in sweep_calls) == block_rows(skips, inputs, B, DEPTH)
    assert sweep_calls[0] == (0, B * len(conds))  # before any fork: one slab per input
    full = B * sum(DEPTH - len(s) for s in skips)
    assert sum(r for _, r in sweep_calls) < full


def test_no_variants_no_outputs():
    x, cond, _ = _mmdit_inputs()
    with torch.no_grad():
        assert _mmdit().forward_shared(x, torch.full((2,), 0.5), skips=[], **cond) == []


def test_block_rows_counts_the_shared_prefix_at_sd3_shape():
    # 24 blocks, S² rows cond + uncond + one sub-network dropping {3, 10}: 48 + blocks 4..23 except 10 = 19.
    assert block_rows([frozenset(), frozenset(), frozenset({3, 10})], [0, 1, 0], 1, 24) == 48 + 19
    assert block_rows([frozenset(), frozenset({23})], [0, 0], 2, 24) == 2 * 24  # last block dropped: free
    assert block_rows([frozenset({5}), frozenset({5})], [0, 1], 1, 24) == 2 * 23  # same skip, two inputs


@pytest.mark.parametrize("kind", ["mmdit", "toy"])
def test_guided_denoiser_runs_a_step_as_one_sweep(kind):
    make, make_inputs = MODELS[kind]
    model = make()
    x, cond, uncond = make_inputs()
    B = x.shape[0]
    s2 = G.S2Guidance(scale=3.0, omega=0.7, num_subnetworks=3, drop_ratio=0.25, interval=(0.2, 0.8), seed=3)
    s2.reset(model.num_blocks)
    calls, hooks = _block_batches(model)
    est, counters = {}, {}
    for share in (True, False):
        s2.reset()
        guided = GuidedDenoiser(model, s2, cond, uncond, share_prefix=share)
        with torch.no_grad():
            est[share] = guided(x, Step(3, 10, 0.5, 0.4))
        counters[share] = (guided.calls, guided.nfe, guided.block_rows, sum(r for _, r in calls))
        calls.clear()
    for h in hooks:
        h.remove()
    torch.testing.assert_close(est[True].x0, est[False].x0, rtol=1e-4, atol=1e-4)
    s2.reset()
    masks = [p.skip for p in s2.passes(Step(3, 10, 0.5, 0.4))[2:]]
    calls_, nfe, rows, hooked = counters[True]
    assert calls_ == 1 and nfe == 2 + len(set(masks)) and rows == hooked
    assert rows == block_rows([frozenset(), frozenset(), *masks], [0, 1, 0, 0, 0], B, DEPTH)
    calls_, nfe, rows_sep, hooked = counters[False]
    assert calls_ == 1 + len(set(masks)) and rows_sep == hooked == B * (2 * DEPTH + sum(DEPTH - 2 for _ in set(masks)))
    assert rows < rows_sep


def test_cfg_cost_and_s2_with_omega_zero_costs_exactly_cfg():
    model = _mmdit()
    x, cond, uncond = _mmdit_inputs()
    counts = {}
    for name, guider in {"cfg": G.CFG(3.0), "s2_w0": G.S2Guidance(3.0, omega=0.0, interval=(0, 1))}.items():
        guider.reset(model.num_blocks)
        guided = GuidedDenoiser(model, guider, cond, uncond)
        with torch.no_grad():
            for i, s in enumerate([0.9, 0.6, 0.3]):
                guided(x, Step(i, 3, s, s - 0.3))
        counts[name] = (guided.calls, guided.nfe, guided.block_rows)
    assert counts["cfg"] == counts["s2_w0"] == (3, 6, 3 * 2 * x.shape[0] * DEPTH)


def test_xprediction_sweep_maps_each_row_to_its_own_input():
    net = _mmdit()
    wrapped = XPrediction(net)
    x, cond, uncond = _mmdit_inputs()
    sig = torch.tensor([0.3, 0.8])
    xs, sigs, stacked = _stack(x, sig, [cond, uncond])
    skips, inputs = [frozenset(), frozenset(), frozenset({3})], [0, 1, 0]
    with torch.no_grad():
        outs = wrapped.forward_shared(xs, sigs, skips=skips, inputs=inputs, **stacked)
        for (k, s), v in zip(zip(inputs, skips), outs):
            torch.testing.assert_close(v, wrapped(x, sig, skip=s, **[cond, uncond][k]), rtol=1e-5, atol=1e-5)


def test_autoguidance_weak_network_and_sampling_through_the_sweep():
    model, weak = _mmdit(seed=0), _mmdit(depth=4, seed=5)
    x, cond, uncond = _mmdit_inputs()
    ag = G.AutoGuidance(2.0, weak=weak)
    guided = GuidedDenoiser(model, ag, cond, uncond)
    sig = torch.full((2,), 0.5)
    with torch.no_grad():
        est = guided(x, Step(0, 1, 0.5, 0.0))
        vc, vw = model(x, sig, **cond), weak(x, sig, **cond)
    torch.testing.assert_close(est.x0, x - 0.5 * (vw + 2.0 * (vc - vw)), rtol=1e-5, atol=1e-5)
    assert (guided.calls, guided.nfe, guided.block_rows, guided.other_block_rows) == (2, 2, 2 * DEPTH, 2 * 4)
    # A whole S² run: the sweep and separate passes sample the same image (float rounding, amplified by λ).
    s2 = G.S2Guidance(scale=3.0, omega=0.5, drop_ratio=0.25, interval=(0.2, 0.8), seed=1)
    runs = {share: sample(model, x, uniform_sigmas(6), s2, cond, uncond, progress=False, share_prefix=share)
            for share in (True, False)}
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-4, atol=1e-4)


def test_benchmark_counts_the_sd3_medium_work_without_running_it(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "work.json"
    assert bench.main(["--mode", "guidance", "--count-only", "--preset", "sd3_medium", "--batch", "1",
                       "--resolution", "64", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["guiders"]
    # 28 steps, 23 of them (2-24) in the central 80% of the steps; CFG 2 x 24 block-rows a step; a separate
    # sub-network pass 22 more.
    assert rows["cfg"]["work_per_image"] == 28 * 48 and rows["cfg"]["nfe_per_image"] == 56
    assert rows["s2_separate_passes"]["work_per_image"] == 28 * 48 + 23 * 22
    assert result["expected_s2_work_ratio"] == pytest.approx(1 + 23 * 14 / (28 * 48))  # E[first dropped] = 8
    assert rows["s2"]["work_ratio"] <= 1.25 and rows["s2"]["nfe_per_image"] == 79


@pytest.mark.parametrize("name", ["mmdit", "toy"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_s2_with_per_row_masks_equals_its_rows_sampled_one_by_one(name, share_prefix):
    """Each row keyed by its own seed draws its own masks: a batch equals its rows sampled alone (the sweep with
    one-row variants, or one call per distinct mask), and the rows do get different masks."""
    make, inputs = MODELS[name]
    model = make()
    x, cond, uncond = inputs(B=3)
    keys = [101, 202, 303]
    guider = G.S2Guidance(scale=3.0, omega=1.0, drop_ratio=0.25, seed=5)
    sigmas = uniform_sigmas(6)
    batch = sample(model, x, sigmas, guider, cond, uncond, progress=False, share_prefix=share_prefix, rows=keys)
    for b, key in enumerate(keys):
        one = sample(model, x[b:b + 1], sigmas, guider, {k: v[b:b + 1] for k, v in cond.items()},
                     {k: v[b:b + 1] for k, v in uncond.items()}, progress=False, share_prefix=share_prefix,
                     rows=[key])
        torch.testing.assert_close(batch[b:b + 1], one, rtol=1e-4, atol=1e-5)
    guider.reset(DEPTH, rows=keys)
    masks = [guider.sample_mask() for _ in range(4)]
    assert any(len(set(m)) > 1 for m in masks)  # the rows' masks differ (else this test proves nothing)


def test_per_row_masks_add_no_block_calls():
    """Rows with different masks still share each block's batch: one call per block (plus perturbed forks)."""
    model = _mmdit()
    x, cond, uncond = _mmdit_inputs(B=2)
    guided = GuidedDenoiser(model, G.CFG(2.0), cond, uncond)
    masks = (frozenset({3}), frozenset({5}))
    calls, hooks = _block_batches(model)
    out = guided.run(x, 0.5, [G.base.COND, G.base.UNCOND, G.base.Pass(cond=True, skip=masks)])
    for h in hooks:
        h.remove()
    assert len(calls) == DEPTH  # every block ran as one batched call
    # 2 cond + 2 uncond rows; each sub-network row rides with its cond row until its dropped block (3 or 5) and
    # runs as its own row from the next block on
    assert [rows for _, rows in calls] == [4, 4, 4, 4, 5, 5, 6, 6]
    sep = [model(x[b:b + 1], torch.full((1,), 0.5), context=cond["context"][b:b + 1],
                 pooled=cond["pooled"][b:b + 1], skip=masks[b]) for b in range(2)]
    torch.testing.assert_close(out[2], torch.cat(sep), rtol=1e-4, atol=1e-5)
