"""Parameterizations (eps, x0, v, score, velocity) and the Model that turns a network into
denoised estimates.

With ``x_t = alpha x_0 + sigma eps`` the five targets are (Kingma et al. 2021; Salimans & Ho 2022;
Lipman et al. 2023):

    eps;   x0;   v = alpha eps - sigma x0;   score = -eps / sigma;
    velocity = dx_t/dt = alpha' x0 + sigma' eps

and each is an invertible linear function of ``(x_t, eps)``, so conversions are exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from ._constraints import Constraint
from ._process import GaussianProcess, check_compatible
from ._state import State

Param = Literal["eps", "x0", "v", "score", "velocity"]
PARAMS: tuple[str, ...] = get_args(Param)


class Denoiser(Protocol):
    """A network: ``net(x_t: State, t: Tensor[B]) -> State`` (same fields, in ``param`` space)."""

    def __call__(self, x: State, t: Tensor) -> State: ...


@dataclass(frozen=True)
class Prediction:
    """Denoised estimates at one level; ``x0`` lies on the integration variable's cover, so
    ``x = alpha * x0 + sigma * eps`` holds exactly field by field."""

    x0: State
    eps: State


def _check_param(param: str) -> None:
    if param not in PARAMS:
        raise ValueError(f"unknown parameterization {param!r}; expected one of {PARAMS}")


def _field_to_eps_x0(
    raw: Tensor, x: Tensor, c: Constraint, param: str, a, s, da, ds
) -> tuple[Tensor, Tensor]:
    torus = c.needs_variance_exploding
    if param == "eps":
        eps = raw
    elif param == "score":
        eps = -s * raw
    elif param == "x0":
        if not torus:
            return raw, (x - a * raw) / s
        eps = c.difference(x, raw) / s
    elif param == "v":
        if torus:
            raise ValueError("the v parameterization is not periodic; use eps, x0 or score on the torus")
        n = a * a + s * s
        return (a * x - s * raw) / n, (s * x + a * raw) / n
    else:  # velocity
        det = a * ds - s * da
        if not torus:
            return (ds * x - s * raw) / det, (a * raw - da * x) / det
        eps = raw / ds
    return (x - s * eps) / a, eps


def to_prediction(
    raw: State, x: State, param: Param, alpha, sigma, d_alpha=None, d_sigma=None
) -> Prediction:
    """Convert a network output ``raw`` in ``param`` space at ``x`` to ``Prediction(x0, eps)``.

    ``alpha, sigma`` (and for ``velocity`` ``d_alpha, d_sigma``) are scalars or per-system [B].
    """
    _check_param(param)
    if param == "velocity" and (d_alpha is None or d_sigma is None):
        raise ValueError("the velocity parameterization needs d_alpha and d_sigma")
    x0, eps = {}, {}
    for k, v in x.items():
        ex = x.expand
        x0[k], eps[k] = _field_to_eps_x0(
            raw[k], v, x.constraint(k), param, ex(alpha, k), ex(sigma, k),
            ex(d_alpha, k) if d_alpha is not None else None,
            ex(d_sigma, k) if d_sigma is not None else None,
        )
    return Prediction(x._with(x0), x._with(eps))


def from_prediction(
    x0: State, eps: State, param: Param, alpha, sigma, d_alpha=None, d_sigma=None
) -> State:
    """The ``param``-space value of ``(x0, eps)`` (the regression target of a loss)."""
    _check_param(param)
    if param == "eps":
        return eps
    if param == "x0":
        return x0
    if param == "score":
        return eps * (-1.0 / sigma)
    if param == "v":
        return eps.lincomb(alpha, x0, -sigma)
    return x0.lincomb(d_alpha, eps, d_sigma)


def eps_error_scale(param: Param, alpha, sigma, d_alpha=None, d_sigma=None):
    """``|d eps / d raw|``: an error ``e`` in ``param`` space is ``scale * e`` in eps space."""
    _check_param(param)
    if param == "eps":
        return torch.ones_like(torch.as_tensor(sigma))
    if param == "score":
        return sigma
    if param == "x0":
        return alpha / sigma
    if param == "v":
        return alpha / (alpha * alpha + sigma * sigma)
    return (alpha / (alpha * d_sigma - sigma * d_alpha)).abs()


class Model:
    """A network together with its process and parameterization: what samplers call.

    Wraps, does not subclass: ``net`` is any callable ``net(x: State, t: Tensor[B]) -> State``, or,
    for a conditional model, ``net(x, t, cond) -> State`` with ``cond`` a mapping of tensors whose
    leading dim is B (e.g. a coarse field ``[B, C, h, w]``). ``cond`` is bound to the Model
    (``with_cond``), so every sampler and loss works unchanged for conditional models.
    ``predict(x, t)`` passes the canonical ``x`` (torus: wrapped) and returns ``Prediction``.
    """

    def __init__(self, net: Denoiser, process: GaussianProcess, param: Param = "eps",
                 cond: Mapping[str, Tensor] | None = None) -> None:
        _check_param(param)
        if not callable(net):
            raise TypeError("Model: net must be callable as net(x: State, t: Tensor) -> State")
        if cond is not None:
            if not isinstance(cond, Mapping) or not all(isinstance(v, Tensor) for v in cond.values()):
                raise TypeError("Model: cond must be a mapping of name -> torch.Tensor")
            cond = dict(cond)
        self.net, self.process, self.param, self.cond = net, process, param, cond
        self.nfe = 0

    def with_cond(self, cond: Mapping[str, Tensor] | None) -> Model:
        """The same network, process and parameterization with ``cond`` bound (a new Model)."""
        return Model(self.net, self.process, self.param, cond)

    def call_net(self, x: State, t: Tensor) -> State:
        """``net(x, t)``, or ``net(x, t, cond)`` when a condition is bound (checked against B)."""
        if self.cond is None:
            return self.net(x, t)
        for k, v in self.cond.items():
            if v.shape[0] != x.num_systems:
                raise ValueError(
                    f"Model: condition {k!r} has leading dim {v.shape[0]}, but the state has "
                    f"{x.num_systems} systems"
                )
        return self.net(x, t, self.cond)

    def predict(self, x: State, t: Tensor, alpha=None, sigma=None) -> Prediction:
        """Denoise ``x`` at time ``t`` (0-d or [B]); ``alpha, sigma`` default to the process's."""
        if t.ndim == 0:
            t_b = t.expand(x.num_systems)
        else:
            t_b = t
        # Coefficients in the state's dtype: float64 times [B] would promote float32 predictions.
        alpha = self.process.alpha(t).to(x.dtype) if alpha is None else alpha
        sigma = self.process.sigma(t).to(x.dtype) if sigma is None else sigma
        raw = self.call_net(x.canonical(), t_b)
        self.nfe += 1
        da = ds = None
        if self.param == "velocity":
            da, ds = self.process.d_alpha(t).to(x.dtype), self.process.d_sigma(t).to(x.dtype)
        return to_prediction(raw, x, self.param, alpha, sigma, da, ds)

    def check(self, state: State) -> None:
        check_compatible(self.process, state)

    def __repr__(self) -> str:
        c = f", cond={sorted(self.cond)}" if self.cond is not None else ""
        return f"Model(process={self.process!r}, param={self.param!r}{c})"
