"""EDM preconditioning (Karras et al. 2022, Table 1, "Ours"), as a wrapper around any network."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._process import GaussianProcess
from ._state import State


class EDMPrecond(nn.Module):
    """``D(x; s) = c_skip(s) y + c_out(s) F(c_in(s) y, c_noise(s))`` in scaled variables.

    ``y = x / alpha`` and ``s = sigma / alpha`` make the wrapper valid for every Gaussian process
    (for EDM itself ``alpha = 1``). The wrapped ``net(x: State, c_noise: Tensor[B]) -> State`` sees
    unit-variance inputs; the wrapper returns an ``x0`` prediction (use ``param="x0"``). A condition
    (``forward(x, t, cond)``) is passed to the wrapped network unchanged: ``net(x, c_noise, cond)``.

    Shapes: ``x`` any State with B systems, ``t [B]``; output like ``x``.
    """

    def __init__(self, net: nn.Module, process: GaussianProcess, sigma_data: float = 0.5) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError("EDMPrecond: sigma_data must be positive")
        self.net, self.process, self.sigma_data = net, process, float(sigma_data)

    def coefficients(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for scaled noise levels ``s [B]``."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s**2 + sd2)
        c_in = 1 / torch.sqrt(s**2 + sd2)
        c_noise = torch.log(s) / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: State, t: Tensor, cond: Mapping[str, Tensor] | None = None) -> State:
        for k in x.keys():
            if x.constraint(k).needs_variance_exploding:
                raise ValueError(f"EDMPrecond: field {k!r} is on the torus; predict its score instead")
        alpha = self.process.alpha(t).to(x.dtype)
        s = self.process.sigma(t).to(x.dtype) / alpha
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        y = x / alpha
        f = self.net(y * c_in, c_noise) if cond is None else self.net(y * c_in, c_noise, cond)
        return y.lincomb(c_skip, f, c_out)
