"""What every sampler shares: grid resolution, model calls, projection, progress, callbacks, and
the NaN/Inf stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core import Level, Model, Prediction, State, check_compatible
from ._grid import TimeGrid, default_grid


@dataclass(frozen=True)
class StepInfo:
    """Passed to ``callback`` after each step: step ``i`` (0-based) went from grid point i to i+1.

    ``x``: the new iterate (canonical, e.g. wrapped on the torus); ``x0``: the data prediction
    used for the step; ``t, sigma``: grid values at the new point.
    """

    i: int
    t: float
    sigma: float
    x: State
    x0: State


Callback = Callable[[StepInfo], None]


class Loop:
    """Shared sampler plumbing. ``model.predict`` is called only through ``predict`` so NFE and
    levels stay consistent; ``finish_step`` projects, checks finiteness, reports."""

    def __init__(self, name: str, model: Model, x: State, grid: TimeGrid | int,
                 callback: Callback | None, progress: bool) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"{name}: model must be a sciddiff Model (network + process + param)")
        check_compatible(model.process, x)
        self.name, self.model, self.callback = name, model, callback
        self.grid = default_grid(model.process, grid) if isinstance(grid, int) else grid
        g = self.grid
        dt = x.dtype
        self.t = g.t.to(dt).to(x.device)
        self.alpha = g.alpha.to(dt).to(x.device)
        self.sigma = g.sigma.to(dt).to(x.device)
        # the grid as python numbers: messages, callbacks, and coefficients that State.lincomb
        # fuses into one pass
        self._t_host = g.t.tolist()
        self.alpha_host = g.alpha.tolist()
        self.sigma_host = g.sigma.tolist()
        self._bar = tqdm(total=g.steps, desc=name, disable=not progress, leave=False)

    @property
    def steps(self) -> int:
        return self.grid.steps

    def is_clean(self, i: int) -> bool:
        return self.grid.clean_last and i == self.grid.steps

    def predict(self, x: State, i: int) -> Prediction:
        """Model prediction at grid point ``i`` (never the clean point)."""
        if self.is_clean(i):
            raise RuntimeError(f"{self.name}: the model is not evaluated at the clean point")
        return self.model.predict(x, self.t[i], self.alpha[i], self.sigma[i])

    def predict_at(self, x: State, t: Tensor) -> Prediction:
        """Model prediction at an off-grid time (midpoints)."""
        p = self.model.process
        return self.model.predict(x, t, p.alpha(t), p.sigma(t))

    def level(self, i: int) -> Level:
        return Level(self.alpha[i], self.sigma[i])

    def finish_step(self, i: int, x: State, x0: State) -> State:
        """Project after step ``i`` (landing on point i+1), check, report; returns the iterate."""
        x = x.project(self.level(i + 1))
        x.check_finite(f"{self.name}, step {i + 1}/{self.steps} (t={self._t_host[i + 1]:.6g})")
        if self.callback is not None:
            self.callback(StepInfo(i, self._t_host[i + 1], self.sigma_host[i + 1], x.canonical(),
                                   x0.canonical()))
        self._bar.update(1)
        return x

    def done(self, x: State) -> State:
        self._bar.close()
        return x.canonical()

    def noise(self, x: State, generator: torch.Generator | None) -> State:
        return x.randn_like(generator)

    def require_finite_start(self, what: str) -> None:
        if float(self.grid.alpha[0]) <= 0:
            raise ValueError(
                f"{self.name}: {what} needs alpha > 0 at the first grid time (got alpha = 0 at "
                f"t = {self._t_host[0]}); start the grid below t_max or use a data-prediction "
                "sampler (ddim, dpmpp_2m) or a flow sampler"
            )
