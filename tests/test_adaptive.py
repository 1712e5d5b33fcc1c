"""The adaptive probability-flow ODE sampler against closed-form PF-ODE solutions."""

from __future__ import annotations

import pytest
import torch

from sciddiff.core import EDM, VE, VP, LinearInterpolant, Model, State, ZeroCoM
from sciddiff.samplers import StepInfo
from sciddiff.samplers._adaptive import AdaptiveResult, adaptive
from sciddiff.testing import ExactDenoiser, GaussianMixture, ZeroCoMGaussian


def _gaussian(dtype=torch.float64) -> GaussianMixture:
    """One component, diagonal stds: the PF-ODE is closed form (``pf_ode_solution``)."""
    return GaussianMixture(torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype),
                           torch.tensor([[0.3, 1.0, 2.0]], dtype=dtype))


def _level(process, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    tt = torch.tensor(t, dtype=torch.float64)
    return process.alpha(tt), process.sigma(tt)


def _start(process, n: int = 16, dtype=torch.float64, seed: int = 0) -> State:
    template = State.from_tensor(torch.zeros(n, 3, dtype=dtype))
    return process.prior(template, torch.Generator().manual_seed(seed))


def _closed_form(dist: GaussianMixture, process, x_T: torch.Tensor, r: AdaptiveResult) -> torch.Tensor:
    return dist.pf_ode_solution(x_T, _level(process, r.t_start), _level(process, r.t_end))


@pytest.mark.parametrize("process", [VP(timesteps=1000), VP(), EDM(), VE()], ids=repr)
def test_matches_closed_form_float64(process):
    dist = _gaussian()
    model = Model(ExactDenoiser(dist, process, "eps"), process, "eps")
    x = _start(process)
    r = adaptive(model, x, rtol=1e-8, atol=1e-8, denoise_final=False)
    assert r.t_start == process.t_max and r.t_end == process.t_min
    ref = _closed_form(dist, process, x["x"], r)
    err = (r.x["x"] - ref).abs().max().item()
    assert err < 1e-6, err  # observed 2e-8 .. 4e-8
    assert r.nfe == model.nfe and r.steps > 0


@pytest.mark.parametrize("param", ["x0", "velocity"])
def test_flow_path_and_other_params(param):
    """LinearInterpolant: default start just below t_max (alpha(1) = 0), end at s = exp(-10)."""
    process = LinearInterpolant()
    dist = _gaussian()
    model = Model(ExactDenoiser(dist, process, param), process, param)
    x = _start(process, n=8)
    r = adaptive(model, x, rtol=1e-8, atol=1e-8, denoise_final=False)
    assert 0 < r.t_end < 1e-4 and 1 - 1e-3 < r.t_start < 1
    err = (r.x["x"] - _closed_form(dist, process, x["x"], r)).abs().max().item()
    assert err < 1e-6, err  # observed 1e-7
    with pytest.raises(ValueError, match="t_start"):
        adaptive(model, x, t_start=1.0)
    with pytest.raises(ValueError, match="t_end"):
        adaptive(model, x, t_end=0.0)


def test_float32():
    process = EDM()
    dist = _gaussian(torch.float32)
    model = Model(ExactDenoiser(dist, process, "eps"), process, "eps")
    x = _start(process, dtype=torch.float32)
    r = adaptive(model, x, rtol=1e-5, atol=1e-5, denoise_final=False)
    assert r.x["x"].dtype == torch.float32
    ref = _closed_form(dist.to(torch.float64), process, x["x"].double(), r)
    err = (r.x["x"].double() - ref).abs().max().item()
    assert err < 1e-3, err  # observed 4e-5


def test_denoise_final_and_tolerance_vs_nfe():
    process = VP()
    dist = _gaussian()
    model = Model(ExactDenoiser(dist, process, "eps"), process, "eps")
    x = _start(process)
    tight = adaptive(model, x, rtol=1e-7, atol=1e-7, denoise_final=False)
    loose = adaptive(model, x, rtol=1e-3, atol=1e-3, denoise_final=False)
    assert 0 < loose.nfe < tight.nfe and loose.steps < tight.steps
    final = adaptive(model, x, rtol=1e-7, atol=1e-7)
    assert final.nfe == tight.nfe + 1  # one extra call: the jump to sigma = 0
    a, s = _level(process, tight.t_end)
    expected = dist.denoise(tight.x["x"], a, s)
    assert torch.allclose(final.x["x"], expected, atol=1e-10)
    again = adaptive(model, x, rtol=1e-7, atol=1e-7)  # deterministic
    assert torch.equal(again.x["x"], final.x["x"])


def test_nan_raises():
    process = EDM()

    def bad(x: State, t: torch.Tensor) -> State:
        out = torch.zeros_like(x["x"])
        if float(t[0]) < 10:
            out[0, 1] = float("nan")
        return x.replace(x=out)

    with pytest.raises(FloatingPointError, match=r"adaptive: model output .*non-finite.*'x'"):
        adaptive(Model(bad, process, "eps"), _start(process, n=2))


def test_callback_and_progress():
    process = EDM()
    dist = _gaussian()
    model = Model(ExactDenoiser(dist, process, "eps"), process, "eps")
    seen: list[StepInfo] = []
    r = adaptive(model, _start(process, n=4), rtol=1e-4, atol=1e-4, denoise_final=False,
                 callback=seen.append, progress=True)
    assert [i.i for i in seen] == list(range(r.steps))
    sig = [i.sigma for i in seen]
    assert all(a > b for a, b in zip(sig[:-1], sig[1:], strict=True))
    assert sig[-1] == pytest.approx(process.sigma_min)
    assert torch.allclose(seen[-1].x["x"], r.x["x"])
    assert r.nfe == model.nfe  # dopri5 is FSAL: the callback's x0 costs no extra call
    a, s = _level(process, seen[-1].t)
    assert torch.allclose(seen[-1].x0["x"], dist.denoise(seen[-1].x["x"], a, s), atol=1e-8)


def test_zero_com_batch():
    """Flat point clouds of different sizes stay centred; the sample matches the exact flow."""
    process = VP()
    dist = ZeroCoMGaussian(std=0.7)
    sizes = [3, 5, 4]
    template = dist.sample(sizes, torch.Generator().manual_seed(0))
    x = process.prior(template, torch.Generator().manual_seed(1))
    model = Model(ExactDenoiser(dist, process, "eps", field="pos"), process, "eps")
    r = adaptive(model, x, rtol=1e-8, atol=1e-8, denoise_final=False)
    assert isinstance(r.x.constraint("pos"), ZeroCoM)
    com = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, x.batch["pos"], r.x["pos"])
    assert com.abs().max() < 1e-12
    # isotropic Gaussian: y(s) = y_T * sqrt((std^2 + s^2) / (std^2 + s_T^2))
    (aT, sT), (a1, s1) = _level(process, r.t_start), _level(process, r.t_end)
    ratio = ((0.49 + (s1 / a1) ** 2) / (0.49 + (sT / aT) ** 2)).sqrt()
    ref = a1 * x["pos"] / aT * ratio
    assert (r.x["pos"] - ref).abs().max() < 1e-6


def test_torus_matches_fine_heun():
    """Torus field under VE: integrated on the covering space, returned wrapped to [0, 1)."""
    from sciddiff.samplers import edm_rho, heun
    from sciddiff.testing import WrappedNormalMixture, torus_state

    process = VE(sigma_max=5.0)
    dist = WrappedNormalMixture(torch.tensor([[0.2, 0.7], [0.6, 0.1]], dtype=torch.float64), 0.05)
    model = Model(ExactDenoiser(dist, process, "eps"), process, "eps")
    x = process.prior(torus_state(torch.zeros(6, 2, dtype=torch.float64)), torch.Generator().manual_seed(0))
    r = adaptive(model, x, rtol=1e-7, atol=1e-7, denoise_final=False)
    ref = heun(model, x, edm_rho(process, 400, final="none"))
    assert ((r.x["x"] >= 0) & (r.x["x"] < 1)).all()
    assert (r.x["x"] - ref["x"]).abs().max() < 1e-4  # observed 8e-6 (heun's own error)
