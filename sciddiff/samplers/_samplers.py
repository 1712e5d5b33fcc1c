"""Samplers: one algorithm per function, for any State and any Gaussian process.

All work in the scaled variables ``y = x / alpha``, ``s = sigma / alpha`` (or, equivalently, in
data-prediction form) so one implementation serves VP, VE, EDM and flow paths. Shapes: ``x`` is the
starting State (B systems, e.g. ``process.prior(template)``); every sampler returns a State of the
same layout, canonical (torus fields wrapped).
"""

from __future__ import annotations

import torch

from ..core import Model, State
from ._common import Callback, Loop
from ._grid import TimeGrid


def _sqrt_pos(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(x, min=0))


@torch.no_grad()
def ddim(model: Model, x: State, grid: TimeGrid | int, *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback | None = None,
         progress: bool = False) -> State:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12): ``x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c z``
    with ``c = eta * sigma' * sqrt(1 - exp(2 (lambda - lambda')))`` (the posterior std at eta=1)."""
    return _ddim("ddim", model, x, grid, eta, generator, callback, progress)


def _ddim(name: str, model: Model, x: State, grid: TimeGrid | int, eta: float,
          generator: torch.Generator | None, callback: Callback | None, progress: bool) -> State:
    if eta < 0:
        raise ValueError(f"{name}: eta must be >= 0")
    loop = Loop(name, model, x, grid, callback, progress)
    lam = loop.grid.log_snr.to(x.dtype)
    for i in range(loop.steps):
        p = loop.predict(x, i)
        if eta > 0:
            a1, s1 = loop.alpha[i + 1], loop.sigma[i + 1]
            c = eta * s1 * _sqrt_pos(-torch.expm1(2 * (lam[i] - lam[i + 1])))
            x_new = p.x0.lincomb(a1, p.eps, _sqrt_pos(s1**2 - c**2))
            if not loop.is_clean(i + 1):
                x_new = x_new + loop.noise(x, generator) * c
        else:  # python-number coefficients: one fused pass (State.lincomb)
            x_new = (p.x0 * loop.alpha_host[i + 1]).lincomb(1.0, p.eps, loop.sigma_host[i + 1])
        x = loop.finish_step(i, x_new, p.x0)
    return loop.done(x)


@torch.no_grad()
def ddpm(model: Model, x: State, grid: TimeGrid | int, *, generator: torch.Generator | None = None,
         callback: Callback | None = None, progress: bool = False) -> State:
    """Ancestral sampling (Ho et al. 2020, Alg. 2): a draw from the posterior
    ``q(x_s | x_t, x0_hat)`` at each step; equal to DDIM with eta = 1 on any grid."""
    return _ddim("ddpm", model, x, grid, 1.0, generator, callback, progress)


@torch.no_grad()
def euler(model: Model, x: State, grid: TimeGrid | int, *, callback: Callback | None = None,
          progress: bool = False) -> State:
    """Euler on the probability-flow ODE ``dy/ds = eps`` (Karras et al. 2022, Alg. 1 without the
    correction). In data-prediction form ``x' = alpha' (x0 + s' eps)``, i.e. deterministic DDIM."""
    return _ddim("euler", model, x, grid, 0.0, None, callback, progress)


@torch.no_grad()
def heun(model: Model, x: State, grid: TimeGrid | int, *, callback: Callback | None = None,
         progress: bool = False) -> State:
    """Heun's 2nd-order method on ``dy/ds = eps`` (Karras et al. 2022, Alg. 1); the last step into
    the clean point is an Euler step. NFE = 2 * steps - 1 with a clean point."""
    loop = Loop("heun", model, x, grid, callback, progress)
    loop.require_finite_start("heun")
    a = loop.alpha_host   # python numbers: State.lincomb fuses them into one pass
    s = [sg / al for sg, al in zip(loop.sigma_host, a, strict=True)]
    for i in range(loop.steps):
        p = loop.predict(x, i)
        # in x = alpha' y: the Euler point, then the trapezoidal correction on top of it
        h = (s[i + 1] - s[i]) * a[i + 1]
        x_new = (x * (a[i + 1] / a[i])).lincomb(1.0, p.eps, h)
        if not loop.is_clean(i + 1):
            p2 = loop.predict(x_new, i + 1)
            x_new = x_new.lincomb(1.0, p2.eps, 0.5 * h).lincomb(1.0, p.eps, -0.5 * h)
        x = loop.finish_step(i, x_new, p.x0)
    return loop.done(x)


@torch.no_grad()
def euler_maruyama(model: Model, x: State, grid: TimeGrid | int, *,
                   generator: torch.Generator | None = None, callback: Callback | None = None,
                   progress: bool = False) -> State:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, Eq. 6) in scaled variables:
    ``y' = y + (s^2 - s'^2) score_y + sqrt(s^2 - s'^2) z`` with ``score_y = -eps / s``.
    The step into the clean point is deterministic (``x = x0``)."""
    loop = Loop("euler_maruyama", model, x, grid, callback, progress)
    loop.require_finite_start("euler_maruyama")
    a, sg = loop.alpha, loop.sigma
    s = sg / a
    for i in range(loop.steps):
        p = loop.predict(x, i)
        if loop.is_clean(i + 1):
            x_new = p.x0
        else:
            dv = s[i] ** 2 - s[i + 1] ** 2
            y = (x / a[i]).lincomb(1.0, p.eps, -dv / s[i])
            x_new = y.lincomb(1.0, loop.noise(x, generator), torch.sqrt(dv)) * a[i + 1]
        x = loop.finish_step(i, x_new, p.x0)
    return loop.done(x)


@torch.no_grad()
def pc_langevin(model: Model, x: State, grid: TimeGrid | int, *, snr: float = 0.16,
                corrector_steps: int = 1, generator: torch.Generator | None = None,
                callback: Callback | None = None, progress: bool = False) -> State:
    """Predictor-corrector (Song et al. 2021, Alg. 2-5): an ancestral (DDPM) predictor step, then
    ``corrector_steps`` Langevin steps at the new level with step size
    ``2 (snr E||z|| / E||score||)^2`` (norms per system, averaged over the batch)."""
    if snr <= 0 or corrector_steps < 0:
        raise ValueError("pc_langevin: snr must be > 0 and corrector_steps >= 0")
    loop = Loop("pc_langevin", model, x, grid, callback, progress)
    lam = loop.grid.log_snr.to(x.dtype)
    for i in range(loop.steps):
        p = loop.predict(x, i)
        a1, s1 = loop.alpha[i + 1], loop.sigma[i + 1]
        if loop.is_clean(i + 1):
            x = loop.finish_step(i, p.x0, p.x0)
            continue
        c = s1 * _sqrt_pos(-torch.expm1(2 * (lam[i] - lam[i + 1])))
        x_new = p.x0.lincomb(a1, p.eps, _sqrt_pos(s1**2 - c**2)) + loop.noise(x, generator) * c
        x_new = x_new.project(loop.level(i + 1))
        for _ in range(corrector_steps):
            q = loop.predict(x_new, i + 1)
            score = q.eps * (-1.0 / s1)
            z = loop.noise(x, generator)
            # norms averaged over the batch, as in Song et al.'s reference code: per-system norms
            # of low-dimensional systems fluctuate too much to set a step size.
            ratio = z.sqnorm().sqrt().mean() / score.sqnorm().sqrt().mean().clamp(min=1e-30)
            step = 2 * (snr * ratio) ** 2
            x_new = x_new + score * step + z * torch.sqrt(2 * step)
            x_new = x_new.project(loop.level(i + 1))
        x = loop.finish_step(i, x_new, p.x0)
    return loop.done(x)


@torch.no_grad()
def dpmpp_2m(model: Model, x: State, grid: TimeGrid | int, *, lower_order_final: bool = True,
             callback: Callback | None = None, progress: bool = False) -> State:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), multistep in log-SNR with
    data prediction. First order on the first step, and on the last where ``lower_order_final``
    (always into the clean point, where the 2nd-order term is undefined)."""
    loop = Loop("dpmpp_2m", model, x, grid, callback, progress)
    lam = loop.grid.log_snr.to(x.dtype)
    x0_prev, h_prev = None, None
    for i in range(loop.steps):
        p = loop.predict(x, i)
        h = lam[i + 1] - lam[i]
        last = i == loop.steps - 1
        if x0_prev is None or loop.is_clean(i + 1) or (lower_order_final and last and loop.steps < 15):
            d = p.x0
        else:
            r = h_prev / h
            d = p.x0.lincomb(1 + 0.5 / r, x0_prev, -0.5 / r)
        x_new = x.lincomb(loop.sigma[i + 1] / loop.sigma[i], d, -loop.alpha[i + 1] * torch.expm1(-h))
        x0_prev, h_prev = p.x0, h
        x = loop.finish_step(i, x_new, p.x0)
    return loop.done(x)
