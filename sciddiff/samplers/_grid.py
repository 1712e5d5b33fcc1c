"""Time grids: where a sampler evaluates the model. Separate from the samplers (as in
k-diffusion), so every schedule works with every sampler.

A grid runs from noise to data. With ``final="zero"`` it holds ``n`` model times followed by the
clean point (``alpha = 1, sigma = 0``): ``n`` steps, the last of which lands on the data (as EDM's
appended sigma = 0 and diffusers' ``final_sigmas_type="zero"``). With ``final="none"`` it holds
``n + 1`` model times and the last step stops at the last of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core import GaussianProcess

Final = Literal["zero", "none"]

#: Smallest noise level ``s = sigma / alpha`` used where a process reaches ``sigma = 0`` at
#: ``t_min`` (flow paths), whose log-SNR is infinite there (``edm_rho`` and ``adaptive``).
FLOW_S_END: float = math.exp(-10.0)


@dataclass(frozen=True)
class TimeGrid:
    """Grid points ``t, alpha, sigma [n+1]`` (float64), from noise to data.

    ``clean_last`` marks a final clean point (``alpha = 1, sigma = 0``, never passed to the model).
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    clean_last: bool

    def __post_init__(self) -> None:
        n = self.t.shape[0]
        if n < 2 or self.alpha.shape != (n,) or self.sigma.shape != (n,):
            raise ValueError("TimeGrid: t, alpha, sigma must be 1-D with at least two points")
        s = self.sigma / self.alpha.clamp(min=1e-300)
        if not bool((s[1:] < s[:-1]).all()):
            raise ValueError("TimeGrid: the noise level sigma/alpha must decrease strictly")

    @property
    def steps(self) -> int:
        return self.t.shape[0] - 1

    @property
    def log_snr(self) -> Tensor:
        """``lambda = log(alpha / sigma)`` per point (+inf at the clean point).

        Note: this is half the usual log-SNR, the variable DPM-Solver integrates in.
        """
        return torch.log(self.alpha) - torch.log(self.sigma)

    @classmethod
    def from_times(cls, process: GaussianProcess, t: Tensor, final: Final = "zero") -> TimeGrid:
        """Grid at the given model times (decreasing), plus the clean point if ``final="zero"``."""
        if final not in ("zero", "none"):
            raise ValueError(f"unknown final {final!r}; expected 'zero' or 'none'")
        t = t.to(torch.float64)
        a, s = process.alpha(t), process.sigma(t)
        clean = final == "zero"
        if clean and float(s[-1]) == 0:  # the process itself ends clean (flow paths at t_min)
            return cls(t=t, alpha=a, sigma=s, clean_last=True)
        if clean:
            t = torch.cat([t, t.new_tensor([process.t_min])])
            a = torch.cat([a, a.new_ones(1)])
            s = torch.cat([s, s.new_zeros(1)])
        return cls(t=t, alpha=a, sigma=s, clean_last=clean)


def _count(n: int, final: Final, process: GaussianProcess | None = None) -> int:
    """Model points (plus the endpoint where the process itself reaches sigma = 0 at t_min)."""
    if n < 1:
        raise ValueError(f"a grid needs at least one step, got {n}")
    if final == "zero" and not (process is not None and _ends_clean(process)):
        return n
    return n + 1


def _ends_clean(process: GaussianProcess) -> bool:
    return float(process.sigma(torch.tensor(process.t_min, dtype=torch.float64))) == 0.0


def uniform_time(process: GaussianProcess, n: int, final: Final = "zero",
                 t_start: float | None = None, t_end: float | None = None) -> TimeGrid:
    """Model times equally spaced in t from ``t_start`` (default ``t_max``) to ``t_end``
    (default ``t_min``), inclusive (DDIM's "linspace" spacing)."""
    hi = process.t_max if t_start is None else t_start
    lo = process.t_min if t_end is None else t_end
    t = torch.linspace(hi, lo, _count(n, final, process), dtype=torch.float64)
    return TimeGrid.from_times(process, t, final)


def trailing(process: GaussianProcess, n: int, final: Final = "zero") -> TimeGrid:
    """Trailing spacing (Lin et al. 2024, Table 2): ``t_max`` first, equal strides that stop one
    stride short of ``t_min``; integers for discrete-time processes (as diffusers' "trailing")."""
    m = _count(n, final)
    discrete = getattr(process, "timesteps", None)
    if discrete is not None:
        t = torch.round(torch.arange(discrete, 0, -discrete / m, dtype=torch.float64)) - 1
    else:
        span = process.t_max - process.t_min
        t = process.t_min + span * (1 - torch.arange(m, dtype=torch.float64) / m)
    return TimeGrid.from_times(process, t[:m], final)


def logsnr_uniform(process: GaussianProcess, n: int, final: Final = "zero",
                   t_start: float | None = None, t_end: float | None = None) -> TimeGrid:
    """Model times equally spaced in log-SNR (DPM-Solver's "logSNR" schedule, Lu et al. 2022)."""
    hi = torch.tensor(process.t_max if t_start is None else t_start, dtype=torch.float64)
    lo = torch.tensor(process.t_min if t_end is None else t_end, dtype=torch.float64)
    hi = _finite_start(process, hi)
    if t_end is None and _ends_clean(process):  # log-SNR is infinite at t_min: stop at s = 1e-3
        lo = process.t_of_sigma_ratio(torch.tensor(1e-3, dtype=torch.float64))
    lam = torch.linspace(float(process.log_snr(hi)), float(process.log_snr(lo)), _count(n, final),
                         dtype=torch.float64)
    t = process.t_of_log_snr(lam)
    t[0], t[-1] = hi, lo
    return TimeGrid.from_times(process, t, final)


def edm_rho(process: GaussianProcess, n: int, rho: float = 7.0, final: Final = "zero",
            sigma_min: float | None = None, sigma_max: float | None = None) -> TimeGrid:
    """Karras et al. 2022, Eq. 5: ``s_i = (s_max^(1/rho) + i/(m-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``
    in the scaled noise level ``s = sigma / alpha`` (defaults: the process's range)."""
    if rho <= 0:
        raise ValueError("edm_rho: rho must be positive")
    s_hi, s_lo = _s_range(process)
    s_hi = s_hi if sigma_max is None else sigma_max
    s_lo = s_lo if sigma_min is None else sigma_min
    m = _count(n, final)
    i = torch.arange(m, dtype=torch.float64) / max(m - 1, 1)
    s = (s_hi ** (1 / rho) + i * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
    t = process.t_of_log_snr(-2 * torch.log(s))
    return TimeGrid.from_times(process, t, final)


def _finite_start(process: GaussianProcess, t: Tensor) -> Tensor:
    """Move a start time where alpha == 0 (flow paths at t = 1) to the last time with finite log-SNR."""
    if float(process.alpha(t)) > 0:
        return t
    return t - 1e-4 * (process.t_max - process.t_min)


def _s_range(process: GaussianProcess) -> tuple[float, float]:
    lo = torch.tensor(process.t_min, dtype=torch.float64)
    hi = _finite_start(process, torch.tensor(process.t_max, dtype=torch.float64))
    s_lo = float(process.sigma(lo) / process.alpha(lo))
    s_hi = float(process.sigma(hi) / process.alpha(hi))
    if s_lo <= 0:  # flow paths reach sigma = 0 at t_min
        s_lo = FLOW_S_END
    return s_hi, s_lo


def default_grid(process: GaussianProcess, n: int) -> TimeGrid:
    """The default schedule for ``n`` steps: uniform in log-SNR, or uniform in t for paths that
    start where alpha = 0 (flow matching), whose log-SNR is unbounded there."""
    if float(process.alpha(torch.tensor(process.t_max, dtype=torch.float64))) <= 0:
        return uniform_time(process, n)
    return logsnr_uniform(process, n)
