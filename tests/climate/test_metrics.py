"""Scores of probabilistic downscaling against closed forms and independent implementations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from sciddiff.climate._metrics import (
    PowerSpectrum,
    bias,
    climate_scores,
    crps,
    crps_ensemble,
    mae,
    power_spectrum,
    rank_histogram,
    rmse,
    spectral_error,
    spread_skill,
)

properscoring = pytest.importorskip("properscoring")


def _draw(shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _brute_force_crps(y: np.ndarray, x: np.ndarray, fair: bool) -> np.ndarray:
    """O(M^2) CRPS: mean |X_i - y| - sum_{i != j} |X_i - X_j| / (2 M (M - 1)) or / (2 M^2)."""
    M = x.shape[1]
    skill = np.abs(x - y[:, None]).mean(1)
    pairs = np.abs(x[:, :, None] - x[:, None, :]).sum((1, 2))
    return skill - pairs / (2 * M * (M - 1 if fair else M))


# ------------------------------------------------------------------------------------------------
# deterministic scores
def test_rmse_mae_bias_closed_form(dtype):
    truth = torch.zeros(2, 2, 2, dtype=dtype)
    ens = torch.zeros(2, 3, 2, 2, dtype=dtype)
    ens[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)  # ensemble mean 2 at one of 8 points
    ens[1, :, 1, 1] = -4.0
    assert rmse(truth, ens) == pytest.approx(math.sqrt((4 + 16) / 8), rel=1e-6)
    assert mae(truth, ens) == pytest.approx((2 + 4) / 8, rel=1e-6)
    assert bias(truth, ens) == pytest.approx((2 - 4) / 8, rel=1e-6)
    # a deterministic forecast shaped like the truth is a one-member ensemble
    assert rmse(truth, ens.mean(1)) == pytest.approx(rmse(truth, ens), rel=1e-6)


def test_mask_restricts_points_and_nan_needs_a_mask():
    truth = np.array([[[0.0, np.nan]]])
    ens = np.array([[[[1.0, 5.0]], [[3.0, 5.0]]]])  # [T=1, M=2, 1, 2]
    with pytest.raises(ValueError, match="non-finite"):
        rmse(truth, ens)
    mask = np.array([[True, False]])
    assert rmse(truth, ens, mask=mask) == pytest.approx(2.0)
    assert crps(truth, ens, fair=False, mask=mask) == pytest.approx(2.0 - 2.0 / 4.0)
    with pytest.raises(ValueError, match="selects no points"):
        mae(truth, ens, mask=np.zeros((1, 2), bool))


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[T, M, \.\.\.\]"):
        rmse(np.zeros((3, 4, 5)), np.zeros((3, 2, 4, 6)))


# ------------------------------------------------------------------------------------------------
# CRPS
def test_plain_crps_matches_properscoring(dtype):
    y, x = _draw((6, 5, 7), dtype, 1), _draw((6, 9, 5, 7), dtype, 2)
    ours = crps_ensemble(y, x, fair=False)
    ref = properscoring.crps_ensemble(y.double().numpy(), np.moveaxis(x.double().numpy(), 1, -1))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=tol, atol=tol)
    assert ours.dtype == dtype


def test_fair_crps_matches_brute_force_and_the_correction(dtype):
    y, x = _draw((4, 3, 5), dtype, 3), _draw((4, 6, 3, 5), dtype, 4)
    fair = crps_ensemble(y, x).double().numpy()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(fair, _brute_force_crps(y.double().numpy(), x.double().numpy(), True),
                               rtol=tol, atol=tol)
    # fair = skill - S / (2 M (M - 1)) = skill + (M / (M - 1)) (plain - skill)
    M = x.shape[1]
    skill = (x - y[:, None]).abs().mean(1).double().numpy()
    plain = crps_ensemble(y, x, fair=False).double().numpy()
    np.testing.assert_allclose(fair, skill + M / (M - 1) * (plain - skill), rtol=tol, atol=tol)


def test_crps_ignores_member_order_and_ties():
    y = torch.tensor([0.3, -1.0], dtype=torch.float64)
    x = torch.tensor([[1.0, -2.0, 1.0, 0.5], [0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    perm = x[:, torch.tensor([3, 1, 0, 2])]
    torch.testing.assert_close(crps_ensemble(y, x), crps_ensemble(y, perm))
    np.testing.assert_allclose(crps_ensemble(y, x).numpy(), _brute_force_crps(y.numpy(), x.numpy(), True))


def test_fair_crps_is_unbiased_for_the_member_distribution():
    """For members iid N(0, 1), the fair score's expectation is the CRPS of N(0, 1) itself
    (Gneiting & Raftery 2007, Eq. 5); the plain one exceeds it by E|X - X'| / (2 M) = 1 / (M sqrt(pi))."""
    g = torch.Generator().manual_seed(5)
    y = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    M, reps = 3, 40_000
    x = torch.randn(reps, 9, M, generator=g, dtype=torch.float64).transpose(1, 2)  # [reps, M, 9]
    yy = y.expand(reps, 9)
    z = y.numpy()
    exact = z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi)
    fair = crps_ensemble(yy, x).mean(0).numpy()
    plain = crps_ensemble(yy, x, fair=False).mean(0).numpy()
    np.testing.assert_allclose(fair, exact, atol=0.01)
    np.testing.assert_allclose(plain, exact + 1 / (M * math.sqrt(math.pi)), atol=0.01)
    assert np.all(plain - fair > 0.15)  # the bias is much larger than the Monte Carlo error


def test_one_member_crps_is_the_absolute_error():
    y, x = _draw((3, 4), torch.float64, 6), _draw((3, 4), torch.float64, 7)
    torch.testing.assert_close(crps_ensemble(y, x, fair=False), (x - y).abs())
    with pytest.raises(ValueError, match="at least 2 members"):
        crps_ensemble(y, x)


# ------------------------------------------------------------------------------------------------
# calibration
@pytest.mark.parametrize("M", [3, 10])
def test_spread_skill_calibrated_and_under_dispersed(dtype, M):
    """Truth and members iid from one distribution: ratio 1 with the sqrt((M+1)/M) correction (the
    uncorrected ratio would be sqrt(M/(M+1)): 0.87 at M = 3)."""
    y, x = _draw((40, 30, 30), dtype, 8), _draw((40, M, 30, 30), dtype, 9)
    ss = spread_skill(y, x)
    assert ss.members == M
    assert ss.ratio == pytest.approx(1.0, abs=0.02)
    assert ss.skill == pytest.approx(math.sqrt(1 + 1 / M), rel=0.02)
    assert ss.spread == pytest.approx(1.0, rel=0.02)
    narrow = spread_skill(y, 0.3 * x)
    assert narrow.ratio < 0.4


def test_spread_skill_needs_two_members():
    with pytest.raises(ValueError, match="at least 2 members"):
        spread_skill(np.zeros((2, 3)), np.zeros((2, 1, 3)))


def test_rank_histogram_flat_when_calibrated_and_u_shaped_when_under_dispersed(dtype):
    y, x = _draw((50, 20, 20), dtype, 10), _draw((50, 7, 20, 20), dtype, 11)
    counts = rank_histogram(y, x)
    assert counts.shape == (8,) and int(counts.sum()) == y.numel()
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    narrow = rank_histogram(y, 0.3 * x).numpy()
    assert stats.chisquare(narrow).pvalue < 1e-12
    assert narrow[0] + narrow[-1] > 0.5 * narrow.sum()


def test_rank_histogram_breaks_ties_at_random():
    """Discrete data (many ties): truth and members iid on {0, 1, 2}. Counting only the members below
    would pile up on the low ranks; random tie-breaking keeps the histogram flat."""
    g = torch.Generator().manual_seed(12)
    y = torch.randint(0, 3, (40_000,), generator=g).double()
    x = torch.randint(0, 3, (40_000, 4), generator=g).double()
    counts = rank_histogram(y, x, generator=torch.Generator().manual_seed(0)).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    again = rank_histogram(y, x, generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(counts, again)
    below_only = np.bincount((x < y[:, None]).sum(1).numpy(), minlength=5)
    assert stats.chisquare(below_only).pvalue < 1e-12


# ------------------------------------------------------------------------------------------------
# spectra
@pytest.mark.parametrize("detrend", ["plane", "mean", "none"])
def test_white_noise_spectrum_is_flat_at_its_variance(dtype, detrend):
    s = power_spectrum(2.0 * _draw((300, 32, 48), dtype, 13), detrend=detrend)
    assert s.k.shape == (16,) and s.k[-1] == pytest.approx(0.5)
    # 300 fields and >= 6 modes per bin: the bin means are within ~10% of sigma^2 = 4; removing the
    # plane also removes some of the lowest bin's power (3 of its degrees of freedom)
    first = 1 if detrend == "plane" else 0
    np.testing.assert_allclose(s.power[first:], 4.0, rtol=0.1)
    assert 0.8 * 4.0 < s.power[0] < 1.1 * 4.0
    assert abs(np.polyfit(np.log(s.k[first:]), np.log(s.power[first:]), 1)[0]) < 0.05


@pytest.mark.parametrize("detrend", ["plane", "mean", "none"])
def test_sinusoid_spectrum_peaks_at_its_wavenumber(dtype, detrend):
    H, W = 32, 48
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    for cy, cx in [(5, 0), (3, 6), (0, 12)]:
        k0 = math.hypot(cy / H, cx / W)
        offset = 0.0 if detrend == "none" else 0.5  # a mean would leak into the window's first bins
        field = torch.tensor(np.sin(2 * np.pi * (cy * i / H + cx * j / W)) + offset, dtype=dtype)
        s = power_spectrum(field, detrend=detrend)
        assert s.k[np.argmax(s.power)] == pytest.approx(k0, abs=0.5 / 32)
        far = np.abs(s.k - k0) > 3.5 / 32
        # the Hann window confines the leakage; the plane fitted to the sinusoid itself leaves a ramp
        leak = 0.05 if detrend == "plane" else 1e-3
        assert s.power[far].max() < leak * s.power.max()


def test_plane_detrending_removes_a_gradient():
    H, W = 32, 48
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    noise = _draw((50, H, W), torch.float64, 17).numpy()
    ramp = noise + 0.5 * i - 0.3 * j  # a large-scale gradient, as in temperature fields
    np.testing.assert_allclose(power_spectrum(ramp).power, power_spectrum(noise).power, rtol=1e-10)
    assert power_spectrum(ramp, detrend="mean").power[0] > 100 * power_spectrum(noise).power[0]


def test_spectrum_spacing_scales_wavenumbers():
    f = _draw((4, 16, 16), torch.float64, 14)
    a, b = power_spectrum(f), power_spectrum(f, spacing=0.25)
    np.testing.assert_allclose(b.k, a.k / 0.25)
    np.testing.assert_allclose(b.power, a.power)


def test_spectrum_errors():
    with pytest.raises(ValueError, match="non-finite"):
        power_spectrum(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="detrend"):
        power_spectrum(np.zeros((8, 8)), detrend="linear")


def test_spectral_error_of_known_ratios():
    k = np.arange(1, 10) / 18
    true = PowerSpectrum(k, np.linspace(1.0, 0.1, 9))
    assert spectral_error(true, true) == 0.0
    assert spectral_error(PowerSpectrum(k, 10 * true.power), true) == pytest.approx(1.0)
    coarse_wrong = true.power.copy()
    coarse_wrong[:6] *= 100  # only the first 6 of 9 bins: outside the finest third
    assert spectral_error(PowerSpectrum(k, coarse_wrong), true) == pytest.approx(0.0)
    assert spectral_error(PowerSpectrum(k, coarse_wrong), true, band="all") == pytest.approx(2 * 6 / 9)
    with pytest.raises(ValueError, match="wavenumbers differ"):
        spectral_error(PowerSpectrum(k[:5], true.power[:5]), true)


# ------------------------------------------------------------------------------------------------
# all scores
def test_climate_scores_agree_with_the_parts(dtype):
    y, x = _draw((6, 16, 16), dtype, 15), _draw((6, 4, 16, 16), dtype, 16)
    s = climate_scores(y, x, generator=torch.Generator().manual_seed(3))
    assert s.members == 4
    assert s.rmse == pytest.approx(rmse(y, x))
    assert s.crps == pytest.approx(crps(y, x, fair=False))
    assert s.crps_fair == pytest.approx(crps(y, x))
    assert s.spread_skill == pytest.approx(spread_skill(y, x).ratio)
    assert s.rank_histogram == rank_histogram(y, x, generator=torch.Generator().manual_seed(3)).tolist()
    assert len(s.spectrum_k) == len(s.spectrum_pred) == len(s.spectrum_true) == 8
    json.dumps(s.to_dict())
    det = climate_scores(y, x[:, 0])
    assert det.members == 1 and det.crps_fair is None and det.spread_skill is None
    assert det.crps == pytest.approx(det.mae)
