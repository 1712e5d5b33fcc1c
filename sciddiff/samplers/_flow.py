"""Flow-matching samplers: explicit Runge-Kutta on ``dx/dt = v(x, t) = alpha'(t) x0 + sigma'(t) eps``.

They integrate in the process's own time t, so they suit flow paths (``LinearInterpolant``, where
``v = eps - x0``), and work for any process whose grid times are true process times (a grid whose
clean point is not the process's ``t_min`` value is refused).
"""

from __future__ import annotations

import torch

from ..core import Model, Prediction, State
from ._common import Callback, Loop
from ._grid import TimeGrid


def _velocity(loop: Loop, p: Prediction, t: torch.Tensor) -> State:
    proc = loop.model.process
    return p.x0.lincomb(proc.d_alpha(t), p.eps, proc.d_sigma(t))


def _flow_loop(name: str, model: Model, x: State, grid: TimeGrid | int, callback, progress) -> Loop:
    loop = Loop(name, model, x, grid, callback, progress)
    g, proc = loop.grid, model.process
    if g.clean_last:
        t_end = g.t[-1:]
        off = (proc.sigma(t_end) - g.sigma[-1:]).abs() + (proc.alpha(t_end) - 1).abs()
        if float(off) > 1e-9:
            raise ValueError(
                f"{name}: the grid ends at a clean point (sigma = 0) that {type(proc).__name__} does not "
                "reach at t_min; integrate in t with final='none', or use an ODE sampler in scaled "
                "variables (dpmpp_pc, heun)"
            )
    return loop


def _eval(loop: Loop, x: State, i: int, t: torch.Tensor | None = None) -> tuple[Prediction, State]:
    """Prediction and velocity at grid point i, or at an off-grid time t."""
    if t is None:
        t = loop.t[i]
        p = loop.model.predict(x, t, loop.alpha[i], loop.sigma[i])
    else:
        p = loop.predict_at(x, t)
    return p, _velocity(loop, p, t)


@torch.no_grad()
def flow_euler(model: Model, x: State, grid: TimeGrid | int, *, callback: Callback | None = None,
               progress: bool = False) -> State:
    """Euler: ``x' = x + (t' - t) v(x, t)`` (Lipman et al. 2023; Liu et al. 2023)."""
    loop = _flow_loop("flow_euler", model, x, grid, callback, progress)
    for i in range(loop.steps):
        p, v = _eval(loop, x, i)
        x = loop.finish_step(i, x.lincomb(1.0, v, loop.t[i + 1] - loop.t[i]), p.x0)
    return loop.done(x)


@torch.no_grad()
def flow_midpoint(model: Model, x: State, grid: TimeGrid | int, *, callback: Callback | None = None,
                  progress: bool = False) -> State:
    """Explicit midpoint (RK2): ``x' = x + dt v(x + dt/2 v(x, t), t + dt/2)``; 2 NFE per step."""
    loop = _flow_loop("flow_midpoint", model, x, grid, callback, progress)
    for i in range(loop.steps):
        dt = loop.t[i + 1] - loop.t[i]
        p, v = _eval(loop, x, i)
        _, v_mid = _eval(loop, x.lincomb(1.0, v, 0.5 * dt), i, loop.t[i] + 0.5 * dt)
        x = loop.finish_step(i, x.lincomb(1.0, v_mid, dt), p.x0)
    return loop.done(x)


@torch.no_grad()
def flow_heun(model: Model, x: State, grid: TimeGrid | int, *, callback: Callback | None = None,
              progress: bool = False) -> State:
    """Heun (explicit trapezoid, RK2): average the velocities at both ends; the step into a point
    with sigma = 0 is an Euler step (as in EDM), where eps-type predictions are undefined."""
    loop = _flow_loop("flow_heun", model, x, grid, callback, progress)
    for i in range(loop.steps):
        dt = loop.t[i + 1] - loop.t[i]
        p, v = _eval(loop, x, i)
        x_new = x.lincomb(1.0, v, dt)
        if float(loop.sigma[i + 1]) > 0:
            _, v2 = _eval(loop, x_new, i + 1)
            x_new = x.lincomb(1.0, v + v2, 0.5 * dt)
        x = loop.finish_step(i, x_new, p.x0)
    return loop.done(x)
