"""Gaussian probability paths ``x_t = alpha(t) x_0 + sigma(t) eps``.

Diffusion (VP, VE, EDM) and the linear-interpolant flow-matching path are all of this form, so one
set of samplers, conversions and losses serves every process. Time runs from data (``t_min``) to
noise (``t_max``). In the scaled variables ``y = x / alpha`` and ``s = sigma / alpha`` every process
has the same probability-flow ODE ``dy/ds = eps`` (Karras et al. 2022, Eq. 4); samplers use this.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._constraints import Level
from ._state import State


@dataclass(frozen=True)
class PathSample:
    """A draw from the path: ``x_t = alpha * x_0 + sigma * noise`` (all per-system scalars [B])."""

    x_t: State
    x_0: State
    noise: State
    t: Tensor
    alpha: Tensor
    sigma: Tensor


class GaussianProcess(ABC):
    """``x_t = alpha(t) x_0 + sigma(t) eps`` with ``t`` in ``[t_min, t_max]``."""

    t_min: float
    t_max: float

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    @property
    def variance_exploding(self) -> bool:
        """True where ``alpha(t) == 1`` for all t (required by torus fields)."""
        return False

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``, decreasing in t."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        """``d alpha / dt`` (autograd; processes override with closed forms)."""
        return _derivative(self.alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return _derivative(self.sigma, t)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of ``log_snr`` by interpolation on a dense table (monotone in t)."""
        table_t, table_l = self._log_snr_table(lam.dtype, lam.device)
        # table_l decreases with t; flip for searchsorted.
        lf, tf = table_l.flip(0), table_t.flip(0)
        lam_c = lam.clamp(lf[0], lf[-1])
        i = torch.searchsorted(lf, lam_c.contiguous()).clamp(1, lf.shape[0] - 1)
        w = (lam_c - lf[i - 1]) / (lf[i] - lf[i - 1])
        return tf[i - 1] + w * (tf[i] - tf[i - 1])

    def t_of_sigma_ratio(self, s: Tensor) -> Tensor:
        """Time at which ``sigma / alpha == s``."""
        return self.t_of_log_snr(-2 * torch.log(s))

    def _log_snr_table(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        t = torch.linspace(self.t_min, self.t_max, 20001, dtype=torch.float64)
        return t.to(dtype=dtype, device=device), self.log_snr(t).to(dtype=dtype, device=device)

    # sampling the path ------------------------------------------------------------------------
    def sample(self, x0: State, t: Tensor, noise: State) -> PathSample:
        """Corrupt ``x0`` at per-system times ``t [B]`` with ``noise`` (from ``x0.randn_like``)."""
        check_compatible(self, x0)
        alpha, sigma = self.alpha(t).to(x0.dtype), self.sigma(t).to(x0.dtype)
        x_t = x0.lincomb(alpha, noise, sigma)
        return PathSample(x_t=x_t, x_0=x0, noise=noise, t=t, alpha=alpha, sigma=sigma)

    def prior(self, template: State, generator: torch.Generator | None = None) -> State:
        """A draw of ``x_{t_max}`` for data shaped like ``template`` (values ignored).

        Uses ``N(0, sigma(t_max)^2 + alpha(t_max)^2)`` per coordinate: the marginal of unit-variance
        data, and exactly ``N(0, sigma^2)`` where ``alpha(t_max) = 0``.
        """
        check_compatible(self, template)
        t = torch.tensor(self.t_max, dtype=torch.float64)
        alpha, sigma = float(self.alpha(t)), float(self.sigma(t))
        scale = sigma if self.variance_exploding else math.hypot(alpha, sigma)
        out = {}
        for k, v in template.items():
            z = torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)
            out[k] = template.constraint(k).prior(z, scale, template.batch.get(k), template.num_systems)
        return template._with(out).project(Level(alpha, sigma))


def check_compatible(process: GaussianProcess, state: State) -> None:
    """Raise where a field's constraint is not defined under ``process`` (torus needs alpha == 1)."""
    for k in state.keys():
        if state.constraint(k).needs_variance_exploding and not process.variance_exploding:
            raise ValueError(
                f"field {k!r} lives on the torus, which needs a variance-exploding process "
                f"(alpha == 1: VE or EDM); got {type(process).__name__}"
            )


def _derivative(fn, t: Tensor) -> Tensor:
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(tt).sum(), tt)
    return g


# ------------------------------------------------------------------------------------------------
class VP(GaussianProcess):
    """Variance preserving: ``alpha^2 + sigma^2 = 1`` (Ho et al. 2020; Song et al. 2021).

    Args:
        schedule: ``"linear"`` betas (DDPM) or ``"cosine"`` (Nichol & Dhariwal 2021, Eq. 17).
        timesteps: ``None`` for continuous time ``t in [t_min, 1]``; an integer N for DDPM's
            discrete time ``t in [0, N-1]`` (``alpha_bar`` from the cumulative product of betas,
            log-linearly interpolated between integers, so samplers may use fractional t).
        beta_min, beta_max: linear schedule ends; defaults 1e-4, 0.02 (discrete, per step) or
            0.1, 20 (continuous, Song et al.).
        t_min: smallest continuous time (default 1e-3; 0 in discrete time).
    """

    def __init__(
        self,
        schedule: Literal["linear", "cosine"] = "linear",
        timesteps: int | None = None,
        beta_min: float | None = None,
        beta_max: float | None = None,
        t_min: float | None = None,
        cosine_s: float = 0.008,
    ) -> None:
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"VP: unknown schedule {schedule!r} (expected 'linear' or 'cosine')")
        if timesteps is not None and timesteps < 2:
            raise ValueError("VP: timesteps must be >= 2")
        self.schedule, self.timesteps, self.cosine_s = schedule, timesteps, cosine_s
        discrete = timesteps is not None
        self.beta_min = beta_min if beta_min is not None else (1e-4 if discrete else 0.1)
        self.beta_max = beta_max if beta_max is not None else (0.02 if discrete else 20.0)
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError("VP: need 0 < beta_min < beta_max")
        if discrete:
            self.t_min, self.t_max = 0.0, float(timesteps - 1)
            self._log_alpha_table = self._discrete_log_alpha(timesteps)
        else:
            self.t_min = 1e-3 if t_min is None else float(t_min)
            # cosine: stop where alpha_bar would vanish (as DPM-Solver's NoiseScheduleVP).
            self.t_max = 1.0 if schedule == "linear" else 0.9946

    def _discrete_log_alpha(self, n: int) -> Tensor:
        if self.schedule == "linear":
            betas = torch.linspace(self.beta_min, self.beta_max, n, dtype=torch.float64)
            return 0.5 * torch.cumsum(torch.log1p(-betas), 0)
        s = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((s + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return 0.5 * torch.cumsum(torch.log1p(-betas), 0)

    def log_alpha(self, t: Tensor) -> Tensor:
        if self.timesteps is not None:
            table = self._log_alpha_table.to(device=t.device, dtype=t.dtype)
            tc = t.clamp(0, self.timesteps - 1)
            i0 = tc.floor().long().clamp(max=self.timesteps - 2)
            w = tc - i0.to(t.dtype)
            return table[i0] * (1 - w) + table[i0 + 1] * w
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        return torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - math.log(
            math.cos(s / (1 + s) * math.pi / 2)
        )

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        la = self.log_alpha(t)
        return 2 * la - torch.log(-torch.expm1(2 * la))

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """Exact inverse: ``alpha^2 = sigmoid(lambda)`` for VP, then invert ``log_alpha(t)``."""
        la = 0.5 * torch.nn.functional.logsigmoid(lam)
        if self.timesteps is not None:
            table = self._log_alpha_table.to(device=lam.device, dtype=lam.dtype)
            rev = -table  # increasing in t
            x = (-la).clamp(float(rev[0]), float(rev[-1])).contiguous()
            i = torch.searchsorted(rev, x).clamp(1, self.timesteps - 1)
            w = (x - rev[i - 1]) / (rev[i] - rev[i - 1])
            return (i - 1).to(lam.dtype) + w
        if self.schedule == "linear":
            b0, db = self.beta_min, self.beta_max - self.beta_min
            # 0.25 db t^2 + 0.5 b0 t + la = 0
            t = (-0.5 * b0 + torch.sqrt(0.25 * b0**2 - db * la)) / (0.5 * db)
        else:
            s = self.cosine_s
            c0 = math.log(math.cos(s / (1 + s) * math.pi / 2))
            t = torch.arccos(torch.exp(la + c0).clamp(max=1.0)) * 2 * (1 + s) / math.pi - s
        return t.clamp(self.t_min, self.t_max)

    def __repr__(self) -> str:
        return f"VP(schedule={self.schedule!r}, timesteps={self.timesteps})"


class _VarianceExploding(GaussianProcess):
    """``alpha(t) == 1``: the noise is added to the data, never scaled (VE, EDM)."""

    @property
    def variance_exploding(self) -> bool:
        return True

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)


class VE(_VarianceExploding):
    """Variance exploding: ``x_t = x_0 + sigma(t) eps``, ``sigma = s_min (s_max/s_min)^t``
    (Song et al. 2021, NCSN++), ``t in [0, 1]``."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError("VE: need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = 0.0, 1.0

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def d_sigma(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        s = torch.exp(-lam / 2)
        return (torch.log(s / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)).clamp(0, 1)

    def __repr__(self) -> str:
        return f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class EDM(_VarianceExploding):
    """Karras et al. 2022: ``alpha = 1``, ``sigma(t) = t``, ``t in [sigma_min, sigma_max]``.

    Pair with ``EDMPrecond`` and the log-normal time sampler for EDM training.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max or sigma_data <= 0:
            raise ValueError("EDM: need 0 < sigma_min < sigma_max and sigma_data > 0")
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.t_min, self.t_max = sigma_min, sigma_max

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam / 2).clamp(self.sigma_min, self.sigma_max)

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class LinearInterpolant(GaussianProcess):
    """Flow matching's conditional OT path / rectified flow: ``x_t = (1 - t) x_0 + t eps``,
    ``t in [0, 1]`` (Lipman et al. 2023, Eq. 20 with sigma_min = 0; Liu et al. 2023).

    Its velocity ``dx_t/dt = eps - x_0`` is the flow-matching target (``param="velocity"``).
    """

    def __init__(self) -> None:
        self.t_min, self.t_max = 0.0, 1.0

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def log_snr(self, t: Tensor) -> Tensor:
        return 2 * (torch.log1p(-t) - torch.log(t))

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-lam / 2)

    def __repr__(self) -> str:
        return "LinearInterpolant()"
