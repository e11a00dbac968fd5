"""Regional compilation (`MMDiT.compile()`): S²'s fresh masks and changing row counts cause only a bounded
number of compiles, and the compiled model samples what the eager one does."""
import pytest
import torch

import s2g.guidance as G
from s2g.models.mmdit import MMDiT, MMDiTConfig
from s2g.sampling import sample, uniform_sigmas

dynamo = pytest.importorskip("torch._dynamo")


def _model(seed=0):
    torch.manual_seed(seed)
    model = MMDiT(MMDiTConfig(depth=6, hidden=32, heads=2, patch=2, in_channels=4, out_channels=4, context_dim=8,
                              pooled_dim=8, pos_embed_max_size=8, qk_norm=True, dual_attention_blocks=(1,))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    cond = {"context": torch.randn(2, 5, 8, generator=g), "pooled": torch.randn(2, 8, generator=g)}
    return torch.randn(2, 4, 8, 8, generator=g), cond, {k: torch.zeros_like(v) for k, v in cond.items()}


def _run(model, guider):
    x, cond, uncond = _inputs()
    return sample(model, x, uniform_sigmas(10), guider, cond, uncond, progress=False)


def _s2(seed=0, n=1):
    return G.S2Guidance(scale=3.0, omega=0.5, num_subnetworks=n, drop_ratio=0.34, interval=(0.15, 0.85), seed=seed)


def test_regional_compile_recompiles_a_bounded_number_of_times():
    # Dynamo's compile count does not depend on the backend: "eager" keeps this test fast (inductor: test below).
    eager_model, model = _model(), _model()
    model.compile(backend="eager")
    dynamo.reset()
    counters = dynamo.utils.counters
    counters.clear()
    out = _run(model, _s2(seed=0))
    graphs = counters["stats"]["unique_graphs"]
    # 8 compiled kinds (3 embedders + context embedder, final layer, plain / dual / last joint block), each at
    # most once static and once with a dynamic batch; every block of a kind shares its code.
    assert 8 <= graphs <= 16, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, _run(eager_model, _s2(seed=0)), rtol=1e-5, atol=1e-5)
    # Other masks and more rows (naive S², 2 + 3 slabs) reuse what is compiled: no recompile.
    _run(model, _s2(seed=7))
    _run(model, _s2(seed=3, n=3))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow  # inductor compiles C++ for ~10 graphs: about a minute and a half on a 2-core CPU
def test_inductor_compiled_sampling_equals_eager():
    eager_model, model = _model(), _model()
    model.compile()
    torch.testing.assert_close(_run(model, _s2()), _run(eager_model, _s2()), rtol=1e-4, atol=1e-4)
