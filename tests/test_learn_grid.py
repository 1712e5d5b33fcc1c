"""Learned grids (LD3-style): the differentiable twin equals the plain samplers, its gradient is
right, and learning lowers the error on starting points it never saw."""

from __future__ import annotations

import pytest
import torch

from sciddiff.core import VP, LinearInterpolant, Model, State
from sciddiff.samplers import (
    adaptive,
    dpmpp_pc,
    edm_rho,
    learn_grid,
    logsnr_uniform,
    solve_on_grid,
    unipc,
)
from sciddiff.testing import ExactDenoiser, ZeroCoMGaussian, ring_mixture


def _ring_model(dtype, process=None):
    proc = VP(timesteps=1000) if process is None else process
    dist = ring_mixture().to(dtype)
    return dist, Model(ExactDenoiser(dist, proc, "eps"), proc, "eps")


def _starts(dist, proc, n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(proc.t_max, dtype=torch.float64)
    x0 = dist.sample(n, g).to(dtype)
    a, s = proc.alpha(t).to(dtype), proc.sigma(t).to(dtype)
    return State.from_tensor(a * x0 + s * torch.randn(x0.shape, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["unipc", "dpmpp_pc"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final_step", ["denoise", "adams"])
def test_twin_solver_equals_the_plain_sampler(dtype, solver, order, final_step):
    dist, model = _ring_model(dtype)
    x = _starts(dist, model.process, 64, 0, dtype)
    fn = unipc if solver == "unipc" else dpmpp_pc
    tol = 1e-11 if dtype == torch.float64 else 2e-4
    for grid in (logsnr_uniform(model.process, 9), edm_rho(model.process, 9)):
        want = fn(model, x, grid, order=order, final_step=final_step)["x"]
        got = solve_on_grid(model, x, grid.t[:-1], solver=solver, order=order, final_step=final_step)["x"]
        assert float((got - want).abs().max()) < tol * (1 + float(want.abs().max()))


def test_twin_keeps_zero_com():
    dist = ZeroCoMGaussian(std=1.0)
    proc = VP()
    x = proc.prior(dist.sample([3, 5, 4], torch.Generator().manual_seed(0), dtype=torch.float64),
                   torch.Generator().manual_seed(1))
    model = Model(ExactDenoiser(dist, proc, "eps", field="pos"), proc, "eps")
    grid = logsnr_uniform(proc, 6)
    want = unipc(model, x, grid)["pos"]
    got = solve_on_grid(model, x, grid.t[:-1])["pos"]
    assert torch.allclose(got, want, atol=1e-12)
    com = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, x.batch["pos"], got)
    assert float(com.abs().max()) < 1e-12


def test_gradient_in_the_grid_matches_finite_differences():
    """Continuous-time VP (smooth alpha(t)), so the loss is differentiable in the times."""
    dist, model = _ring_model(torch.float64, VP())
    x = _starts(dist, model.process, 16, 0, torch.float64)
    t = logsnr_uniform(model.process, 5).t[:-1].clone().requires_grad_(True)
    f = lambda tt: solve_on_grid(model, x, tt, final_step="adams")["x"].square().sum()  # noqa: E731
    assert torch.autograd.gradcheck(lambda tt: f(torch.cat([t[:1].detach(), tt])), (t[1:],),
                                    eps=1e-7, atol=1e-5, rtol=1e-4)


def test_learned_grid_beats_its_start_on_held_out_points():
    dist, model = _ring_model(torch.float64)
    proc = model.process
    train, held = _starts(dist, proc, 128, 1, torch.float64), _starts(dist, proc, 256, 2, torch.float64)
    teach = lambda x: adaptive(model, x, rtol=1e-9, atol=1e-9).x  # noqa: E731
    learned = learn_grid(model, train, teach(train), steps=8, iters=40, lr=0.1)
    grid = learned.grid
    assert grid.steps == 8 and grid.clean_last
    assert float(grid.t[0]) == proc.t_max and bool((grid.t[1:-1] >= proc.t_min).all())
    assert learned.best_loss < 0.5 * learned.initial_loss and len(learned.losses) == 41
    assert learned.nfe == 41 * 8
    ref = teach(held)["x"]
    err = lambda out: float((out["x"] - ref).norm(dim=1).mean())  # noqa: E731
    before = err(unipc(model, held, logsnr_uniform(proc, 8)))
    after = err(learned.sample(model, held))
    assert after < 0.5 * before, (before, after)


def test_learn_grid_teacher_default_and_errors():
    dist, model = _ring_model(torch.float64)
    x = _starts(dist, model.process, 32, 3, torch.float64)
    learned = learn_grid(model, x, steps=4, iters=2)   # default teacher: adaptive
    assert learned.grid.steps == 4 and len(learned.losses) == 3
    with pytest.raises(ValueError, match="solver"):
        learn_grid(model, x, x, steps=4, solver="heun")
    with pytest.raises(ValueError, match="at least 2 steps"):
        learn_grid(model, x, x, steps=1)
    with pytest.raises(ValueError, match="init"):
        learn_grid(model, x, x, steps=4, init=logsnr_uniform(model.process, 5))
    flow = Model(ExactDenoiser(dist, LinearInterpolant(), "eps"), LinearInterpolant(), "eps")
    with pytest.raises(ValueError, match="alpha = 0"):
        learn_grid(flow, x, x, steps=4)
