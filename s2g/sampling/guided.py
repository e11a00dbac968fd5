"""The guided denoiser: asks the guider which predictions a step needs, runs them in as few network calls as it
can, and hands the velocities back to the guider. It knows no guider by name."""
from __future__ import annotations

import torch
from torch import Tensor

from ..guidance.base import Estimate, Guider, Pass, Step


def _concat(conds: list[dict]) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def _stackable(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape[1:] == b[k].shape[1:] for k in a)


class GuidedDenoiser:
    """`guided(x, step) -> Estimate` for one sampling run.

    cond / uncond: dicts of batched conditioning tensors passed to the denoiser as keyword arguments
    (e.g. context=, pooled= for the MMDiT; label= for the toy MLP).
    """

    def __init__(self, denoiser, guider: Guider, cond: dict, uncond: dict | None = None, share_prefix: bool = True):
        self.denoiser, self.guider, self.cond, self.uncond = denoiser, guider, cond, uncond
        self.share_prefix = share_prefix
        self.calls = 0  # network calls made, for benchmarks and tests of the batching

    def _call(self, denoiser, x: Tensor, sigma: Tensor, skip: frozenset, cond: dict) -> Tensor:
        self.calls += 1
        kwargs = dict(cond)
        if skip:
            kwargs["skip"] = skip
        return denoiser(x, sigma, **kwargs).to(x.dtype)

    def run(self, x: Tensor, sigma: float, passes: list[Pass]) -> list[Tensor]:
        """Velocities for `passes` (same order). Identical passes run once; a conditional and an unconditional
        pass through the same network with the same skipped blocks share one batched call."""
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        groups: dict[tuple, set] = {}
        for p in passes:
            groups.setdefault((p.denoiser, p.skip), set()).add(p.cond)
        if any(not p.cond for p in passes) and self.uncond is None:
            raise ValueError(f"{type(self.guider).__name__} needs an unconditional input but none was given")
        results: dict[Pass, Tensor] = {}
        self._run_shared(x, sig, groups, results)
        for (net, skip), conds in groups.items():
            net_fn = self.denoiser if net is None else net
            if conds == {True, False} and _stackable(self.cond, self.uncond):
                both = self._call(net_fn, torch.cat([x, x]), torch.cat([sig, sig]), skip,
                                  _concat([self.cond, self.uncond]))
                v_c, v_u = both.chunk(2)
                results[Pass(True, skip, net)], results[Pass(False, skip, net)] = v_c, v_u
            else:
                for c in sorted(conds, reverse=True):
                    results[Pass(c, skip, net)] = self._call(net_fn, x, sig, skip, self.cond if c else self.uncond)
        return [results[p] for p in passes]

    def _run_shared(self, x: Tensor, sig: Tensor, groups: dict, results: dict) -> None:
        """Conditional passes that differ only in skipped blocks (S² sub-networks, SLG) share every block before
        the first one they disagree on, when the network offers `forward_shared`. The handled conditional
        requests are removed from `groups`; an unconditional pass then runs on its own."""
        by_net: dict = {}
        for (net, skip), conds in groups.items():
            if True in conds:
                by_net.setdefault(net, []).append(skip)
        for net, skips in by_net.items():
            net_fn = self.denoiser if net is None else net
            if not (self.share_prefix and hasattr(net_fn, "forward_shared") and any(skips)):
                continue
            self.calls += 1
            outs = net_fn.forward_shared(x, sig, skips=skips, **self.cond)
            for skip, v in zip(skips, outs):
                results[Pass(True, skip, net)] = v.to(x.dtype)
                groups[(net, skip)].discard(True)
        for key in [k for k, conds in groups.items() if not conds]:
            del groups[key]

    def __call__(self, x: Tensor, step: Step) -> Estimate:
        passes = self.guider.passes(step)
        velocities = self.run(x, step.sigma, passes)
        for p, v in zip(passes, velocities):
            if not torch.isfinite(v).all():
                raise FloatingPointError(f"non-finite prediction at step {step.index} (σ={step.sigma:.4f}) "
                                         f"in pass {p}")
        return self.guider.combine(x, step, passes, velocities)
