"""The downscaling UNet and model: shapes, periodic equivariance, conditional EDM training, the
tensor-level ``predict``, the conservation projection and safetensors + JSON round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sciddiff.climate import _model
from sciddiff.climate._model import (
    Downscaler,
    DownscalerMeta,
    RegressionNet,
    ResidualDenoiser,
    block_mean,
    conserve_projection,
    load_downscaler,
    save_downscaler,
    static_feature_names,
    static_features,
    upsample,
)
from sciddiff.climate._unet import UNet
from sciddiff.core import EDM, EDMPrecond, LogNormalTime, Model, State, denoising_loss
from sciddiff.samplers import edm_rho

TINY = {"base": 8, "mults": [1, 2], "blocks": 1}


def _randomize(net: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Replace every parameter (the zero-initialised output layers included) by random values, so
    a test of the network's structure cannot pass because its output is identically zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return net


def _meta(**kw) -> DownscalerMeta:
    base = dict(variables=("t2m",), units=("K",), factor=4, mean=(280.0,), std=(3.0,),
                residual_std=(0.2,), frequencies=(1.0, 16.0))
    return DownscalerMeta(**{**base, **kw})


def _grid(H: int = 16, W: int = 24):
    return torch.linspace(58, 50.25, H, dtype=torch.float64), torch.linspace(-10, 1.5, W, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# UNet
@pytest.mark.parametrize("hw", [(16, 24), (13, 21), (9, 7)])
@pytest.mark.parametrize("periodic", [False, True])
def test_unet_shapes_any_size(hw, periodic):
    net = _randomize(UNet(3, 2, base=8, mults=(1, 2, 2), blocks=1, attn_levels=(1,), periodic_lon=periodic))
    x = torch.randn(2, 3, *hw)
    y = net(x, torch.tensor([0.1, -0.3]))
    assert y.shape == (2, 2, *hw)
    assert torch.isfinite(y).all() and y.abs().sum() > 0


def test_unet_without_time_embedding_and_errors():
    net = UNet(2, 1, base=8, mults=(1, 2), blocks=1, time_embedding=False)
    assert net(torch.randn(1, 2, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"expected input \[B, 2, H, W\]"):
        net(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pass noise"):
        UNet(2, 1, base=8, mults=(1,), blocks=1)(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="attn_levels"):
        UNet(2, 1, base=8, mults=(1, 2), attn_levels=(2,))
    with pytest.raises(ValueError, match="dropout"):
        UNet(2, 1, dropout=1.5)


def test_unet_config_round_trip():
    net = _randomize(UNet(3, 1, base=8, mults=[1, 2], blocks=2, attn_levels=[1], dropout=0.1,
                          periodic_lon=True, mid_attention=False))
    cfg = json.loads(json.dumps(net.config))
    twin = UNet(**cfg)
    twin.load_state_dict(net.state_dict())
    net.eval(), twin.eval()
    x, t = torch.randn(2, 3, 8, 16), torch.randn(2)
    torch.testing.assert_close(twin(x, t), net(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("shift", [4, 8, -12])
def test_periodic_unet_commutes_with_longitude_rolls(dtype, shift):
    """Circular longitude padding: rolling the input by a multiple of 2**(levels-1) rolls the output."""
    net = _randomize(UNet(2, 2, base=8, mults=(1, 2, 2), blocks=1, attn_levels=(2,), periodic_lon=True))
    net = net.to(dtype).eval()
    x, t = torch.randn(2, 2, 12, 24, dtype=dtype), torch.tensor([0.5, -1.0], dtype=dtype)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(net(x.roll(shift, -1), t), net(x, t).roll(shift, -1), **tol)


def test_non_periodic_unet_is_not_roll_equivariant():
    """The control for the test above: zero padding at the longitude edges breaks the symmetry."""
    net = _randomize(UNet(2, 2, base=8, mults=(1, 2, 2), blocks=1)).double().eval()
    x, t = torch.randn(1, 2, 12, 24, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    assert (net(x.roll(4, -1), t) - net(x, t).roll(4, -1)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# grid operations and static features
def test_block_mean_and_upsample_closed_forms(dtype):
    x = torch.arange(2 * 8 * 12, dtype=dtype).reshape(1, 2, 8, 12)
    bm = block_mean(x, 4)
    assert bm.shape == (1, 2, 2, 3)
    torch.testing.assert_close(bm[0, 0, 0, 0], x[0, 0, :4, :4].mean())
    c = torch.randn(2, 1, 4, 6, dtype=dtype)
    ref = F.interpolate(c, scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(upsample(c, 4), ref)
    # Periodic: the field upsampled with wrap-around equals the middle copy of a tiled field.
    tiled = F.interpolate(c.repeat(1, 1, 1, 3), scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(upsample(c, 4, periodic_lon=True), tiled[..., 24:48])
    with pytest.raises(ValueError, match="not a multiple of factor 4"):
        block_mean(torch.zeros(1, 1, 6, 8), 4)


def test_static_features_values_and_errors():
    lat, lon = _grid(4, 6)
    s = static_features(lat, lon, frequencies=(1.0, 4.0), extra={"orog": torch.ones(4, 6)},
                        dtype=torch.float64)
    assert s.shape == (9, 4, 6)
    assert len(static_feature_names((1.0, 4.0), ["orog"])) == 9
    torch.testing.assert_close(s[4], torch.sin(4 * torch.deg2rad(lat))[:, None].expand(4, 6))
    torch.testing.assert_close(s[7], torch.cos(4 * torch.deg2rad(lon))[None].expand(4, 6))
    # integer frequencies are periodic in longitude
    torch.testing.assert_close(static_features(lat, lon + 360, frequencies=(1.0, 4.0), dtype=torch.float64),
                               s[:8], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"latitudes must lie in \[-90, 90\]"):
        static_features([100.0], [0.0])
    with pytest.raises(ValueError, match="extra field 'orog' has shape"):
        static_features(lat, lon, extra={"orog": torch.ones(3, 6)})


# ------------------------------------------------------------------------------------------------
# conservation
@pytest.fixture
def fields(dtype):
    g = torch.Generator().manual_seed(3)
    fine = 280 + 3 * torch.randn(2, 3, 1, 8, 12, generator=g, dtype=dtype)
    coarse = 280 + 3 * torch.randn(2, 1, 1, 2, 3, generator=g, dtype=dtype)
    return fine, coarse


def test_conserve_projection_block_means_exact_and_idempotent(fields, dtype):
    fine, coarse = fields
    p = conserve_projection(fine, coarse, 4)
    atol = 1e-4 if dtype == torch.float32 else 1e-11  # relative to values ~280
    torch.testing.assert_close(block_mean(p, 4), coarse.expand(2, 3, 1, 2, 3), rtol=0, atol=atol)
    torch.testing.assert_close(conserve_projection(p, coarse, 4), p, rtol=0, atol=atol)
    # the correction is constant within each block
    d = (p - fine).reshape(2, 3, 1, 2, 4, 3, 4)
    assert float((d - d[:, :, :, :, :1, :, :1]).abs().max()) < atol


def test_conserve_projection_is_the_closest_constrained_field(fields, dtype):
    """Any other field with the same block means is farther, by Pythagoras exactly."""
    fine, coarse = fields
    p = conserve_projection(fine, coarse, 4)
    z = torch.randn(fine.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    z = z - block_mean(z, 4).repeat_interleave(4, -2).repeat_interleave(4, -1)  # zero block means
    other = p + z
    d_p, d_o, d_z = ((fine - p) ** 2).sum(), ((fine - other) ** 2).sum(), (z**2).sum()
    assert d_p < d_o
    torch.testing.assert_close(d_o, d_p + d_z, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)


def test_conserve_projection_shape_error():
    msg = "coarse grid 2 x 2 times factor 4 is 8 x 8, but the fine grid is 8 x 12"
    with pytest.raises(ValueError, match=msg):
        conserve_projection(torch.zeros(1, 8, 12), torch.zeros(1, 2, 2), 4)


# ------------------------------------------------------------------------------------------------
# conditional EDM on a toy problem
def test_conditional_edm_loss_decreases():
    """The residual denoiser learns a target that depends on its condition (x0 = 0.5 * up)."""
    torch.manual_seed(0)
    process = EDM()
    net = EDMPrecond(ResidualDenoiser(1, 0, TINY), process, sigma_data=0.5)
    model = Model(net, process, "x0")
    time = LogNormalTime(process)
    g = torch.Generator().manual_seed(1)
    up = torch.randn(64, 1, 8, 8, generator=g)
    up = F.avg_pool2d(F.pad(up, (1, 1, 1, 1), mode="circular"), 3, stride=1)  # smooth fields
    x0 = State.from_tensor(0.5 * up / up.std())

    def held_out() -> float:
        gg = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return float(denoising_loss(model, x0, time=time, weighting="edm", generator=gg,
                                        cond={"up": up / up.std()}).loss)

    before = held_out()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, 64, (16,))
        out = denoising_loss(model, State.from_tensor(x0["x"][idx]), time=time, weighting="edm",
                             cond={"up": up[idx] / up.std()})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = held_out()
    assert after < 0.6 * before, (before, after)


# ------------------------------------------------------------------------------------------------
# predict
@pytest.fixture
def model():
    torch.manual_seed(0)
    return _randomize(Downscaler(_meta(), TINY, TINY), seed=2, scale=0.05).eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(4)
    coarse = 280 + 3 * torch.randn(2, 1, 4, 6, generator=g)
    lat, lon = _grid()
    return coarse, static_features(lat, lon, frequencies=(1.0, 16.0))[None]


def test_predict_shapes_members_and_units(model, inputs):
    coarse, static = inputs
    ens = model.predict(coarse, static, members=3, nfe=3, generator=torch.Generator().manual_seed(0))
    assert ens.shape == (2, 3, 1, 16, 24) and ens.dtype == coarse.dtype
    reg = model.predict(coarse, static, mode="regression")
    assert reg.shape == (2, 1, 1, 16, 24)
    assert float((ens[:, 0] - ens[:, 1]).abs().max()) > 0  # members differ
    cons = model.predict(coarse, static, members=2, nfe=3, conserve=True,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block_mean(cons, 4), coarse[:, None].expand(2, 2, 1, 4, 6), rtol=0, atol=1e-4)


def test_untrained_regression_is_bicubic_in_physical_units(inputs):
    """The regression's output layer starts at zero, so its mean is exactly the bicubic upsample."""
    coarse, static = inputs
    m = Downscaler(_meta(), TINY, TINY).double()
    reg = m.predict(coarse.double(), static, mode="regression")[:, 0]
    ref = F.interpolate(coarse.double(), scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(reg, ref, rtol=0, atol=1e-10)


def test_untrained_diffusion_matches_closed_form(inputs):
    """With the diffusion network's zero-initialised output, EDM's denoiser is ``D = c_skip x``,
    so each Euler (DDIM) step multiplies the state by ``c_skip + s'(1 - c_skip)/s``: the whole
    pipeline (prior, grid, sampler, residual scaling, denormalisation) has a closed form."""
    coarse, static = inputs
    m = Downscaler(_meta(), TINY, TINY).double()
    ens = m.predict(coarse.double(), static, members=4, sampler="euler", nfe=6,
                    generator=torch.Generator().manual_seed(5))
    s = edm_rho(m.process, 6).sigma
    c_skip = 0.25 / (s[:-1] ** 2 + 0.25)
    k = torch.prod(c_skip + s[1:] * (1 - c_skip) / s[:-1])
    z = 80.0 * torch.randn(8, 1, 16, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    up = F.interpolate(coarse.double(), scale_factor=4, mode="bicubic", align_corners=False)
    expected = up[:, None] + 3.0 * (0.2 / 0.5) * k * z.reshape(2, 4, 1, 16, 24)  # std * residual scale
    torch.testing.assert_close(ens, expected, rtol=1e-10, atol=1e-9)


def test_predict_reproducible_and_batch_independent(model, inputs):
    coarse, static = inputs
    a = model.predict(coarse, static, members=3, nfe=3, generator=torch.Generator().manual_seed(7))
    b = model.predict(coarse, static, members=3, nfe=3, generator=torch.Generator().manual_seed(7),
                      batch_size=2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    for sampler in ("dpmpp_2m", "unipc", "euler"):
        c = model.predict(coarse, static, members=2, nfe=4, sampler=sampler,
                          generator=torch.Generator().manual_seed(7))
        assert c.shape == (2, 2, 1, 16, 24) and torch.isfinite(c).all()


def test_predict_clear_errors(model, inputs):
    coarse, static = inputs
    with pytest.raises(ValueError, match="unknown mode 'ensemble'"):
        model.predict(coarse, static, mode="ensemble")
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        model.predict(coarse, static, sampler="rk4")
    with pytest.raises(ValueError, match=r"coarse must be a tensor \[B, 1, h, w\]"):
        model.predict(coarse[:, 0], static)
    with pytest.raises(ValueError, match="needs static channels"):
        model.predict(coarse, None)
    with pytest.raises(ValueError, match=r"static must be \[2 or 1, 8, 16, 24\]"):
        model.predict(coarse, static[:, :, :8])
    bad = coarse.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf values"):
        model.predict(bad, static)


def test_meta_validation():
    with pytest.raises(ValueError, match="units has 2 entries for 1 variables"):
        _meta(units=("K", "K"))
    with pytest.raises(ValueError, match="residual_std must be positive"):
        _meta(residual_std=(0.0,))
    with pytest.raises(ValueError, match="unknown sampler"):
        _meta(sampler="rk4")


def test_cv_means_members_take_the_fold_means_in_turn(inputs):
    """With K fold networks, member m is fold (m mod K)'s mean plus the same residual draw that a
    model without folds adds to its regression mean."""
    coarse, static = inputs
    torch.manual_seed(0)
    plain = _randomize(Downscaler(_meta(), TINY, TINY), seed=2, scale=0.05).eval()
    folds = [_randomize(RegressionNet(**plain.regression.config), seed=10 + k, scale=0.05).eval()
             for k in range(2)]
    cv = Downscaler(_meta(cv_means=2), plain.regression, plain.diffusion.net, folds).eval()
    kw = {"members": 5, "nfe": 3}
    a = plain.predict(coarse, static, generator=torch.Generator().manual_seed(1), **kw)
    b = cv.predict(coarse, static, generator=torch.Generator().manual_seed(1), **kw)
    with torch.no_grad():
        cond = cv.condition(cv.normalize(coarse), static)
        shift = [cv.denormalize(cond["up"] + f(cond)) - cv.denormalize(cv.regression_mean(cond))
                 for f in folds]
    for m in range(5):
        torch.testing.assert_close(b[:, m] - a[:, m], shift[m % 2], rtol=0, atol=1e-4)
    assert float(shift[0].abs().max()) > 0.01 and float((shift[0] - shift[1]).abs().max()) > 0.01
    # regression mode keeps the regression UNet's mean
    torch.testing.assert_close(cv.predict(coarse, static, mode="regression"),
                               plain.predict(coarse, static, mode="regression"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cv_means = 2 needs that many fold models"):
        Downscaler(_meta(cv_means=2), plain.regression, plain.diffusion.net, folds[:1])
    with pytest.raises(ValueError, match="cv_means must be 0 or at least 2"):
        _meta(cv_means=1)


def test_cv_means_round_trip_stores_folds_in_half_precision(inputs, tmp_path):
    coarse, static = inputs
    torch.manual_seed(0)
    m = _randomize(Downscaler(_meta(cv_means=2), TINY, TINY), seed=3, scale=0.05).eval()
    save_downscaler(tmp_path, m)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "downscaler.safetensors")
    assert {v.dtype for k, v in stored.items() if k.startswith("folds.") and v.is_floating_point()} \
        == {torch.float16}
    assert stored["regression.unet.head.conv.weight"].dtype == torch.float32
    twin = load_downscaler(tmp_path)
    assert len(twin.folds) == 2 and twin.dtype == torch.float32
    kw = {"members": 4, "nfe": 3}
    a = m.predict(coarse, static, generator=torch.Generator().manual_seed(3), **kw)
    b = twin.predict(coarse, static, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0.02)  # K: half-precision fold weights


# ------------------------------------------------------------------------------------------------
# save / load
def test_save_load_round_trip_identical_predictions(model, inputs, tmp_path):
    coarse, static = inputs
    model.meta.domain = {"lat_min": 50.25, "lat_max": 58.0, "period": "2019-03-01/2019-03-21"}
    model.meta.training = {"regression_steps": 3}
    save_downscaler(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downscaler.json", "downscaler.safetensors"]
    twin = load_downscaler(tmp_path)
    assert twin.meta == model.meta and twin.factor == 4 and twin.units == ("K",)
    kw = {"members": 2, "nfe": 3}
    a = model.predict(coarse, static, generator=torch.Generator().manual_seed(3), **kw)
    b = twin.predict(coarse, static, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_errors_name_the_file(model, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no downscaler in"):
        load_downscaler(tmp_path / "missing")
    monkeypatch.setattr(_model, "BUNDLED_DIR", tmp_path / "bundled")
    with pytest.raises(FileNotFoundError, match="no bundled checkpoint"):
        load_downscaler(None)
    save_downscaler(tmp_path, model)
    meta_path = tmp_path / "downscaler.json"
    good = meta_path.read_text()
    meta_path.write_text(good[:-10])
    with pytest.raises(ValueError, match=r"downscaler\.json: invalid JSON at line"):
        load_downscaler(tmp_path)
    doc = json.loads(good)
    doc["save_id"] = "other"
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="come from different saves"):
        load_downscaler(tmp_path)
    doc = json.loads(good)
    doc["diffusion"]["unet"]["base"] = 16
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="weights do not match the networks"):
        load_downscaler(tmp_path)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    """A failure while writing leaves the previous save intact and no temporary files."""
    save_downscaler(tmp_path, model)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_model, "save_file", boom)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_downscaler(tmp_path, model)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_downscaler(tmp_path)


def test_residual_scale_matches_meta(model):
    r = model.residual_scale(torch.zeros(1, dtype=torch.float64))
    assert math.isclose(float(r.flatten()[0]), 0.2 / 0.5)


def test_periodic_switch_equals_a_model_built_for_that_grid():
    """A global (periodic) model run with ``periodic_lon=False`` is exactly the same weights built
    for a regional grid, without copying a parameter; the default keeps the training grid's wrap."""
    lat, lon = _grid()
    static = static_features(lat, lon, frequencies=(1.0, 16.0))[None]
    glob = _randomize(Downscaler(_meta(periodic_lon=True), TINY, TINY)).double().eval()
    reg = Downscaler(_meta(periodic_lon=False), TINY, TINY).double().eval()
    reg.load_state_dict(glob.state_dict())
    coarse = 280 + torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(model, **kw):
        gen = torch.Generator().manual_seed(0)
        return model.predict(coarse, static, members=2, nfe=3, generator=gen, **kw)

    switched = run(glob, periodic_lon=False)
    torch.testing.assert_close(switched, run(reg), rtol=0, atol=0)
    assert not torch.equal(switched, run(glob))            # the wrap matters at the edges
    torch.testing.assert_close(run(reg, periodic_lon=True), run(glob), rtol=0, atol=0)
    twin = glob._with_periodic(False)
    pairs = zip(glob.parameters(), twin.parameters(), strict=True)
    assert all(a.data_ptr() == b.data_ptr() for a, b in pairs)
    assert glob.meta.periodic_lon and "_periodic_variants" not in glob.state_dict()
