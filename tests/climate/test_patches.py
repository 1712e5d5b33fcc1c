"""Patch-wise downscaling: tilings, the partition of unity, and exactness for local functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sciddiff.climate._patches import PatchWindow, axis_weights, patchwise, tile_starts, window_profile

SIZES = [(1, 8, 2), (8, 8, 2), (9, 8, 2), (20, 8, 2), (21, 8, 2), (37, 12, 4), (50, 16, 8), (13, 6, 0)]
TOLS = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize(("size", "patch", "overlap"), SIZES)
def test_tiles_cover_the_axis_with_enough_overlap(size, patch, overlap, periodic):
    starts = tile_starts(size, patch, overlap, periodic=periodic)
    length = min(patch, size)
    covered = torch.zeros(size, dtype=torch.long)
    for s in starts:
        covered[torch.arange(s, s + length) % size] += 1
        assert 0 <= s and (periodic or s + length <= size)
    assert covered.min() >= 1
    if len(starts) > 1:  # consecutive windows (and, periodic, the last with the first) overlap enough
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        if periodic:
            gaps.append(size + starts[0] - starts[-1])
        assert max(gaps) <= patch - overlap


@pytest.mark.parametrize("factor", [1, 3, 4])
@pytest.mark.parametrize(("size", "patch", "overlap", "periodic"),
                         [(20, 8, 2, False), (28, 8, 4, False), (48, 16, 8, False), (18, 8, 2, True),
                          (24, 8, 4, True), (16, 16, 4, False)])
def test_raw_weights_are_a_partition_of_unity_on_regular_tilings(size, patch, overlap, periodic, factor):
    w = axis_weights(size, patch, overlap, factor, periodic=periodic)
    torch.testing.assert_close(w.sum(0), torch.ones(size * factor, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("periodic", [False, True])
def test_weights_positive_everywhere_and_zero_in_the_trim(periodic):
    for size in range(1, 70):
        for patch, overlap, trim in [(8, 2, 0), (12, 4, 1), (10, 5, 2), (16, 8, 3), (6, 0, 0)]:
            w = axis_weights(size, patch, overlap, 4, periodic=periodic, trim=trim)
            assert w.sum(0).min() > 1e-3, (size, patch, overlap)
    # interior window of a regular tiling: the first and last trim * factor fine cells get weight 0
    w = axis_weights(44, 16, 8, 2, trim=3)
    start = tile_starts(44, 16, 8)[1] * 2
    assert torch.all(w[1, start: start + 6] == 0) and w[1, start + 6] > 0
    assert torch.all(w[1, start + 32 - 6: start + 32] == 0)


def test_ramps_are_complementary_hann():
    n, width, trim = 40, 16, 3
    rise = window_profile(n, width, trim, left=True, right=False)
    fall = window_profile(n, width, trim, left=False, right=True)
    u = torch.arange(width, dtype=torch.float64)
    torch.testing.assert_close(rise[:width] + fall[n - width:], torch.ones(width, dtype=torch.float64))
    ramp = torch.sin(0.5 * torch.pi * (u[trim: width - trim] - trim + 0.5) / (width - 2 * trim)) ** 2
    torch.testing.assert_close(rise[trim: width - trim], ramp)
    assert torch.all(rise[width:] == 1)
    assert torch.all(window_profile(n, width, trim, left=False, right=False) == 1)


def _kernel(dtype):
    return torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]], dtype=dtype)[None, None]


def _local_fn(x, factor, periodic=False):
    """Bicubic upsampling then a fixed 3x3 convolution (receptive field 2 coarse + 1 fine cells);
    two 'members' (the field and its negative + 1) to exercise the member dim."""
    B, C, h, w = x.shape
    if periodic:  # wrap longitude before interpolating, crop after
        xp = F.pad(x, (2, 2, 0, 0), mode="circular")
        up = F.interpolate(xp, scale_factor=factor, mode="bicubic", align_corners=False)
        up = up[..., 2 * factor: -2 * factor]
        up = F.pad(up.reshape(B * C, 1, h * factor, w * factor), (1, 1, 0, 0), mode="circular")
        y = F.conv2d(F.pad(up, (0, 0, 1, 1), mode="replicate"), _kernel(x.dtype))
    else:
        up = F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)
        y = F.conv2d(F.pad(up.reshape(B * C, 1, h * factor, w * factor), (1, 1, 1, 1), mode="replicate"),
                     _kernel(x.dtype))
    y = y.reshape(B, C, h * factor, w * factor)
    return torch.stack([y, 1 - y], dim=1)


@pytest.mark.parametrize("shape", [(37, 53), (24, 40), (17, 16)])
def test_patchwise_equals_whole_field_for_a_local_function(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *shape, generator=gen, dtype=dtype)
    whole = _local_fn(x, 4)
    # receptive field: 7 fine cells at a window edge (bicubic clamping + conv) <= trim * factor = 8
    out = patchwise(lambda xp, win: _local_fn(xp, 4), x, 4, patch=16, overlap=8, trim=2)
    assert out.shape == (2, 2, 3, shape[0] * 4, shape[1] * 4) and out.dtype == dtype
    torch.testing.assert_close(out, whole, rtol=0, atol=TOLS[dtype])
    # without discarding the window edges the seams show: the test can fail
    bad = patchwise(lambda xp, win: _local_fn(xp, 4), x, 4, patch=16, overlap=8, trim=0)
    assert (bad - whole).abs().max() > 1e-3


def test_patchwise_periodic_longitude_matches_the_wrapped_whole_field(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 12, 45, generator=gen, dtype=dtype)  # 45 is not a multiple of the stride
    whole = _local_fn(x, 2, periodic=True)
    out = patchwise(lambda xp, win: _local_fn(xp, 2, periodic=win.cols.numel() == 45), x, 2,
                    patch=(12, 16), overlap=(4, 8), periodic=True, trim=(1, 3))
    torch.testing.assert_close(out, whole, rtol=0, atol=TOLS[dtype])


def test_windows_index_the_grid_and_static_slices_follow():
    seen = []

    def fn(xp, win: PatchWindow):
        seen.append(win)
        assert xp.shape[-2:] == (len(win.rows), len(win.cols))
        # the window's coarse values are exactly the grid's at its indices
        torch.testing.assert_close(xp[0, 0], grid[win.rows][:, win.cols])
        return static[:, :, win.fine_rows()][..., win.fine_cols()][:, None].expand(-1, 1, -1, -1, -1)

    grid = torch.arange(10 * 14, dtype=torch.float64).reshape(10, 14)
    static = torch.randn(1, 1, 30, 42, dtype=torch.float64)
    out = patchwise(fn, grid[None, None], 3, patch=6, overlap=2, periodic=True)
    torch.testing.assert_close(out[0, 0], static[0])  # blending identical copies gives the copy
    assert any(int(w.cols[-1]) < int(w.cols[0]) for w in seen)  # a window wrapped around
    assert torch.equal(PatchWindow(torch.tensor([2]), torch.tensor([0, 1]), 3).fine_cols(), torch.arange(6))


def test_stochastic_fn_is_reproducible_and_blends_constants_exactly():
    x = torch.zeros(2, 1, 20, 30)

    def noisy(gen):
        def fn(xp, win):
            B, C, h, w = xp.shape
            return 5.0 + 0.0 * torch.randn(B, 4, C, 2 * h, 2 * w, generator=gen)
        return fn

    out = patchwise(noisy(torch.Generator().manual_seed(0)), x, 2, patch=8, overlap=4)
    torch.testing.assert_close(out, torch.full_like(out, 5.0))

    def rand(gen):
        return lambda xp, win: torch.randn(xp.shape[0], 3, 1, 2 * xp.shape[2], 2 * xp.shape[3], generator=gen)

    a = patchwise(rand(torch.Generator().manual_seed(3)), x, 2, patch=8, overlap=4)
    b = patchwise(rand(torch.Generator().manual_seed(3)), x, 2, patch=8, overlap=4)
    assert torch.equal(a, b) and a.std() > 0.5


def test_bad_arguments_raise_clear_errors():
    x = torch.zeros(1, 1, 10, 10)
    ok = lambda xp, win: xp.repeat_interleave(2, -1).repeat_interleave(2, -2)[:, None]  # noqa: E731
    with pytest.raises(ValueError, match="at most half the patch"):
        patchwise(ok, x, 2, patch=6, overlap=4)
    with pytest.raises(ValueError, match="trim"):
        patchwise(ok, x, 2, patch=8, overlap=4, trim=2)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        patchwise(ok, x[0], 2, patch=6, overlap=2)
    with pytest.raises(ValueError, match="non-negative int"):
        patchwise(ok, x, 2, patch=(6, 6, 6), overlap=2)
    with pytest.raises(ValueError, match="fn returned shape"):
        patchwise(lambda xp, win: xp[:, None], x, 2, patch=6, overlap=2)
