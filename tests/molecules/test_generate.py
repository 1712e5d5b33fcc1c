"""Generation and plots: loading a generator, sampler choice and NFE, sizes, errors, SDF and PNG
output. The generators here are untrained tiny networks (no data needed): these tests check the
plumbing; ``test_train.py`` checks that a trained model samples sensibly."""

from __future__ import annotations

import json
import shutil
from typing import get_args

import numpy as np
import pytest
import torch

import sciddiff.molecules._generate as G
from sciddiff.core import EDM
from sciddiff.molecules._config import MoleculeTrainConfig
from sciddiff.molecules._generate import (
    GRIDS,
    SAMPLERS,
    GridName,
    SamplerName,
    generate,
    load_generator,
    make_grid,
    sample_molecules,
)
from sciddiff.molecules._plot import plot_molecules
from sciddiff.molecules._train import build_network, build_process, molecule_info
from sciddiff.molecules._types import Molecule
from sciddiff.training import DiffusionModule, save_checkpoint


def _make_generator(directory, process="vp", sampler="dpmpp_2m", nfe=8):
    """An untrained tiny EGNN saved as a generator directory (checkpoint + molecule.json)."""
    cfg = MoleculeTrainConfig(backbone_kwargs={"hidden": 8, "layers": 1}, process=process,
                              sigma_data=1.0 if process == "edm" else None, sampler=sampler, nfe=nfe)
    torch.manual_seed(0)
    proc = build_process(cfg)
    module = DiffusionModule(build_network(cfg, proc), proc, cfg.resolved_param, ema_decay=0.9)
    save_checkpoint(directory, module)
    (directory / "molecule.json").write_text(json.dumps(molecule_info(cfg, [4, 5, 5, 6, 6, 6])))
    return directory


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    return _make_generator(tmp_path_factory.mktemp("gen"))


def test_tables_match_the_literals():
    assert set(SAMPLERS) == set(get_args(SamplerName))
    assert set(GRIDS) | {"default"} == set(get_args(GridName))


def test_default_grid_is_karras_for_edm():
    p = EDM()
    torch.testing.assert_close(make_grid(p, 6).sigma, G.S.edm_rho(p, 6).sigma)
    with pytest.raises(ValueError, match="unknown grid 'cosine'"):
        make_grid(p, 6, "cosine")


@pytest.mark.parametrize("sampler, nfe", [("dpmpp_2m", 7), ("heun", 7), ("unipc", 5), ("flow_midpoint", 6),
                                          ("pc_langevin", 5)])
def test_nfe_is_the_number_of_model_calls(gen_dir, sampler, nfe):
    gen = load_generator(gen_dir)
    if sampler == "flow_midpoint":  # flow samplers need a process that reaches sigma = 0
        gen = load_generator(_make_generator(gen_dir.parent / "flowgen", "flow"))
    before = gen.model.nfe
    mols = sample_molecules(3, checkpoint=gen, sampler=sampler, nfe=nfe, seed=0, num_atoms=5)
    assert gen.model.nfe - before == nfe
    assert [len(m) for m in mols] == [5, 5, 5]


def test_sizes_seeds_and_defaults(gen_dir):
    gen = load_generator(gen_dir)
    assert load_generator(gen_dir) is gen  # cached
    drawn = sample_molecules(30, checkpoint=gen, seed=3)
    assert {len(m) for m in drawn} <= {4, 5, 6} and len({len(m) for m in drawn}) > 1
    again = sample_molecules(30, checkpoint=gen_dir, seed=3)
    for a, b in zip(drawn, again, strict=True):
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.positions, b.positions)
    other = sample_molecules(30, checkpoint=gen, seed=4)
    assert any(not np.array_equal(a.positions, b.positions) for a, b in zip(drawn, other, strict=False))
    noisy = [sample_molecules(2, checkpoint=gen, sampler="ddpm", nfe=4, seed=9, num_atoms=[3, 7])
             for _ in range(2)]
    np.testing.assert_array_equal(noisy[0][1].positions, noisy[1][1].positions)  # stochastic, seeded
    assert [len(m) for m in noisy[0]] == [3, 7]


def test_a_learned_grid_drives_sample_molecules(gen_dir):
    """``learn_grid`` on the molecule State (two flat fields, zero CoM) and its grid passed on."""
    from sciddiff.molecules._convert import prior_state
    from sciddiff.samplers import learn_grid

    gen = load_generator(gen_dir)
    x = prior_state(torch.tensor([5, 4, 6]), gen.model.process, torch.Generator().manual_seed(0))
    learned = learn_grid(gen.model, x, steps=4, iters=3)
    assert learned.grid.steps == 4 and len(learned.losses) == 4
    before = gen.model.nfe
    mols = sample_molecules(3, checkpoint=gen, sampler="unipc", nfe=4, grid=learned.grid, seed=0,
                            num_atoms=5)
    assert gen.model.nfe - before == 4 and [len(m) for m in mols] == [5, 5, 5]
    with pytest.raises(ValueError, match="the grid has 4 steps; 'unipc' at nfe=6 takes 6"):
        sample_molecules(2, checkpoint=gen, sampler="unipc", nfe=6, grid=learned.grid)


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n must be a positive integer"),
    ({"sampler": "rk4"}, "unknown sampler 'rk4'"),
    ({"sampler": "flow_midpoint", "nfe": 1}, "nfe=1 is too small for 'flow_midpoint'"),
    ({"num_atoms": [3, 4]}, "num_atoms must be None, an int or 3 ints"),
    ({"num_atoms": 0}, "needs >= 1 atom"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"sampler": "flow_euler"}, "does not reach at t_min"),  # the engine's own check, passed through
])
def test_bad_arguments(gen_dir, kwargs, match):
    kw = {"n": 3, "checkpoint": gen_dir, "nfe": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_molecules(kw.pop("n"), **kw)


def test_missing_and_broken_generators(tmp_path, gen_dir, monkeypatch):
    monkeypatch.setattr(G, "DEFAULT_CHECKPOINT", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"none: the bundled QM9 checkpoint.*train_molecules"):
        load_generator()
    with pytest.raises(FileNotFoundError, match="a molecule generator"):
        sample_molecules(2, checkpoint=tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(gen_dir, broken)
    info = json.loads((broken / "molecule.json").read_text())
    (broken / "molecule.json").write_text(json.dumps({**info, "h_scale": -1}))
    with pytest.raises(ValueError, match=r"broken/molecule\.json: key 'h_scale'"):
        load_generator(broken)
    (broken / "molecule.json").write_text(json.dumps({**info, "num_atoms": {"sizes": [3]}}))
    with pytest.raises(ValueError, match=r"molecule\.json: key 'num_atoms'"):
        load_generator(broken)
    (broken / "molecule.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"molecule\.json: invalid JSON at line 1"):
        load_generator(broken)


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_every_process_samples(tmp_path, process):
    d = _make_generator(tmp_path, process)
    mols = sample_molecules(4, checkpoint=d, nfe=4, seed=0, num_atoms=[2, 3, 4, 5])
    for m, n in zip(mols, [2, 3, 4, 5], strict=True):
        assert len(m) == n and np.isfinite(m.positions).all()
        assert np.abs(m.positions.mean(0)).max() < 1e-4


def test_generate_writes_a_readable_sdf(gen_dir, tmp_path):
    from rdkit import Chem

    from sciddiff.molecules._io import read_sdf

    out = tmp_path / "gen.sdf"
    mols = generate(5, checkpoint=gen_dir, nfe=4, seed=0, num_atoms=[3, 4, 5, 6, 7], out=out)
    assert [m.GetNumAtoms() for m in mols] == [3, 4, 5, 6, 7]
    assert all(m.GetNumConformers() == 1 and m.HasProp("sanitized") for m in mols)
    back = read_sdf(out)
    assert [len(m) for m in back] == [3, 4, 5, 6, 7]
    ref = sample_molecules(5, checkpoint=gen_dir, nfe=4, seed=0, num_atoms=[3, 4, 5, 6, 7])
    for a, b in zip(back, ref, strict=True):
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)  # SDF keeps 4 decimals
    assert len([m for m in Chem.SDMolSupplier(str(out), removeHs=False, sanitize=False)]) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["gen.sdf"]  # no temporary file left behind


def test_generate_sanitizes_valid_molecules(monkeypatch):
    """A sane geometry comes back sanitized, with EDM's bond orders; an impossible one does not."""
    from rdkit import Chem

    hcn = Molecule([1, 6, 7], [[-1.066, 0, 0], [0, 0, 0], [1.156, 0, 0]])
    h3o = Molecule([8, 1, 1, 1], [[0, 0, 0], [0.95, 0, 0], [-0.475, 0.823, 0], [-0.475, -0.823, 0]])
    monkeypatch.setattr(G, "sample_molecules", lambda n, **kw: [hcn, h3o])
    mols = generate(2)
    assert mols[0].GetIntProp("sanitized") == 1
    assert mols[0].GetBondBetweenAtoms(1, 2).GetBondType() == Chem.BondType.TRIPLE
    assert mols[1].GetIntProp("sanitized") == 0  # O with three bonds: RDKit refuses it
    assert Chem.MolToSmiles(Chem.RemoveHs(mols[0])) == "C#N"


def test_plot_molecules(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    rd = Chem.AddHs(Chem.MolFromSmiles("CC(=O)O"))
    AllChem.EmbedMolecule(rd, randomSeed=1)
    odd = Molecule([8, 8, 8], [[0, 0, 0], [0.5, 0, 0], [5, 5, 5]])  # not a sane molecule: still drawn
    path = plot_molecules([rd, odd, rd], tmp_path / "m.png", n2d=3, n3d=2)
    data = path.read_bytes()
    assert path == tmp_path / "m.png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]
    with pytest.raises(ValueError, match=r"m\.jpg: the output is a PNG"):
        plot_molecules([rd], tmp_path / "m.jpg")
    with pytest.raises(ValueError, match="not both 0"):
        plot_molecules([rd], tmp_path / "x.png", n2d=0, n3d=0)
    with pytest.raises(ValueError, match="molecule 0 .* has no conformer"):
        plot_molecules([Chem.MolFromSmiles("CC")], tmp_path / "x.png")
    with pytest.raises(TypeError, match="item 0 is a str"):
        plot_molecules(["CCO"], tmp_path / "x.png")
