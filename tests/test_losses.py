"""Losses: denoising / flow-matching loss, weightings, time samplers, wrapped-normal score, OT coupling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from sciddiff.core import (
    EDM,
    PARAMS,
    VE,
    VP,
    FlatTorus,
    ImportanceTime,
    LinearInterpolant,
    LogNormalTime,
    LossOutput,
    Model,
    State,
    TimeSample,
    UniformTime,
    ZeroCoM,
    denoising_loss,
    from_prediction,
    loss_weight,
    ot_coupling,
    wrapped_normal_score,
)
from sciddiff.testing import ExactDenoiser, GaussianMixture

F64 = torch.float64


class FixedTime:
    """A time sampler that always returns ``t``."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self, n, generator=None, device=None) -> TimeSample:
        return TimeSample(torch.full((n,), self.t, dtype=F64), torch.ones(n, dtype=F64))


class BandTime:
    """Uniform times in ``[lo, hi]`` (keeps the ``1/sigma^2`` of the score's native loss bounded)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, n, generator=None, device=None) -> TimeSample:
        u = torch.rand(n, generator=generator, dtype=F64)
        return TimeSample(self.lo + (self.hi - self.lo) * u, torch.ones(n, dtype=F64))


class Shifted:
    """The exact denoiser with its eps prediction shifted: a worse model, in any param."""

    def __init__(self, dist, process, param, shift=0.3):
        self.exact = ExactDenoiser(dist, process, "eps")
        self.process, self.param, self.shift = process, param, shift

    def __call__(self, x, t):
        p = self.process
        tt = t.to(F64)
        a, s = p.alpha(tt).to(x.dtype), p.sigma(tt).to(x.dtype)
        eps = self.exact(x, t).map(lambda v: v + self.shift)
        x0 = (x - eps * s) / a
        da = p.d_alpha(tt).to(x.dtype)
        ds = p.d_sigma(tt).to(x.dtype)
        return from_prediction(x0, eps, self.param, a, s, da, ds)


MIX = GaussianMixture(torch.tensor([[-1.0, 0.5, 0.0], [1.5, -0.5, 1.0]], dtype=F64),
                      torch.tensor([0.3, 0.6], dtype=F64))
WRONG = GaussianMixture(torch.tensor([[0.5, 0.5, -1.0], [-1.0, 0.0, 0.5]], dtype=F64),
                        torch.tensor([0.5, 0.4], dtype=F64))


def _data(dist, n, dtype, seed=0):
    return State.from_tensor(dist.sample(n, torch.Generator().manual_seed(seed)).to(dtype))


# closed forms with the exact model ---------------------------------------------------------------
@pytest.mark.parametrize(("proc", "t"), [(VP(timesteps=1000), 300.0), (LinearInterpolant(), 0.4),
                                         (EDM(), 0.7), (VP("cosine"), 0.5)])
def test_exact_eps_loss_single_gaussian(proc, t, dtype):
    """``E||eps - E[eps|x_t]||^2 / d = 1 - sigma^2 / (alpha^2 s0^2 + sigma^2)`` for data N(0, s0^2)."""
    s0, d, n = 0.8, 4, 20000
    g = GaussianMixture(torch.zeros(1, d, dtype=F64), s0)
    x0 = _data(g, n, dtype)
    model = Model(ExactDenoiser(g.to(dtype), proc, "eps"), proc, "eps")
    out = denoising_loss(model, x0, time=FixedTime(t), generator=torch.Generator().manual_seed(1))
    tt = torch.tensor(t, dtype=F64)
    a, s = float(proc.alpha(tt)), float(proc.sigma(tt))
    want = 1 - s**2 / (a**2 * s0**2 + s**2)
    assert float(out.loss) == pytest.approx(want, rel=0.03)
    # x0 parameterization: the posterior variance s0^2 sigma^2 / (alpha^2 s0^2 + sigma^2)
    m0 = Model(ExactDenoiser(g.to(dtype), proc, "x0"), proc, "x0")
    out0 = denoising_loss(m0, x0, time=FixedTime(t), generator=torch.Generator().manual_seed(1))
    assert float(out0.loss) == pytest.approx(s0**2 * s**2 / (a**2 * s0**2 + s**2), rel=0.03)


@pytest.mark.parametrize("weighting", ["simple", "min_snr", "edm"])
@pytest.mark.parametrize("param", PARAMS)
def test_exact_model_beats_perturbed(param, weighting):
    proc = VP(timesteps=1000)
    x0 = _data(MIX, 2000, F64)
    kw = {"weighting": weighting, "time": BandTime(50.0, 900.0)}
    exact = denoising_loss(Model(ExactDenoiser(MIX, proc, param), proc, param), x0,
                           generator=torch.Generator().manual_seed(2), **kw)
    worse = denoising_loss(Model(Shifted(MIX, proc, param), proc, param), x0,
                           generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(exact.t, worse.t)
    assert float(exact.loss) < float(worse.loss)


# weightings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "edm", "interpolant"])
@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_weighting_independent_of_param(name, weighting, dtype):
    """The same prediction in any parameterization gives the same ``edm`` / ``min_snr`` loss."""
    proc = {"vp": VP(timesteps=1000), "edm": EDM(), "interpolant": LinearInterpolant()}[name]
    time = FixedTime(0.5) if name == "interpolant" else None
    x0 = _data(MIX, 64, dtype)
    losses = []
    for param in PARAMS:
        model = Model(ExactDenoiser(WRONG.to(dtype), proc, param), proc, param)
        out = denoising_loss(model, x0, weighting=weighting, time=time,
                             generator=torch.Generator().manual_seed(3))
        losses.append(out.per_system.double())
    rtol = 1e-3 if dtype == torch.float32 else 1e-8
    for other in losses[1:]:
        assert_close(other, losses[0], rtol=rtol, atol=rtol * float(losses[0].abs().max()))


@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_weighting_on_x0_error(weighting, dtype):
    proc = EDM(sigma_data=0.6) if weighting == "edm" else VP(timesteps=1000)
    x0 = _data(MIX, 64, dtype)
    model = Model(ExactDenoiser(WRONG.to(dtype), proc, "eps"), proc, "eps")
    out = denoising_loss(model, x0, weighting=weighting, sigma_data=0.6,
                         generator=torch.Generator().manual_seed(4))
    a, s = out.path.alpha, out.path.sigma
    x0_hat = ExactDenoiser(WRONG.to(dtype), proc, "x0")(out.path.x_t, out.t)
    err = (x0_hat - x0).sqnorm() / 3
    if weighting == "edm":
        sig = s / a
        lam = (sig**2 + 0.6**2) / (sig * 0.6) ** 2
    else:
        lam = ((a / s) ** 2).clamp(max=5.0)
    assert_close(out.per_system, lam * err, rtol=1e-3 if dtype == torch.float32 else 1e-8, atol=1e-6)
    assert_close(loss_weight(weighting, a, s, 0.6), lam)


@pytest.mark.parametrize("name", ["vp", "edm", "interpolant"])
@pytest.mark.parametrize("param", PARAMS)
def test_simple_is_native_mse(name, param, dtype):
    proc = {"vp": VP(timesteps=1000), "edm": EDM(), "interpolant": LinearInterpolant()}[name]
    x0 = _data(MIX, 32, dtype)
    net = ExactDenoiser(WRONG.to(dtype), proc, param)
    out = denoising_loss(Model(net, proc, param), x0, generator=torch.Generator().manual_seed(5))
    ps = out.path
    tt = out.t.to(F64)
    da, ds = proc.d_alpha(tt).to(dtype), proc.d_sigma(tt).to(dtype)
    target = from_prediction(ps.x_0, ps.noise, param, ps.alpha, ps.sigma, da, ds)
    raw = net(ps.x_t, out.t)
    want = (raw - target).sqnorm() / 3
    rtol = 2e-3 if dtype == torch.float32 else 1e-8
    assert_close(out.per_system, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    assert out.per_system.shape == (32,) and not out.per_system.requires_grad
    assert_close(out.loss, out.per_system.mean(), rtol=rtol, atol=0)


def test_flow_matching_loss(dtype):
    """LinearInterpolant + velocity + simple: mean ``||v_hat - (eps - x0)||^2`` per dof (CFM)."""
    proc = LinearInterpolant()
    x0 = _data(MIX, 128, dtype)
    net = ExactDenoiser(WRONG.to(dtype), proc, "velocity")
    out = denoising_loss(Model(net, proc, "velocity"), x0, generator=torch.Generator().manual_seed(6))
    v_hat = net(out.path.x_t, out.t)["x"]
    want = (v_hat - (out.path.noise["x"] - x0["x"])).square().mean(1)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert_close(out.per_system, want, rtol=tol, atol=tol)
    assert_close(out.loss, want.mean(), rtol=tol, atol=tol)


def test_loss_zero_com_dof_and_grad(dtype):
    """Per-system losses divide by each system's dof ((N-1) d for zero-CoM fields); loss has grad."""
    sizes = [3, 5, 2]
    idx = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    c = ZeroCoM()
    x0 = State({"pos": c.project(torch.randn(10, 3, dtype=dtype), idx, 3)}, batch={"pos": idx},
               constraints={"pos": c})
    w = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))
    proc = EDM()
    out = denoising_loss(Model(lambda x, t: x * w, proc, "eps"), x0,
                         generator=torch.Generator().manual_seed(0))
    eps_hat = out.path.x_t * w
    want = (eps_hat - out.path.noise).sqnorm() / torch.tensor([6.0, 12.0, 3.0], dtype=dtype)
    assert_close(out.per_system, want.detach())
    out.loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad)
    assert isinstance(out, LossOutput) and out.t.shape == (3,)


def test_loss_on_torus_uses_wrapped_score(dtype):
    proc = VE(0.01, 1.0)
    g = torch.Generator().manual_seed(0)
    x0 = State.from_tensor(torch.rand(16, 2, generator=g, dtype=dtype), "f", FlatTorus())
    out = denoising_loss(Model(lambda x, t: x.map(torch.zeros_like), proc, "eps"), x0, generator=g)
    ps = out.path
    d = FlatTorus().difference(ps.x_t["f"], x0["f"])
    target = -ps.sigma[:, None] * wrapped_normal_score(d, ps.sigma[:, None])
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert_close(out.per_system, target.square().mean(1), rtol=tol, atol=tol)
    small = ps.sigma < 0.05  # where the wrapping is negligible the target is the drawn noise
    assert_close(target[small], ps.noise["f"][small], rtol=tol, atol=tol)


def test_loss_errors():
    proc = EDM()
    x0 = _data(MIX, 4, F64)
    m = Model(ExactDenoiser(MIX, proc), proc)
    with pytest.raises(ValueError, match="unknown coupling 'best'"):
        denoising_loss(m, x0, coupling="best")
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        denoising_loss(m, x0, weighting="snr")
    with pytest.raises(ValueError, match="unknown weighting"):
        loss_weight("snr", torch.ones(1), torch.ones(1))


# time samplers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("proc", [VP(), VP(timesteps=1000), VE(), EDM(), LinearInterpolant()], ids=repr)
def test_uniform_time(proc):
    ts = UniformTime(proc)(5000, generator=torch.Generator().manual_seed(0))
    t = ts.t
    assert t.shape == (5000,) and t.dtype == F64 and torch.equal(ts.weight, torch.ones(5000, dtype=F64))
    assert float(t.min()) >= proc.t_min and float(t.max()) < proc.t_max + 1e-12
    if getattr(proc, "timesteps", None):
        assert torch.equal(t, t.round()) and float(t.max()) == 999.0 and float(t.min()) == 0.0
    else:
        assert float(t.max()) < proc.t_max
        u = (t - proc.t_min) / (proc.t_max - proc.t_min)
        assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.005
    again = UniformTime(proc)(5000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.t, t)


def test_lognormal_time_edm():
    proc = EDM()
    ts = LogNormalTime(proc)(40000, generator=torch.Generator().manual_seed(0))
    ln = torch.log(proc.sigma(ts.t) / proc.alpha(ts.t))
    assert float(ln.mean()) == pytest.approx(-1.2, abs=0.03)
    assert float(ln.std()) == pytest.approx(1.2, abs=0.03)
    assert float(ts.t.min()) >= proc.t_min and float(ts.t.max()) <= proc.t_max


@pytest.mark.parametrize("proc", [VP(timesteps=1000), VP("cosine"), LinearInterpolant()], ids=repr)
def test_lognormal_time_other_processes(proc):
    ts = LogNormalTime(proc, p_mean=0.0, p_std=0.5)(20000, generator=torch.Generator().manual_seed(0))
    ln = torch.log(proc.sigma(ts.t) / proc.alpha(ts.t))
    assert float(ts.t.min()) >= proc.t_min and float(ts.t.max()) <= proc.t_max
    assert float(ln.median()) == pytest.approx(0.0, abs=0.03)
    assert float(ln.std()) == pytest.approx(0.5, abs=0.03)


def _filled_importance(proc, bins=10, history=4, uniform_prob=0.05, loss=lambda t: 1 + t**2):
    it = ImportanceTime(proc, bins=bins, history=history, uniform_prob=uniform_prob)
    span = proc.t_max - proc.t_min
    for r in range(history):
        t = proc.t_min + (torch.arange(bins, dtype=F64) + 0.5) / bins * span
        it.update(t, loss(t) * (1 + 0.1 * r))
    return it


def test_importance_time_uniform_until_full():
    proc = LinearInterpolant()
    it = ImportanceTime(proc, bins=10, history=3)
    assert_close(it.probabilities(), torch.full((10,), 0.1, dtype=F64))
    it.update(torch.tensor([0.05, 0.15, 0.95]), torch.tensor([5.0, 1.0, 2.0]))
    ts = it(1000, generator=torch.Generator().manual_seed(0))
    assert_close(ts.weight, torch.ones(1000, dtype=F64))  # still uniform: weights are 1
    assert float(ts.t.min()) >= 0 and float(ts.t.max()) < 1
    with pytest.raises(ValueError, match="bins >= 2"):
        ImportanceTime(proc, bins=1)


def test_importance_time_probabilities_and_weights():
    proc = LinearInterpolant()
    bins, hist, up = 10, 4, 0.05
    it = _filled_importance(proc, bins, hist, up)
    centres = (torch.arange(bins, dtype=F64) + 0.5) / bins
    hist_l = (1 + centres[:, None] ** 2) * (1 + 0.1 * torch.arange(hist, dtype=F64))[None]
    w = hist_l.square().mean(1).sqrt()
    want = (1 - up) * w / w.sum() + up / bins
    assert_close(it.probabilities(), want)
    ts = it(5000, generator=torch.Generator().manual_seed(1))
    k = (ts.t * bins).long().clamp(max=bins - 1)
    assert_close(ts.weight, 1.0 / (bins * want[k]))
    # bins are drawn with the stated probabilities
    freq = torch.bincount(k, minlength=bins).double() / 5000
    assert_close(freq, want, rtol=0, atol=0.02)
    assert_close((want * 1.0 / (bins * want)).sum(), torch.tensor(1.0, dtype=F64))  # E[weight] = 1


def test_importance_time_history_rolls():
    proc = LinearInterpolant()
    it = ImportanceTime(proc, bins=2, history=2)
    for v in (1.0, 2.0, 3.0):
        it.update(torch.tensor([0.1]), torch.tensor([v]))
    assert it._losses[0].tolist() == [3.0, 2.0] and int(it._count[0]) == 3


@pytest.mark.parametrize("proc", [LinearInterpolant(), EDM()], ids=repr)
def test_importance_time_unbiased(proc):
    """``E[w L(t)]`` under the importance distribution equals ``E[L(t)]`` under uniform t."""
    span = proc.t_max - proc.t_min

    def loss(t):
        u = (t - proc.t_min) / span
        return 1 + 8 * u**2 + torch.sin(6 * u)

    it = _filled_importance(proc, bins=20, history=3, uniform_prob=0.01, loss=loss)
    ts = it(200000, generator=torch.Generator().manual_seed(2))
    est = float((ts.weight * loss(ts.t)).mean())
    exact = 1 + 8 / 3 + (1 - math.cos(6)) / 6  # integral over u in [0, 1]
    assert est == pytest.approx(exact, rel=0.005)
    assert float(ts.weight.mean()) == pytest.approx(1.0, rel=0.01)


def test_importance_time_discrete_and_loss_updates():
    proc = VP(timesteps=1000)
    it = ImportanceTime(proc, bins=4, history=2)
    x0 = _data(MIX, 16, F64)
    model = Model(ExactDenoiser(MIX, proc), proc)
    for i in range(3):
        out = denoising_loss(model, x0, time=it, generator=torch.Generator().manual_seed(i))
        assert torch.equal(out.t, out.t.round())
    assert int(it._count.sum()) == 48
    ts = _filled_importance(proc, bins=4, history=2)(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ts.t, ts.t.round()) and float(ts.t.max()) <= 999


# wrapped normal score ----------------------------------------------------------------------------
def _wn_logpdf(d, sigma, images=12):
    k = torch.arange(-images, images + 1, dtype=d.dtype)
    return torch.logsumexp(-((d.unsqueeze(-1) + k) ** 2) / (2 * sigma**2), -1)


@pytest.mark.parametrize("sigma", [0.03, 0.1, 0.3, 0.6])
def test_wrapped_normal_score_autograd(sigma, dtype):
    d = torch.linspace(-0.5, 0.5, 41, dtype=dtype)
    dd = d.double().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_wn_logpdf(dd, torch.tensor(sigma, dtype=F64)).sum(), dd)
    images = 3 if sigma <= 0.3 else 6
    got = wrapped_normal_score(d, sigma, images=images)
    assert got.dtype == dtype
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    assert_close(got.double(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def test_wrapped_normal_score_small_sigma_and_symmetry(dtype):
    d = torch.linspace(-0.4, 0.4, 17, dtype=dtype)
    s = 0.02
    assert_close(wrapped_normal_score(d, s), -d / s**2, rtol=1e-5, atol=1e-3)
    s = 0.25
    assert_close(wrapped_normal_score(d + 1, s), wrapped_normal_score(d, s), rtol=1e-4, atol=1e-4)
    assert_close(wrapped_normal_score(-d, s), -wrapped_normal_score(d, s), rtol=1e-5, atol=1e-5)
    zero_half = wrapped_normal_score(torch.tensor([0.0, 0.5], dtype=dtype), s)
    assert_close(zero_half, torch.zeros(2, dtype=dtype), rtol=0, atol=1e-4)


def test_wrapped_normal_score_per_system_sigma(dtype):
    d = torch.rand(4, 3, generator=torch.Generator().manual_seed(0), dtype=dtype) - 0.5
    s = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=dtype)
    got_b = wrapped_normal_score(d, s)  # [B] sigma against [B, d]
    got_col = wrapped_normal_score(d, s[:, None])
    for i in range(4):
        want = wrapped_normal_score(d[i], float(s[i]))
        assert_close(got_b[i], want)
        assert_close(got_col[i], want)


# OT coupling ------------------------------------------------------------------------------------
def _total_cost(x0: State, noise: State) -> float:
    return float((x0 - noise).sqnorm().sum())


def _brute_force(x0: State, noise: State) -> float:
    B = x0.num_systems
    best = math.inf
    for perm in itertools.permutations(range(B)):
        p = torch.tensor(perm)
        cost = float(sum(((x0[k] - noise[k][p]) ** 2).sum() for k in x0))
        best = min(best, cost)
    return best


@pytest.mark.parametrize("B", [2, 4, 6])
def test_ot_coupling_dense_optimal(B, dtype):
    g = torch.Generator().manual_seed(B)
    x0 = State({"a": torch.randn(B, 3, generator=g, dtype=dtype) + 1.0,
                "b": torch.randn(B, 2, 2, generator=g, dtype=dtype)})
    noise = x0.randn_like(g)
    out = ot_coupling(x0, noise)
    # a permutation of the systems, the same one in every field
    rows = {i: int((noise["a"] == out["a"][i]).all(1).nonzero()) for i in range(B)}
    assert sorted(rows.values()) == list(range(B))
    for i, j in rows.items():
        assert torch.equal(out["b"][i], noise["b"][j])
    c_opt, c_id = _total_cost(x0, out), _total_cost(x0, noise)
    assert c_opt <= c_id + 1e-6
    assert c_opt == pytest.approx(_brute_force(x0, noise), rel=1e-5)
    assert out.batch is noise.batch and out.dtype == dtype


def test_ot_coupling_large_batch_improves(dtype):
    g = torch.Generator().manual_seed(0)
    x0 = State.from_tensor(torch.randn(64, 8, generator=g, dtype=dtype) * 2 + 1)
    noise = x0.randn_like(g)
    out = ot_coupling(x0, noise)
    assert _total_cost(x0, out) < _total_cost(x0, noise)
    assert torch.equal(out["x"].sort(0).values, noise["x"].sort(0).values)


def test_ot_coupling_flat_keeps_blocks(dtype):
    sizes = [2, 3, 2, 3, 2, 1, 3]
    B = len(sizes)
    idx = torch.repeat_interleave(torch.arange(B), torch.tensor(sizes))
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(1))]  # interleaved rows
    g = torch.Generator().manual_seed(2)
    x0 = State({"pos": torch.randn(idx.numel(), 3, generator=g, dtype=dtype) * 3,
                "h": torch.randn(B, 2, generator=g, dtype=dtype)},
               batch={"pos": idx}, constraints={"pos": ZeroCoM()})
    # labelled noise: row r of system i carries (i, position of r within system i, 0)
    local = torch.zeros(idx.numel(), dtype=torch.long)
    for i in range(B):
        rows = (idx == i).nonzero().flatten()
        local[rows] = torch.arange(rows.numel())
    lab_pos = torch.stack([idx, local, torch.zeros_like(idx)], 1).to(dtype)
    lab_h = torch.stack([torch.arange(B), torch.zeros(B, dtype=torch.long)], 1).to(dtype)
    noise = State({"pos": lab_pos, "h": lab_h}, batch={"pos": idx}, constraints={"pos": ZeroCoM()})
    out = ot_coupling(x0, noise)
    src = []
    for i in range(B):
        block = out["pos"][idx == i]
        j = int(block[0, 0])
        src.append(j)
        assert sizes[j] == sizes[i]  # only equal sizes exchanged
        # the whole block of system j, rows in their original order
        assert torch.equal(block[:, 0], torch.full((sizes[i],), float(j), dtype=dtype))
        assert torch.equal(block[:, 1], torch.arange(sizes[i], dtype=dtype))
        assert int(out["h"][i, 0]) == j  # dense fields follow the same permutation
    assert sorted(src) == list(range(B))


def test_ot_coupling_flat_optimal_within_groups(dtype):
    sizes = [2, 3, 2, 3, 2, 3]
    B = len(sizes)
    idx = torch.repeat_interleave(torch.arange(B), torch.tensor(sizes))
    g = torch.Generator().manual_seed(3)
    x0 = State({"pos": torch.randn(idx.numel(), 2, generator=g, dtype=dtype) + 2}, batch={"pos": idx})
    noise = x0.randn_like(g)
    out = ot_coupling(x0, noise)
    assert _total_cost(x0, out) <= _total_cost(x0, noise) + 1e-6
    best = math.inf  # brute force over permutations within each size group
    g2, g3 = [0, 2, 4], [1, 3, 5]

    def block(st, i):
        return st["pos"][idx == i]

    for p2 in itertools.permutations(g2):
        for p3 in itertools.permutations(g3):
            m = dict(zip(g2, p2, strict=True)) | dict(zip(g3, p3, strict=True))
            c = sum(float(((block(x0, i) - block(noise, m[i])) ** 2).sum()) for i in range(B))
            best = min(best, c)
    assert _total_cost(x0, out) == pytest.approx(best, rel=1e-5)


def test_ot_coupling_in_loss():
    proc = LinearInterpolant()
    x0 = _data(MIX, 32, F64)
    m = Model(ExactDenoiser(MIX, proc, "velocity"), proc, "velocity")
    ind = denoising_loss(m, x0, coupling="independent", generator=torch.Generator().manual_seed(0))
    ot = denoising_loss(m, x0, coupling="ot", generator=torch.Generator().manual_seed(0))
    assert torch.equal(ind.t, ot.t)
    assert _total_cost(x0, ot.path.noise) <= _total_cost(x0, ind.path.noise)
    assert torch.equal(ot.path.noise["x"].sort(0).values, ind.path.noise["x"].sort(0).values)
