"""Training losses: denoising score matching and conditional flow matching, with time samplers.

Every loss is computed as a weighted squared error in eps space, ``w(t) ||eps_hat - eps||^2``,
where ``w`` converts the chosen weighting to eps space; since all parameterizations are linear in
each other (see ``_params``) this equals the usual loss in the native space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ._params import Model, eps_error_scale, to_prediction
from ._process import EDM, GaussianProcess, PathSample
from ._state import State

Weighting = Literal["simple", "min_snr", "edm"]
Coupling = Literal["independent", "ot"]


@dataclass(frozen=True)
class TimeSample:
    """Times ``t [B]`` and importance weights ``weight [B]`` (1 unless importance-sampled)."""

    t: Tensor
    weight: Tensor


@dataclass(frozen=True)
class LossOutput:
    """``loss``: scalar mean; ``per_system [B]`` unweighted by importance; ``t [B]``."""

    loss: Tensor
    per_system: Tensor
    t: Tensor
    path: PathSample


# ------------------------------------------------------------------------------------------------
# time samplers
class UniformTime:
    """``t ~ U(t_min, t_max)`` (continuous) or uniform integers (DDPM's discrete time)."""

    def __init__(self, process: GaussianProcess, eps: float = 1e-5) -> None:
        self.process, self.eps = process, eps

    def __call__(self, n: int, generator=None, device=None) -> TimeSample:
        p = self.process
        if getattr(p, "timesteps", None) is not None:
            t = torch.randint(0, p.timesteps, (n,), generator=generator, device=device).double()
        else:
            lo, hi = p.t_min, p.t_max - self.eps * (p.t_max - p.t_min)
            t = lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return TimeSample(t, torch.ones(n, dtype=torch.float64, device=device))


class LogNormalTime:
    """EDM's training distribution: ``ln(sigma/alpha) ~ N(p_mean, p_std^2)`` (Karras et al. 2022,
    Table 1), mapped to the process's time and clipped to its range."""

    def __init__(self, process: GaussianProcess, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.process, self.p_mean, self.p_std = process, p_mean, p_std

    def __call__(self, n: int, generator=None, device=None) -> TimeSample:
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        s = torch.exp(self.p_mean + self.p_std * z)
        p = self.process
        if isinstance(p, EDM):
            t = s.clamp(p.sigma_min, p.sigma_max)
        else:
            t = p.t_of_sigma_ratio(s).clamp(p.t_min, p.t_max)
        return TimeSample(t, torch.ones_like(t))


class ImportanceTime:
    """Loss-proportional importance sampling of t (Nichol & Dhariwal 2021, Sec. 3.3).

    Time is split into ``bins``; each keeps its last ``history`` losses. Until every bin is full
    sampling is uniform; then bin ``k`` is drawn with ``p_k ∝ sqrt(E[L_k^2])`` and the loss is
    reweighted by ``1 / (bins * p_k)`` so its expectation is unchanged. Call ``update`` after each
    step with the per-system losses.
    """

    def __init__(self, process: GaussianProcess, bins: int = 100, history: int = 10,
                 uniform_prob: float = 1e-3) -> None:
        if bins < 2 or history < 1:
            raise ValueError("ImportanceTime: need bins >= 2 and history >= 1")
        if getattr(process, "timesteps", None) is not None:
            bins = min(bins, process.timesteps)  # every bin holds at least one integer time
        self.process, self.bins, self.history, self.uniform_prob = process, bins, history, uniform_prob
        self._losses = torch.zeros(bins, history, dtype=torch.float64)
        self._count = torch.zeros(bins, dtype=torch.long)

    def _bin_of(self, t: Tensor) -> Tensor:
        p = self.process
        T = getattr(p, "timesteps", None)
        if T is not None:  # integer j belongs to bin j * bins // T
            return (t.double().cpu().round().long() * self.bins // T).clamp(0, self.bins - 1)
        u = (t.double().cpu() - p.t_min) / (p.t_max - p.t_min)
        return (u * self.bins).long().clamp(0, self.bins - 1)

    def probabilities(self) -> Tensor:
        """Current bin probabilities ``[bins]``."""
        if bool((self._count < self.history).any()):
            return torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        w = self._losses.square().mean(1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.bins

    def __call__(self, n: int, generator=None, device=None) -> TimeSample:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        probs = self.probabilities()
        k = torch.multinomial(probs.to(gen_device), n, replacement=True, generator=generator).cpu()
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device).cpu()
        p = self.process
        T = getattr(p, "timesteps", None)
        if T is not None:
            # Integer bins: a uniform integer inside the drawn bin; weight (1/T) / (p_k / size_k).
            first = -(-torch.arange(self.bins + 1) * T // self.bins)  # ceil(k T / bins)
            size = (first[1:] - first[:-1]).double()
            t = (first[k].double() + torch.floor(u * size[k])).clamp(max=T - 1)
            w = size[k] / (T * probs[k])
            return TimeSample(t.to(device), w.to(device))
        t = p.t_min + (k.double() + u) / self.bins * (p.t_max - p.t_min)
        t = t.clamp(p.t_min, p.t_max - 1e-5 * (p.t_max - p.t_min))
        w = 1.0 / (self.bins * probs[k])
        return TimeSample(t.to(device), w.to(device))

    def update(self, t: Tensor, losses: Tensor) -> None:
        for b, l in zip(self._bin_of(t).tolist(), losses.detach().double().cpu().tolist(), strict=True):
            self._losses[b] = torch.roll(self._losses[b], 1)
            self._losses[b, 0] = l
            self._count[b] += 1


# ------------------------------------------------------------------------------------------------
def loss_weight(weighting: Weighting, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5,
                gamma: float = 5.0) -> Tensor:
    """Weight on the *x0-space* squared error for a weighting name ([B]); ``simple`` is handled by
    the caller (native space).

    - ``min_snr``: ``min(SNR, gamma)`` (Hang et al. 2023);
    - ``edm``: ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` with ``s = sigma/alpha`` (Karras et al. 2022).
    """
    snr = (alpha / sigma) ** 2
    if weighting == "min_snr":
        return snr.clamp(max=gamma)
    if weighting == "edm":
        s = sigma / alpha
        return (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    raise ValueError(f"unknown weighting {weighting!r}; expected 'simple', 'min_snr' or 'edm'")


def wrapped_normal_score(d: Tensor, sigma: Tensor | float, images: int = 3) -> Tensor:
    """Score of the wrapped normal ``sum_k N(d + k; 0, sigma^2)`` at displacement ``d``
    (DiffCSP, Jiao et al. 2023, Eq. 4), summing ``2*images+1`` periodic images."""
    k = torch.arange(-images, images + 1, dtype=d.dtype, device=d.device)
    dk = d.unsqueeze(-1) + k
    s2 = torch.as_tensor(sigma, dtype=d.dtype, device=d.device)
    if s2.ndim:
        s2 = s2.reshape(*s2.shape, *([1] * (dk.ndim - s2.ndim)))
    s2 = s2**2
    logw = -(dk**2) / (2 * s2)
    w = torch.softmax(logw, dim=-1)
    return -(w * dk).sum(-1) / s2.squeeze(-1)


def _eps_target(path: PathSample) -> State:
    """The regression target in eps space: the drawn noise, or on the torus ``-sigma * score`` of
    the wrapped normal (which differs from the noise once sigma is not small)."""
    out = {}
    x_t, x_0 = path.x_t, path.x_0
    for k, v in path.noise.items():
        c = x_t.constraint(k)
        if c.needs_variance_exploding:
            s = x_t.expand(path.sigma, k)
            out[k] = -s * wrapped_normal_score(c.difference(x_t[k], x_0[k]), s)
        else:
            out[k] = v
    return path.noise._with(out)


def ot_coupling(x0: State, noise: State) -> State:
    """Minibatch optimal-transport coupling (Tong et al. 2024; Pooladian et al. 2023): permute the
    noise among systems so the total squared distance to ``x0`` is minimal (Hungarian algorithm).

    Systems of different sizes cannot be paired, so assignment runs within each group of
    equally-sized systems. Returns the permuted noise (same layout as ``noise``).
    """
    B = x0.num_systems
    if not x0.batch:
        groups = {(): torch.arange(B)}
    else:
        sig = torch.stack([x0.sizes(k) for k in sorted(x0.batch)], 1)
        uniq, inv = torch.unique(sig, dim=0, return_inverse=True)
        groups = {i: torch.nonzero(inv == i).flatten() for i in range(uniq.shape[0])}
    perm = torch.arange(B)
    for members in groups.values():
        if members.numel() < 2:
            continue
        a = _flatten_systems(x0, members)
        b = _flatten_systems(noise, members)
        cost = torch.cdist(a.double(), b.double()).square().cpu().numpy()
        _, cols = linear_sum_assignment(cost)
        perm[members] = members[torch.as_tensor(np.asarray(cols), dtype=torch.long)]
    return _permute_systems(noise, perm)


def _flatten_systems(x: State, members: Tensor) -> Tensor:
    """Concatenate all fields of the given (equally-sized) systems to rows ``[len(members), D]``."""
    rows = []
    for k, v in x.items():
        if k in x.batch:
            idx = x.batch[k]
            parts = [v[idx == int(m)].reshape(-1) for m in members]
            rows.append(torch.stack(parts))
        else:
            rows.append(v[members].reshape(len(members), -1))
    return torch.cat(rows, 1)


def _permute_systems(x: State, perm: Tensor) -> State:
    """System ``i`` of the result is system ``perm[i]`` of ``x`` (sizes must match)."""
    out = {}
    for k, v in x.items():
        if k in x.batch:
            idx = x.batch[k]
            order = torch.argsort(idx, stable=True)  # elements grouped by system, order kept
            sizes = torch.bincount(idx, minlength=x.num_systems)
            starts = torch.cumsum(sizes, 0) - sizes
            sys_sorted = idx[order]
            local = torch.arange(idx.numel(), device=idx.device) - starts[sys_sorted]
            src = order[starts[perm.to(idx.device)[sys_sorted]] + local]
            new = torch.empty_like(v)
            new[order] = v[src]
            out[k] = new
        else:
            out[k] = v[perm.to(v.device)]
    return x._with(out)


def denoising_loss(
    model: Model,
    x0: State,
    *,
    time: UniformTime | LogNormalTime | ImportanceTime | None = None,
    weighting: Weighting = "simple",
    coupling: Coupling = "independent",
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> LossOutput:
    """Denoising score matching / conditional flow matching in one function.

    ``x0``: clean data (B systems). Draws ``t`` from ``time`` (default uniform), noise in each
    field's tangent space (optionally OT-coupled), and regresses the model's ``param``-space output.
    ``weighting="simple"`` is the native-space MSE: eps-MSE for DDPM (Ho et al. 2020), the
    conditional flow-matching loss ``||v - (eps - x0)||^2`` for ``LinearInterpolant`` with
    ``param="velocity"`` (Lipman et al. 2023); ``edm`` and ``min_snr`` weight the x0-space error.
    ``cond`` (tensors ``[B, ...]``) is passed to a conditional network (see ``Model``); OT coupling
    re-pairs noise with data, never data with its condition.
    Returns per-system losses [B] (mean over each system's degrees of freedom).
    """
    if cond is not None:
        model = model.with_cond(cond)
    process = model.process
    time = time or UniformTime(process)
    # Draw times where the generator lives (a CUDA generator cannot fill CPU tensors, nor vice versa).
    ts = time(x0.num_systems, generator=generator,
              device=generator.device if generator is not None else x0.device)
    t = ts.t.to(x0.device)
    noise = x0.randn_like(generator)
    if coupling == "ot":
        noise = ot_coupling(x0, noise)
    elif coupling != "independent":
        raise ValueError(f"unknown coupling {coupling!r}; expected 'independent' or 'ot'")
    path = process.sample(x0, t, noise)
    a, s = path.alpha, path.sigma
    raw = model.call_net(path.x_t.canonical(), t.to(x0.dtype) if t.is_floating_point() else t)
    da = process.d_alpha(t).to(x0.dtype) if model.param == "velocity" else None
    ds = process.d_sigma(t).to(x0.dtype) if model.param == "velocity" else None
    pred = to_prediction(raw, path.x_t, model.param, a, s, da, ds)
    err = (pred.eps - _eps_target(path)).sqnorm() / x0.dof().clamp(min=1)
    scale = eps_error_scale(model.param, a, s, da, ds)
    if weighting == "simple":
        w = 1.0 / scale**2  # back to the native space
    else:
        w = loss_weight(weighting, a, s, sigma_data) * (s / a) ** 2  # x0 error = (s/a) eps error
    per_system = w * err
    loss = (per_system * ts.weight.to(per_system)).mean()
    if isinstance(time, ImportanceTime):
        time.update(ts.t, per_system)
    return LossOutput(loss=loss, per_system=per_system.detach(), t=t, path=path)


def edm_sigma_data(x0: State) -> float:
    """Root-mean-square of the data, a default for ``sigma_data``."""
    return float(math.sqrt(float(x0.sqnorm().sum() / x0.dof().sum())))
