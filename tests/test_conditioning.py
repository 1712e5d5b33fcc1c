"""Conditional models: ``net(x, t, cond)`` bound through ``Model.with_cond``, in losses, samplers,
EDMPrecond and the Lightning module. Closed form: x | c ~ N(c, s0^2 I), whose exact denoiser under
``x_t = a x0 + s eps`` is ``E[x0 | x_t, c] = c + a s0^2 (x_t - a c) / (a^2 s0^2 + s^2)``."""

from __future__ import annotations

import pytest
import torch

from sciddiff.core import EDM, VP, EDMPrecond, Model, State, denoising_loss
from sciddiff.samplers import dpmpp_2m, heun

S0 = 0.3


class ExactConditional(torch.nn.Module):
    """Exact x0-denoiser of x | c ~ N(c, S0^2) for ``process`` (param "x0")."""

    def __init__(self, process) -> None:
        super().__init__()
        self.process = process

    def forward(self, x: State, t: torch.Tensor, cond) -> State:
        a = self.process.alpha(t).to(x.dtype)[:, None]
        s = self.process.sigma(t).to(x.dtype)[:, None]
        c = cond["c"]
        x0 = c + a * S0**2 * (x["x"] - a * c) / (a**2 * S0**2 + s**2)
        return x.replace(x=x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conditional_sampler_reproduces_conditional_gaussian(dtype):
    process = VP("linear")
    g = torch.Generator().manual_seed(0)
    B, d = 4000, 3
    c = torch.randn(B, d, generator=g, dtype=dtype) * 2
    model = Model(ExactConditional(process), process, "x0").with_cond({"c": c})
    xT = process.prior(State.from_tensor(torch.zeros(B, d, dtype=dtype)), g)
    out = dpmpp_2m(model, xT, 25)["x"]
    r = out - c
    assert r.mean().abs() < 0.02
    assert abs(float(r.std()) - S0) < 0.02 * S0 / 0.3 + 0.01


def test_edm_precond_passes_condition_and_heun_samples_it():
    process = EDM()
    g = torch.Generator().manual_seed(1)
    B, d = 2000, 2
    c = torch.randn(B, d, generator=g, dtype=torch.float64)

    class Raw(torch.nn.Module):
        # F such that EDMPrecond(F) is the exact denoiser: F = (D - c_skip y) / c_out.
        def __init__(self, pre: EDMPrecond) -> None:
            super().__init__()
            self.pre = [pre]

        def forward(self, x: State, c_noise: torch.Tensor, cond) -> State:
            pre = self.pre[0]
            s = torch.exp(4 * c_noise)
            c_skip, c_out, c_in, _ = pre.coefficients(s)
            y = x["x"] / c_in[:, None]
            m = cond["c"]
            d_exact = m + S0**2 * (y - m) / (S0**2 + s[:, None] ** 2)
            return x.replace(x=(d_exact - c_skip[:, None] * y) / c_out[:, None])

    pre = EDMPrecond(torch.nn.Identity(), process, sigma_data=0.5)
    pre.net = Raw(pre)
    model = Model(pre, process, "x0", cond={"c": c})
    xT = process.prior(State.from_tensor(torch.zeros(B, d, dtype=torch.float64)), g)
    r = heun(model, xT, 20)["x"] - c
    assert r.mean().abs() < 0.03 and abs(float(r.std()) - S0) < 0.02


def test_loss_uses_condition_and_checks_its_batch_size():
    process = VP("linear")
    g = torch.Generator().manual_seed(2)
    c = torch.randn(512, 2, generator=g)
    x0 = State.from_tensor(c + S0 * torch.randn(512, 2, generator=g))
    model = Model(ExactConditional(process), process, "x0")
    good = denoising_loss(model, x0, cond={"c": c}, generator=torch.Generator().manual_seed(3)).loss
    wrong = denoising_loss(model, x0, cond={"c": torch.zeros_like(c)},
                           generator=torch.Generator().manual_seed(3)).loss
    assert good < 0.5 * wrong
    with pytest.raises(ValueError, match="condition 'c' has leading dim 3"):
        denoising_loss(model, x0, cond={"c": c[:3]})
    with pytest.raises(TypeError, match="cond must be a mapping"):
        Model(ExactConditional(process), process, "x0", cond=[c])


def test_lightning_module_trains_a_conditional_net():
    pytest.importorskip("pytorch_lightning")
    from sciddiff.training import DiffusionModule

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 2)

        def forward(self, x: State, t: torch.Tensor, cond) -> State:
            h = torch.cat([x["x"], cond["c"], t[:, None].float() / 1000], dim=1)
            return x.replace(x=self.lin(h))

    torch.manual_seed(0)
    module = DiffusionModule(Net(), VP("linear"), "x0", lr=3e-2, ema_decay=None)
    c = torch.randn(256, 2)
    batch = {"x": c + 0.05 * torch.randn(256, 2), "cond": {"c": c}}
    opt = torch.optim.Adam(module.net.parameters(), lr=3e-2)
    first = float(module.compute_loss(batch).loss.detach())
    for _ in range(150):
        opt.zero_grad()
        module.compute_loss(batch).loss.backward()
        opt.step()
    assert float(module.compute_loss(batch).loss.detach()) < 0.2 * first
    with pytest.raises(ValueError, match="conditional batch must be"):
        module.compute_loss({"x": batch["x"], "cond": batch["cond"], "extra": c})
