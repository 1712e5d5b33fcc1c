"""State: validation, per-system arithmetic on flat and dense fields, reductions, noise, devices."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sciddiff.core import Euclidean, FlatTorus, Masked, State, ZeroCoM

SIZES = [2, 3, 1, 4]  # systems of different sizes (flat field)
B = len(SIZES)


def _batch(sizes=SIZES, shuffle=False) -> torch.Tensor:
    idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if shuffle:  # rows of a system need not be contiguous
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(3))]
    return idx


def _mixed(dtype, gen, shuffle=False, constraints=None) -> State:
    """flat ``pos [N, 3]``, dense ``h [B, 4]`` and dense ``grid [B, 2, 2]``."""
    idx = _batch(shuffle=shuffle)
    return State(
        {
            "pos": torch.randn(idx.numel(), 3, generator=gen, dtype=dtype),
            "h": torch.randn(B, 4, generator=gen, dtype=dtype),
            "grid": torch.randn(B, 2, 2, generator=gen, dtype=dtype),
        },
        batch={"pos": idx},
        constraints=constraints,
    )


def _manual_scale(s: State, c: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each system's rows multiplied by ``c[system]``, by an explicit loop."""
    out = {}
    for k, v in s.items():
        w = v.clone()
        for r in range(v.shape[0]):
            sys_ = int(s.batch[k][r]) if k in s.batch else r
            w[r] = v[r] * c[sys_]
        out[k] = w
    return out


# construction ----------------------------------------------------------------------------------
def test_batch_index_length_mismatch():
    with pytest.raises(ValueError, match=r"batch index of 'pos' has 4 entries but the field has 5 rows"):
        State({"pos": torch.zeros(5, 3)}, batch={"pos": torch.zeros(4, dtype=torch.long)})


def test_dense_leading_dims_disagree():
    with pytest.raises(ValueError, match=r"dense field 'b' has leading dim 4, expected 3"):
        State({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})


def test_dense_leading_dim_against_explicit_num_systems():
    with pytest.raises(ValueError, match=r"dense field 'a' has leading dim 3, expected 5"):
        State({"a": torch.zeros(3, 2)}, num_systems=5)


@pytest.mark.parametrize("where", ["batch", "constraints"])
def test_unknown_field(where):
    kw = {"batch": {"y": torch.zeros(2, dtype=torch.long)}} if where == "batch" else {
        "constraints": {"y": ZeroCoM()}}
    with pytest.raises(KeyError, match=r"unknown field 'y'"):
        State({"x": torch.zeros(2, 3)}, **kw)


def test_scalar_field():
    with pytest.raises(ValueError, match=r"field 'x' must have a leading dim, got a scalar"):
        State({"x": torch.tensor(1.0)})


def test_other_construction_errors():
    with pytest.raises(ValueError, match="at least one field"):
        State({})
    with pytest.raises(TypeError, match=r"field 'x' must be a torch.Tensor"):
        State({"x": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"batch index of 'x' must be a 1-D integer tensor"):
        State({"x": torch.zeros(2, 3)}, batch={"x": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"batch index of 'x' must be a 1-D integer tensor"):
        State({"x": torch.zeros(2, 3)}, batch={"x": torch.zeros(2, 1, dtype=torch.long)})


def test_num_systems_inferred():
    idx = torch.tensor([0, 0, 2, 2], dtype=torch.int32)  # system 1 empty: B = max + 1
    s = State({"pos": torch.zeros(4, 3)}, batch={"pos": idx})
    assert s.num_systems == 3
    assert s.batch["pos"].dtype == torch.long  # int32 index stored as long
    assert s.sizes("pos").tolist() == [2, 0, 2]
    s2 = State({"pos": torch.zeros(4, 3), "h": torch.zeros(5, 1)}, batch={"pos": idx})
    assert s2.num_systems == 5  # a dense field fixes B
    assert State({"pos": torch.zeros(4, 3)}, batch={"pos": idx}, num_systems=7).num_systems == 7


def test_from_tensor_access_and_repr(gen):
    x = torch.randn(3, 2, generator=gen)
    s = State.from_tensor(x, "y", FlatTorus())
    assert s["y"] is x and list(s) == ["y"] and list(s.keys()) == ["y"]
    assert isinstance(s.constraint("y"), FlatTorus)
    assert s.num_systems == 3 and s.dtype == torch.float32 and s.device == x.device
    assert isinstance(State.from_tensor(x).constraint("x"), Euclidean)
    r = repr(_mixed(torch.float32, gen, constraints={"pos": ZeroCoM()}))
    assert "B=4" in r and "pos: flat (10, 3) ZeroCoM" in r and "h: dense (4, 4) Euclidean" in r


def test_replace(gen):
    s = _mixed(torch.float64, gen)
    h = torch.ones_like(s["h"])
    r = s.replace(h=h)
    assert r["h"] is h and r["pos"] is s["pos"] and r.batch is s.batch and r.num_systems == B
    with pytest.raises(ValueError, match="'h' unknown or of a different shape"):
        s.replace(h=torch.ones(B, 5))
    with pytest.raises(ValueError, match="'zz' unknown"):
        s.replace(zz=h)


# arithmetic -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_per_system_coefficients(dtype, tol, gen, shuffle):
    s = _mixed(dtype, gen, shuffle=shuffle)
    c = torch.rand(B, generator=gen, dtype=dtype) + 0.5
    want = _manual_scale(s, c)
    for got in (s * c, c * s):
        for k in s:
            assert_close(got[k], want[k], **tol)
    inv = _manual_scale(s, 1 / c)
    q = s / c
    for k in s:
        assert_close(q[k], inv[k], **tol)
    # layout shared, never copied
    assert q.batch is s.batch and q.num_systems == s.num_systems and q.constraints is s.constraints


@pytest.mark.parametrize("coef", [2.5, torch.tensor(2.5), torch.tensor(2.5, dtype=torch.float64)])
def test_scalar_coefficients(dtype, tol, gen, coef):
    s = _mixed(dtype, gen)
    for got in (s * coef, coef * s):
        for k in s:
            assert got[k].dtype == dtype  # a 0-d float64 coefficient does not promote float32
            assert_close(got[k], s[k] * 2.5, **tol)
    for k in s:
        assert_close((s / coef)[k], s[k] / 2.5, **tol)


def test_add_sub_neg_map(dtype, tol, gen):
    a, b = _mixed(dtype, gen), _mixed(dtype, gen)
    for k in a:
        assert_close((a + b)[k], a[k] + b[k], **tol)
        assert_close((a - b)[k], a[k] - b[k], **tol)
        assert_close((-a)[k], -a[k], **tol)
        assert_close(a.map(torch.sin)[k], torch.sin(a[k]), **tol)


@pytest.mark.parametrize("kind", ["per_system", "scalar", "mixed"])
def test_lincomb(dtype, tol, gen, kind):
    x, y = _mixed(dtype, gen, shuffle=True), _mixed(dtype, gen, shuffle=True)
    ca = torch.rand(B, generator=gen, dtype=dtype) - 0.5
    cb = torch.rand(B, generator=gen, dtype=dtype) + 1.0
    if kind == "per_system":
        a, b, fa, fb = ca, cb, ca, cb
    elif kind == "scalar":
        a, b = 0.3, torch.tensor(-1.7, dtype=dtype)
        fa, fb = torch.full((B,), 0.3, dtype=dtype), torch.full((B,), -1.7, dtype=dtype)
    else:
        a, b, fa, fb = ca, 2.0, ca, torch.full((B,), 2.0, dtype=dtype)
    got = x.lincomb(a, y, b)
    wa, wb = _manual_scale(x, fa), _manual_scale(y, fb)
    for k in x:
        assert_close(got[k], wa[k] + wb[k], **tol)
        assert_close(got[k], (x * a + y * b)[k], **tol)


def test_expand_shapes(gen):
    s = _mixed(torch.float32, gen, shuffle=True)
    c = torch.arange(B, dtype=torch.float32)
    assert s.expand(c, "pos").shape == (10, 1) and s.expand(c, "pos").flatten().tolist() == \
        s.batch["pos"].float().tolist()
    assert s.expand(c, "h").shape == (B, 1)
    assert s.expand(c, "grid").shape == (B, 1, 1)
    assert s.expand(1.5, "grid") == 1.5
    z = torch.tensor(2.0)
    assert s.expand(z, "pos") is z


# reductions -------------------------------------------------------------------------------------
def _manual_per_system(s: State, fn) -> torch.Tensor:
    out = torch.zeros(s.num_systems, dtype=torch.float64)
    for k, v in s.items():
        for r in range(v.shape[0]):
            sys_ = int(s.batch[k][r]) if k in s.batch else r
            out[sys_] += float(fn(k, r))
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_reductions_against_loops(dtype, tol, gen, shuffle):
    x, y = _mixed(dtype, gen, shuffle=shuffle), _mixed(dtype, gen, shuffle=shuffle)
    sq = _manual_per_system(x, lambda k, r: x[k][r].double().square().sum())
    dot = _manual_per_system(x, lambda k, r: (x[k][r].double() * y[k][r].double()).sum())
    tot = _manual_per_system(x, lambda k, r: x[k][r].double().sum())
    assert x.sqnorm().dtype == dtype and x.sqnorm().shape == (B,)
    assert_close(x.sqnorm().double(), sq, **tol)
    assert_close(x.dot(y).double(), dot, **tol)
    assert_close(x.per_system_sum(dict(x.items())).double(), tot, **tol)
    # a subset of fields
    only_pos = _manual_per_system(State({"pos": x["pos"]}, batch={"pos": x.batch["pos"]}, num_systems=B),
                                  lambda k, r: x[k][r].double().sum())
    assert_close(x.per_system_sum({"pos": x["pos"]}).double(), only_pos, **tol)


def test_reductions_empty_system(dtype):
    idx = torch.tensor([0, 0, 2])
    s = State({"pos": torch.ones(3, 2, dtype=dtype)}, batch={"pos": idx}, num_systems=4)
    assert s.sqnorm().tolist() == [4.0, 0.0, 2.0, 0.0]
    assert s.sizes("pos").tolist() == [2, 0, 1, 0]
    assert s.dof().tolist() == [4.0, 0.0, 2.0, 0.0]


def test_sizes_and_dof(dtype, gen):
    s = _mixed(dtype, gen, shuffle=True, constraints={"pos": ZeroCoM()})
    assert s.sizes("pos").tolist() == SIZES
    want = [(n - 1) * 3 + 4 + 4 for n in SIZES]  # ZeroCoM pos: (N-1)*d; h: 4; grid: 2*2
    assert s.dof().dtype == dtype
    assert s.dof().tolist() == want
    plain = _mixed(dtype, gen)
    assert plain.dof().tolist() == [n * 3 + 8 for n in SIZES]


def test_dof_dense_zero_com_and_masked(dtype):
    x = torch.zeros(3, 5, 2, dtype=dtype)  # dense point clouds [B, N, d]
    s = State({"x": x}, constraints={"x": ZeroCoM()})
    assert s.dof().tolist() == [8.0, 8.0, 8.0]
    mask = torch.zeros(3, 5, 2, dtype=torch.bool)
    mask[0, :2] = True  # 4 known entries in system 0
    mask[2, 0, 0] = True
    m = Masked(mask, torch.zeros_like(x), torch.zeros_like(x))
    assert State({"x": x}, constraints={"x": m}).dof().tolist() == [6.0, 10.0, 9.0]
    # flat field with a batch index
    idx = torch.tensor([1, 0, 1, 1])
    fm = torch.tensor([[True, False], [False, False], [True, True], [False, False]])
    f = State({"p": torch.zeros(4, 2, dtype=dtype)}, batch={"p": idx},
              constraints={"p": Masked(fm, torch.zeros(4, 2), torch.zeros(4, 2))})
    assert f.dof().tolist() == [2.0, 3.0]


# noise ------------------------------------------------------------------------------------------
def test_randn_like_reproducible_and_projected(dtype, tol):
    s = _mixed(dtype, torch.Generator().manual_seed(1), shuffle=True, constraints={"pos": ZeroCoM()})
    n1 = s.randn_like(torch.Generator().manual_seed(7))
    n2 = s.randn_like(torch.Generator().manual_seed(7))
    n3 = s.randn_like(torch.Generator().manual_seed(8))
    for k in s:
        assert n1[k].dtype == dtype and n1[k].shape == s[k].shape
        assert torch.equal(n1[k], n2[k])
        assert not torch.equal(n1[k], n3[k])
    # zero centre of mass per system for the ZeroCoM field
    com = torch.zeros(B, 3, dtype=dtype).index_add_(0, s.batch["pos"], n1["pos"])
    assert_close(com, torch.zeros_like(com), **tol)
    # Euclidean fields are the plain draws, in field order
    g = torch.Generator().manual_seed(7)
    raw = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in s.items()}
    assert torch.equal(n1["h"], raw["h"]) and torch.equal(n1["grid"], raw["grid"])
    assert_close(n1["pos"], ZeroCoM().project(raw["pos"], s.batch["pos"], B), **tol)


def test_randn_like_dense_zero_com(dtype, tol):
    s = State({"x": torch.zeros(6, 5, 3, dtype=dtype)}, constraints={"x": ZeroCoM()})
    n = s.randn_like(torch.Generator().manual_seed(0))
    assert_close(n["x"].mean(1), torch.zeros(6, 3, dtype=dtype), **tol)


def test_project_canonical_difference_delegate(dtype, tol, gen):
    s = State({"f": torch.randn(4, 3, generator=gen, dtype=dtype) * 3,
               "e": torch.randn(4, 3, generator=gen, dtype=dtype)}, constraints={"f": FlatTorus()})
    c = s.canonical()
    assert bool(((c["f"] >= 0) & (c["f"] < 1)).all()) and torch.equal(c["e"], s["e"])
    d = s.difference(s.map(lambda v: v + 0.1))
    assert_close(d["f"], torch.full_like(s["f"], -0.1), **tol)
    assert_close(d["e"], torch.full_like(s["e"], -0.1), **tol)
    plain = State.from_tensor(s["e"])
    assert plain.canonical() is plain  # no constraints: no copy


def test_check_finite():
    s = State({"a": torch.zeros(2, 1), "b": torch.tensor([[0.0], [float("nan")]])})
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite values .* field 'b'"):
        s.check_finite("step 3")
    State({"a": torch.zeros(2, 1)}).check_finite("ok")


# dtype / device ---------------------------------------------------------------------------------
def test_to_dtype(gen):
    s = _mixed(torch.float32, gen, constraints={"pos": ZeroCoM()})
    d = s.to(torch.float64)
    assert d.dtype == torch.float64 and all(v.dtype == torch.float64 for _, v in d.items())
    assert d.batch["pos"].dtype == torch.long  # never converted with the fields
    assert d.num_systems == B and isinstance(d.constraint("pos"), ZeroCoM)
    for k in s:
        assert torch.equal(d[k].float(), s[k])
    assert d.to(dtype=torch.float32).dtype == torch.float32


def test_to_device_moves_batch_index(gen):
    """``to(device)`` must move the batch indices too (checked with the meta device on CPU)."""
    s = _mixed(torch.float32, gen)
    m = s.to("meta")
    assert m["pos"].device.type == "meta" and m["h"].device.type == "meta"
    assert m.batch["pos"].device.type == "meta" and m.batch["pos"].dtype == torch.long
    assert s.batch["pos"].device.type == "cpu"  # the original is untouched
    m2 = s.to("meta", torch.float64)
    assert m2.batch["pos"].device.type == "meta" and m2.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_roundtrip(gen):
    s = _mixed(torch.float32, gen, constraints={"pos": ZeroCoM()})
    c = s.to("cuda")
    assert c.batch["pos"].is_cuda
    assert_close(c.sqnorm().cpu(), s.sqnorm())
    assert c.dof().tolist() == s.dof().tolist()
    assert_close(c.project()["pos"].cpu(), s.project()["pos"])


def test_detach_clone(gen):
    x = torch.randn(3, 2, generator=gen, requires_grad=True)
    s = State.from_tensor(x * 2)
    assert s["x"].requires_grad and not s.detach()["x"].requires_grad
    c = s.clone()
    assert c["x"] is not s["x"] and torch.equal(c["x"], s["x"])


def test_dof_zero_com_empty_and_single_element_systems(dtype):
    idx = torch.tensor([0, 2, 2])  # system 0: one atom (no freedom), system 1: empty
    s = State({"pos": torch.zeros(3, 3, dtype=dtype)}, batch={"pos": idx}, num_systems=3,
              constraints={"pos": ZeroCoM()})
    assert s.dof().tolist() == [0.0, 0.0, 3.0]


def test_batch_index_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch index of 'pos' must lie in \[0, 2\)"):
        State({"pos": torch.zeros(3, 3)}, batch={"pos": torch.tensor([0, 1, 2])}, num_systems=2)
    with pytest.raises(ValueError, match="must lie in"):
        State({"pos": torch.zeros(2, 3)}, batch={"pos": torch.tensor([0, -1])}, num_systems=2)
