"""Molecule backbones: EGNN (dense and sparse layouts, EDM-faithful) and the chirality-aware e3nn
network; their symmetries, and the symmetry of a whole sampler run."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from sciddiff import cli
from sciddiff.core import VP, Model, State, ZeroCoM
from sciddiff.molecules._e3nn import E3Denoiser
from sciddiff.molecules._egnn import EGNNDenoiser, _EdgeInput, _Sparse, _WeightedSum, full_edges
from sciddiff.samplers import dpmpp_2m
from sciddiff.testing._equivariance import assert_equivariant, check_equivariance

SIZES = (5, 3, 7, 1, 4)
SMALL_E3 = dict(hidden_irreps="8x0e + 4x0o + 4x1o + 4x1e", layers=3, radial_basis=8, radial_hidden=16)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """e3nn builds its Clebsch-Gordan constants in the default dtype (see E3Denoiser's docstring)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def molecules(dtype: torch.dtype, seed: int = 0, sizes=SIZES,
              shuffle: bool = True) -> tuple[State, torch.Tensor]:
    """A batch of random molecules (zero CoM, one-hot types) and times ``t [B]``; atoms of different
    molecules interleaved when ``shuffle`` (the networks must not assume sorted batches)."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if shuffle:
        batch = batch[torch.randperm(batch.shape[0], generator=g)]
    n = batch.shape[0]
    pos = torch.randn(n, 3, generator=g, dtype=dtype) * 1.5
    h = torch.nn.functional.one_hot(torch.randint(0, 5, (n,), generator=g), 5).to(dtype)
    s = State({"pos": pos, "h": h}, {"pos": batch, "h": batch}, len(sizes), {"pos": ZeroCoM()})
    return s.project(), torch.rand(len(sizes), generator=g, dtype=dtype)


def chiral_molecule(dtype: torch.dtype) -> State:
    """A stereocentre: C bonded to H, N, O, F on a tetrahedron (four different neighbours)."""
    d = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=dtype) / 3**0.5
    bonds = torch.tensor([[1.09], [1.47], [1.43], [1.35]], dtype=dtype)
    pos = torch.cat([torch.zeros(1, 3, dtype=dtype), d * bonds])
    h = torch.nn.functional.one_hot(torch.tensor([1, 0, 2, 3, 4]), 5).to(dtype)
    b = torch.zeros(5, dtype=torch.long)
    return State({"pos": pos, "h": h}, {"pos": b, "h": b}, 1, {"pos": ZeroCoM()}).project()


def egnn(dtype: torch.dtype, impl: str = "sparse", seed: int = 0, **kw) -> EGNNDenoiser:
    """A small EGNN whose coordinate updates are not near zero (EDM initialises them at 1e-3 scale,
    which would make the position checks weak)."""
    torch.manual_seed(seed)
    args = dict(hidden=16, layers=2, impl=impl) | kw
    net = EGNNDenoiser(**args).to(dtype)
    with torch.no_grad():
        for blk in net.e_blocks:
            blk.gcl_equiv.coord_mlp[4].weight.normal_(0, 0.05)
    return net


def e3(dtype: torch.dtype, seed: int = 0, **kw) -> E3Denoiser:
    torch.manual_seed(seed)
    with default_dtype(dtype):
        return E3Denoiser(**(SMALL_E3 | kw))


# ------------------------------------------------------------------------------------------------
# EGNN
@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_egnn_is_e3_and_permutation_equivariant(dtype, impl):
    s, t = molecules(dtype)
    net = egnn(dtype, impl)
    rep = assert_equivariant(lambda x: net(x, t), s, reflect=True)
    assert rep.scales["pos"] > 0.05 and rep.scales["h"] > 0.05  # the outputs are not trivial


@pytest.mark.parametrize("attention", [True, False])
def test_egnn_dense_equals_sparse(dtype, tol, attention):
    """Same weights, same function, in value and in every parameter gradient."""
    s, t = molecules(dtype, seed=1)
    a = egnn(dtype, "sparse", attention=attention, inv_sublayers=2)
    b = egnn(dtype, "dense", attention=attention, inv_sublayers=2)
    b.load_state_dict(a.state_dict())
    outs = []
    for net in (a, b):
        o = net(s, t)
        (o["pos"].square().sum() + (o["h"] * torch.arange(5, dtype=dtype)).sum()).backward()
        outs.append(o)
    for k in ("pos", "h"):
        torch.testing.assert_close(outs[0][k], outs[1][k], **tol)
    scale = 1e-4 if dtype == torch.float32 else 1e-10
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=scale * (1 + float(q.grad.abs().max())), rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_egnn_inference_path_equals_autograd_path(dtype, tol, impl, monkeypatch):
    """Without autograd the sparse layout runs edges in row-aligned chunks with in-place
    activations; with 7-edge chunks (many chunks, rows split across none) the result must not move.
    Single-atom molecules have no edges at all."""
    import sciddiff.molecules._egnn as egnn_mod

    s, t = molecules(dtype, seed=4, sizes=(5, 1, 7, 3, 1))
    net = egnn(dtype, impl, inv_sublayers=2)
    want = net(s, t)
    for chunk in (7, 1, 10**6):
        monkeypatch.setattr(egnn_mod, "CHUNK_EDGES", chunk)
        with torch.no_grad():
            got = net(s, t)
        for k in ("pos", "h"):
            torch.testing.assert_close(got[k], want[k].detach(), **tol)


def test_egnn_matches_edm_reference_port():
    """The factored layers compute EDM's published architecture: weights mapped one to one, same
    output as the EDM-style port (full concatenations, padded ``B * Nmax^2`` edges, masks)."""
    ref_mod = cli.load_benchmark("_edm_reference")
    s, t = molecules(torch.float64, seed=2)
    net = egnn(torch.float64, inv_sublayers=2)
    out = net(s, t)
    ref = ref_mod.from_denoiser(net)
    r = ref(*ref_mod.to_edm_batch(s, t))
    batch = s.batch["pos"]
    counts = torch.bincount(batch)
    order = torch.argsort(batch, stable=True)
    slot = torch.empty_like(batch)
    slot[order] = torch.arange(batch.shape[0]) - (torch.cumsum(counts, 0) - counts)[batch[order]]
    torch.testing.assert_close(r[batch, slot, :3], out["pos"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(r[batch, slot, 3:], out["h"], atol=1e-12, rtol=1e-12)


def test_egnn_without_features_and_time():
    s, t = molecules(torch.float64)
    pos_only = State({"pos": s["pos"]}, {"pos": s.batch["pos"]}, s.num_systems, {"pos": ZeroCoM()})
    net = egnn(torch.float64, h_dim=0, time_conditioning=False)
    out = net(pos_only, t)
    assert set(out.keys()) == {"pos"}
    assert_equivariant(lambda x: net(x, t), pos_only, scalar_fields=(), reflect=True)


def test_egnn_output_has_zero_com_and_config_round_trips(tmp_path):
    from sciddiff.training import network_config, network_from_config

    s, t = molecules(torch.float64)
    net = egnn(torch.float64, impl="dense", coords_range=3.0, time_scale=0.5)
    out = net(s, t)
    com = torch.zeros(s.num_systems, 3, dtype=torch.float64).index_add_(0, s.batch["pos"], out["pos"])
    assert com.abs().max() < 1e-12
    cfg = json.loads(json.dumps(network_config(net)))
    again = network_from_config(cfg, VP()).to(torch.float64)
    assert isinstance(again, EGNNDenoiser) and again.config == net.config
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again(s, t)["pos"], out["pos"], atol=0, rtol=0)


def test_full_edges_and_custom_autograd():
    batch = torch.tensor([2, 0, 1, 0, 2, 2, 0, 1, 2, 3])
    row, col = full_edges(batch, 5)
    pairs = {(int(i), int(j)) for i, j in zip(row, col, strict=True)}
    want = {(i, j) for i in range(10) for j in range(10) if i != j and batch[i] == batch[j]}
    assert pairs == want and len(pairs) == row.shape[0]
    assert torch.all(row[1:] >= row[:-1])  # sorted by row (the CSR layout relies on it)
    g = _Sparse(batch, 5)
    opt = dict(dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(10, 4, **opt), torch.randn(10, 4, **opt)
    e, w_e = torch.randn(g.num_edges, 2, **opt), torch.randn(4, 2, **opt)
    ref = a.detach()[row] + b.detach()[col] + e.detach() @ w_e.detach().T
    torch.testing.assert_close(_EdgeInput.apply(a, b, e, w_e, g), ref)
    assert torch.autograd.gradcheck(lambda *z: _EdgeInput.apply(*z, g), (a, b, e, w_e))
    w, m = torch.randn(g.num_edges, **opt), torch.randn(g.num_edges, 4, **opt)
    ref = torch.zeros(10, 4, dtype=torch.float64).index_add_(0, row, w.detach()[:, None] * m.detach())
    torch.testing.assert_close(_WeightedSum.apply(w, m, g), ref)
    assert torch.autograd.gradcheck(lambda *z: _WeightedSum.apply(*z, g), (w, m))


# ------------------------------------------------------------------------------------------------
# e3nn backbone
def test_e3_is_se3_and_permutation_equivariant(dtype):
    s, t = molecules(dtype)
    net = e3(dtype)
    rep = assert_equivariant(lambda x: net(x, t), s)
    assert rep.scales["pos"] > 0.01 and rep.scales["h"] > 0.01


def test_e3_tells_enantiomers_apart_egnn_does_not():
    """On a stereocentre, E3Denoiser's output for the mirror image is far from the mirrored output
    (pseudovector and pseudoscalar paths), while rotations pass to float64 rounding; the EGNN is
    reflection-equivariant and cannot tell the two apart."""
    s = chiral_molecule(torch.float64)
    t = torch.tensor([0.3], dtype=torch.float64)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    s_m = s.replace(pos=s["pos"] @ mirror)
    net = e3(torch.float64)
    with torch.no_grad():
        out, out_m = net(s, t), net(s_m, t)
    err_pos = float((out_m["pos"] - out["pos"] @ mirror).abs().max() / out["pos"].abs().max())
    err_h = float((out_m["h"] - out["h"]).abs().max() / out["h"].abs().max())
    assert err_pos > 0.05 and err_h > 1e-3, (err_pos, err_h)
    rot = check_equivariance(lambda x: net(x, t), s, translate=True, permute=True)
    assert max(rot.relative().values()) < 1e-10
    ref = check_equivariance(lambda x: net(x, t), s, reflect=True)
    assert ref.relative()["pos"] > 0.05
    with pytest.raises(AssertionError, match="rotation x reflection"):
        assert_equivariant(lambda x: net(x, t), s, reflect=True)

    e = egnn(torch.float64)
    with torch.no_grad():
        oe, oe_m = e(s, t), e(s_m, t)
    torch.testing.assert_close(oe_m["pos"], oe["pos"] @ mirror, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(oe_m["h"], oe["h"], atol=1e-12, rtol=1e-12)


def test_e3_config_and_lmax():
    net = e3(torch.float64, lmax=1, h_dim=0, time_conditioning=False)
    s, t = molecules(torch.float64)
    pos_only = State({"pos": s["pos"]}, {"pos": s.batch["pos"]}, s.num_systems, {"pos": ZeroCoM()})
    assert_equivariant(lambda x: net(x, t), pos_only, scalar_fields=())
    with default_dtype(torch.float64):
        again = E3Denoiser(**json.loads(json.dumps(net.config)))
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again(pos_only, t)["pos"], net(pos_only, t)["pos"], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
def test_sampler_is_equivariant():
    """dpmpp_2m is a fixed-noise ODE solver: with an E(3)-equivariant model, the sample from a
    rotated (reflected, permuted) prior is the rotated (...) sample."""
    template, _ = molecules(torch.float64, seed=3)
    net = egnn(torch.float64)
    model = Model(net, VP(), "eps")
    x_T = model.process.prior(template, torch.Generator().manual_seed(5))
    rep = assert_equivariant(lambda x: dpmpp_2m(model, x, 4), x_T, translate=False, reflect=True)
    assert rep.scales["pos"] > 0.1


# ------------------------------------------------------------------------------------------------
def test_clear_errors():
    s, t = molecules(torch.float64)
    with pytest.raises(ValueError, match="unknown impl"):
        EGNNDenoiser(impl="csr")
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        EGNNDenoiser(hidden=0)
    net = egnn(torch.float64)
    with pytest.raises(ValueError, match=r"expected fields \['h', 'pos'\]"):
        net(State({"pos": s["pos"]}, {"pos": s.batch["pos"]}), t)
    with pytest.raises(TypeError, match="'pos' is torch.float32 but the network is torch.float64"):
        net(s.to(torch.float32), t)
    with pytest.raises(ValueError, match="t must have shape"):
        net(s, t[:2])
    with pytest.raises(ValueError, match=r"'h' must be a flat field \[20, 5\]"):
        net(State({"pos": s["pos"], "h": s["h"][:, :4]}, s.batch), t)
    with pytest.raises(ValueError, match="needs 1o"):
        E3Denoiser(hidden_irreps="8x0e + 4x0o + 4x1e")
    with pytest.raises(ValueError, match="no parity-odd part"):
        E3Denoiser(hidden_irreps="8x0e + 4x1o")
    with pytest.raises(ValueError, match="cannot parse"):
        E3Denoiser(hidden_irreps="eight scalars")
    with pytest.raises(ValueError, match="lmax"):
        E3Denoiser(lmax=0)


def test_throughput_benchmark_smoke(tmp_path):
    """The benchmark's plumbing at a tiny size: every row, both files, ratios against the port."""
    mod = cli.load_benchmark("molecules")
    sizes = mod.draw_sizes(500, seed=1)
    assert min(sizes) >= 3 and max(sizes) <= 29 and 16 < sum(sizes) / 500 < 20  # QM9: mean 18.0
    recs = mod.run_throughput(tmp_path, quick=True, threads=1, batch=3, hidden=8, layers=1)
    assert [(r["backbone"], r["impl"]) for r in recs] == list(mod.BACKBONES)
    for r in recs:
        assert r["step_seconds"] > 0 and r["forward_seconds"] > 0 and r["params"] > 0
        assert r["train_mol_per_s"] == pytest.approx(3 / r["step_seconds"])
        assert r["step_speedup_vs_reference"] is not None
    data = json.loads((tmp_path / "molecules_throughput.json").read_text())
    assert len(data["records"]) == 4 and data["meta"]["batch"] == 3
    md = (tmp_path / "molecules_throughput.md").read_text()
    assert "edm-reference" in md and "x quoted" in md
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ValueError, match="unknown row"):
        mod.run_throughput(tmp_path, quick=True, threads=1, backbones=[("egnn", "csr")])
