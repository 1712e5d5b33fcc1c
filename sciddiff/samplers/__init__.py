"""Samplers (plain functions) and time grids (separate, composable)."""

from ._common import Callback, StepInfo
from ._grid import TimeGrid, default_grid, edm_rho, logsnr_uniform, trailing, uniform_time
from ._samplers import ddim, ddpm, dpmpp_2m, euler, euler_maruyama, heun, pc_langevin

__all__ = [
    "Callback", "StepInfo", "TimeGrid", "default_grid", "edm_rho", "logsnr_uniform", "trailing",
    "uniform_time", "ddim", "ddpm", "dpmpp_2m", "euler", "euler_maruyama", "heun", "pc_langevin",
]
