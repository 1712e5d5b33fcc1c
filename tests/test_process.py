"""Gaussian processes: VP (linear/cosine, discrete/continuous), VE, EDM, linear interpolant."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sciddiff.core import (
    EDM,
    VE,
    VP,
    FlatTorus,
    GaussianProcess,
    LinearInterpolant,
    Masked,
    State,
    ZeroCoM,
    check_compatible,
)

F64 = torch.float64


class _Custom(GaussianProcess):
    """A process with no overrides: exercises the base class's autograd derivatives and the
    table-based inverse of ``log_snr``."""

    t_min, t_max = 0.01, 2.0

    def alpha(self, t):
        return torch.exp(-0.5 * t)

    def sigma(self, t):
        return torch.sinh(t)


PROCESSES = {
    "vp_linear_discrete": lambda: VP("linear", timesteps=1000),
    "vp_cosine_discrete": lambda: VP("cosine", timesteps=1000),
    "vp_linear": lambda: VP("linear"),
    "vp_cosine": lambda: VP("cosine"),
    "ve": lambda: VE(),
    "edm": lambda: EDM(),
    "interpolant": lambda: LinearInterpolant(),
    "custom": lambda: _Custom(),
}
VP_NAMES = [k for k in PROCESSES if k.startswith("vp")]


@pytest.fixture(params=list(PROCESSES), ids=list(PROCESSES))
def process(request) -> GaussianProcess:
    return PROCESSES[request.param]()


@pytest.fixture(params=VP_NAMES, ids=VP_NAMES)
def vp(request) -> VP:
    return PROCESSES[request.param]()


def _grid(p, n=201, interior=True):
    t = torch.linspace(p.t_min, p.t_max, n, dtype=F64)
    return t[1:-1] if interior else t


# alpha, sigma -----------------------------------------------------------------------------------
def test_vp_variance_preserving(vp, dtype, tol):
    t = _grid(vp, interior=False).to(dtype)
    a, s = vp.alpha(t), vp.sigma(t)
    assert a.dtype == dtype and s.dtype == dtype
    assert_close(a**2 + s**2, torch.ones_like(t), **tol)
    assert bool((a > 0).all() and (s > 0).all())


def _ddpm_alphas_cumprod(schedule: str, n: int = 1000) -> torch.Tensor:
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, n, dtype=F64)
    else:  # Nichol & Dhariwal 2021, Eq. 17 with beta clipped at 0.999
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=F64)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_discrete_vp_matches_ddpm(schedule, dtype, tol):
    p = VP(schedule, timesteps=1000)
    t = torch.arange(1000, dtype=dtype)
    want = _ddpm_alphas_cumprod(schedule).to(dtype)
    assert_close(p.alpha(t) ** 2, want, **tol)
    assert_close(p.sigma(t) ** 2, 1 - want, **tol)
    assert p.t_min == 0.0 and p.t_max == 999.0


@pytest.mark.parametrize(("schedule", "name"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_discrete_vp_matches_diffusers(schedule, name):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    ac = sched.alphas_cumprod.to(F64)  # computed in float32 by diffusers
    ours = VP(schedule, timesteps=1000).alpha(torch.arange(1000, dtype=F64)) ** 2
    assert_close(ours, ac, rtol=2e-5, atol=1e-6)


def test_discrete_vp_interpolates_log_alpha(dtype, tol):
    p = VP(timesteps=1000)
    i = torch.tensor([0.0, 17.0, 500.0, 997.0], dtype=dtype)
    w = torch.tensor([0.25, 0.5, 0.9, 0.1], dtype=dtype)
    la = torch.log(p.alpha(i + w))
    want = (1 - w) * torch.log(p.alpha(i)) + w * torch.log(p.alpha(i + 1))
    assert_close(la, want, **tol)
    # clamped outside [0, T-1]
    assert_close(p.alpha(torch.tensor([-3.0, 1200.0], dtype=dtype)),
                 p.alpha(torch.tensor([0.0, 999.0], dtype=dtype)), **tol)


def test_continuous_vp_closed_forms(dtype, tol):
    t = torch.linspace(1e-3, 1.0, 50, dtype=dtype)
    lin = VP("linear")
    want = torch.exp(-0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1)  # Song et al. 2021, beta in [0.1, 20]
    assert_close(lin.alpha(t), want, **tol)
    cos = VP("cosine")
    t = t * cos.t_max
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert_close(cos.alpha(t) ** 2, f(t) / f(torch.zeros_like(t)), **tol)
    assert lin.t_min == 1e-3 and lin.t_max == 1.0 and VP(t_min=0.01).t_min == 0.01


def test_ve_edm_interpolant_closed_forms(dtype, tol):
    t = torch.linspace(0, 1, 11, dtype=dtype)
    ve = VE(0.01, 50.0)
    assert_close(ve.sigma(t), 0.01 * 5000.0**t, **tol)
    assert torch.equal(ve.alpha(t), torch.ones_like(t))
    e = EDM()
    s = torch.linspace(e.t_min, e.t_max, 11, dtype=dtype)
    assert torch.equal(e.sigma(s), s) and torch.equal(e.alpha(s), torch.ones_like(s))
    li = LinearInterpolant()
    assert_close(li.alpha(t), 1 - t, **tol)
    assert_close(li.sigma(t), t, **tol)
    assert ve.variance_exploding and e.variance_exploding
    assert not li.variance_exploding and not VP().variance_exploding
    assert (e.t_min, e.t_max) == (0.002, 80.0) and (ve.t_min, ve.t_max) == (0.0, 1.0)


# log-SNR ----------------------------------------------------------------------------------------
def test_log_snr_decreasing_and_consistent(process, dtype, tol):
    t = _grid(process).to(dtype)
    lam = process.log_snr(t)
    assert lam.dtype == dtype
    assert bool((lam.diff() < 0).all())
    ref = 2 * (torch.log(process.alpha(t.double())) - torch.log(process.sigma(t.double())))
    assert_close(lam.double(), ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


def test_t_of_log_snr_inverts(process, dtype):
    t = _grid(process, n=301).to(dtype)
    back = process.t_of_log_snr(process.log_snr(t))
    assert back.dtype == dtype
    span = process.t_max - process.t_min
    # the base class inverts on a 20001-point table (linear interpolation): looser in float64
    atol = (1e-6 if isinstance(process, _Custom) else 1e-12) if dtype == F64 else 2e-6
    assert_close(back.double(), t.double(), rtol=0, atol=atol * span)


def test_t_of_log_snr_clamps(process):
    lam = torch.tensor([1e3, -1e3], dtype=F64)
    t = process.t_of_log_snr(lam)
    assert float(t[0]) == pytest.approx(process.t_min, abs=1e-9 * process.t_max)
    assert float(t[1]) == pytest.approx(process.t_max, abs=1e-9 * process.t_max)


def test_t_of_sigma_ratio(process):
    t = _grid(process, n=23)
    s = process.sigma(t) / process.alpha(t)
    tt = process.t_of_sigma_ratio(s)
    assert_close(process.sigma(tt) / process.alpha(tt), s, rtol=1e-6, atol=0)


# derivatives ------------------------------------------------------------------------------------
def test_derivatives_match_finite_differences(process, dtype):
    if isinstance(process, VP) and process.timesteps is not None:
        t = torch.tensor([0.5, 10.5, 123.3, 700.7, 998.5], dtype=F64)  # inside one linear piece
        h = 1e-3
    else:
        t = _grid(process, n=13)
        h = 1e-6 * (process.t_max - process.t_min)
    fd_a = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
    fd_s = (process.sigma(t + h) - process.sigma(t - h)) / (2 * h)
    da, ds = process.d_alpha(t.to(dtype)), process.d_sigma(t.to(dtype))
    assert da.dtype == dtype and ds.dtype == dtype and da.shape == t.shape
    rtol = 1e-6 if dtype == F64 else 1e-4
    scale_a, scale_s = fd_a.abs().max() + 1e-12, fd_s.abs().max()
    assert_close(da.double(), fd_a, rtol=rtol, atol=rtol * float(scale_a))
    assert_close(ds.double(), fd_s, rtol=rtol, atol=rtol * float(scale_s))


def test_derivatives_do_not_need_grad_mode(process):
    t = _grid(process, n=5)
    with torch.no_grad():
        da, ds = process.d_alpha(t), process.d_sigma(t)
    assert not da.requires_grad and not ds.requires_grad
    assert torch.isfinite(da).all() and torch.isfinite(ds).all()


# sampling the path ------------------------------------------------------------------------------
def _state(dtype, gen):
    idx = torch.tensor([0, 0, 1, 2, 2, 2])
    return State(
        {"pos": torch.randn(6, 3, generator=gen, dtype=dtype), "h": torch.randn(3, 2, generator=gen,
                                                                               dtype=dtype)},
        batch={"pos": idx}, constraints={"pos": ZeroCoM()},
    ).project()


def test_sample_is_linear_combination(process, dtype, tol, gen):
    x0 = _state(dtype, gen)
    noise = x0.randn_like(gen)
    t = _grid(process, n=5).to(dtype)[:3]  # per-system times [B]
    ps = process.sample(x0, t, noise)
    a, s = process.alpha(t), process.sigma(t)
    assert ps.alpha.dtype == dtype and ps.sigma.dtype == dtype
    assert_close(ps.alpha, a, **tol)
    assert_close(ps.sigma, s, **tol)
    assert ps.x_0 is x0 and ps.noise is noise and ps.t is t
    idx = x0.batch["pos"]
    assert_close(ps.x_t["pos"], a[idx, None] * x0["pos"] + s[idx, None] * noise["pos"], **tol)
    assert_close(ps.x_t["h"], a[:, None] * x0["h"] + s[:, None] * noise["h"], **tol)
    assert ps.x_t.batch is x0.batch
    # float64 times with a float32 state keep the state's dtype
    ps64 = process.sample(x0, t.double(), noise)
    assert ps64.x_t.dtype == dtype


def _prior_template(dtype, B=4000, d=5):
    return State.from_tensor(torch.zeros(B, d, dtype=dtype))


@pytest.mark.parametrize("name", ["vp_linear_discrete", "vp_cosine", "ve", "edm", "interpolant"])
def test_prior_shape_and_variance(name, dtype):
    p = PROCESSES[name]()
    tpl = _prior_template(dtype)
    x = p.prior(tpl, torch.Generator().manual_seed(0))
    assert x["x"].shape == tpl["x"].shape and x.dtype == dtype
    tm = torch.tensor(p.t_max, dtype=F64)
    a, s = float(p.alpha(tm)), float(p.sigma(tm))
    want = s**2 if p.variance_exploding else a**2 + s**2
    if isinstance(p, VP) or isinstance(p, LinearInterpolant):
        assert want == pytest.approx(1.0)
    if isinstance(p, VE):
        assert want == pytest.approx(50.0**2)
    if isinstance(p, EDM):
        assert want == pytest.approx(80.0**2)
    var = float(x["x"].double().var())
    assert var == pytest.approx(want, rel=0.05)  # 20000 draws: ~1% standard error
    assert abs(float(x["x"].double().mean())) < 0.05 * math.sqrt(want)


def test_prior_reproducible_and_constrained(dtype, tol):
    p = VP(timesteps=1000)
    tpl = _state(dtype, torch.Generator().manual_seed(0))
    a = p.prior(tpl, torch.Generator().manual_seed(4))
    b = p.prior(tpl, torch.Generator().manual_seed(4))
    for k in tpl:
        assert torch.equal(a[k], b[k]) and a[k].shape == tpl[k].shape
    com = torch.zeros(3, 3, dtype=dtype).index_add_(0, tpl.batch["pos"], a["pos"])
    assert_close(com, torch.zeros_like(com), **tol)
    assert a.batch is tpl.batch


def test_prior_on_torus_and_masked(dtype, tol, gen):
    ve = VE()
    x = ve.prior(State.from_tensor(torch.zeros(500, 3, dtype=dtype), constraint=FlatTorus()), gen)
    assert bool(((x["x"] >= 0) & (x["x"] <= 1)).all())
    mask = torch.zeros(4, 2, dtype=torch.bool)
    mask[:, 0] = True
    known = torch.randn(4, 2, generator=gen, dtype=dtype)
    m = Masked.create(mask, known, generator=gen)
    p = LinearInterpolant()
    y = p.prior(State({"x": torch.zeros(4, 2, dtype=dtype)}, constraints={"x": m}), gen)
    # at t_max: alpha = 0, sigma = 1, so known entries become their fixed noise
    assert_close(y["x"][mask], m.noise[mask], **tol)


# compatibility and validation --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp_linear_discrete", "vp_cosine", "interpolant"])
def test_torus_needs_variance_exploding(name, gen):
    p = PROCESSES[name]()
    st = State.from_tensor(torch.rand(3, 2, generator=gen), "frac", FlatTorus())
    msg = r"field 'frac' lives on the torus, which needs a variance-exploding process"
    with pytest.raises(ValueError, match=msg):
        check_compatible(p, st)
    with pytest.raises(ValueError, match=msg):
        p.sample(st, torch.full((3,), 0.5, dtype=F64), st.randn_like(gen))
    with pytest.raises(ValueError, match=type(p).__name__):
        p.prior(st, gen)


@pytest.mark.parametrize("name", ["ve", "edm"])
def test_torus_with_variance_exploding_ok(name, gen):
    p = PROCESSES[name]()
    st = State.from_tensor(torch.rand(3, 2, generator=gen), "frac", FlatTorus())
    check_compatible(p, st)
    ps = p.sample(st, torch.full((3,), p.t_min, dtype=F64), st.randn_like(gen))
    assert ps.x_t["frac"].shape == (3, 2)


def test_constructor_validation():
    with pytest.raises(ValueError, match="unknown schedule 'quad'"):
        VP("quad")
    with pytest.raises(ValueError, match="timesteps must be >= 2"):
        VP(timesteps=1)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VP(beta_min=0.5, beta_max=0.1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VE(1.0, 0.5)
    with pytest.raises(ValueError, match="sigma_data > 0"):
        EDM(sigma_data=0.0)
    assert "timesteps=1000" in repr(VP(timesteps=1000)) and "VE(" in repr(VE())
    assert repr(LinearInterpolant()) == "LinearInterpolant()" and "EDM(" in repr(EDM())
