"""Molecules <-> State, RDKit and ASE conversions, the atom-count histogram and the noise prior."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sciddiff.core import EDM, VP, LinearInterpolant, ZeroCoM
from sciddiff.molecules._convert import (
    NumAtomsDistribution,
    from_ase,
    from_rdkit,
    molecules_to_state,
    prior_state,
    state_to_molecules,
    to_ase,
)
from sciddiff.molecules._types import Molecule

Chem = pytest.importorskip("rdkit.Chem")
AllChem = pytest.importorskip("rdkit.Chem.AllChem")


def _embedded(smiles: str, name: str = "") -> Chem.Mol:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=7) == 0
    if name:
        mol.SetProp("_Name", name)
    return mol


def _molecules() -> list[Molecule]:
    """Three small molecules of different sizes with non-zero centroids (built by hand)."""
    rng = np.random.default_rng(0)
    water = Molecule([8, 1, 1], [[0.0, 0.0, 0.1], [0.76, 0.0, -0.5], [-0.76, 0.0, -0.5]], name="water")
    hcn = Molecule([1, 6, 7], [[5.0, 1.0, 0.0], [6.07, 1.0, 0.0], [7.22, 1.0, 0.0]], name="HCN")
    blob = Molecule([6, 9, 1, 1, 6, 8, 7], rng.normal(3.0, 1.5, (7, 3)), charges=[0, 0, 0, 0, 0, -1, 1])
    return [water, hcn, blob]


# ------------------------------------------------------------------------------------------------
# molecules -> State -> molecules
def test_molecules_to_state_layout(dtype):
    mols = _molecules()
    s = molecules_to_state(mols, dtype=dtype)
    n = sum(len(m) for m in mols)
    assert set(s.keys()) == {"pos", "h"} and s.num_systems == 3
    assert s["pos"].shape == (n, 3) and s["h"].shape == (n, 5)
    assert s["pos"].dtype == dtype and s["h"].dtype == dtype
    assert isinstance(s.constraint("pos"), ZeroCoM)
    assert s.batch["pos"] is s.batch["h"]  # one shared index tensor
    assert s.batch["pos"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    # one-hot in EDM's order H, C, N, O, F; independent lookup
    order = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}
    expect_h = np.zeros((n, 5))
    for row, z in enumerate(np.concatenate([m.numbers for m in mols])):
        expect_h[row, order[int(z)]] = 1.0
    np.testing.assert_array_equal(s["h"].double().numpy(), expect_h)
    # positions: each molecule minus its own centroid
    expect_pos = np.concatenate([m.positions - m.positions.mean(0) for m in mols])
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(s["pos"].double().numpy(), expect_pos, rtol=0, atol=atol)
    com = torch.zeros(3, 3, dtype=dtype).index_add_(0, s.batch["pos"], s["pos"])
    torch.testing.assert_close(com, torch.zeros_like(com), rtol=0, atol=10 * atol)
    # degrees of freedom: 3 (N_b - 1) for zero-CoM positions + 5 N_b for types
    assert s.dof().tolist() == [3 * (k - 1) + 5 * k for k in (3, 3, 7)]


def test_round_trip_molecule_state_molecule(dtype):
    mols = _molecules()
    back = state_to_molecules(molecules_to_state(mols, dtype=dtype, charges=True))
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    assert len(back) == len(mols)
    for m, b in zip(mols, back, strict=True):
        np.testing.assert_array_equal(b.numbers, m.numbers)
        np.testing.assert_allclose(b.positions, m.positions - m.positions.mean(0), rtol=0, atol=atol)
        expect_q = m.charges if m.charges is not None else np.zeros(len(m), dtype=np.int64)
        np.testing.assert_array_equal(b.charges, expect_q)
        assert b.positions.dtype == np.float64 and b.numbers.dtype == np.int64


def test_charges_field_optional():
    s = molecules_to_state(_molecules(), charges=True)
    assert s["charge"].shape == (13, 1) and s.batch["charge"] is s.batch["pos"]
    assert s["charge"][:, 0].tolist() == [0] * 6 + [0, 0, 0, 0, 0, -1, 1]
    no = state_to_molecules(molecules_to_state(_molecules()))
    assert all(m.charges is None for m in no)


def test_state_to_molecules_decodes_scaled_noisy_types_and_shuffled_rows(gen):
    mols = _molecules()
    s = molecules_to_state(mols, dtype=torch.float64)
    noisy = 0.25 * s["h"] + 0.05 * torch.randn(s["h"].shape, generator=gen, dtype=torch.float64)
    perm = torch.randperm(s["pos"].shape[0], generator=gen)
    batch = s.batch["pos"][perm]
    from sciddiff.core import State

    shuffled = State({"pos": s["pos"][perm], "h": noisy[perm]}, batch={"pos": batch, "h": batch})
    back = state_to_molecules(shuffled, scale_h=0.25)
    for i, b in enumerate(back):
        # rows of one molecule keep their relative order (stable grouping)
        keep = np.flatnonzero(batch.numpy() == i)
        rows = perm.numpy()[keep]
        np.testing.assert_array_equal(b.numbers, np.concatenate([x.numbers for x in mols])[rows])
        np.testing.assert_allclose(b.positions, s["pos"].numpy()[rows], rtol=0, atol=0)


def test_unknown_element_names_molecule_and_element():
    mols = _molecules() + [Molecule([6, 16, 1], np.zeros((3, 3)), name="thio")]
    with pytest.raises(ValueError, match=r"molecule 3 \('thio'\): element S \(atom 1\)"):
        molecules_to_state(mols)
    with pytest.raises(ValueError, match=r"molecule 0: element Cl"):
        molecules_to_state([Molecule([17], np.zeros((1, 3)))])


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([], ValueError, "no molecules"),
        ([Molecule(np.zeros(0), np.zeros((0, 3)))], ValueError, "molecule 0 has no atoms"),
        (["CCO"], TypeError, "item 0 is a str"),
    ],
)
def test_molecules_to_state_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        molecules_to_state(bad)
    with pytest.raises(TypeError, match="floating"):
        molecules_to_state(_molecules(), dtype=torch.int64)


def test_state_to_molecules_bad_input():
    s = molecules_to_state(_molecules())
    with pytest.raises(ValueError, match="scale_h must be a positive"):
        state_to_molecules(s, scale_h=0.0)
    from sciddiff.core import State

    with pytest.raises(ValueError, match="flat field 'h'"):
        state_to_molecules(State({"pos": s["pos"]}, batch={"pos": s.batch["pos"]}))
    bad = s.replace(pos=torch.where(s.batch["pos"][:, None] == 1, float("nan"), s["pos"]))
    with pytest.raises(ValueError, match="system 1 has non-finite positions"):
        state_to_molecules(bad)


# ------------------------------------------------------------------------------------------------
# RDKit and ASE
def test_from_rdkit_matches_conformer_and_keeps_charges():
    mol = _embedded("CC(=O)[O-]", name="acetate")
    m = from_rdkit(mol)
    assert m.name == "acetate" and len(m) == mol.GetNumAtoms() == 7
    np.testing.assert_array_equal(m.numbers, [a.GetAtomicNum() for a in mol.GetAtoms()])
    np.testing.assert_array_equal(m.positions, mol.GetConformer().GetPositions())
    assert m.charges.tolist() == [0, 0, 0, -1, 0, 0, 0]


def test_from_rdkit_errors():
    with pytest.raises(ValueError, match="no conformer"):
        from_rdkit(Chem.MolFromSmiles("CCO"))
    flat = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(flat)
    with pytest.raises(ValueError, match="2D"):
        from_rdkit(flat)
    dummy = Chem.MolFromSmiles("*C")
    AllChem.Compute2DCoords(dummy)
    dummy.GetConformer().Set3D(True)
    with pytest.raises(ValueError, match=r"atom 0 is '\*'"):
        from_rdkit(dummy)
    with pytest.raises(TypeError, match="rdkit"):
        from_rdkit("CCO")


def test_ase_round_trip_g2():
    from ase.collections import g2

    for name in ("CH3CH2OH", "C6H6", "HCN", "CH3COF"):
        atoms = g2[name]
        m = from_ase(atoms)
        np.testing.assert_array_equal(m.numbers, atoms.numbers)
        np.testing.assert_array_equal(m.positions, atoms.positions)
        back = to_ase(m)
        np.testing.assert_array_equal(back.numbers, atoms.numbers)
        np.testing.assert_array_equal(back.positions, atoms.positions)
        assert not back.pbc.any()


def test_ase_round_trip_charges_name_properties():
    m = _molecules()[2]
    m.name, m.properties = "blob", {"energy": -1.5}
    atoms = to_ase(m)
    assert atoms.info == {"energy": -1.5, "name": "blob"}
    back = from_ase(atoms)
    np.testing.assert_array_equal(back.charges, m.charges)
    np.testing.assert_array_equal(back.positions, m.positions)
    assert back.name == "blob" and back.properties == {"energy": -1.5}


def test_from_ase_errors():
    import ase

    with pytest.raises(ValueError, match="periodic"):
        from_ase(ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]], cell=[5, 5, 5], pbc=True))
    with pytest.raises(ValueError, match="not integers"):
        from_ase(ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]], charges=[0.3, -0.3]))
    with pytest.raises(ValueError, match="atom 1 has Z=53"):
        from_ase(ase.Atoms("HI", positions=[[0, 0, 0], [0, 0, 1.6]]))


# ------------------------------------------------------------------------------------------------
# atom-count histogram
def test_num_atoms_distribution_histogram_and_json():
    counts = [9, 9, 18, 18, 18, 27, 5]
    d = NumAtomsDistribution(counts)
    assert d.sizes.tolist() == [5, 9, 18, 27] and d.frequencies.tolist() == [1, 2, 3, 1]
    torch.testing.assert_close(d.probs, torch.tensor([1, 2, 3, 1], dtype=torch.float64) / 7)
    assert d.max_atoms == 27 and math.isclose(d.mean, sum(counts) / 7)
    again = NumAtomsDistribution.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again == d and again != NumAtomsDistribution([9])
    assert NumAtomsDistribution(torch.tensor(counts)) == d == NumAtomsDistribution(np.array(counts))
    lp = d.log_prob(torch.tensor([9, 10, 27, 100, 0]))
    torch.testing.assert_close(lp[[0, 2]], torch.tensor([2 / 7, 1 / 7], dtype=torch.float64).log())
    assert torch.isneginf(lp[[1, 3, 4]]).all()


def test_num_atoms_distribution_sample_frequencies():
    d = NumAtomsDistribution([3] * 10 + [7] * 30 + [12] * 60)
    s1 = d.sample(20000, torch.Generator().manual_seed(1))
    s2 = d.sample(20000, torch.Generator().manual_seed(1))
    assert s1.dtype == torch.long and s1.shape == (20000,) and torch.equal(s1, s2)
    assert set(s1.unique().tolist()) == {3, 7, 12}
    freq = torch.tensor([(s1 == k).double().mean().item() for k in (3, 7, 12)], dtype=torch.float64)
    # binomial standard error at n=20000 is <= 0.0035; 0.015 is over 4 of them
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64), rtol=0, atol=0.015)
    assert d.sample(0).shape == (0,)


@pytest.mark.parametrize(
    "bad, match",
    [([], "non-empty"), ([3, 0], ">= 1"), ([2.5], "integers"), ([[1, 2]], "1-D")],
)
def test_num_atoms_distribution_bad_counts(bad, match):
    with pytest.raises(ValueError, match=match):
        NumAtomsDistribution(bad)


def test_num_atoms_distribution_bad_dict():
    with pytest.raises(ValueError, match="expected keys"):
        NumAtomsDistribution.from_dict({"sizes": [1]})
    with pytest.raises(ValueError, match="as many as"):
        NumAtomsDistribution.from_dict({"sizes": [1, 2], "frequencies": [3]})
    with pytest.raises(ValueError, match="sizes >= 1"):
        NumAtomsDistribution.from_dict({"sizes": [0], "frequencies": [3]})


# ------------------------------------------------------------------------------------------------
# noise prior
@pytest.mark.parametrize("process", [VP("cosine"), EDM(), LinearInterpolant()], ids=["vp", "edm", "flow"])
def test_prior_state_layout_and_scale(process, dtype):
    sizes = torch.randint(5, 30, (400,), generator=torch.Generator().manual_seed(2))
    s = prior_state(sizes, process, torch.Generator().manual_seed(3), dtype)
    n, b = int(sizes.sum()), 400
    assert s["pos"].shape == (n, 3) and s["h"].shape == (n, 5) and s.num_systems == b
    assert s["pos"].dtype == dtype and isinstance(s.constraint("pos"), ZeroCoM)
    assert torch.equal(s.sizes("pos"), sizes) and torch.equal(s.batch["h"], s.batch["pos"])
    com = torch.zeros(b, 3, dtype=torch.float64).index_add_(0, s.batch["pos"], s["pos"].double())
    assert com.abs().max() < (1e-3 if dtype == torch.float32 else 1e-10) * process.t_max
    # variance: N(0, scale^2) with scale = hypot(alpha, sigma) at t_max (sigma alone when VE);
    # the zero-CoM subspace has 3 (N_b - 1) dimensions per molecule
    t = torch.tensor(process.t_max, dtype=torch.float64)
    a, sg = float(process.alpha(t)), float(process.sigma(t))
    scale2 = sg**2 if process.variance_exploding else a**2 + sg**2
    var_pos = s["pos"].double().square().sum() / (3 * (n - b))
    var_h = s["h"].double().square().mean()
    for v in (var_pos, var_h):  # ~2e4 to 3e4 dof: relative standard error below 1 %
        assert abs(float(v) / scale2 - 1) < 0.04


def test_prior_state_reproducible_and_charges():
    sizes = torch.tensor([3, 1, 9])
    a = prior_state(sizes, VP(), torch.Generator().manual_seed(0), charges=True)
    b = prior_state(sizes, VP(), torch.Generator().manual_seed(0), charges=True)
    assert set(a.keys()) == {"pos", "h", "charge"} and a["charge"].shape == (13, 1)
    for k in a.keys():
        assert torch.equal(a[k], b[k])
    assert torch.equal(a["pos"][3], torch.zeros(3))  # a one-atom molecule sits at its centroid
    decoded = state_to_molecules(a)
    assert [len(m) for m in decoded] == [3, 1, 9]


@pytest.mark.parametrize(
    "sizes, match",
    [
        (torch.tensor([3.0, 4.0]), "integer"),
        (torch.tensor([[3, 4]]), "1-D"),
        (torch.tensor([3, 0]), ">= 1 atom"),
        (torch.zeros(0, dtype=torch.long), "at least one"),
    ],
)
def test_prior_state_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        prior_state(sizes, VP())


# ------------------------------------------------------------------------------------------------
def test_domain_libraries_are_imported_lazily():
    """RDKit and ASE must not be imported at module level (only inside functions)."""
    here = Path(__file__).resolve().parents[2] / "sciddiff" / "molecules"
    for name in ("_convert.py", "_io.py"):
        tree = ast.parse((here / name).read_text())
        top = []
        for node in tree.body:
            if isinstance(node, ast.Import):
                top += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                top.append(node.module)
        assert top, name
        assert not [m for m in top if m.split(".")[0] in ("rdkit", "ase")], (name, top)
