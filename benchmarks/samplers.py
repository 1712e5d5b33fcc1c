"""Sampler benchmark against exact scores: ``sciddiff bench samplers --out DIR [--quick]``.

Every problem is a Gaussian mixture, so the noise prediction is exact and the only error left is the
sampler's. All samplers start from the same exact ``x_T`` (a draw of the forward process at
``t = 999`` of DDPM's linear-beta VP process, ``VP(timesteps=1000)``) and are compared with the
exact probability-flow ODE solution from that ``x_T``: an adaptive dopri5 solve (torchdiffeq,
float64, ``rtol = atol = 1e-10``) of ``dy/ds = (y - D(y, s)) / s`` in the scaled variables
``y = x / alpha``, ``s = sigma / alpha`` from ``s_T`` down to 0. The error of a row is the mean
Euclidean distance of its samples to the reference.

Rows: every sciddiff sampler in ``SCIDDIFF_SAMPLERS`` with every schedule in ``SCHEDULES`` at each
NFE budget, and the diffusers schedulers in ``DIFFUSERS_SCHEDULERS`` driven by the same exact noise
prediction. NFE counts model calls; each row records the calls it made (``nfe``) and its budget
(``nfe_budget``). ``seconds`` is the wall time of the whole sampling call (grid or ``set_timesteps``
plus the loop), ``model_seconds`` the time inside the exact model, and ``overhead_per_step_us``
their difference per model call.

Outputs in ``DIR``: ``samplers.json`` (one record per row), ``samplers.md`` (tables),
``samplers.png`` (error against NFE) and ``cache/`` (the reference solutions).

Python: ``run(out_dir, quick=True, problems=None, quiet=False, ...) -> list[dict]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sciddiff.samplers as S
from sciddiff._atomic import atomic_write, atomic_write_text
from sciddiff.core import VP, Model, State
from sciddiff.testing import GaussianMixture, random_mixture, ring_mixture

from ._common import LIBRARIES, CallTimer, hardware_line
from ._report import LEARNED, _config, best_rows, write_markdown, write_plot

DTYPE = torch.float64
T_START = 999.0                      # DDPM's last discrete time: where every sampler starts
REF_TOL = 1e-10                      # rtol = atol of the reference ODE solve
QUICK_NFES = (5, 10, 20, 50)
FULL_NFES = (5, 10, 20, 50, 100)
QUICK_SAMPLES = 2000
FULL_SAMPLES = 10000


def process() -> VP:
    """DDPM's process: linear betas 1e-4 .. 0.02 over 1000 discrete steps."""
    return VP(timesteps=1000)


# ================================================================================================
# Problems
# ================================================================================================
def _aniso_2d() -> GaussianMixture:
    """5 components in 2-D with unequal weights and diagonal (anisotropic) stds."""
    means = torch.tensor([[-2.0, 0.0], [1.5, 1.5], [0.5, -2.0], [2.5, -0.5], [-1.0, 2.0]], dtype=DTYPE)
    stds = torch.tensor([[0.05, 0.30], [0.20, 0.05], [0.10, 0.10], [0.02, 0.15], [0.30, 0.08]],
                        dtype=DTYPE)
    weights = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=DTYPE)
    return GaussianMixture(means, stds, weights)


def _aniso_16d() -> GaussianMixture:
    """6 components in 16-D: means N(0, 1.5^2 I), stds log-uniform in [0.02, 0.3] per coordinate,
    weights proportional to 1 .. 6 (all drawn with seed 2)."""
    g = torch.Generator().manual_seed(2)
    means = 1.5 * torch.randn(6, 16, generator=g, dtype=DTYPE)
    stds = torch.exp(math.log(0.02) + math.log(15.0) * torch.rand(6, 16, generator=g, dtype=DTYPE))
    weights = torch.arange(1, 7, dtype=DTYPE)
    return GaussianMixture(means, stds, weights)


@dataclass(frozen=True)
class ProblemSpec:
    name: str
    make: Callable[[], GaussianMixture]
    description: str


PROBLEMS: dict[str, ProblemSpec] = {p.name: p for p in [
    ProblemSpec("gmm2d", ring_mixture,
                "2-D, 8 equal-weight components at radius 2 on a circle, std 0.05 (ring_mixture())"),
    ProblemSpec("gmm64d", random_mixture,
                "64-D, 8 equal-weight components, means N(0, I) with seed 1, std 0.05 (random_mixture())"),
    ProblemSpec("gmm2d-aniso", _aniso_2d,
                "2-D, 5 components, weights 0.40/0.25/0.15/0.12/0.08, diagonal stds 0.02 .. 0.3"),
    ProblemSpec("gmm16d-aniso", _aniso_16d,
                "16-D, 6 components, weights proportional to 1..6, means N(0, 1.5^2 I), "
                "diagonal stds log-uniform in [0.02, 0.3] (seed 2)"),
]}
QUICK_PROBLEMS = ("gmm2d", "gmm64d", "gmm2d-aniso")
FULL_PROBLEMS = ("gmm2d", "gmm64d", "gmm2d-aniso", "gmm16d-aniso")


@dataclass
class Problem:
    """One benchmark problem: the mixture, the start ``x_T [n, d]`` and the reference ``[n, d]``."""

    name: str
    dist: GaussianMixture
    den: MixtureDenoiser
    process: VP
    x_T: Tensor
    ref: Tensor
    seed: int
    ref_seconds: float            # time of the reference solve (0 when read from the cache)
    ref_cached: bool
    ref_nfe: int

    @property
    def dim(self) -> int:
        return self.x_T.shape[1]

    @property
    def n(self) -> int:
        return self.x_T.shape[0]


class MixtureDenoiser:
    """The exact posterior mean ``E[x_0 | x_t = x]`` of a diagonal ``GaussianMixture``, in matmul form.

    Algebraically the same as ``GaussianMixture.denoise`` (the test and ``check`` compare them to
    ~1e-13) but ~30x faster in 64-D: the squared distances are expanded as
    ``sum_d (x_d^2 - 2 a x_d mu_kd + a^2 mu_kd^2) / var_kd``, so no ``[n, K, d]`` temporaries.
    One level ``(alpha, sigma)`` for the whole batch (scalars); per-row levels use the mixture's own.
    """

    def __init__(self, dist: GaussianMixture) -> None:
        self.dist = dist
        self.mu = dist.means.to(DTYPE)
        self.s2 = dist.stds.to(DTYPE) ** 2
        self.logw = torch.log(dist.weights.to(DTYPE))

    def __call__(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        a = torch.as_tensor(alpha, dtype=x.dtype)
        s = torch.as_tensor(sigma, dtype=x.dtype)
        if a.numel() != 1 or s.numel() != 1:
            return self.dist.denoise(x, a, s)
        a, s = a.reshape(()), s.reshape(())
        mu, s2 = self.mu.to(x.dtype), self.s2.to(x.dtype)
        var = a * a * s2 + s * s                                       # [K, d]
        iv = 1 / var
        amu = a * mu
        const = self.logw.to(x.dtype) - 0.5 * ((amu * amu * iv).sum(1) + torch.log(2 * math.pi * var).sum(1))
        logp = (x * x) @ (-0.5 * iv).T + x @ (amu * iv).T + const      # [n, K]
        r = torch.softmax(logp, dim=1)
        gain = a * s2 * iv                                             # [K, d]
        return r @ (mu - gain * amu) + x * (r @ gain)

    def check(self, x: Tensor, tol: float = 1e-9) -> None:
        """Raise unless this agrees with ``GaussianMixture.denoise`` on ``x`` at a few levels."""
        for a, s in [(0.006, 1.0), (0.5, 0.8), (0.99, 0.1), (1.0, 0.01), (1.0, 1e-5)]:
            at, st = torch.tensor(a, dtype=DTYPE), torch.tensor(s, dtype=DTYPE)
            xx = a * x / float(x.std()) * 2 + s * x
            want = self.dist.denoise(xx, at, st)
            err = float((self(xx, at, st) - want).abs().max())
            if not err <= tol * (1 + float(want.abs().max())):
                raise AssertionError(f"MixtureDenoiser disagrees with GaussianMixture.denoise: {err:.3g}")


def exact_eps(den: MixtureDenoiser, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The exact ``E[eps | x_t = x] = (x - alpha D(x)) / sigma`` at level ``(alpha, sigma)`` (scalars,
    or per-row ``[n]``)."""
    col = (lambda c: c.reshape(-1, 1)) if alpha.numel() > 1 else (lambda c: c.reshape(()))
    return (x - col(alpha) * den(x, alpha, sigma)) / col(sigma)


def start_point(dist: GaussianMixture, proc: VP, n: int, seed: int) -> Tensor:
    """``x_T = alpha_T x_0 + sigma_T eps`` with ``x_0`` from the mixture (float64, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(T_START, dtype=DTYPE)
    x0 = dist.sample(n, g)
    return proc.alpha(t) * x0 + proc.sigma(t) * torch.randn(x0.shape, generator=g, dtype=DTYPE)


def reference(den: MixtureDenoiser, proc: VP, x_T: Tensor, tol: float = REF_TOL) -> tuple[Tensor, int]:
    """Adaptive PF-ODE solve (dopri5, float64) from ``x_T`` at ``t = 999`` to the clean point.

    Integrates ``dy/ds = (y - D(y, s)) / s`` in ``y = x / alpha``, ``s = sigma / alpha`` from
    ``s_T`` to 0 (``D = GaussianMixture.denoise(y, 1, s)``, computed by ``MixtureDenoiser``); returns
    ``(x_0 [n, d], number of right-hand-side evaluations)``.
    """
    from torchdiffeq import odeint

    t = torch.tensor(T_START, dtype=DTYPE)
    a_T, s_T = proc.alpha(t), proc.sigma(t)
    calls = [0]
    one = torch.ones((), dtype=DTYPE)

    def f(s: Tensor, y: Tensor) -> Tensor:
        calls[0] += 1
        if float(s) <= 0:
            return torch.zeros_like(y)
        return (y - den(y, one, s)) / s

    span = torch.stack([s_T / a_T, torch.zeros((), dtype=DTYPE)])
    with torch.no_grad():
        sol = odeint(f, x_T / a_T, span, rtol=tol, atol=tol, method="dopri5")
    return sol[-1], calls[0]


def make_problem(name: str, n: int, seed: int, cache_dir: Path | None = None, tol: float = REF_TOL,
                 log: Callable[[str], None] | None = None) -> Problem:
    """Build a problem; the reference is cached under ``cache_dir`` keyed by problem, seed, n, tol."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
    dist = PROBLEMS[name].make().to(DTYPE)
    den = MixtureDenoiser(dist)
    proc = process()
    x_T = start_point(dist, proc, n, seed)
    den.check(x_T[:64])
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"ref-{name}-seed{seed}-n{n}-tol{tol:g}.pt"
        if path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if torch.equal(blob["x_T"], x_T) and blob["ref"].shape == x_T.shape:
                    return Problem(name, dist, den, proc, x_T, blob["ref"], seed, 0.0, True, int(blob["nfe"]))
            except Exception as exc:  # a stale or broken cache file: recompute
                if log:
                    log(f"ignoring the cache {path}: {exc}")
    if log:
        log(f"{name}: computing the reference PF-ODE solution (dopri5, tol {tol:g}, n={n}) ...")
    t0 = time.perf_counter()
    ref, ref_nfe = reference(den, proc, x_T, tol)
    secs = time.perf_counter() - t0
    if log:
        log(f"{name}: reference done in {secs:.1f} s ({ref_nfe} evaluations)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({"x_T": x_T, "ref": ref, "nfe": ref_nfe, "tol": tol}, tmp))
    return Problem(name, dist, den, proc, x_T, ref, seed, secs, False, ref_nfe)


def sample_error(x: Tensor, ref: Tensor) -> float:
    """Mean Euclidean distance of the samples to the reference."""
    return float((x.to(DTYPE) - ref).norm(dim=1).mean())


# ================================================================================================
# The registry of sciddiff samplers and schedules
# ================================================================================================
def one_per_step(nfe: int) -> int:
    """One model call per step (the step into the clean point included)."""
    return nfe


def two_per_step(nfe: int) -> int:
    """Two calls per step but one on the last (Heun's Euler step into the clean point, or
    pc_langevin with one corrector step, none at the clean point): ``2 * steps - 1 <= nfe``."""
    return (nfe + 1) // 2


Runner = Callable[..., State]   # runner(model, x, grid, generator) -> State


def default_factory(fn: Callable, kwargs: dict[str, Any]) -> Runner:
    """Call ``fn(model, x, grid, **kwargs)``, passing ``generator`` where ``fn`` takes one."""
    takes_generator = "generator" in inspect.signature(fn).parameters

    def runner(model: Model, x: State, grid: S.TimeGrid, generator: torch.Generator | None) -> State:
        kw = dict(kwargs)
        if takes_generator:
            kw["generator"] = generator
        return fn(model, x, grid, **kw)

    return runner


@dataclass(frozen=True)
class SamplerEntry:
    """A sciddiff sampler in the benchmark.

    ``name``: attribute of ``sciddiff.samplers`` (rows are skipped while it does not exist);
    ``steps``: NFE budget -> grid steps (the calls are counted, and the steps reduced until the
    count fits the budget); ``kind``: ``"ode"`` (compared to the ODE reference) or ``"sde"``
    (stochastic; its distance to the ODE solution is not a discretisation error);
    ``factory(fn, kwargs) -> runner(model, x, grid, generator)``.
    """

    name: str
    steps: Callable[[int], int] = one_per_step
    kind: str = "ode"
    kwargs: dict[str, Any] = field(default_factory=dict)
    factory: Callable[[Callable, dict[str, Any]], Runner] = default_factory
    label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name

    def resolve(self) -> Runner | None:
        fn = getattr(S, self.name, None)
        return None if fn is None else self.factory(fn, self.kwargs)


# Add a sampler with one line; names not (yet) in sciddiff.samplers are skipped.
SCIDDIFF_SAMPLERS: list[SamplerEntry] = [
    SamplerEntry("ddim"),
    SamplerEntry("euler"),
    SamplerEntry("heun", two_per_step),
    SamplerEntry("dpmpp_2m"),
    SamplerEntry("dpmpp_pc", label="dpmpp_pc(2)"),                     # UniC corrector: no extra NFE
    SamplerEntry("dpmpp_pc", kwargs={"order": 3}, label="dpmpp_pc(3)"),
    SamplerEntry("dpmpp_3m"),
    SamplerEntry("unipc", label="unipc(2)"),
    SamplerEntry("unipc", kwargs={"order": 3}, label="unipc(3)"),
    # Adams-Bashforth in s into the clean point instead of the data prediction (the latter's
    # overshoot below DDPM's sigma_min = 0.01 is an error floor of about 1e-3 on gmm2d)
    SamplerEntry("unipc", kwargs={"final_step": "adams"}, label="unipc(2)+adams"),
    SamplerEntry("unipc", kwargs={"order": 3, "final_step": "adams"}, label="unipc(3)+adams"),
    SamplerEntry("dpmpp_pc", kwargs={"order": 3, "final_step": "adams"}, label="dpmpp_pc(3)+adams"),
    SamplerEntry("ipndm"),
    SamplerEntry("ddpm", kind="sde"),
    SamplerEntry("euler_maruyama", kind="sde"),
    SamplerEntry("pc_langevin", two_per_step, kind="sde", kwargs={"corrector_steps": 1}),
]


@dataclass(frozen=True)
class ScheduleEntry:
    """A time schedule ``fn(process, steps, **kwargs) -> TimeGrid`` from ``sciddiff.samplers``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name

    def resolve(self) -> Callable[[VP, int], S.TimeGrid] | None:
        fn = getattr(S, self.name, None)
        if fn is None:
            return None
        return lambda proc, steps: fn(proc, steps, **self.kwargs)


SCHEDULES: list[ScheduleEntry] = [
    ScheduleEntry("uniform_time"),
    ScheduleEntry("trailing"),
    ScheduleEntry("logsnr_uniform"),
    ScheduleEntry("edm_rho"),
]


# ------------------------------------------------------------------------------------------------
# Learned grids (``sciddiff.samplers.learn_grid``): one grid per problem, sampler and NFE, fitted on
# starting points of their own (seed + LEARN_SEED_OFFSET) against their own reference solve, then
# scored on the benchmark's x_T like every other row. Rows have schedule "learned" and record the
# cost of learning (``learn_seconds``, ``learn_nfe``).
# ------------------------------------------------------------------------------------------------
LEARNED_SCHEDULE = LEARNED
LEARN_SEED_OFFSET = 1


@dataclass(frozen=True)
class LearnSpec:
    """How grids are learned: ``n_train`` starting points, ``iters`` Adam steps at ``lr``, at the
    budgets ``nfes`` (None: every budget of the run)."""

    n_train: int
    iters: int
    lr: float = 0.05
    nfes: tuple[int, ...] | None = None

    def budgets(self, nfes: Sequence[int]) -> list[int]:
        """The run's budgets at which grids are learned."""
        return [n for n in nfes if self.nfes is None or n in self.nfes]


QUICK_LEARN = LearnSpec(n_train=500, iters=150, nfes=(10, 20))
FULL_LEARN = LearnSpec(n_train=1000, iters=200)
#: Grids are learned for these: order 2 with the denoise final step wins at few steps; order 3 with
#: the Adams final step at many (the denoise step caps the error at 3e-3 on gmm16d-aniso at
#: NFE 50-100, whatever the grid).
LEARNED_SAMPLERS: list[SamplerEntry] = [
    SamplerEntry("unipc", label="unipc(2)"),
    SamplerEntry("unipc", kwargs={"order": 3, "final_step": "adams"}, label="unipc(3)+adams"),
]


@dataclass(frozen=True)
class FixedGrid:
    """A precomputed grid in the place of a ``ScheduleEntry`` (valid for its own step count only)."""

    grid: S.TimeGrid
    title: str = LEARNED_SCHEDULE

    def resolve(self) -> Callable[[VP, int], S.TimeGrid]:
        def fn(proc: VP, steps: int) -> S.TimeGrid:
            if steps != self.grid.steps:
                raise ValueError(f"the learned grid has {self.grid.steps} steps, not {steps}")
            return self.grid

        return fn


class ExactNet:
    """The exact mixture as a sciddiff network in the eps parameterization, timed and counted.

    The timer covers the whole network call, as a trained network's would: the exact model's
    lookup of ``alpha(t), sigma(t)`` (a real network embeds ``t`` instead), the exact eps and the
    output State. Samplers' overhead is what they do outside this call."""

    def __init__(self, den: MixtureDenoiser, proc: VP, timer: CallTimer) -> None:
        self.den, self.proc, self.timer = den, proc, timer

    def __call__(self, x: State, t: Tensor) -> State:
        started = time.perf_counter()
        # Samplers pass one time for the whole batch (a 0-d time expanded to [B]): use it once.
        one = t.ndim == 0 or t.shape[0] <= 1 or t.stride(0) == 0 or bool((t == t[0]).all())
        tt = (t.reshape(-1)[:1] if one else t).to(DTYPE)
        a, s = self.proc.alpha(tt), self.proc.sigma(tt)
        out = x.replace(x=exact_eps(self.den, x["x"], a.to(x.dtype), s.to(x.dtype)))
        self.timer.add(started)
        return out


@dataclass
class Outcome:
    x: Tensor
    nfe: int
    steps: int
    seconds: float
    model_seconds: float


def sample_sciddiff(entry: SamplerEntry, schedule: ScheduleEntry | FixedGrid, problem: Problem, steps: int,
                    seed: int = 0) -> Outcome:
    """Run one sciddiff sampler on ``problem.x_T`` with ``steps`` grid steps."""
    runner, sched = entry.resolve(), schedule.resolve()
    if runner is None or sched is None:
        raise LookupError(f"sciddiff.samplers has no {entry.name if runner is None else schedule.name}")
    timer = CallTimer()
    model = Model(ExactNet(problem.den, problem.process, timer), problem.process, "eps")
    x = State.from_tensor(problem.x_T.clone())
    gen = torch.Generator().manual_seed(seed + 12345)
    t0 = time.perf_counter()
    grid = sched(problem.process, steps)
    out = runner(model, x, grid, gen)
    secs = time.perf_counter() - t0
    return Outcome(out["x"], timer.calls, steps, secs, timer.seconds)


# ================================================================================================
# diffusers
# ================================================================================================
@dataclass(frozen=True)
class DiffusersEntry:
    """A diffusers scheduler configuration driven by the exact eps.

    ``cls``: class name in ``diffusers``; ``config``: constructor options (``timestep_spacing`` is
    ``"trailing"`` and ``clip_sample`` False wherever the class has those options);
    ``steps``: NFE budget -> ``num_inference_steps``; ``dtype``: the sampler state's dtype.
    """

    sampler: str
    cls: str
    schedule: str = "trailing"
    config: dict[str, Any] = field(default_factory=dict)
    steps: Callable[[int], int] = one_per_step
    dtype: torch.dtype = DTYPE


DIFFUSERS_SCHEDULERS: list[DiffusersEntry] = [
    DiffusersEntry("DDIM", "DDIMScheduler"),
    DiffusersEntry("DPMSolver++(2M)", "DPMSolverMultistepScheduler", config={"solver_order": 2}),
    DiffusersEntry("DPMSolver++(2M)", "DPMSolverMultistepScheduler", "karras",
                   {"solver_order": 2, "use_karras_sigmas": True}),
    DiffusersEntry("DPMSolver++(3M)", "DPMSolverMultistepScheduler", config={"solver_order": 3}),
    DiffusersEntry("DPMSolver++(3M)", "DPMSolverMultistepScheduler", "karras",
                   {"solver_order": 3, "use_karras_sigmas": True}),
    DiffusersEntry("UniPC", "UniPCMultistepScheduler"),
    DiffusersEntry("UniPC", "UniPCMultistepScheduler", "karras", {"use_karras_sigmas": True}),
    DiffusersEntry("UniPC(float32)", "UniPCMultistepScheduler", dtype=torch.float32),
    DiffusersEntry("Euler", "EulerDiscreteScheduler"),
    DiffusersEntry("Euler", "EulerDiscreteScheduler", "karras", {"use_karras_sigmas": True}),
    DiffusersEntry("Heun", "HeunDiscreteScheduler", steps=two_per_step),
    DiffusersEntry("Heun", "HeunDiscreteScheduler", "karras", {"use_karras_sigmas": True},
                   steps=two_per_step),
]

# The same algorithm on the same grid in both libraries (their errors agree to float32 precision):
# like-for-like pairs for the overhead comparison. Euler/Heun "karras" are not here: diffusers
# builds their Karras sigmas between the trailing grid's ends, not the process's.
MATCHED_PAIRS: list[tuple[tuple[str, str], tuple[str, str]]] = [
    (("ddim", "trailing"), ("DDIM", "trailing")),
    (("euler", "trailing"), ("Euler", "trailing")),
    (("heun", "trailing"), ("Heun", "trailing")),
    (("dpmpp_2m", "trailing"), ("DPMSolver++(2M)", "trailing")),
    (("dpmpp_2m", "edm_rho"), ("DPMSolver++(2M)", "karras")),
    (("unipc(2)", "edm_rho"), ("UniPC", "karras")),
]


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:
        return False
    return True


def make_scheduler(entry: DiffusersEntry):
    """The scheduler with DDPM's betas (linear 1e-4 .. 0.02, 1000 steps) and eps prediction.

    The betas are passed explicitly: most schedulers default to them, but ``HeunDiscreteScheduler``
    defaults to Stable Diffusion's 0.00085 .. 0.012 (a different process). Checked against
    ``process()`` to float32 precision.
    """
    import diffusers

    cls = getattr(diffusers, entry.cls)
    params = inspect.signature(cls.__init__).parameters
    cfg: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                           "beta_schedule": "linear", "prediction_type": "epsilon"}
    if "timestep_spacing" in params:
        cfg["timestep_spacing"] = "trailing"
    if "clip_sample" in params:
        cfg["clip_sample"] = False
    cfg.update(entry.config)
    sched = cls(**cfg)
    want = torch.exp(2 * process().log_alpha(torch.arange(1000, dtype=DTYPE)))
    got = sched.alphas_cumprod.to(DTYPE)
    if got.shape != want.shape or float(((got - want) / want).abs().max()) > 1e-5:
        raise ValueError(f"{entry.cls}: alphas_cumprod differ from VP(timesteps=1000)")
    return sched


def sample_diffusers(entry: DiffusersEntry, problem: Problem, steps: int, seed: int = 0,
                     float64_tables: bool = False) -> Outcome:
    """Run a diffusers scheduler's sampling loop on ``problem.x_T`` with the exact eps.

    The model sees the scheduler's (scaled) input and returns the exact eps at the scheduler's own
    noise level for that call: ``sigmas[i]`` (``alpha_bar = 1 / (1 + sigma^2)``) where the scheduler
    keeps sigmas (DPM-Solver, UniPC, Euler, Heun: call ``i`` is at ``sigmas[i]``, also for the
    fractional Karras levels), else ``alphas_cumprod[t]`` (DDIM). Euler and Heun integrate the
    variance-exploding ``y = x / alpha``: they start from ``x_T * sqrt(1 + sigma_0^2)`` and their
    ``scale_model_input`` hands the model ``x`` again; the other schedulers work on ``x``.

    ``float64_tables`` (DDIM only): replace the float32 ``alphas_cumprod`` by the float64 product
    of the same betas (used to check that DDIM equals sciddiff's ddim on the trailing grid).
    """
    sched = make_scheduler(entry)
    if float64_tables:
        if hasattr(sched, "sigmas"):
            raise ValueError("float64_tables is supported for DDIM only")
        betas = torch.linspace(sched.config.beta_start, sched.config.beta_end,
                               sched.config.num_train_timesteps, dtype=DTYPE)
        sched.alphas_cumprod = torch.cumprod(1 - betas, 0)
    den, timer = problem.den, CallTimer()
    dtype = entry.dtype
    x = problem.x_T.clone().to(dtype)
    gen = torch.Generator().manual_seed(seed + 12345)
    step_kw = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}

    def model(inp: Tensor, i: int, t: Tensor) -> Tensor:
        started = time.perf_counter()
        if uses_sigmas:
            s = sched.sigmas[i].to(DTYPE)
            a = torch.rsqrt(1 + s * s)
            sg = s * a
        else:
            ab = sched.alphas_cumprod[int(t)].to(DTYPE)
            a, sg = ab.sqrt(), (1 - ab).sqrt()
        eps = exact_eps(den, inp.to(DTYPE), a, sg).to(inp.dtype)
        timer.add(started)
        return eps

    t0 = time.perf_counter()
    sched.set_timesteps(steps)
    uses_sigmas = hasattr(sched, "sigmas")
    if entry.cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        x = x * torch.sqrt(1 + sched.sigmas[0].to(dtype) ** 2)
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        x = sched.step(model(inp, i, t), t, x, **step_kw).prev_sample
    secs = time.perf_counter() - t0
    return Outcome(x, timer.calls, steps, secs, timer.seconds)


# ================================================================================================
# Rows
# ================================================================================================
def _fit_budget(budget: int, rule: Callable[[int], int],
                sample: Callable[[int], Outcome]) -> tuple[Outcome | None, int]:
    """Run with ``rule(budget)`` steps, fewer while the counted calls exceed the budget.
    Returns the outcome and the step count (``(None, 0)`` when none fits)."""
    steps = rule(budget)
    while steps >= 1:
        out = sample(steps)
        if out.nfe <= budget:
            return out, steps
        steps -= 1
    return None, 0


def _record(problem: Problem, library: str, sampler: str, schedule: str, kind: str, budget: int,
            out: Outcome | None, note: str | None, dtype: torch.dtype) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "problem": problem.name, "dim": problem.dim, "n_samples": problem.n, "seed": problem.seed,
        "library": library, "sampler": sampler, "schedule": schedule, "kind": kind,
        "dtype": str(dtype).replace("torch.", ""),
        "nfe": None, "nfe_budget": budget, "steps": None, "error": None, "seconds": None,
        "model_seconds": None, "overhead_per_step_us": None, "note": note,
    }
    if out is not None:
        err = sample_error(out.x, problem.ref)
        rec.update(nfe=out.nfe, steps=out.steps)
        _set_timing(rec, out)
        if math.isfinite(err):
            rec["error"] = err
        else:
            rec["note"] = "non-finite samples"
    return rec


def _set_timing(rec: dict[str, Any], out: Outcome) -> None:
    rec.update(seconds=out.seconds, model_seconds=out.model_seconds,
               overhead_per_step_us=(out.seconds - out.model_seconds) / max(out.nfe, 1) * 1e6)


def _exc_note(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}"


Row = tuple[dict[str, Any], Callable[[], Outcome] | None]   # (record, rerun with the same steps)


def _row(problem: Problem, library: str, sampler: str, schedule: str, kind: str, budget: int,
         rule: Callable[[int], int], sample: Callable[[int], Outcome], dtype: torch.dtype) -> Row:
    import warnings

    out, steps, note = None, 0, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, steps = _fit_budget(budget, rule, sample)
        if out is None:
            note = f"no step count fits an NFE budget of {budget}"
    except Exception as exc:
        note = _exc_note(exc)
    rec = _record(problem, library, sampler, schedule, kind, budget, out, note, dtype)
    return rec, (None if out is None else (lambda: sample(steps)))


def _sciddiff_rows(problem: Problem, nfes: Sequence[int], seed: int,
                   tick: Callable[[], None] | None) -> list[Row]:
    rows = []
    for entry in SCIDDIFF_SAMPLERS:
        if entry.resolve() is None:
            continue
        for sch in SCHEDULES:
            if sch.resolve() is None:
                continue
            for budget in nfes:
                rows.append(_row(problem, "sciddiff", entry.title, sch.title, entry.kind, budget, entry.steps,
                                 lambda n, e=entry, s=sch: sample_sciddiff(e, s, problem, n, seed), DTYPE))
                if tick:
                    tick()
    return rows


def _learned_rows(problem: Problem, nfes: Sequence[int], seed: int, spec: LearnSpec, cache_dir: Path | None,
                  tick: Callable[[], None] | None, log: Callable[[str], None] | None = None) -> list[Row]:
    """Rows on grids learned for ``problem`` (see ``LearnSpec``); one ``tick`` per row."""
    budgets = spec.budgets(nfes)
    if not budgets or not hasattr(S, "learn_grid"):
        return []
    train = make_problem(problem.name, spec.n_train, seed + LEARN_SEED_OFFSET, cache_dir,
                         log=log)
    model = Model(ExactNet(train.den, train.process, CallTimer()), train.process, "eps")
    x, target = State.from_tensor(train.x_T.clone()), State.from_tensor(train.ref.clone())
    rows = []
    for entry in LEARNED_SAMPLERS:
        for budget in budgets:
            steps = entry.steps(budget)
            learned = S.learn_grid(model, x, target, steps=steps, solver=entry.name, iters=spec.iters,
                                   lr=spec.lr, t_start=T_START, **entry.kwargs)
            fixed = FixedGrid(learned.grid)
            row = _row(problem, "sciddiff", entry.title, fixed.title, entry.kind, budget,
                       lambda n, k=steps: k,
                       lambda n, e=entry, f=fixed: sample_sciddiff(e, f, problem, n, seed), DTYPE)
            row[0].update(learn_seconds=learned.seconds, learn_nfe=learned.nfe, learn_iters=spec.iters,
                          train_samples=spec.n_train, train_seed=train.seed,
                          train_loss_initial=learned.initial_loss, train_loss_best=learned.best_loss,
                          grid_t=learned.grid.t[:-1].tolist())
            rows.append(row)
            if log:
                log(f"{problem.name}: learned a {steps}-step grid for {entry.title} in "
                    f"{learned.seconds:.1f} s "
                    f"(train loss {learned.initial_loss:.3g} -> {learned.best_loss:.3g})")
            if tick:
                tick()
    return rows


def _diffusers_rows(problem: Problem, nfes: Sequence[int], seed: int,
                    tick: Callable[[], None] | None) -> list[Row]:
    rows = []
    for entry in DIFFUSERS_SCHEDULERS:
        for budget in nfes:
            rows.append(_row(problem, "diffusers", entry.sampler, entry.schedule, "ode", budget, entry.steps,
                             lambda n, e=entry: sample_diffusers(e, problem, n, seed), entry.dtype))
            if tick:
                tick()
    return rows


def _retime(rows: list[Row], rounds: int, tick: Callable[[], None] | None = None) -> None:
    """``rounds`` more timed passes over all rows (both libraries, alternating direction), keeping
    each row's fastest run: every row is timed at several well separated moments, so a change of
    machine load does not fall on one library's rows only."""
    import warnings

    for k in range(rounds):
        for rec, rerun in (rows if k % 2 else rows[::-1]):
            if rerun is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = rerun()
                if out.seconds < rec["seconds"]:
                    _set_timing(rec, out)
            if tick:
                tick()


def sciddiff_rows(problem: Problem, nfes: Sequence[int], seed: int = 0,
                  repeats: int = 1) -> list[dict[str, Any]]:
    """The sciddiff records of one problem (each timed ``repeats`` times, the fastest kept)."""
    rows = _sciddiff_rows(problem, nfes, seed, None)
    _retime(rows, repeats - 1)
    return [r for r, _ in rows]


def diffusers_rows(problem: Problem, nfes: Sequence[int], seed: int = 0,
                   repeats: int = 1) -> list[dict[str, Any]]:
    """The diffusers records of one problem (each timed ``repeats`` times, the fastest kept)."""
    rows = _diffusers_rows(problem, nfes, seed, None)
    _retime(rows, repeats - 1)
    return [r for r, _ in rows]


def _warm_up(problem: Problem, with_diffusers: bool) -> None:
    """One untimed run per library so first-call costs do not land in a timed row."""
    small = dataclasses.replace(problem, x_T=problem.x_T[:64], ref=problem.ref[:64])
    sample_sciddiff(SamplerEntry("ddim"), ScheduleEntry("trailing"), small, 2)
    if with_diffusers:
        try:
            sample_diffusers(DIFFUSERS_SCHEDULERS[0], small, 2)
        except Exception:
            pass


# ================================================================================================
# Entry point
# ================================================================================================
def run(out_dir: str | Path, quick: bool = True, problems: Sequence[str] | None = None, quiet: bool = False,
        *, n_samples: int | None = None, nfes: Sequence[int] | None = None, seed: int = 0,
        ref_tol: float = REF_TOL, include_diffusers: bool = True,
        threads: int | None = 1, repeats: int = 3,
        learn: LearnSpec | None | bool = True) -> list[dict[str, Any]]:
    """Run the benchmark; writes ``samplers.json``, ``samplers.md``, ``samplers.png`` to ``out_dir``.

    ``quick``: 2,000 samples, NFE 5/10/20/50, problems gmm2d, gmm64d, gmm2d-aniso (under 5 min on
    2 cores, the first time included); otherwise 10,000 samples, NFE up to 100 and gmm16d-aniso too.
    ``n_samples``, ``nfes``, ``problems`` override the mode's choices. ``threads``: torch's intra-op
    threads while it runs (default 1: steadier timings; small tensors gain little from more, and
    OpenMP threads on a busy machine can be much slower); ``None`` keeps the current setting.
    ``repeats``: timed runs per row, the fastest kept (the samples are identical); the extra runs are
    rounds over all rows of a problem, both libraries interleaved. ``learn``: rows on learned grids
    (``True``: the mode's ``QUICK_LEARN`` / ``FULL_LEARN``; a ``LearnSpec``; ``False``/``None``: none).
    Returns the records.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if learn is True:
            learn = QUICK_LEARN if quick else FULL_LEARN
        return _run(out_dir, quick, problems, quiet, n_samples, nfes, seed, ref_tol, include_diffusers,
                    max(1, int(repeats)), learn or None)
    finally:
        torch.set_num_threads(previous)


def _run(out_dir, quick, problems, quiet, n_samples, nfes, seed, ref_tol, include_diffusers, repeats, learn):
    from tqdm import tqdm

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(problems) if problems else list(QUICK_PROBLEMS if quick else FULL_PROBLEMS)
    for nm in names:
        if nm not in PROBLEMS:
            raise ValueError(f"unknown problem {nm!r}; known: {', '.join(PROBLEMS)}")
    n = n_samples or (QUICK_SAMPLES if quick else FULL_SAMPLES)
    nfe_list = list(nfes or (QUICK_NFES if quick else FULL_NFES))

    def log(msg: str) -> None:
        if not quiet:
            tqdm.write(msg, file=sys.stderr)

    warn: list[str] = []
    with_diffusers = include_diffusers and diffusers_available()
    if include_diffusers and not with_diffusers:
        warn.append("diffusers is not installed: the diffusers rows are skipped "
                    "(pip install -e '.[bench]' to compare)")
        print(f"warning: {warn[-1]}", file=sys.stderr)
    skipped = [e.name for e in SCIDDIFF_SAMPLERS if e.resolve() is None]
    skipped += [s.name for s in SCHEDULES if s.resolve() is None]

    n_sci = sum(1 for e in SCIDDIFF_SAMPLERS if e.resolve()) * sum(1 for s in SCHEDULES if s.resolve())
    per_problem = (n_sci + (len(DIFFUSERS_SCHEDULERS) if with_diffusers else 0)) * len(nfe_list)
    if learn is not None:
        per_problem += len(LEARNED_SAMPLERS) * len(learn.budgets(nfe_list))
    records: list[dict[str, Any]] = []
    built: list[Problem] = []
    for nm in names:
        prob = make_problem(nm, n, seed, out / "cache", ref_tol, log)
        built.append(prob)
        _warm_up(prob, with_diffusers)
        with tqdm(total=per_problem * repeats, desc=nm, disable=quiet, file=sys.stderr, leave=False) as bar:
            rows = _sciddiff_rows(prob, nfe_list, seed, bar.update)
            if learn is not None:
                rows += _learned_rows(prob, nfe_list, seed, learn, out / "cache", bar.update, log)
            if with_diffusers:
                rows += _diffusers_rows(prob, nfe_list, seed, bar.update)
            _retime(rows, repeats - 1, bar.update)
        records += [r for r, _ in rows]
        if not quiet:
            for lib in LIBRARIES:
                b = best_rows(records, nm, lib, nfe_list[min(1, len(nfe_list) - 1)])
                if b:
                    log(f"{nm}: best {lib} at NFE {b['nfe_budget']}: {b['error']:.4g} ({_config(b)})")

    atomic_write_text(out / "samplers.json", json.dumps(records, indent=1))
    meta = {"hardware": hardware_line(), "mode": "quick" if quick else "full", "n_samples": n, "seed": seed,
            "ref_tol": ref_tol, "skipped": skipped, "warnings": warn, "repeats": repeats,
            "learn": None if learn is None else dataclasses.asdict(learn),
            "wall_seconds": time.perf_counter() - started}
    write_markdown(out / "samplers.md", records, built, nfe_list, meta,
                   {p.name: PROBLEMS[p.name].description for p in built}, MATCHED_PAIRS)
    try:
        write_plot(out / "samplers.png", records, built, nfe_list)
    except ImportError:
        print("warning: matplotlib is not installed: samplers.png is not written", file=sys.stderr)
    log(f"wrote {out / 'samplers.json'}, {out / 'samplers.md'}, {out / 'samplers.png'} "
        f"({time.perf_counter() - started:.1f} s)")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.samplers ...``: the same as ``sciddiff bench samplers ...``."""
    from sciddiff.cli import main as cli_main

    return cli_main(["bench", "samplers", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
