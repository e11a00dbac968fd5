"""The guided denoiser: asks the guider which predictions a step needs, runs them in as few network calls as it
can, and hands the velocities back to the guider. It knows no guider by name."""
from __future__ import annotations

import torch
from torch import Tensor

from ..guidance.base import Estimate, Guider, Pass, Step
from ..models.sweep import block_rows


def _concat(conds: list[dict]) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def _stackable(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape[1:] == b[k].shape[1:] for k in a)


def _innermost(net):
    """Through wrappers that keep the network as `.net` (XPrediction, OnDevice) to the first that says what
    perturbations it can do."""
    while not hasattr(net, "perturbations") and hasattr(net, "net"):
        net = net.net
    return net


def _perturbations(net) -> tuple:
    return tuple(getattr(_innermost(net), "perturbations", ("skip",)))


def _per_row(p: Pass, rows: int) -> bool:
    """Whether the pass skips a different block set in each row (a tuple of `rows` frozensets)."""
    if not isinstance(p.skip, tuple):
        return False
    if len(p.skip) != rows:
        raise ValueError(f"a pass has skip sets for {len(p.skip)} rows in a batch of {rows}")
    return True


def _row_plans(p: Pass, rows: int) -> list:
    """Each row's plan (what the denoiser's `skip=` gets for that row alone)."""
    if not _per_row(p, rows):
        return [p.plan] * rows
    return [Pass(p.cond, skip, p.denoiser, p.perturb).plan for skip in p.skip]


class GuidedDenoiser:
    """`guided(x, step) -> Estimate` for one sampling run.

    cond / uncond: dicts of batched conditioning tensors passed to the denoiser as keyword arguments
    (e.g. context=, pooled= for the MMDiT; label= for the toy MLP).

    Cost counters (for benchmarks and tests): `calls` network calls; `nfe` predictions per image (CFG: 2 per
    step); `block_rows` block evaluations of the main denoiser summed over the batch's rows (per image: divide by
    the batch size); `other_block_rows` the same for other networks (Autoguidance's weak model, whose blocks
    cost differently).
    """

    def __init__(self, denoiser, guider: Guider, cond: dict, uncond: dict | None = None, share_prefix: bool = True):
        self.denoiser, self.guider, self.cond, self.uncond = denoiser, guider, cond, uncond
        missing = sorted(set(guider.perturbations()) - set(_perturbations(denoiser)))
        if missing:  # before the first step, not at the first step that perturbs
            raise ValueError(f"{type(guider).__name__} needs {', '.join(missing)}, which "
                             f"{type(_innermost(denoiser)).__name__} cannot do (it can do: "
                             f"{', '.join(_perturbations(denoiser))})")
        self.share_prefix = share_prefix
        self.calls = self.nfe = self.block_rows = self.other_block_rows = 0

    def _count(self, net, rows: int) -> None:
        if net is None:
            self.block_rows += rows
        else:
            self.other_block_rows += rows

    def _call(self, denoiser, x: Tensor, sigma: Tensor, skip, cond: dict) -> Tensor:
        self.calls += 1
        kwargs = dict(cond)
        if skip:
            kwargs["skip"] = skip  # a skip set, or a plan {block: Perturbation}
        return denoiser(x, sigma, **kwargs).to(x.dtype)

    def run(self, x: Tensor, sigma: float, passes: list[Pass]) -> list[Tensor]:
        """Velocities for `passes` (same order). Identical passes run once. The passes through one network are
        one batched sweep over its blocks (`forward_shared`): cond and uncond rows stacked, each sub-network or
        perturbed row forking from its conditional row at its first skipped or perturbed block. A network without
        `forward_shared` (or `share_prefix=False`) gets one call per plan, cond and uncond batched."""
        if any(not p.cond for p in passes) and self.uncond is None:
            raise ValueError(f"{type(self.guider).__name__} needs an unconditional input but none was given")
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        by_net: dict = {}
        for p in dict.fromkeys(passes):
            by_net.setdefault(p.denoiser, []).append(p)
        self.nfe += sum(len(ps) for ps in by_net.values())
        results: dict[Pass, Tensor] = {}
        for net, net_passes in by_net.items():
            net_fn = self.denoiser if net is None else net
            conds = sorted({p.cond for p in net_passes}, reverse=True)  # cond first
            stacks = [conds] if len(conds) == 1 or _stackable(self.cond, self.uncond) else [[c] for c in conds]
            for stack in stacks:
                ps = [p for p in net_passes if p.cond in stack]
                if self.share_prefix and hasattr(net_fn, "forward_shared") and any(p.perturbed for p in ps):
                    self._sweep(net, net_fn, x, sig, stack, ps, results)
                else:
                    self._separate(net, net_fn, x, sig, ps, results)
        return [results[p] for p in passes]

    def _inputs(self, x: Tensor, sig: Tensor, conds: list[bool]) -> tuple[Tensor, Tensor, dict]:
        if len(conds) == 1:
            return x, sig, self.cond if conds[0] else self.uncond
        return (torch.cat([x] * len(conds)), torch.cat([sig] * len(conds)),
                _concat([self.cond if c else self.uncond for c in conds]))

    def _sweep(self, net, net_fn, x, sig, stack: list[bool], passes: list[Pass], results: dict) -> None:
        """All `passes` (inputs in `stack`) in one sweep over the network's blocks. If some pass has a skip set
        per row (S² masks drawn per image), every row becomes its own variant: rows that agree on what happened
        so far still share each block's batch, so per-row masks add no block work."""
        xs, sigs, cond = self._inputs(x, sig, stack)
        B = x.shape[0]
        if any(_per_row(p, B) for p in passes):
            skips = [plan for p in passes for plan in _row_plans(p, B)]
            inputs = [stack.index(p.cond) * B + b for p in passes for b in range(B)]
            rows = 1
        else:
            skips, inputs, rows = [p.plan for p in passes], [stack.index(p.cond) for p in passes], B
        self.calls += 1
        outs = net_fn.forward_shared(xs, sigs, skips=skips, inputs=inputs, **cond)
        self._count(net, block_rows(skips, inputs, rows, getattr(net_fn, "num_blocks", 0) or 0))
        per_pass = len(outs) // len(passes)
        for j, p in enumerate(passes):
            results[p] = torch.cat(outs[j * per_pass:(j + 1) * per_pass]).to(x.dtype)

    def _separate(self, net, net_fn, x, sig, passes: list[Pass], results: dict) -> None:
        """One call per plan; cond and uncond with the same plan share it. A pass with a skip set per row runs
        one call per distinct set, on the rows that have it."""
        B = x.shape[0]
        for p in [p for p in passes if _per_row(p, B)]:
            out = torch.empty_like(x)
            for skip in dict.fromkeys(p.skip):
                idx = torch.tensor([b for b, s in enumerate(p.skip) if s == skip], device=x.device)
                cond = {k: v[idx] for k, v in (self.cond if p.cond else self.uncond).items()}
                plan = Pass(True, skip, net, p.perturb).plan
                out[idx] = self._call(net_fn, x[idx], sig[idx], plan, cond)
                n = getattr(net_fn, "num_blocks", 0) or 0
                self._count(net, len(idx) * (n - len(skip)) if n else 0)
            results[p] = out
        passes = [p for p in passes if not _per_row(p, B)]
        by_skip: dict[tuple, list[bool]] = {}
        for p in passes:
            by_skip.setdefault((p.skip, p.perturb), []).append(p.cond)
        n = getattr(net_fn, "num_blocks", 0) or 0
        for (skip, perturb), conds in by_skip.items():
            plan = Pass(True, skip, net, perturb).plan
            if len(conds) == 2 and not _stackable(self.cond, self.uncond):
                stacks = [[c] for c in conds]
            else:
                stacks = [sorted(conds, reverse=True)]
            for stack in stacks:
                xs, sigs, cond = self._inputs(x, sig, stack)
                out = self._call(net_fn, xs, sigs, plan, cond)
                self._count(net, xs.shape[0] * (n - len(skip)) if n else 0)
                for c, v in zip(stack, out.split(x.shape[0])):
                    results[Pass(c, skip, net, perturb)] = v

    def __call__(self, x: Tensor, step: Step) -> Estimate:
        passes = self.guider.passes(step)
        velocities = self.run(x, step.sigma, passes)
        for p, v in zip(passes, velocities):
            if not torch.isfinite(v).all():
                raise FloatingPointError(f"non-finite prediction at step {step.index} (σ={step.sigma:.4f}) "
                                         f"in pass {p}")
        return self.guider.combine(x, step, passes, velocities)
