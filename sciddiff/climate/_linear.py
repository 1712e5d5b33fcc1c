"""Local linear downscaling: a per-pixel ridge regression on the surrounding coarse cells.

The classical statistical-downscaling baseline (linear "perfect prognosis" regression on a
neighbourhood of large-scale predictors, e.g. Maraun & Widmann 2018, "Statistical Downscaling and
Bias Correction for Climate Research", ch. 11; Gutierrez et al. 2019, VALUE): every fine cell ``p``
gets its own linear map from the ``(2 R + 1)^2`` coarse cells centred on the coarse cell that
contains it. Features are anomalies from the field's spatial mean ``m`` (per field and channel),
and the prediction adds ``m`` back::

    y_p = m + b_p + sum_j w_pj (x_j - m)

so a constant shift of the input shifts the output by the same constant (exactly; tested). The
coefficients are the ridge solution (Hoerl & Kennard 1970) of the summed squared error over the
training fields plus ``ridge * |w_p|^2`` (the intercept ``b_p`` is not penalised), in float64.

Fine cells of one coarse cell share their features, so the normal matrices are per coarse cell
``[h, w, K, K]`` and solved once for the ``f^2`` fine cells inside it. Edges: the neighbourhood is
clamped at the grid edge (edge values repeated) and wraps around in longitude for a global grid
(``periodic_lon``). The coefficients belong to one grid: the model does not transfer to another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def _neighbourhood(coarse: Tensor, radius: int, periodic_lon: bool) -> Tensor:
    """``[T, C, h, w] -> [T, C, h, w, (2 R + 1)^2]``: the coarse cells around each cell (rows then
    columns, offsets ``-R .. R``), edge-clamped, wrapped in longitude if ``periodic_lon``."""
    h, w = coarse.shape[-2:]
    rows = (torch.arange(h)[:, None] + torch.arange(-radius, radius + 1)).clamp(0, h - 1)  # [h, 2R+1]
    cols = torch.arange(w)[:, None] + torch.arange(-radius, radius + 1)
    cols = cols % w if periodic_lon else cols.clamp(0, w - 1)                               # [w, 2R+1]
    x = coarse[..., rows, :]                         # [T, C, h, 2R+1, w]
    x = x[..., cols]                                 # [T, C, h, 2R+1, w, 2R+1]
    return x.permute(0, 1, 2, 4, 3, 5).reshape(*coarse.shape, -1)


def _n_coefficients(radius: int) -> int:
    """``K + 1``: the ``(2 R + 1)^2`` neighbourhood weights and the intercept of one fine cell."""
    return (2 * radius + 1) ** 2 + 1


def _design(coarse: Tensor, radius: int, periodic_lon: bool) -> tuple[Tensor, Tensor]:
    """Features ``[T, C, h, w, K + 1]`` (anomalies, then a 1 for the intercept) and the field means
    ``[T, C, 1, 1]``."""
    m = coarse.mean(dim=(-2, -1), keepdim=True)
    x = _neighbourhood(coarse - m, radius, periodic_lon)
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1), m


def _check_fields(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"local linear: {name} must be a tensor [T, C, H, W], got {shape}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        first = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise ValueError(f"local linear: {name} has {bad} NaN/inf values (first at field {first[0]}, "
                         f"channel {first[1]}); fill or drop those fields first")


@dataclass(frozen=True)
class LocalLinear:
    """A fitted local linear downscaler (see the module docstring; build with `fit_local_linear`).

    Attributes:
        coef: ``[C, H, W, K + 1]`` float64, ``K = (2 radius + 1)^2`` neighbourhood weights then the
            intercept, per fine cell of the training grid ``H x W``.
        factor: fine cells per coarse cell along each axis.
        radius: neighbourhood radius in coarse cells.
        ridge: the penalty the coefficients were fitted with (NaN where unknown).
        periodic_lon: whether the neighbourhood wraps around in longitude.
    """

    coef: Tensor
    factor: int
    radius: int
    ridge: float
    periodic_lon: bool = False

    def __post_init__(self) -> None:
        if not (math.isnan(self.ridge) or self.ridge >= 0):
            raise ValueError(f"LocalLinear: ridge must be >= 0 (NaN: unknown), got {self.ridge}")
        k = _n_coefficients(self.radius)
        if self.coef.ndim != 4 or self.coef.shape[-1] != k:
            raise ValueError(f"LocalLinear: coef must be [C, H, W, {k}] for radius {self.radius}, "
                             f"got {tuple(self.coef.shape)}")
        H, W = self.coef.shape[1:3]
        if self.factor < 1 or H % self.factor or W % self.factor:
            raise ValueError(f"LocalLinear: grid {H} x {W} is not a multiple of factor {self.factor}")

    @property
    def grid(self) -> tuple[int, int]:
        """The fine grid ``(H, W)`` the coefficients belong to."""
        return int(self.coef.shape[1]), int(self.coef.shape[2])

    def predict(self, coarse: Tensor) -> Tensor:
        """``coarse [B, C, h, w] -> [B, C, h f, w f]`` in ``coarse``'s dtype (float64 inside)."""
        _check_fields("coarse", coarse)
        C, (H, W), f = self.coef.shape[0], self.grid, self.factor
        if coarse.shape[1] != C or tuple(coarse.shape[-2:]) != (H // f, W // f):
            raise ValueError(f"LocalLinear.predict: coarse must be [B, {C}, {H // f}, {W // f}] (the grid "
                             f"the model was fitted on), got {tuple(coarse.shape)}")
        a, m = _design(coarse.double(), self.radius, self.periodic_lon)   # [B, C, h, w, K+1]
        coef = self.coef.to(a.device).reshape(C, H // f, f, W // f, f, -1)
        y = torch.einsum("bcuvk,cuivjk->bcuivj", a, coef).reshape(a.shape[0], C, H, W)
        return (y + m).to(coarse.dtype)


def fit_local_linear(coarse: Tensor, fine: Tensor, *, radius: int = 2, ridge: float = 1.0,
                     periodic_lon: bool = False, chunk: int = 256) -> LocalLinear:
    """Fit `LocalLinear` on training pairs ``coarse [T, C, h, w]``, ``fine [T, C, h f, w f]``.

    ``ridge`` (>= 0, in squared input units): the L2 penalty on the weights; ``ridge = 0`` needs at
    least ``K + 1`` training fields and gives the minimum-norm least-squares fit (at the grid edge,
    clamped neighbours repeat, so only their summed weight is determined). ``chunk`` fields at a
    time go into the normal equations, which bounds memory for long records.
    """
    _check_fields("coarse", coarse)
    _check_fields("fine", fine)
    T, C, h, w = coarse.shape
    H, W = fine.shape[-2:]
    if fine.shape[:2] != (T, C) or H % h or W % w or H // h != W // w:
        raise ValueError(f"fit_local_linear: fine {tuple(fine.shape)} must be [{T}, {C}, {h} f, {w} f] "
                         f"for coarse {tuple(coarse.shape)}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"fit_local_linear: radius must be a non-negative integer, got {radius!r}")
    if not ridge >= 0:
        raise ValueError(f"fit_local_linear: ridge must be >= 0, got {ridge}")
    if int(chunk) < 1:
        raise ValueError(f"fit_local_linear: chunk must be >= 1, got {chunk}")
    f = H // h
    K = _n_coefficients(radius)
    if ridge == 0 and T < K:
        raise ValueError(f"fit_local_linear: {T} training fields cannot determine {K} coefficients per "
                         "cell without a penalty; pass ridge > 0")
    opts = dict(dtype=torch.float64, device=coarse.device)
    AtA = torch.zeros(C, h, w, K, K, **opts)
    Atb = torch.zeros(C, h, f, w, f, K, **opts)
    for s in range(0, T, chunk):
        a, m = _design(coarse[s:s + chunk].double(), radius, periodic_lon)
        b = (fine[s:s + chunk].double() - m).reshape(-1, C, h, f, w, f)
        AtA += torch.einsum("tcuvk,tcuvl->cuvkl", a, a)
        Atb += torch.einsum("tcuvk,tcuivj->cuivjk", a, b)
    penalty = torch.full((K,), float(ridge), **opts)
    penalty[-1] = 0.0  # the intercept is not shrunk
    AtA += torch.diag(penalty)
    rhs = Atb.permute(0, 1, 3, 5, 2, 4).reshape(C, h, w, K, f * f)   # [C, h, w, K, f f]
    if ridge > 0:  # positive definite: the weights are penalised and the intercept sees every field
        sol = torch.linalg.solve(AtA, rhs)                            # [C, h, w, K, f f]
    else:  # edge cells repeat clamped neighbours: the minimum-norm solution (pseudo-inverse)
        sol = torch.linalg.pinv(AtA, hermitian=True) @ rhs
    coef = sol.reshape(C, h, w, K, f, f).permute(0, 1, 4, 2, 5, 3).reshape(C, h * f, w * f, K)
    return LocalLinear(coef.contiguous(), f, radius, float(ridge), bool(periodic_lon))


class LinearMean(nn.Module):
    """A `LocalLinear` map as the downscaler's mean stage (``mean_model="local_linear"``), in the
    normalised units of ``Downscaler``: ``mean(cond)`` reads the normalised coarse field
    ``cond["coarse"] [B, C, h, w]`` and returns ``[B, C, h f, w f]``, like ``RegressionNet.mean``.

    With ``x = std x_n + mean`` per channel, the physical map ``m + b + W (x - m)`` is, in normalised
    units, ``m_n + b / std + W (x_n - m_n)``: the same weights and a rescaled intercept
    (`set_fit`). The coefficients are a buffer ``coef [C, H, W, K + 1]`` of the training grid
    ``H x W``; other grids are refused.
    """

    def __init__(self, channels: int, grid: Sequence[int], factor: int, radius: int = 2,
                 periodic_lon: bool = False) -> None:
        super().__init__()
        self.channels, self.factor, self.radius = int(channels), int(factor), int(radius)
        self.grid, self.periodic_lon = (int(grid[0]), int(grid[1])), bool(periodic_lon)
        self.register_buffer("coef", torch.zeros(self.channels, *self.grid, _n_coefficients(self.radius)))

    @property
    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "grid": list(self.grid), "factor": self.factor,
                "radius": self.radius, "periodic_lon": self.periodic_lon}

    def set_fit(self, fit: LocalLinear, std: Sequence[float]) -> LinearMean:
        """Take the coefficients of ``fit`` (fitted in physical units with per-channel ``std``)."""
        if tuple(fit.coef.shape) != tuple(self.coef.shape) or fit.radius != self.radius:
            raise ValueError(f"LinearMean: fit coefficients {tuple(fit.coef.shape)} (radius {fit.radius}) "
                             f"do not match {tuple(self.coef.shape)} (radius {self.radius})")
        coef = fit.coef.clone()
        coef[..., -1] /= torch.as_tensor(list(std), dtype=coef.dtype).reshape(-1, 1, 1)
        self.coef.copy_(coef.to(self.coef))
        return self

    def local_linear(self) -> LocalLinear:
        """The map in normalised units as a `LocalLinear` (float64 coefficients)."""
        return LocalLinear(self.coef.double(), self.factor, self.radius, float("nan"), self.periodic_lon)

    def mean(self, cond: Mapping[str, Tensor]) -> Tensor:
        """Normalised mean ``[B, C, H, W]`` from ``cond["coarse"] [B, C, h, w]`` (normalised)."""
        if "coarse" not in cond:
            raise ValueError(f"LinearMean: the condition lacks 'coarse'; got {sorted(cond)}")
        return self.local_linear().predict(cond["coarse"])
