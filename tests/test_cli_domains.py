"""The domain commands of the ``sciddiff`` command line, end to end with tiny models: ``generate``,
``evaluate``, ``train`` and ``demo`` for molecules, ``downscale`` (and ``train``) for climate, and the
error paths (exit status 2, one ``sciddiff: error: ...`` line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sciddiff import cli

GSCHNET = Path("/work/shared/data/qm9_peer_samples/gschnet_qm9_samples.xyz")
PNG = b"\x89PNG\r\n\x1a\n"
FRACTIONS = ("atom_stability", "molecule_stability", "validity", "uniqueness", "valid_unique")
REQUIRED = {"n", *FRACTIONS, "novelty"}
TINY_MOLECULES = {"backbone_kwargs": {"hidden": 8, "layers": 1}, "batch_size": 16, "limit": 32,
                  "lr": 2e-3, "ema_decay": 0.9, "grad_clip": None, "checkpoint_every": 1000,
                  "log_every": 5, "nfe": 4}


def run(argv, capsys) -> tuple[int, str, str]:
    """``main(argv)``: the exit status, stdout and stderr."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(argv, capsys, *words: str) -> str:
    """``argv`` fails with status 2 and a single ``sciddiff: error:`` line containing ``words``."""
    rc, _, err = run(argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sciddiff: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------
# molecules: a tiny model trained on a few real QM9 molecules
@pytest.fixture(scope="module")
def tiny_qm9(tmp_path_factory):
    """``load_qm9`` restricted to the first 100 rows of QM9 (built once into a temporary cache)."""
    import sciddiff.molecules._qm9 as qm9

    cache = tmp_path_factory.mktemp("qm9cache")
    original = qm9.load_qm9
    try:
        original("train", cache_dir=cache, limit=100)
    except ImportError as e:
        pytest.skip(f"QM9 needs the qm9pack package: {e}")
    mp = pytest.MonkeyPatch()
    mp.setattr(qm9, "load_qm9", lambda split, cache_dir=None: original(split, cache_dir=cache, limit=100))
    yield qm9.load_qm9
    mp.undo()


@pytest.fixture(scope="module")
def mol_model(tiny_qm9, tmp_path_factory):
    from sciddiff.molecules import MoleculeTrainConfig, train_molecules

    out = tmp_path_factory.mktemp("molmodel")
    cfg = MoleculeTrainConfig(**TINY_MOLECULES, max_steps=10)
    train_molecules(cfg, out, progress=False,
                    trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    return out


@pytest.fixture(scope="module")
def generated(mol_model, tmp_path_factory):
    """``sciddiff generate molecules`` with the tiny model: the SDF and PNG paths."""
    d = tmp_path_factory.mktemp("gen")
    sdf, png = d / "x.sdf", d / "x.png"
    rc = cli.main(["generate", "molecules", "-n", "8", "-o", str(sdf), "--checkpoint", str(mol_model),
                   "--seed", "0", "--nfe", "4", "--png", str(png), "--quiet"])
    assert rc == 0
    return sdf, png


def test_generate_molecules_writes_sdf_and_png(generated, mol_model, tmp_path, capsys):
    from sciddiff.molecules import read_molecules

    sdf, png = generated
    mols = read_molecules(sdf)
    assert len(mols) == 8
    sizes = set(json.loads((mol_model / "molecule.json").read_text())["num_atoms"]["sizes"])
    for m in mols:
        assert len(m) in sizes and np.isfinite(m.positions).all()
        assert set(m.numbers.tolist()) <= {1, 6, 7, 8, 9}
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 1000
    assert sorted(p.name for p in sdf.parent.iterdir()) == ["x.png", "x.sdf"]  # no temporaries left
    # The same seed reproduces the file; XYZ output too, and without --quiet the path is printed.
    again = tmp_path / "again.xyz"
    rc, out, _ = run(["generate", "molecules", "-n", "8", "-o", again, "--checkpoint", mol_model,
                      "--seed", "0", "--nfe", "4"], capsys)
    assert rc == 0 and str(again.resolve()) in out
    for a, b in zip(mols, read_molecules(again), strict=True):
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)  # SDF keeps 4 decimals


def test_evaluate_molecules_json(generated, capsys):
    rc, out, _ = run(["evaluate", "molecules", generated[0], "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert REQUIRED <= set(d) and all(k in REQUIRED or k.startswith("relax_") for k in d), d
    assert d["n"] == 8 and d["novelty"] is None
    for k in FRACTIONS:
        assert isinstance(d[k], float) and 0.0 <= d[k] <= 1.0, (k, d[k])
    assert d["valid_unique"] <= d["validity"]
    # The plain-text form lists the same keys.
    rc, text, _ = run(["evaluate", "molecules", generated[0]], capsys)
    assert rc == 0 and all(k in text for k in REQUIRED)


def test_evaluate_novelty_against_a_smiles_file(tmp_path, capsys):
    """Two valid molecules (water, methane) and a SMILES file holding one of them: novelty 1/2."""
    xyz = tmp_path / "two.xyz"
    xyz.write_text(
        "3\nwater\nO 0.000 0.000 0.117\nH 0.000 0.757 -0.469\nH 0.000 -0.757 -0.469\n"
        "5\nmethane\nC 0.000 0.000 0.000\nH 0.629 0.629 0.629\nH -0.629 -0.629 0.629\n"
        "H -0.629 0.629 -0.629\nH 0.629 -0.629 -0.629\n"
    )
    smiles = tmp_path / "train.smi"
    smiles.write_text("# training set\nO\n\nCCO\n")
    rc, out, _ = run(["evaluate", "molecules", xyz, "--json", "--train-smiles", smiles], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["n"] == 2 and d["validity"] == 1.0 and d["uniqueness"] == 1.0
    assert d["novelty"] == pytest.approx(0.5)
    smiles.write_text("O\nC\n")
    rc, out, _ = run(["evaluate", "molecules", xyz, "--json", "--train-smiles", smiles], capsys)
    assert rc == 0 and json.loads(out)["novelty"] == 0.0


@pytest.mark.skipif(not GSCHNET.is_file(), reason=f"G-SchNet's QM9 samples not present at {GSCHNET}")
def test_evaluate_gschnet_samples(tmp_path, capsys):
    """Every 20th of G-SchNet's 10,000 published samples (Gebauer et al. 2019; the file is ordered by
    size, so its first frames are all 35-atom molecules and unrepresentative) against EDM Table 1's
    G-SchNet row: 95.7 / 68.1 / 85.5 % atom stability, molecule stability, validity, within 3 binomial
    standard errors of 500 molecules (the full file reproduces the row to 0.2 %, test_metrics.py)."""
    lines, frames, i = GSCHNET.read_text().splitlines(), [], 0
    while i < len(lines):
        n = int(lines[i])
        frames.append(lines[i : i + n + 2])
        i += n + 2
    head = tmp_path / "gschnet500.xyz"
    head.write_text("".join("\n".join(f) + "\n" for f in frames[::20]))
    rc, out, _ = run(["evaluate", "molecules", head, "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["n"] == 500 and d["novelty"] is None
    for key, edm in (("atom_stability", 0.957), ("molecule_stability", 0.681), ("validity", 0.855)):
        assert abs(d[key] - edm) < 3 * (edm * (1 - edm) / 500) ** 0.5 + 0.005, (key, d[key])
    assert 0.95 < d["uniqueness"] <= 1.0


def test_train_molecules_from_a_config(tiny_qm9, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY_MOLECULES, "limit": 16, "max_steps": 1000}))
    out = tmp_path / "model"
    rc, stdout, _ = run(["train", "molecules", "--config", cfg, "--out", out, "--max-steps", "3", "--quiet"],
                        capsys)
    assert rc == 0 and str(out.resolve()) in stdout
    info = json.loads((out / "molecule.json").read_text())
    assert info["training"]["steps"] == 3 and info["training"]["molecules"] == 16
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    assert (out / "model.safetensors").is_file()


def test_train_bad_config_key_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lr": 1e-4, "batch_sise": 8}))
    for domain in ("molecules", "climate"):
        line = assert_error(["train", domain, "--config", cfg, "--out", tmp_path / "o"], capsys,
                            "batch_sise", str(cfg))
        if domain == "molecules":
            assert "did you mean 'batch_size'" in line
    assert_error(["train", "climate", "--config", tmp_path / "none.json", "--out", tmp_path / "o"], capsys,
                 "none.json", "not found")
    cfg.write_text('{"lr": 1e-4,\n "batch_size": }')
    assert_error(["train", "molecules", "--config", cfg, "--out", tmp_path / "o"], capsys,
                 "invalid JSON at line 2")
    assert not (tmp_path / "o").exists()  # nothing written before the config is valid


# ------------------------------------------------------------------------------------------------
# molecule error paths
def test_evaluate_error_paths(tmp_path, capsys):
    assert_error(["evaluate", "molecules", tmp_path / "nope.xyz"], capsys, "nope.xyz", "no such")
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\ncomment\nC 0 0 0\nH 1 0 zero\n")
    assert_error(["evaluate", "molecules", bad], capsys, "bad.xyz:4")  # the file and the line
    bad.write_text("3\ncomment\nC 0 0 0\nH 1 0 0\n")
    assert_error(["evaluate", "molecules", bad], capsys, "bad.xyz", "truncated")
    odd = tmp_path / "mols.txt"
    odd.write_text("whatever\n")
    assert_error(["evaluate", "molecules", odd], capsys, "mols.txt", "unknown molecule file type '.txt'")
    good = tmp_path / "h2.xyz"
    good.write_text("2\nH2\nH 0 0 0\nH 0 0 0.74\n")
    assert_error(["evaluate", "molecules", good, "--train-smiles", tmp_path / "none.smi"], capsys,
                 "none.smi")


def test_generate_error_paths(mol_model, tmp_path, capsys):
    assert_error(["generate", "molecules", "-n", "0", "-o", tmp_path / "x.sdf", "--checkpoint", mol_model],
                 capsys, "-n must be at least 1")
    assert_error(["generate", "molecules", "-n", "2", "-o", tmp_path / "x.sdf", "--checkpoint",
                  tmp_path / "missing"], capsys, "missing", "a molecule generator needs")
    assert_error(["generate", "molecules", "-n", "2", "-o", tmp_path / "x.sdf", "--checkpoint", mol_model,
                  "--sampler", "rk4", "--quiet"], capsys, "unknown sampler 'rk4'")
    assert_error(["generate", "molecules", "-n", "2", "-o", tmp_path / "x.sdf", "--checkpoint", mol_model,
                  "--nfe", "0", "--quiet"], capsys, "nfe=0")
    assert list(tmp_path.iterdir()) == []  # no partial output


@pytest.mark.parametrize("out, extra, words", [
    ("x.pdb", [], ["x.pdb", "'.pdb'", ".sdf"]),
    ("nodir/x.sdf", [], ["nodir", "does not exist"]),
    ("x.sdf", ["--png", "x.jpg"], ["x.jpg", "'.jpg'", ".png"]),
    ("x.sdf", ["--device", "gpu"], ["--device 'gpu'"]),
])
def test_generate_checks_outputs_before_sampling(mol_model, tmp_path, capsys, monkeypatch, out, extra,
                                                 words):
    """Bad output paths or devices fail at once, not after a long sampling run."""
    import sciddiff.molecules

    def never(*args, **kwargs):
        raise AssertionError("sampled despite a bad argument")

    monkeypatch.setattr(sciddiff.molecules, "sample_molecules", never)
    extra = [tmp_path / a if a.endswith(".jpg") else a for a in extra]
    assert_error(["generate", "molecules", "-n", "2", "-o", tmp_path / out, "--checkpoint", mol_model,
                  "--quiet", *extra], capsys, *words)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# climate: a tiny untrained Downscaler on a synthetic coarse NetCDF
@pytest.fixture(scope="module")
def downscaler_dir(tmp_path_factory):
    import torch

    from sciddiff.climate import Downscaler, DownscalerMeta, save_downscaler

    torch.manual_seed(0)
    meta = DownscalerMeta(variables=("t2m",), units=("K",), factor=4, mean=(280.0,), std=(4.0,),
                          residual_std=(0.5,), frequencies=(1.0, 4.0), nfe=3)
    unet = {"base": 8, "mults": [1], "blocks": 1}
    model = Downscaler(meta, unet, unet)
    with torch.no_grad():  # the zero-initialised output layers would make every member identical
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_downscaler(tmp_path_factory.mktemp("downscaler"), model)


ATTRS = {"units": "K", "long_name": "2 m temperature", "standard_name": "air_temperature"}


@pytest.fixture(scope="module")
def coarse_nc(tmp_path_factory):
    """A coarse t2m field (time 2, lat 4, lon 6) with CF attributes, as NetCDF."""
    import xarray as xr

    rng = np.random.default_rng(0)
    da = xr.DataArray(
        (280 + rng.normal(size=(2, 4, 6))).astype("float32"), dims=("time", "lat", "lon"), name="t2m",
        coords={"time": np.arange(2),
                "lat": ("lat", np.linspace(58.0, 55.0, 4), {"units": "degrees_north", "axis": "Y"}),
                "lon": ("lon", np.linspace(-10.0, -5.0, 6), {"units": "degrees_east"})},
        attrs=ATTRS,
    )
    path = tmp_path_factory.mktemp("coarse") / "coarse.nc"
    ds = da.to_dataset()
    ds.attrs["title"] = "synthetic"
    ds.to_netcdf(path)
    return path


def test_downscale_ensemble(downscaler_dir, coarse_nc, tmp_path, capsys):
    from sciddiff.climate import read_dataset

    out, png = tmp_path / "fine.nc", tmp_path / "p.png"
    rc, stdout, _ = run(["downscale", coarse_nc, "-o", out, "--var", "t2m", "--factor", "4", "--members", "3",
                         "--checkpoint", downscaler_dir, "--seed", "0", "--png", png, "--nfe", "2"], capsys)
    assert rc == 0 and str(out.resolve()) in stdout
    ds = read_dataset(out)
    fine = ds.t2m
    assert ds.attrs["title"] == "synthetic"
    assert fine.dims == ("time", "member", "lat", "lon") and fine.shape == (2, 3, 16, 24)
    for k, v in ATTRS.items():
        assert fine.attrs[k] == v
    assert fine.lat.attrs["units"] == "degrees_north" and fine.lon.attrs["units"] == "degrees_east"
    assert np.isfinite(fine.values).all() and float(fine.std("member").mean()) > 0
    # Near the coarse input: 4 x 4 block means within a few K (an untrained, barely perturbed model).
    coarse = read_dataset(coarse_nc).t2m
    blocks = fine.mean("member").coarsen(lat=4, lon=4).mean()
    assert float(abs(blocks.values - coarse.values).max()) < 5.0
    assert png.read_bytes()[:8] == PNG
    # The same seed reproduces the ensemble.
    again = tmp_path / "again.nc"
    assert run(["downscale", coarse_nc, "-o", again, "--var", "t2m", "--members", "3", "--checkpoint",
                downscaler_dir, "--seed", "0", "--nfe", "2", "--quiet"], capsys)[0] == 0
    np.testing.assert_array_equal(read_dataset(again).t2m.values, fine.values)


def test_downscale_regression(downscaler_dir, coarse_nc, tmp_path, capsys):
    from sciddiff.climate import read_dataset

    out, png = tmp_path / "reg.nc", tmp_path / "reg.png"
    rc, _, _ = run(["downscale", coarse_nc, "-o", out, "--var", "t2m", "--checkpoint", downscaler_dir,
                    "--mode", "regression", "--png", png, "--quiet"], capsys)
    assert rc == 0
    fine = read_dataset(out).t2m
    assert "member" not in fine.dims and fine.shape == (2, 16, 24) and fine.attrs["units"] == "K"
    assert png.read_bytes()[:8] == PNG


def test_downscale_error_paths(downscaler_dir, coarse_nc, tmp_path, capsys):
    base = ["-o", tmp_path / "o.nc", "--var", "t2m", "--checkpoint", downscaler_dir, "--quiet"]
    assert_error(["downscale", coarse_nc, *base[:-1], "--factor", "2"], capsys,
                 "factor=2 does not match the model's factor 4")
    assert_error(["downscale", tmp_path / "nope.nc", *base], capsys, "nope.nc")
    assert_error(["downscale", coarse_nc, *base[:4], "--checkpoint", tmp_path / "nomodel", "--quiet"], capsys,
                 "nomodel")
    assert_error(["downscale", coarse_nc, "-o", tmp_path / "o.nc", "--var", "tp", "--checkpoint",
                  downscaler_dir, "--quiet"], capsys, "tp")
    assert_error(["downscale", coarse_nc, *base, "--png", tmp_path / "map.jpg"], capsys, "'.jpg'")
    assert_error(["downscale", coarse_nc, *base, "--png", tmp_path / "no" / "map.png"], capsys,
                 "does not exist")
    assert not (tmp_path / "o.nc").exists()


# ------------------------------------------------------------------------------------------------
# help and the entry point
@pytest.mark.parametrize("argv, words", [
    (["--help"], ["generate", "evaluate", "train", "downscale", "bench", "demo"]),
    (["demo", "--help"], ["--out", "--molecules", "--members"]),
    (["generate", "molecules", "--help"], ["--checkpoint", "--nfe", "--png"]),
    (["downscale", "--help"], ["--factor", "--members", "--mode"]),
    (["train", "climate", "--help"], ["--config", "--max-steps"]),
])
def test_help_parses(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(w in out for w in words), out


def test_console_entry_point():
    """The installed ``sciddiff`` script where present, else ``python -m sciddiff``."""
    script = Path(sys.executable).with_name("sciddiff")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "sciddiff"]
    res = subprocess.run([*cmd, "evaluate", "molecules", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--train-smiles" in res.stdout
    res = subprocess.run([*cmd, "evaluate", "molecules", "/nonexistent/x.xyz"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("sciddiff: error: "), res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1

