"""Samplers (plain functions) and time grids (separate, composable)."""

from ._adaptive import AdaptiveResult, adaptive
from ._common import Callback, StepInfo
from ._flow import flow_euler, flow_heun, flow_midpoint
from ._grid import TimeGrid, default_grid, edm_rho, logsnr_uniform, trailing, uniform_time
from ._learn import LearnedGrid, learn_grid, solve_on_grid
from ._multistep import dpmpp_pc, unipc
from ._samplers import ddim, ddpm, dpmpp_2m, euler, euler_maruyama, heun, pc_langevin

__all__ = [
    "AdaptiveResult", "adaptive",
    "Callback", "StepInfo", "TimeGrid", "default_grid", "edm_rho", "logsnr_uniform", "trailing",
    "uniform_time", "ddim", "ddpm", "dpmpp_2m", "dpmpp_pc", "euler", "euler_maruyama", "heun", "pc_langevin",
    "flow_euler", "flow_heun", "flow_midpoint", "unipc", "LearnedGrid", "learn_grid", "solve_on_grid",
]
