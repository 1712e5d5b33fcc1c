"""Samplers against exact answers: convergence orders on the closed-form PF-ODE, SDE samplers
reproduce mixture weights, flow samplers transport prior to data, constraints hold at every step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sciddiff.core import EDM, VE, VP, FlatTorus, LinearInterpolant, Masked, Model, State
from sciddiff.samplers import (
    TimeGrid,
    ddim,
    ddpm,
    dpmpp_2m,
    dpmpp_pc,
    edm_rho,
    euler,
    euler_maruyama,
    flow_euler,
    flow_heun,
    flow_midpoint,
    heun,
    logsnr_uniform,
    pc_langevin,
    trailing,
    uniform_time,
    unipc,
)
from sciddiff.testing import (
    ExactDenoiser,
    GaussianMixture,
    WrappedNormalMixture,
    ZeroCoMGaussian,
    ring_mixture,
)

DTYPES = [torch.float64, torch.float32]


def _gaussian(dtype):
    return GaussianMixture(torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype),
                           torch.tensor([[0.3, 1.0, 0.05]], dtype=dtype))


def _order(errors: list[float], nfes: list[int]) -> float:
    """Slope of log error against log NFE (negated): the empirical order."""
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


ODE_CASES = [  # sampler, NFE per step, expected order
    (euler, 1, 1.0),
    (heun, 2, 2.0),
    (dpmpp_2m, 1, 2.0),
    (lambda m, x, g: dpmpp_pc(m, x, g, order=2), 1, 3.0),
    (lambda m, x, g: unipc(m, x, g, order=2, lower_order_final=False), 1, 3.0),
]


ODE_IDS = ["euler", "heun", "dpmpp_2m", "dpmpp_pc2", "unipc2"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(ODE_CASES)), ids=ODE_IDS)
@pytest.mark.parametrize("process", [VP(), EDM()], ids=["vp", "edm"])
def test_ode_convergence_order(dtype, case, process):
    """Error against the closed-form PF-ODE solution of a Gaussian falls with the method's order."""
    sampler, per_step, expected = ODE_CASES[case]
    dist = _gaussian(dtype)
    gen = torch.Generator().manual_seed(0)
    t0 = torch.tensor(process.t_max * 0.5 if isinstance(process, EDM) else 0.9, dtype=torch.float64)
    t1 = torch.tensor(process.t_min * 50 if isinstance(process, EDM) else 0.05, dtype=torch.float64)
    a0, s0 = process.alpha(t0), process.sigma(t0)
    x_t = (a0 * dist.sample(256, gen).double() + s0 * torch.randn(256, 3, generator=gen, dtype=torch.float64))
    exact = dist.to(torch.float64).pf_ode_solution(x_t, (a0, s0), (process.alpha(t1), process.sigma(t1)))
    model = Model(ExactDenoiser(dist, process, "eps"), process, "eps")
    steps = [8, 16, 32] if dtype == torch.float32 else [8, 16, 32, 64]
    errs = []
    for n in steps:
        grid = logsnr_uniform(process, n, final="none", t_start=float(t0), t_end=float(t1))
        out = sampler(model, State.from_tensor(x_t.to(dtype)), grid)
        errs.append(float((out["x"].double() - exact).norm(dim=1).mean()))
    order = _order(errs, [n * per_step for n in steps])
    tol = 0.35 if dtype == torch.float64 else 0.5
    assert order > expected - tol, (errs, order)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["unipc", "dpmpp_pc"])
def test_adams_final_step_removes_the_denoising_floor(name, dtype):
    """DDPM's process stops at sigma = 0.01, so the last step jumps to the clean point. The data
    prediction overshoots there (for a component of std s it contracts by s^2/(s^2+sigma^2), the
    ODE by s/sqrt(s^2+sigma^2)); the Adams step on eps, linear in s near 0, does not."""
    process = VP(timesteps=1000)
    dist = _gaussian(dtype)
    gen = torch.Generator().manual_seed(0)
    t0 = torch.tensor(400.0, dtype=torch.float64)
    a0, s0 = process.alpha(t0), process.sigma(t0)
    x_t = a0 * dist.sample(512, gen).double() + s0 * torch.randn(512, 3, generator=gen, dtype=torch.float64)
    exact = dist.to(torch.float64).pf_ode_solution(x_t, (a0, s0), (1.0, 0.0))
    model = Model(ExactDenoiser(dist, process, "eps"), process, "eps")
    grid = logsnr_uniform(process, 40, t_start=float(t0))
    sampler = {"unipc": unipc, "dpmpp_pc": dpmpp_pc}[name]
    errs = {}
    for final in ("denoise", "adams"):
        out = sampler(model, State.from_tensor(x_t.to(dtype)), grid, final_step=final)
        errs[final] = float((out["x"].double() - exact).norm(dim=1).mean())
    assert errs["adams"] < 0.35 * errs["denoise"], errs


@pytest.mark.parametrize("sampler", [flow_euler, flow_midpoint, flow_heun])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_sampler_orders(sampler, dtype):
    """Flow samplers on the linear interpolant with the exact velocity: order 1 (Euler), 2 (others);
    they start at t = 1 (pure noise), where diffusion ODE samplers in scaled variables cannot."""
    proc = LinearInterpolant()
    dist = _gaussian(dtype)
    x1 = torch.randn(256, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_end = 0.05
    exact = dist.to(torch.float64).pf_ode_solution(x1, (0.0, 1.0), (1 - t_end, t_end))
    model = Model(ExactDenoiser(dist, proc, "velocity"), proc, "velocity")
    steps = [4, 8, 16] if dtype == torch.float32 else [8, 16, 32, 64]
    errs = []
    for n in steps:
        grid = uniform_time(proc, n, final="none", t_end=t_end)
        errs.append(float((sampler(model, State.from_tensor(x1.to(dtype)), grid)["x"].double() - exact)
                          .norm(dim=1).mean()))
    expected = 1.0 if sampler is flow_euler else 2.0
    assert _order(errs, steps) > expected - 0.35, errs


def _mode_weights(x: torch.Tensor, dist: GaussianMixture) -> torch.Tensor:
    d = torch.cdist(x.double(), dist.means.double())
    return torch.bincount(d.argmin(1), minlength=dist.means.shape[0]).double() / x.shape[0]


UNEQUAL = torch.tensor([0.3, 0.05, 0.2, 0.05, 0.1, 0.1, 0.15, 0.05])


@pytest.mark.parametrize("name", ["ddpm", "euler_maruyama", "pc_langevin", "ddim_eta0.5"])
def test_sde_samplers_reproduce_mixture(name):
    """Stochastic samplers with the exact score reproduce unequal mode weights within 4 standard
    errors and land within a few component stds of a mode."""
    torch.manual_seed(0)
    ring = ring_mixture(std=0.1)
    dist = GaussianMixture(ring.means, 0.1, UNEQUAL)
    proc = VP(timesteps=1000)
    model = Model(ExactDenoiser(dist, proc, "eps"), proc, "eps")
    n = 4000
    gen = torch.Generator().manual_seed(2)
    x = proc.prior(State.from_tensor(torch.zeros(n, 2, dtype=torch.float64)), gen)
    grid = logsnr_uniform(proc, 100)
    fn = {"ddpm": ddpm, "euler_maruyama": euler_maruyama, "pc_langevin": pc_langevin,
          "ddim_eta0.5": lambda m, x, g, generator: ddim(m, x, g, eta=0.5, generator=generator)}[name]
    out = fn(model, x, grid, generator=gen)["x"]
    w = _mode_weights(out, dist)
    se = torch.sqrt(UNEQUAL * (1 - UNEQUAL) / n)
    assert bool(((w - UNEQUAL).abs() < 4 * se).all()), (w, UNEQUAL)
    nearest = torch.cdist(out, dist.means).min(1).values
    assert float(nearest.mean()) < 3 * 0.1 * math.sqrt(2)
    # the spread matches the component std (mean distance of a 2-D Gaussian is std*sqrt(pi/2))
    assert abs(float(nearest.mean()) - 0.1 * math.sqrt(math.pi / 2)) < 0.03


def test_flow_matching_velocity_transports_prior_to_data():
    dist = GaussianMixture(ring_mixture(std=0.1).means, 0.1, UNEQUAL)
    proc = LinearInterpolant()
    model = Model(ExactDenoiser(dist, proc, "velocity"), proc, "velocity")
    gen = torch.Generator().manual_seed(3)
    x = proc.prior(State.from_tensor(torch.zeros(4000, 2, dtype=torch.float64)), gen)
    out = flow_heun(model, x, uniform_time(proc, 60))["x"]
    w = _mode_weights(out, dist)
    assert bool(((w - UNEQUAL).abs() < 4 * torch.sqrt(UNEQUAL * (1 - UNEQUAL) / 4000)).all()), w
    true = dist.sample(4000, gen)
    assert abs(float(dist.log_prob(out).mean() - dist.log_prob(true).mean())) < 0.1


def _prior(proc, n: int) -> State:
    template = State.from_tensor(torch.zeros(n, 2, dtype=torch.float64))
    return proc.prior(template, torch.Generator().manual_seed(0))


SAMPLERS = {
    "ddim": ddim, "ddpm": ddpm, "euler": euler, "heun": heun, "euler_maruyama": euler_maruyama,
    "pc_langevin": pc_langevin, "dpmpp_2m": dpmpp_2m, "dpmpp_pc": dpmpp_pc, "unipc": unipc,
}
STOCHASTIC = {"ddpm", "euler_maruyama", "pc_langevin"}


def _run(name, model, x, grid, **kw):
    if name in STOCHASTIC:
        kw.setdefault("generator", torch.Generator().manual_seed(0))
    return SAMPLERS[name](model, x, grid, **kw)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_com_holds_after_every_step(name, dtype):
    dist = ZeroCoMGaussian(std=1.0)
    proc = VP()
    x = dist.sample([3, 5, 9, 2], torch.Generator().manual_seed(0), dtype=dtype)
    x = proc.prior(x, torch.Generator().manual_seed(1))
    model = Model(ExactDenoiser(dist, proc, "eps", field="pos"), proc, "eps")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    seen = []

    def check(info):
        pos, b = info.x["pos"], info.x.batch["pos"]
        com = torch.zeros(4, 3, dtype=dtype).index_add_(0, b, pos)
        seen.append(float(com.abs().max()))

    out = _run(name, model, x, 8, callback=check)
    assert len(seen) == 8 and max(seen) < tol * 10
    assert out["pos"].shape == x["pos"].shape


@pytest.mark.parametrize("name", [n for n in SAMPLERS])
def test_torus_wrapped_every_step_and_distribution(name):
    """On the torus (VE noise) iterates are wrapped to [0,1) at every step and a mixture whose mode
    straddles the boundary is reproduced (circular mean close to the mode, across the seam)."""
    dist = WrappedNormalMixture(torch.tensor([[0.97, 0.5]], dtype=torch.float64), 0.05)
    proc = VE(sigma_min=0.01, sigma_max=2.0)
    model = Model(ExactDenoiser(dist, proc, "score"), proc, "score")
    n = 500
    template = State({"x": torch.zeros(n, 2, dtype=torch.float64)}, constraints={"x": FlatTorus()})
    x = proc.prior(template, torch.Generator().manual_seed(0))
    lows = []
    out = _run(name, model, x, logsnr_uniform(proc, 40),
               callback=lambda i: lows.append((float(i.x["x"].min()), float(i.x["x"].max()))))
    assert all(lo >= 0 and hi < 1 for lo, hi in lows)
    ang = out["x"][:, 0] * 2 * math.pi
    circ_mean = (math.atan2(float(ang.sin().mean()), float(ang.cos().mean())) / (2 * math.pi)) % 1.0
    assert abs(circ_mean - 0.97) < 0.02
    assert abs(float(out["x"][:, 1].mean()) - 0.5) < 0.02


def test_torus_needs_variance_exploding_process():
    proc = VP()
    template = State({"x": torch.zeros(4, 3)}, constraints={"x": FlatTorus()})
    model = Model(lambda x, t: x, proc, "eps")
    with pytest.raises(ValueError, match="torus"):
        dpmpp_2m(model, template, 5)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_pc", "heun", "ddpm"])
def test_mask_keeps_known_entries(name):
    """Known entries follow ``alpha * known + sigma * noise`` at every step and equal ``known`` at
    the end. (The replacement method conditions only approximately, so the unknown entries are
    not checked against the exact conditional here.)"""
    dist = GaussianMixture(ring_mixture().means, 0.1)
    proc = VP(timesteps=1000)
    n = 64
    known = torch.zeros(n, 2, dtype=torch.float64)
    known[:, 0] = 2.0
    mask = torch.zeros(n, 2, dtype=torch.bool)
    mask[:, 0] = True
    c = Masked.create(mask, known, torch.Generator().manual_seed(0))
    x = proc.prior(State({"x": known.clone()}, constraints={"x": c}), torch.Generator().manual_seed(1))
    assert torch.allclose(x["x"][:, 0], proc.alpha(torch.tensor(999.0)) * 2.0
                          + proc.sigma(torch.tensor(999.0)) * c.noise[:, 0])
    model = Model(ExactDenoiser(dist, proc, "eps"), proc, "eps")
    grid = logsnr_uniform(proc, 30)
    errs = []

    def check(info):
        i = info.i + 1
        want = grid.alpha[i] * 2.0 + grid.sigma[i] * c.noise[:, 0]
        errs.append(float((info.x["x"][:, 0] - want).abs().max()))

    out = _run(name, model, x, grid, callback=check)
    assert torch.equal(out["x"][:, 0], known[:, 0])
    assert len(errs) == 30 and max(errs) < 1e-12
    assert torch.isfinite(out["x"]).all() and float(out["x"][:, 1].std()) > 0.05


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nan_stops_with_clear_error(name):
    proc = VP()

    def bad(x, t):
        return x.map(lambda v: v * float("nan"))

    model = Model(bad, proc, "eps")
    x = proc.prior(State.from_tensor(torch.zeros(4, 2)), torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match=f"{name}.*non-finite.*'x'"):
        _run(name, model, x, 5)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_reproducible_from_generator(name):
    dist = ring_mixture(std=0.1)
    proc = VP(timesteps=1000)
    model = Model(ExactDenoiser(dist, proc, "eps"), proc, "eps")
    x = _prior(proc, 16)
    a = SAMPLERS[name](model, x, 10, generator=torch.Generator().manual_seed(5))
    b = SAMPLERS[name](model, x, 10, generator=torch.Generator().manual_seed(5))
    c = SAMPLERS[name](model, x, 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["x"], b["x"]) and not torch.equal(a["x"], c["x"])


def test_callback_progress_and_nfe():
    proc = VP(timesteps=1000)
    net = ExactDenoiser(ring_mixture(), proc, "eps")
    model = Model(net, proc, "eps")
    x = _prior(proc, 8)
    steps = []
    dpmpp_pc(model, x, 10, callback=lambda i: steps.append(i.i), progress=True)
    assert steps == list(range(10)) and net.nfe == 10
    net.nfe = 0
    heun(model, x, 6)
    assert net.nfe == 11  # 2 per step, Euler into the clean point


def test_flow_start_and_grid_errors():
    proc = LinearInterpolant()
    model = Model(ExactDenoiser(ring_mixture(), proc, "velocity"), proc, "velocity")
    x = _prior(proc, 8)
    with pytest.raises(ValueError, match="alpha > 0"):
        heun(model, x, uniform_time(proc, 5))
    out = dpmpp_pc(model, x, uniform_time(proc, 5))  # data prediction handles alpha = 0
    assert torch.isfinite(out["x"]).all()
    vp = VP(timesteps=1000)
    with pytest.raises(ValueError, match="clean point"):
        flow_euler(Model(ExactDenoiser(ring_mixture(), vp, "eps"), vp, "eps"), x, 5)


@pytest.mark.parametrize("schedule", [uniform_time, trailing, logsnr_uniform, edm_rho])
@pytest.mark.parametrize("process", [VP(timesteps=1000), VP("cosine"), VE(), EDM(), LinearInterpolant()],
                         ids=["vp-ddpm", "vp-cos", "ve", "edm", "flow"])
def test_schedules_are_valid_grids(schedule, process):
    for final in ("zero", "none"):
        g = schedule(process, 7, final=final)
        assert isinstance(g, TimeGrid) and g.steps == 7 and g.clean_last == (final == "zero")
        assert bool((g.t[:-1] >= process.t_min - 1e-9).all()) and bool((g.t <= process.t_max + 1e-9).all())
    if isinstance(process, VP) and process.timesteps:
        assert trailing(process, 10).t[:-1].tolist() == [999.0 - 100 * i for i in range(10)]


def test_unipc_matches_diffusers_on_karras_sigmas():
    """Our UniPC-2 (bh2) on the EDM rho = 7 grid is diffusers' UniPCMultistepScheduler with Karras
    sigmas, driven by the same exact eps (diffusers rounds through float32 in places)."""
    diffusers = pytest.importorskip("diffusers")
    dist = ring_mixture()
    proc = VP(timesteps=1000)
    x = proc.prior(State.from_tensor(torch.zeros(256, 2, dtype=torch.float64)),
                   torch.Generator().manual_seed(4))
    ours = unipc(Model(ExactDenoiser(dist, proc, "eps"), proc, "eps"), x, edm_rho(proc, 10))["x"]
    sched = diffusers.UniPCMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                              use_karras_sigmas=True, timestep_spacing="trailing")
    sched.set_timesteps(10)
    y = x["x"].clone()
    for i, t in enumerate(sched.timesteps):
        s = sched.sigmas[i].double()
        a = torch.rsqrt(1 + s * s)
        eps = (y - a * dist.denoise(y, a, s * a)) / (s * a)
        y = sched.step(eps, t, y).prev_sample.double()
    assert float((ours - y).norm(dim=1).max()) < 1e-4 * float(y.norm(dim=1).max())
