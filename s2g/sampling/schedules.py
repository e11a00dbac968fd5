"""Noise schedules (σ ∈ [0, 1], σ = 1 is pure noise)."""
import torch


def shift_sigma(sigma, shift: float):
    """SD3's resolution shift: σ' = s·σ / (1 + (s-1)·σ), spending more steps at high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sd3_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """`steps + 1` σ values from 1 down to 0, as diffusers' FlowMatchEulerDiscreteScheduler and the sd3.5 code.

    Timesteps are spaced linearly between 1000 and 1000·shift(1/1000) and then shifted, so the smallest
    non-zero σ is shifted twice (0.008929 for 28 steps at shift 3) — kept for parity with both references.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma_min = shift_sigma(1.0 / 1000, shift)
    t = torch.linspace(1.0, sigma_min, int(steps), dtype=torch.float64)
    sigmas = shift_sigma(t, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def uniform_sigmas(steps: int) -> torch.Tensor:
    """σ evenly spaced from 1 to 0 (the toy experiments' grid)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, int(steps) + 1)


def _np_linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy's linspace in float64, operation for operation (start + i·step, the endpoint set exactly), so
    that Wan's grid and its truncated integer timesteps come out bit for bit without importing numpy."""
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [stop]


def _wan_shifted(steps: int, shift: float) -> list[float]:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # Wan's FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py) first builds a 1000-entry training table
    # σ = 1 - linspace(1, 1/1000, 1000) in fp32: σ_max = fp32(0.999), σ_min = 0. Its set_timesteps spaces the
    # sampling grid linearly between the two in float64, drops the endpoint and shifts it.
    sigma_max = float(torch.tensor(1 - 1 / 1000, dtype=torch.float32))
    sig = _np_linspace(sigma_max, 0.0, int(steps) + 1)[:-1]
    return [shift * s / (1 + (shift - 1) * s) for s in sig]


def wan_sigmas(steps: int = 50, shift: float = 5.0) -> torch.Tensor:
    """`steps + 1` σ values ending in 0, as Wan 2.1 samples (its flow UniPC; shift 5 and 50 steps by default
    for text-to-video): σ_i = shift(0.999·(1 - i/steps)), then 0, in fp32.

    diffusers' UniPCMultistepScheduler with flow sigmas spaces its default grid from 1 to 1/1000 instead
    (σ = 1 nudged to 1 - 1e-6), which at shift 5 and 50 steps lies up to 4.3e-3 away from this one; passing it
    Wan's unshifted grid as `sigmas=` reproduces Wan.
    """
    return torch.tensor(_wan_shifted(steps, shift) + [0.0], dtype=torch.float32)


def wan_timesteps(steps: int = 50, shift: float = 5.0) -> torch.Tensor:
    """The integer timesteps Wan feeds its DiT, one per step (int64): 1000·σ_i truncated, taken from the
    float64 σ before it is rounded to fp32 (999, 995, 991, ..., 241, 172, 92 at shift 5 / 50 steps)."""
    return torch.tensor([int(s * 1000) for s in _wan_shifted(steps, shift)], dtype=torch.int64)


class DiscreteTimesteps:
    """A denoiser seen through a fixed timestep table: asked for `sigmas[i]`, the network gets
    `timesteps[i] / num_train_timesteps` instead, while the sampler and the guider keep using the float σ.

    Wan samples this way: its solver steps on the float σ grid, but the DiT is fed the truncated integer
    timesteps (`wan_timesteps`); WanDiT takes σ = t/1000 and turns it back into t within one fp32 ulp. Wrap
    every network a guider runs (the main one and an Autoguidance weak one alike), and wrap the raw network (a
    wrapper that converts x̂0 to a velocity must see the solver's σ). Everything else (`num_blocks`,
    `forward_shared`, `config`, what it can perturb) passes through. A σ that is not on the grid (within 1e-6,
    e.g. latents in half precision, whose σ the guided loop rounds to their dtype) stops with one line.
    """

    def __init__(self, net, sigmas, timesteps, num_train_timesteps: int = 1000):
        sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        t = torch.as_tensor(timesteps).reshape(-1)
        if len(sig) not in (len(t), len(t) + 1):
            raise ValueError(f"{len(t)} timesteps for a grid of {len(sig)} σ values")
        self.net = net
        self._sigmas = sig[:len(t)]
        self._net_sigmas = t.double() / num_train_timesteps

    def network_sigma(self, sigma) -> torch.Tensor:
        """The σ the network sees for the sampler's `sigma` (a [B] tensor or a scalar)."""
        s = torch.as_tensor(sigma)
        flat = s.detach().reshape(-1).double().cpu()
        dist = (flat[:, None] - self._sigmas[None]).abs()
        gap, idx = dist.min(1)
        if gap.numel() and gap.max() > 1e-6:
            bad = flat[gap.argmax()].item()
            raise ValueError(f"σ = {bad:.8f} is not on this timestep table's grid (nearest "
                             f"{self._sigmas[idx[gap.argmax()]].item():.8f}): sample on the grid the table was "
                             f"built from, with fp32 latents")
        dtype = s.dtype if s.is_floating_point() else torch.float32
        return self._net_sigmas[idx].to(dtype=dtype, device=s.device).reshape(s.shape)

    def __call__(self, x, sigma, *cond, **kwargs):
        return self.net(x, self.network_sigma(sigma), *cond, **kwargs)

    def __getattr__(self, name):
        if name == "net":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        attr = getattr(self.net, name)
        if name == "forward_shared":
            return lambda x, sigma, *cond, **kwargs: attr(x, self.network_sigma(sigma), *cond, **kwargs)
        return attr

    def __repr__(self) -> str:
        return f"DiscreteTimesteps({type(self.net).__name__}, {len(self._sigmas)} steps)"
