"""Parameterizations: exact conversions, error scales, Model.predict and EDM preconditioning."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from sciddiff.core import (
    EDM,
    PARAMS,
    VE,
    VP,
    EDMPrecond,
    FlatTorus,
    LinearInterpolant,
    Model,
    Prediction,
    State,
    ZeroCoM,
    eps_error_scale,
    from_prediction,
    to_prediction,
)
from sciddiff.testing import ExactDenoiser, GaussianMixture

F64 = torch.float64
#: round trips divide by alpha, sigma or a determinant: well-conditioned levels, looser float32.
RT_TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-9, "atol": 1e-9}}

# per-system times [B=3], away from the ends where alpha or sigma vanish
PROCS = {
    "vp_discrete": (lambda: VP(timesteps=1000), [20.0, 250.5, 600.0]),
    "edm": (lambda: EDM(), [0.05, 0.8, 12.0]),
    "interpolant": (lambda: LinearInterpolant(), [0.05, 0.5, 0.9]),
}


def _levels(name, dtype):
    make, ts = PROCS[name]
    p = make()
    t = torch.tensor(ts, dtype=F64)
    return p, t, (p.alpha(t).to(dtype), p.sigma(t).to(dtype), p.d_alpha(t).to(dtype),
                  p.d_sigma(t).to(dtype))


def _x0_eps(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    x0 = State({"pos": torch.randn(7, 3, generator=g, dtype=dtype),
                "h": torch.randn(3, 4, generator=g, dtype=dtype)},
               batch={"pos": idx}, constraints={"pos": ZeroCoM()}).project()
    return x0, x0.randn_like(g)


def _assert_state_close(a: State, b: State, **tol):
    assert list(a.keys()) == list(b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert_close(a[k], b[k], **tol)


# conversions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROCS))
@pytest.mark.parametrize("param", PARAMS)
def test_round_trip(name, param, dtype):
    _, _, (a, s, da, ds) = _levels(name, dtype)
    x0, eps = _x0_eps(dtype)
    x = x0.lincomb(a, eps, s)
    raw = from_prediction(x0, eps, param, a, s, da, ds)
    pred = to_prediction(raw, x, param, a, s, da, ds)
    assert isinstance(pred, Prediction)
    _assert_state_close(pred.x0, x0, **RT_TOL[dtype])
    _assert_state_close(pred.eps, eps, **RT_TOL[dtype])
    assert pred.x0.batch is x.batch


@pytest.mark.parametrize("name", list(PROCS))
@pytest.mark.parametrize(("src", "dst"), list(itertools.product(PARAMS, PARAMS)))
def test_convert_between_params(name, src, dst, dtype):
    """Network output in ``src`` re-expressed in ``dst`` describes the same prediction."""
    _, _, (a, s, da, ds) = _levels(name, dtype)
    x0, eps = _x0_eps(dtype, seed=1)
    x = x0.lincomb(a, eps, s)
    p1 = to_prediction(from_prediction(x0, eps, src, a, s, da, ds), x, src, a, s, da, ds)
    raw_dst = from_prediction(p1.x0, p1.eps, dst, a, s, da, ds)
    p2 = to_prediction(raw_dst, x, dst, a, s, da, ds)
    _assert_state_close(p2.x0, x0, **RT_TOL[dtype])
    _assert_state_close(p2.eps, eps, **RT_TOL[dtype])


def test_targets_closed_forms(dtype, tol):
    """v = alpha eps - sigma x0; score = -eps/sigma; velocity = alpha' x0 + sigma' eps."""
    _, _, (a, s, da, ds) = _levels("interpolant", dtype)
    x0, eps = _x0_eps(dtype)
    idx = x0.batch["pos"]

    def col(c, k):
        return c[idx, None] if k == "pos" else c[:, None]

    for k in x0:
        v = from_prediction(x0, eps, "v", a, s)[k]
        assert_close(v, col(a, k) * eps[k] - col(s, k) * x0[k], **tol)
        sc = from_prediction(x0, eps, "score", a, s)[k]
        assert_close(sc, -eps[k] / col(s, k), **tol)
        vel = from_prediction(x0, eps, "velocity", a, s, da, ds)[k]
        assert_close(vel, eps[k] - x0[k], **tol)  # LinearInterpolant: d/dt x_t = eps - x0
    assert from_prediction(x0, eps, "eps", a, s) is eps and from_prediction(x0, eps, "x0", a, s) is x0


def test_scalar_levels(dtype):
    x0, eps = _x0_eps(dtype)
    a, s = 0.6, 0.8
    x = x0.lincomb(a, eps, s)
    for param in ("eps", "x0", "v", "score"):
        pred = to_prediction(from_prediction(x0, eps, param, a, s), x, param, a, s)
        _assert_state_close(pred.x0, x0, **RT_TOL[dtype])
        _assert_state_close(pred.eps, eps, **RT_TOL[dtype])


@pytest.mark.parametrize("name", list(PROCS))
@pytest.mark.parametrize("param", PARAMS)
def test_eps_error_scale_is_derivative(name, param):
    """``|d eps / d raw|`` by a finite difference (exact: the maps are linear)."""
    dtype = F64
    _, _, (a, s, da, ds) = _levels(name, dtype)
    x0, eps = _x0_eps(dtype)
    x = x0.lincomb(a, eps, s)
    raw = from_prediction(x0, eps, param, a, s, da, ds)
    e = raw.randn_like(torch.Generator().manual_seed(9))
    h = 1e-3
    e1 = to_prediction(raw, x, param, a, s, da, ds).eps
    e2 = to_prediction(raw + e * h, x, param, a, s, da, ds).eps
    scale = eps_error_scale(param, a, s, da, ds)
    assert scale.shape == (3,)
    ratio = ((e2 - e1).sqnorm() / (e * h).sqnorm()).sqrt()
    assert_close(ratio, scale.to(dtype), rtol=1e-8, atol=0)
    # the change is proportional to e in every field (a per-system scalar, not a matrix)
    for k in x0:
        d = (e2 - e1)[k] / (e * h)[k]
        col = x.expand(scale, k)
        assert_close(d.abs(), col.expand_as(d).to(dtype), rtol=1e-7, atol=0)


def test_eps_error_scale_closed_forms():
    a, s = torch.tensor([0.6, 0.28]), torch.tensor([0.8, 0.96])
    assert torch.equal(eps_error_scale("eps", a, s), torch.ones(2))
    assert torch.equal(eps_error_scale("score", a, s), s)
    assert_close(eps_error_scale("x0", a, s), a / s)
    assert_close(eps_error_scale("v", a, s), a)  # a / (a^2 + s^2) with a^2 + s^2 = 1
    assert_close(eps_error_scale("velocity", 1 - s, s, -torch.ones(2), torch.ones(2)), 1 - s)


def test_validation(dtype):
    x0, eps = _x0_eps(dtype)
    with pytest.raises(ValueError, match="unknown parameterization 'noise'"):
        from_prediction(x0, eps, "noise", 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown parameterization"):
        to_prediction(x0, x0, "noise", 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown parameterization"):
        eps_error_scale("noise", 1.0, 1.0)
    with pytest.raises(ValueError, match="needs d_alpha and d_sigma"):
        to_prediction(x0, x0, "velocity", 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown parameterization"):
        Model(lambda x, t: x, EDM(), "noise")
    with pytest.raises(TypeError, match="must be callable"):
        Model(3, EDM())


# torus fields -----------------------------------------------------------------------------------
def test_torus_conversions(dtype, tol):
    g = torch.Generator().manual_seed(2)
    x0v = torch.rand(5, 2, generator=g, dtype=dtype)
    epsv = torch.randn(5, 2, generator=g, dtype=dtype)
    s = torch.full((5,), 0.05, dtype=dtype)
    x0 = State.from_tensor(x0v, "f", FlatTorus())
    eps = x0.replace(f=epsv)
    x = x0.lincomb(1.0, eps, s).canonical()  # the model sees the wrapped value
    for param in ("eps", "score", "x0"):
        raw = from_prediction(x0, eps, param, 1.0, s)
        pred = to_prediction(raw, x, param, 1.0, s)
        assert_close(pred.eps["f"], epsv, **RT_TOL[dtype])
        # x0 lies on the cover of x: x = x0 + s eps exactly
        assert_close(pred.x0["f"] + s[:, None] * pred.eps["f"], x["f"], **tol)
        assert_close(FlatTorus().difference(pred.x0["f"], x0v), torch.zeros_like(x0v), **RT_TOL[dtype])
    with pytest.raises(ValueError, match="not periodic"):
        to_prediction(eps, x, "v", 1.0, s)
    vel = to_prediction(eps * 2.0, x, "velocity", 1.0, s, 0.0, 2.0)  # VE: velocity = sigma' eps
    assert_close(vel.eps["f"], epsv, **tol)


# Model ------------------------------------------------------------------------------------------
MIX = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]], dtype=F64),
                      torch.tensor([0.3, 0.5, 0.2], dtype=F64), torch.tensor([0.2, 0.5, 0.3]))


@pytest.mark.parametrize("name", ["vp_discrete", "edm", "interpolant", "ve", "vp_cosine"])
@pytest.mark.parametrize("param", PARAMS)
def test_model_predict_exact_denoiser(name, param, dtype):
    proc = {"ve": lambda: VE(), "vp_cosine": lambda: VP("cosine")}.get(name) or PROCS[name][0]
    p = proc()
    g = torch.Generator().manual_seed(3)
    B = 6
    t = p.t_min + (p.t_max - p.t_min) * torch.linspace(0.05, 0.85, B, dtype=F64)
    x = State.from_tensor((MIX.sample(B, g) * 1.3 + 0.2).to(dtype))
    mix = MIX.to(dtype)
    net = ExactDenoiser(mix, p, param)
    model = Model(net, p, param)
    pred = model.predict(x, t)
    a, s = p.alpha(t).to(dtype), p.sigma(t).to(dtype)
    assert pred.x0.dtype == dtype and pred.eps.dtype == dtype  # float64 t does not promote
    want_x0 = mix.denoise(x["x"], a, s)
    want_eps = mix.eps(x["x"], a, s)
    assert_close(pred.x0["x"], want_x0, **RT_TOL[dtype])
    assert_close(pred.eps["x"], want_eps, **RT_TOL[dtype])
    assert model.nfe == 1 and net.nfe == 1
    # 0-d time broadcast to every system
    p0 = model.predict(x, t[2])
    assert_close(p0.x0["x"], mix.denoise(x["x"], a[2], s[2]), **RT_TOL[dtype])
    assert model.nfe == 2


def test_model_predict_explicit_levels_and_canonical(dtype):
    seen = {}

    def net(x, t):
        seen["x"], seen["t"] = x["f"].clone(), t
        return x.map(torch.zeros_like)  # eps = 0

    p = VE()
    x = State.from_tensor(torch.tensor([[1.25, -0.5]], dtype=dtype), "f", FlatTorus())
    pred = Model(net, p, "eps").predict(x, torch.tensor(0.5, dtype=F64), 1.0, 0.1)
    assert_close(seen["x"], torch.tensor([[0.25, 0.5]], dtype=dtype))  # network sees wrapped x
    assert seen["t"].shape == (1,)
    assert torch.equal(pred.x0["f"], x["f"])  # x0 on the cover: x - sigma * 0
    assert "param='eps'" in repr(Model(net, p, "eps"))
    with pytest.raises(ValueError, match="torus"):
        Model(net, VP(), "eps").check(x)


# EDM preconditioning ----------------------------------------------------------------------------
def test_edm_precond_coefficients(dtype, tol):
    sd = 0.5
    pre = EDMPrecond(nn.Identity(), EDM(), sigma_data=sd)
    s = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=dtype)
    c_skip, c_out, c_in, c_noise = pre.coefficients(s)
    assert_close(c_skip, sd**2 / (s**2 + sd**2), **tol)
    assert_close(c_out, s * sd / torch.sqrt(s**2 + sd**2), **tol)
    assert_close(c_in, 1 / torch.sqrt(s**2 + sd**2), **tol)
    assert_close(c_noise, torch.log(s) / 4, **tol)
    # unit-variance network input and training target for data of std sd (Karras et al. 2022, App. B.6)
    assert_close(c_in**2 * (sd**2 + s**2), torch.ones_like(s), **tol)
    assert_close((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2, c_out**2, **tol)
    with pytest.raises(ValueError, match="sigma_data must be positive"):
        EDMPrecond(nn.Identity(), EDM(), sigma_data=0.0)


class _Toy(nn.Module):
    """``F(y, c_noise)``: a fixed nonlinear map per field, depending on the noise embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def forward(self, y: State, c_noise: torch.Tensor) -> State:
        self.calls.append((y, c_noise))
        return y._with({k: torch.tanh(1.3 * v + y.expand(c_noise, k)) - 0.2 * v for k, v in y.items()})


@pytest.mark.parametrize("name", ["edm", "vp_discrete", "interpolant"])
def test_edm_precond_wrapper(name, dtype, tol):
    p, t, _ = _levels(name, dtype)
    x0, eps = _x0_eps(dtype, seed=4)
    a, s_ = p.alpha(t).to(dtype), p.sigma(t).to(dtype)
    x = x0.lincomb(a, eps, s_)
    toy = _Toy()
    pre = EDMPrecond(toy, p, sigma_data=0.7)
    out = pre(x, t)
    s = s_ / a
    sd = 0.7
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    c_noise = torch.log(s) / 4
    y = x / a
    (fy, fc), = toy.calls
    assert_close(fc, c_noise, **tol)
    for k in x:
        assert_close(fy[k], y[k] * x.expand(c_in, k), **tol)
    f = _Toy()(y * c_in, c_noise)
    for k in x:
        want = x.expand(c_skip, k) * y[k] + x.expand(c_out, k) * f[k]
        assert out[k].dtype == dtype
        assert_close(out[k], want, **tol)
    # as an x0-parameterized model it is a valid denoiser (finite, same layout)
    pred = Model(pre, p, "x0").predict(x, t)
    assert pred.x0.batch is x.batch and torch.isfinite(pred.eps.sqnorm()).all()


def test_edm_precond_rejects_torus():
    x = State.from_tensor(torch.rand(2, 3), "f", FlatTorus())
    with pytest.raises(ValueError, match="EDMPrecond: field 'f' is on the torus"):
        EDMPrecond(_Toy(), EDM())(x, torch.ones(2))


def test_edm_precond_ideal_net_is_exact():
    """For data N(0, sd^2) the exact denoiser is ``c_skip * x`` (EDM), so F = 0 makes D exact."""
    sd = 0.5

    class Zero(nn.Module):
        def forward(self, y, c_noise):
            return y.map(torch.zeros_like)

    t = torch.tensor([0.1, 1.0, 5.0], dtype=F64)
    x = State.from_tensor(torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0)))
    out = EDMPrecond(Zero(), EDM(sigma_data=sd), sd)(x, t)
    g = GaussianMixture(torch.zeros(1, 4, dtype=F64), sd)
    assert_close(out["x"], g.denoise(x["x"], torch.ones(3, dtype=F64), t), rtol=1e-12, atol=1e-14)
