"""Scores of probabilistic downscaling: deterministic errors of the ensemble mean, CRPS (plain and
fair), spread-skill, rank histograms and radially averaged power spectra.

Shapes: ``truth [T, ...]`` (e.g. ``[T, H, W]``) and ``ens [T, M, ...]`` with the members on dim 1;
an ``ens`` shaped like ``truth`` is a deterministic forecast (``M = 1``). Inputs may be numpy arrays
or torch tensors; the arithmetic runs in torch in the inputs' floating dtype (float32 or float64).
An optional ``mask`` (bool, broadcastable to ``truth``, True = scored) restricts the pointwise
scores, e.g. to sea points; unmasked values must be finite.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

Detrend = Literal["plane", "mean", "none"]
Window = Literal["hann", "none"]
Band = Literal["finest_third", "all"]


# ------------------------------------------------------------------------------------------------
# inputs
def _pair(truth: Any, ens: Any) -> tuple[Tensor, Tensor]:
    """``truth [T, ...]`` and ``ens [T, M, ...]`` as tensors of one floating dtype."""
    y, x = torch.as_tensor(truth), torch.as_tensor(ens)
    if x.shape == y.shape:
        x = x.unsqueeze(1)
    if x.ndim != y.ndim + 1 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[1:]:
        raise ValueError(f"ens {tuple(x.shape)} must be [T, M, ...] for truth {tuple(y.shape)} = [T, ...] "
                         "(or have truth's shape for a deterministic forecast)")
    dtype = torch.promote_types(y.dtype, x.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float64
    return y.to(dtype), x.to(dtype)


def _weights(y: Tensor, x: Tensor, mask: Any) -> Tensor | None:
    """Bool mask ``[T, ...]`` (None: all points); checks that the scored values are finite."""
    m = None if mask is None else torch.as_tensor(mask, dtype=torch.bool).expand_as(y)
    finite = torch.isfinite(y) & torch.isfinite(x).all(1)
    if not bool((finite if m is None else finite | ~m).all()):
        raise ValueError("non-finite values in truth or ens at scored points; pass mask= (True = scored)")
    if m is not None and not bool(m.any()):
        raise ValueError("mask selects no points")
    return m


def _mean(v: Tensor, mask: Tensor | None) -> Tensor:
    return v.mean() if mask is None else v[mask].mean()


# ------------------------------------------------------------------------------------------------
# deterministic scores of the ensemble mean
def rmse(truth: Any, ens: Any, mask: Any = None) -> float:
    """Root-mean-square error of the ensemble mean ``ens.mean(1)`` against ``truth``."""
    y, x = _pair(truth, ens)
    m = _weights(y, x, mask)
    return math.sqrt(float(_mean((x.mean(1) - y).square(), m)))


def mae(truth: Any, ens: Any, mask: Any = None) -> float:
    """Mean absolute error of the ensemble mean."""
    y, x = _pair(truth, ens)
    m = _weights(y, x, mask)
    return float(_mean((x.mean(1) - y).abs(), m))


def bias(truth: Any, ens: Any, mask: Any = None) -> float:
    """Mean of ``ens.mean(1) - truth`` (positive: too warm / too high)."""
    y, x = _pair(truth, ens)
    m = _weights(y, x, mask)
    return float(_mean(x.mean(1) - y, m))


# ------------------------------------------------------------------------------------------------
# CRPS
def crps_ensemble(truth: Any, ens: Any, *, fair: bool = True) -> Tensor:
    """Pointwise CRPS of an ``M``-member ensemble: ``[T, ...]``.

    ``CRPS = mean_i |X_i - y| - S / (2 M^2)`` (plain, the "NRG" form of Gneiting & Raftery 2007,
    Eq. 21; as ``properscoring.crps_ensemble``) or ``- S / (2 M (M - 1))`` (``fair=True``: the
    unbiased estimator of the CRPS of the distribution the members are drawn from; Ferro 2014,
    Zamo & Naveau 2018), with ``S = sum_{i != j} |X_i - X_j|``. ``S`` is computed in
    ``O(M log M)`` from the sorted members ``x_(1) <= ... <= x_(M)``:
    ``S = 2 sum_k (2k - M - 1) x_(k)``. The fair form needs ``M >= 2``.
    """
    y, x = _pair(truth, ens)
    M = x.shape[1]
    if fair and M < 2:
        raise ValueError(f"the fair CRPS needs at least 2 members, got {M}")
    skill = (x - y.unsqueeze(1)).abs().mean(1)
    xs = x.sort(dim=1).values
    k = torch.arange(1, M + 1, dtype=x.dtype, device=x.device).reshape(1, M, *[1] * (x.ndim - 2))
    pairs = 2.0 * ((2.0 * k - M - 1.0) * xs).sum(1)
    return skill - pairs / (2.0 * M * (M - 1 if fair else M))


def crps(truth: Any, ens: Any, *, fair: bool = True, mask: Any = None) -> float:
    """Mean of ``crps_ensemble`` over the (masked) points."""
    y, x = _pair(truth, ens)
    m = _weights(y, x, mask)
    return float(_mean(crps_ensemble(y, x, fair=fair), m))


# ------------------------------------------------------------------------------------------------
# calibration
@dataclass(frozen=True)
class SpreadSkill:
    """``spread = sqrt(mean var)`` (unbiased member variance), ``skill`` = RMSE of the ensemble mean,
    ``ratio = sqrt((M + 1) / M) spread / skill`` (1 for a calibrated ensemble)."""

    spread: float
    skill: float
    ratio: float
    members: int


def spread_skill(truth: Any, ens: Any, mask: Any = None) -> SpreadSkill:
    """Spread-skill ratio with the finite-ensemble correction ``sqrt((M + 1) / M)`` (Fortin et al.
    2014, "Why should ensemble spread match the RMSE of the ensemble mean?", Eq. 8): for members
    and truth exchangeable, ``E[(mean - y)^2] = (M + 1) / M E[var]``. Needs ``M >= 2``."""
    y, x = _pair(truth, ens)
    M = x.shape[1]
    if M < 2:
        raise ValueError(f"the spread-skill ratio needs at least 2 members, got {M}")
    m = _weights(y, x, mask)
    spread = math.sqrt(float(_mean(x.var(1, correction=1), m)))
    skill = math.sqrt(float(_mean((x.mean(1) - y).square(), m)))
    ratio = math.sqrt((M + 1) / M) * spread / skill if skill > 0 else math.inf
    return SpreadSkill(spread, skill, ratio, M)


def rank_histogram(truth: Any, ens: Any, *, mask: Any = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """Counts ``[M + 1]`` of the rank of ``truth`` among the members (Talagrand diagram; Hamill 2001).

    The rank is the number of members below the truth; ties (members equal to the truth) are
    broken uniformly at random with ``generator`` (default: a fresh one seeded with 0, so results
    are reproducible). A calibrated ensemble gives a flat histogram.
    """
    y, x = _pair(truth, ens)
    m = _weights(y, x, mask)
    below = (x < y.unsqueeze(1)).sum(1)
    ties = (x == y.unsqueeze(1)).sum(1)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    u = torch.rand(y.shape, generator=g, dtype=torch.float64)
    rank = below + torch.floor(u * (ties + 1)).long()  # uniform on below .. below + ties
    rank = rank if m is None else rank[m]
    return torch.bincount(rank.flatten(), minlength=x.shape[1] + 1)


# ------------------------------------------------------------------------------------------------
# spectra
@dataclass(frozen=True)
class PowerSpectrum:
    """Radially averaged power ``power [K]`` at wavenumbers ``k [K]`` (cycles per unit of the grid
    spacing; bins ``n dk``, ``n = 1..K``, with ``dk = 1 / (spacing * min(H, W))`` and ``K dk`` the
    Nyquist wavenumber 1 / (2 spacing)). White noise of variance s^2 has ``power = s^2`` at all k."""

    k: np.ndarray
    power: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {"k": self.k.tolist(), "power": self.power.tolist()}


def _detrend(x: Tensor, how: Detrend) -> Tensor:
    """Remove the mean or the least-squares plane ``a + b i + c j`` of every field ``[N, H, W]``."""
    if how == "none":
        return x
    if how == "mean":
        return x - x.mean((-2, -1), keepdim=True)
    N, H, W = x.shape
    i, j = torch.meshgrid(torch.linspace(-1, 1, H, dtype=x.dtype), torch.linspace(-1, 1, W, dtype=x.dtype),
                          indexing="ij")
    A = torch.stack([torch.ones_like(i), i, j], -1).reshape(H * W, 3)
    coef = torch.linalg.lstsq(A, x.reshape(N, H * W).T).solution  # [3, N]
    return x - (A @ coef).T.reshape(N, H, W)


def power_spectrum(field: Any, *, detrend: Detrend = "plane", window: Window = "hann",
                   spacing: float = 1.0) -> PowerSpectrum:
    """Radially averaged power spectrum of ``field [..., H, W]`` (averaged over the leading dims).

    Each 2-D field is detrended (``"plane"``: least-squares plane, removing the large-scale gradient
    whose wrap-around would leak power to all wavenumbers), multiplied by a separable Hann window
    (Harris 1978), Fourier transformed, and ``|F|^2 / (H W mean(w^2))`` averaged over the modes
    whose radial wavenumber ``sqrt(kx^2 + ky^2)`` rounds to each bin (modes beyond Nyquist are
    dropped); the window normalisation keeps white noise flat at its variance (plane detrending
    also takes about 10% of the lowest bin's white-noise power on a 32 x 48 grid).
    """
    if detrend not in get_args(Detrend):
        raise ValueError(f"detrend must be one of {get_args(Detrend)}, got {detrend!r}")
    if window not in get_args(Window):
        raise ValueError(f"window must be one of {get_args(Window)}, got {window!r}")
    x = torch.as_tensor(field)
    x = x if x.is_floating_point() else x.double()
    if x.ndim < 2 or min(x.shape[-2:]) < 4:
        raise ValueError(f"power_spectrum: need fields [..., H, W] with H, W >= 4, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("power_spectrum: the field has non-finite values (fill or crop masked areas first)")
    H, W = x.shape[-2:]
    x = _detrend(x.reshape(-1, H, W), detrend)
    w = torch.ones(H, W, dtype=x.dtype)
    if window == "hann":
        w = torch.outer(torch.hann_window(H, periodic=False, dtype=x.dtype),
                        torch.hann_window(W, periodic=False, dtype=x.dtype))
    p = (torch.fft.fft2(x * w).abs().square().mean(0) / (H * W * w.square().mean())).double()
    ky, kx = torch.fft.fftfreq(H, d=spacing).double(), torch.fft.fftfreq(W, d=spacing).double()
    kr = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    dk = 1.0 / (spacing * min(H, W))
    n_bins = min(H, W) // 2
    idx = torch.round(kr / dk).long()
    keep = (idx >= 1) & (idx <= n_bins)
    sums = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx[keep], p[keep])
    counts = torch.bincount(idx[keep], minlength=n_bins + 1).double()
    k = np.arange(1, n_bins + 1) * dk
    return PowerSpectrum(k=k, power=(sums[1:] / counts[1:]).numpy())


def spectral_error(pred: PowerSpectrum, true: PowerSpectrum, band: Band = "finest_third") -> float:
    """Mean ``|log10(P_pred / P_true)|`` over the finest third of the wavenumber bins (the last
    ``ceil(K / 3)``; ``band="all"``: every bin). 0 for matching spectra; 1 = a factor of 10."""
    if band not in get_args(Band):
        raise ValueError(f"band must be one of {get_args(Band)}, got {band!r}")
    if pred.k.shape != true.k.shape or not np.allclose(pred.k, true.k):
        raise ValueError(f"spectral_error: wavenumbers differ ({pred.k.size} vs {true.k.size} bins)")
    sel = slice(-math.ceil(len(true.k) / 3), None) if band == "finest_third" else slice(None)
    ratio = np.asarray(pred.power)[sel] / np.asarray(true.power)[sel]
    return float(np.mean(np.abs(np.log10(ratio))))


# ------------------------------------------------------------------------------------------------
# everything at once
@dataclass(frozen=True)
class ClimateScores:
    """All scores of one forecast against the truth (fields that need ``M >= 2`` are None for a
    deterministic forecast). Spectra: members' (not the smooth ensemble mean's) and the truth's."""

    members: int
    rmse: float
    mae: float
    bias: float
    crps: float
    crps_fair: float | None
    spread: float | None
    spread_skill: float | None
    rank_histogram: list[int]
    spectral_error: float | None
    spectrum_k: list[float] | None
    spectrum_pred: list[float] | None
    spectrum_true: list[float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def climate_scores(truth: Any, ens: Any, *, mask: Any = None, generator: torch.Generator | None = None,
                   band: Band = "finest_third", spacing: float = 1.0) -> ClimateScores:
    """Every score of ``ens [T, M, H, W]`` (or ``[T, H, W]``) against ``truth [T, H, W]``.

    Spectra are skipped (None) when a mask excludes points, since masked fields have holes.
    """
    y, x = _pair(truth, ens)
    M = x.shape[1]
    ss = spread_skill(y, x, mask) if M >= 2 else None
    spec: tuple[PowerSpectrum, PowerSpectrum] | None = None
    if mask is None or bool(torch.as_tensor(mask).all()):
        spec = (power_spectrum(x.reshape(-1, *x.shape[-2:]), spacing=spacing),
                power_spectrum(y, spacing=spacing))
    return ClimateScores(
        members=M, rmse=rmse(y, x, mask), mae=mae(y, x, mask), bias=bias(y, x, mask),
        crps=crps(y, x, fair=False, mask=mask), crps_fair=crps(y, x, mask=mask) if M >= 2 else None,
        spread=ss.spread if ss else None, spread_skill=ss.ratio if ss else None,
        rank_histogram=rank_histogram(y, x, mask=mask, generator=generator).tolist(),
        spectral_error=spectral_error(*spec, band=band) if spec else None,
        spectrum_k=spec[1].k.tolist() if spec else None,
        spectrum_pred=spec[0].power.tolist() if spec else None,
        spectrum_true=spec[1].power.tolist() if spec else None,
    )
