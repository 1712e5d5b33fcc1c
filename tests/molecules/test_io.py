"""Molecule files: XYZ and SDF round trips, ASE interoperability, clear errors for malformed files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from sciddiff.molecules._convert import from_rdkit
from sciddiff.molecules._io import (
    MoleculeFileError,
    _atomic_write,
    read_molecules,
    read_sdf,
    read_xyz,
    write_sdf,
    write_xyz,
)
from sciddiff.molecules._types import Molecule

Chem = pytest.importorskip("rdkit.Chem")
AllChem = pytest.importorskip("rdkit.Chem.AllChem")
ase_io = pytest.importorskip("ase.io")

# the shared read-only data sit beside the project root (../shared/data)
_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GSCHNET = _DATA / "qm9_peer_samples" / "gschnet_qm9_samples.xyz"


def _embedded(smiles: str, name: str) -> Chem.Mol:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=11) == 0
    mol.SetProp("_Name", name)
    return mol


@pytest.fixture(scope="module")
def rd_mols() -> list[Chem.Mol]:
    return [
        _embedded("CCO", "ethanol"),
        _embedded("CC(=O)[O-]", "acetate"),
        _embedded("C[NH3+]", "methylammonium"),
        _embedded("FC#N", "cyanogen fluoride"),
    ]


@pytest.fixture(scope="module")
def mols(rd_mols) -> list[Molecule]:
    return [from_rdkit(m) for m in rd_mols]


def _same_atoms(a: Molecule, b: Molecule, atol: float) -> None:
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=atol)


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# XYZ
def test_xyz_round_trip_and_ase_reads_it(tmp_path, mols):
    path = tmp_path / "m.xyz"
    write_xyz(path, mols)
    back = read_xyz(path)
    assert [m.name for m in back] == ["ethanol", "acetate", "methylammonium", "cyanogen fluoride"]
    for a, b in zip(mols, back, strict=True):
        _same_atoms(a, b, atol=1e-8)
    frames = ase_io.read(path, index=":")
    assert len(frames) == len(mols)
    for a, f in zip(mols, frames, strict=True):
        np.testing.assert_array_equal(f.numbers, a.numbers)
        np.testing.assert_allclose(f.positions, a.positions, rtol=0, atol=1e-8)
    assert _no_temp_files(tmp_path)


def test_xyz_single_molecule_and_overwrite(tmp_path, mols):
    path = tmp_path / "one.xyz"
    write_xyz(path, mols)
    write_xyz(path, mols[1])  # replaces the file
    (back,) = read_xyz(path)
    _same_atoms(back, mols[1], atol=1e-8)


def test_xyz_reader_tolerates_common_variants(tmp_path):
    text = (
        "\n"  # leading blank line
        "3\n"
        "Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\n"
        "O 0.0 0.0 0.1 9.0 9.0 9.0\n"  # extended-XYZ extra columns are ignored
        "h 0.76 0.0 -0.5 9.0 9.0 9.0\n"  # lower-case symbol
        "1 -0.76 0.0 -0.5 9.0 9.0 9.0\n"  # atomic number instead of a symbol
        "  2  \n"
        "\n"  # empty comment line
        "CL 0 0 0\n"
        "Cl 0 0 1.99e0\n"
        "\n\n"  # trailing blank lines
    )
    path = tmp_path / "v.xyz"
    path.write_text(text)
    water, cl2 = read_xyz(path)
    assert water.numbers.tolist() == [8, 1, 1] and cl2.numbers.tolist() == [17, 17]
    np.testing.assert_array_equal(water.positions[:, 0], [0.0, 0.76, -0.76])
    assert cl2.positions[1, 2] == 1.99 and cl2.name == ""
    assert water.name.startswith("Properties=species")


@pytest.mark.parametrize(
    "text, match",
    [
        ("three\ncomment\nC 0 0 0\n", r"bad\.xyz:1: frame 0: expected an atom count.*'three'"),
        ("-2\ncomment\n", r"bad\.xyz:1: frame 0: expected an atom count.*'-2'"),
        ("1\nok\nC 0 0 0\n2.5\nx\nC 0 0 0\n", r"bad\.xyz:4: frame 1: expected an atom count.*'2\.5'"),
        ("3\ncomment\nC 0 0 0\nH 0 0 1\n", r"bad\.xyz:4: frame 0 is truncated.*line 1\) declares 3 atoms"),
        ("3\ncomment\nC 0 0 0\n1\nx\nH 0 0 0\n", r"bad\.xyz:4: expected 'El x y z', got '1'.*truncated"),
        ("2\ncomment\nC 0 0 0\nH 0 zero 1\n", r"bad\.xyz:4: non-numeric coordinate 'zero'"),
        ("2\ncomment\nC 0 0 0\nH 0 nan 1\n", r"bad\.xyz:4: coordinate 'nan' is not finite"),
        ("2\ncomment\nC 0 0 0\nH 0 0 -inf\n", r"bad\.xyz:4: coordinate '-inf' is not finite"),
        ("2\ncomment\nC 0 0 0\nXx 0 0 1\n", r"bad\.xyz:4: unknown element 'Xx'"),
        ("1\ncomment\n0 0 0 1\n", r"bad\.xyz:3: unknown element: atomic number 0"),
        ("1\ncomment\nC 0 0\n", r"bad\.xyz:3: expected 'El x y z', got 'C 0 0'"),
        ("\n\n", r"bad\.xyz: no molecules found"),
    ],
    ids=[
        "count-word", "count-negative", "count-second-frame", "truncated-at-eof", "truncated-mid-file",
        "non-numeric", "nan", "inf", "unknown-element", "atomic-number-0", "short-line", "empty",
    ],
)
def test_xyz_errors_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "bad.xyz"
    path.write_text(text)
    with pytest.raises(MoleculeFileError, match=match):
        read_xyz(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.xyz: no such molecule file"):
        read_xyz(tmp_path / "nope.xyz")
    (tmp_path / "bin.xyz").write_bytes(b"3\n\xff\xfe\x00\n")
    with pytest.raises(MoleculeFileError, match=r"bin\.xyz: not a text file"):
        read_xyz(tmp_path / "bin.xyz")


def test_write_xyz_bad_input_leaves_existing_file(tmp_path, mols):
    path = tmp_path / "keep.xyz"
    write_xyz(path, mols[:1])
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"write_xyz: item 1 is a str"):
        write_xyz(path, [mols[0], "CCO"])
    with pytest.raises(ValueError, match="no molecules"):
        write_xyz(path, [])
    with pytest.raises(ValueError, match=r"write_xyz: molecule 0 \('HI'\): unknown atomic number 53"):
        write_xyz(path, Molecule([1, 53], [[0, 0, 0], [0, 0, 1.6]], name="HI"))
    assert path.read_bytes() == before and _no_temp_files(tmp_path)


def test_atomic_write_failure_keeps_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and _no_temp_files(tmp_path)


@pytest.mark.skipif(not GSCHNET.is_file(), reason=f"G-SchNet samples not found at {GSCHNET}")
def test_read_gschnet_samples():
    mols = read_xyz(GSCHNET)
    assert len(mols) == 10_000
    # every line of the file is a count, a comment or an atom line
    n_lines = sum(1 for line in GSCHNET.read_text().splitlines() if line.strip())
    assert sum(len(m) + 2 for m in mols) == n_lines
    first = mols[0]
    assert first.name == "G-SchNet sample 0" and len(first) == 35
    assert first.symbols[:5] == ["C", "C", "C", "C", "O"]
    np.testing.assert_array_equal(first.positions[0], [2.8, 0.05, -1.349999])
    assert set(np.concatenate([m.numbers for m in mols]).tolist()) <= {1, 6, 7, 8, 9}


# ------------------------------------------------------------------------------------------------
# SDF
def test_sdf_round_trip_rdkit_mols_keeps_charges(tmp_path, rd_mols, mols):
    path = tmp_path / "rd.sdf"
    write_sdf(path, rd_mols)
    back = read_sdf(path)
    assert [m.name for m in back] == [m.name for m in mols]
    for a, b in zip(mols, back, strict=True):
        _same_atoms(a, b, atol=1e-4)
        np.testing.assert_array_equal(a.charges, b.charges)
    assert back[1].charges.tolist() == [0, 0, 0, -1, 0, 0, 0] and back[2].charges[1] == 1
    # the RDKit Mols are written as they are: bonds survive
    again = Chem.SDMolSupplier(str(path), removeHs=False)
    assert [Chem.MolToSmiles(Chem.RemoveHs(m)) for m in again] == ["CCO", "CC(=O)[O-]", "C[NH3+]", "N#CF"]
    assert _no_temp_files(tmp_path)


def test_sdf_round_trip_molecules_with_inferred_bonds(tmp_path, mols):
    src = [Molecule(m.numbers, m.positions, m.charges, m.name, dict(m.properties)) for m in mols]
    src[0].properties = {"energy": -1.5, "source": "ETKDG", "index": 3}
    path = tmp_path / "m.sdf"
    write_sdf(path, src)
    back = read_sdf(path)
    for a, b in zip(src, back, strict=True):
        _same_atoms(a, b, atol=1e-4)
        assert b.name == a.name
        np.testing.assert_array_equal(a.charges, b.charges)
    assert back[0].properties == {"energy": -1.5, "source": "ETKDG", "index": 3}
    # bonds come from EDM's distance rules: ETKDG geometries give the chemical graph back
    sup = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False)
    assert [m.GetNumBonds() for m in sup] == [8, 6, 7, 2]
    frames = ase_io.read(path, index=":")  # ASE's SDF reader returns the first record only
    np.testing.assert_array_equal(frames[0].numbers, src[0].numbers)
    np.testing.assert_allclose(frames[0].positions, src[0].positions, rtol=0, atol=1e-4)


def test_sdf_rdkit_round_trip_through_molecule(rd_mols):
    """RDKit -> Molecule -> RDKit (EDM bonds) -> Molecule keeps atoms, positions and charges."""
    from sciddiff.molecules._bonds import to_rdkit

    for rd in rd_mols:
        m = from_rdkit(rd)
        again = from_rdkit(to_rdkit(m))
        _same_atoms(m, again, atol=1e-12)
        assert again.name == m.name


def test_read_molecules_dispatches_on_suffix(tmp_path, mols, rd_mols):
    write_xyz(tmp_path / "a.XYZ", mols[:2])
    block = Chem.MolToMolBlock(rd_mols[0])
    (tmp_path / "b.mol").write_text(block)
    write_sdf(tmp_path / "c.sdf", mols[:3])
    assert [len(read_molecules(tmp_path / n)) for n in ("a.XYZ", "b.mol", "c.sdf")] == [2, 1, 3]
    _same_atoms(read_molecules(tmp_path / "b.mol")[0], mols[0], atol=1e-4)
    (tmp_path / "d.pdb").write_text("HETATM\n")
    with pytest.raises(MoleculeFileError, match=r"d\.pdb: unknown molecule file type '\.pdb'"):
        read_molecules(tmp_path / "d.pdb")


def _sdf_with_broken_record(tmp_path, rd_mols, broken: str) -> Path:
    records = []
    for m in rd_mols[:3]:
        records.append(Chem.MolToMolBlock(m) + "$$$$\n")
    records[1] = broken
    path = tmp_path / "broken.sdf"
    path.write_text("".join(records))
    return path


@pytest.mark.parametrize(
    "kind",
    ["bad-coordinate", "short-garbage", "bad-counts"],
)
def test_sdf_unparseable_record_named_or_skipped(tmp_path, rd_mols, kind):
    block = Chem.MolToMolBlock(rd_mols[1]).splitlines()
    if kind == "bad-coordinate":
        block[4] = "       abc" + block[4][10:]
        broken = "\n".join(block) + "\n$$$$\n"
    elif kind == "short-garbage":
        broken = "this is\nnot an SD record\n$$$$\n"
    else:
        block[3] = "xx" + block[3][2:]
        broken = "\n".join(block) + "\n$$$$\n"
    path = _sdf_with_broken_record(tmp_path, rd_mols, broken)
    line = len(Chem.MolToMolBlock(rd_mols[0]).splitlines()) + 2
    expect = rf"broken\.sdf: record 1 \(line {line}\): RDKit cannot parse"
    with pytest.raises(MoleculeFileError, match=expect):
        read_sdf(path)
    with pytest.warns(UserWarning, match=r"record 1 .*skipped"):
        kept = read_sdf(path, skip_invalid=True)
    assert [m.name for m in kept] == ["ethanol", "methylammonium"]


def test_sdf_garbage_file_and_2d_record(tmp_path, rd_mols):
    (tmp_path / "g.sdf").write_text("hello world\n")
    with pytest.raises(MoleculeFileError, match=r"g\.sdf: record 0 \(line 1\): RDKit cannot parse"):
        read_sdf(tmp_path / "g.sdf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MoleculeFileError, match=r"g\.sdf: no valid molecules"):
            read_sdf(tmp_path / "g.sdf", skip_invalid=True)
    (tmp_path / "e.sdf").write_text("\n")
    with pytest.raises(MoleculeFileError, match=r"e\.sdf: no molecules found"):
        read_sdf(tmp_path / "e.sdf")
    flat = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(flat)
    (tmp_path / "flat.sdf").write_text(Chem.MolToMolBlock(rd_mols[0]) + "$$$$\n" + Chem.MolToMolBlock(flat))
    with pytest.raises(MoleculeFileError, match=r"flat\.sdf: record 1 \(line \d+\): .*only 2D coordinates"):
        read_sdf(tmp_path / "flat.sdf")


def test_write_sdf_errors(tmp_path, mols):
    path = tmp_path / "x.sdf"
    with pytest.raises(ValueError, match=r"write_sdf: molecule 1 \(RDKit Mol\) has no conformer"):
        write_sdf(path, [mols[0], Chem.MolFromSmiles("CCO")])
    with pytest.raises(TypeError, match=r"write_sdf: item 0 is a str"):
        write_sdf(path, ["CCO"])
    with pytest.raises(ValueError, match="no molecules"):
        write_sdf(path, [])
    odd = Molecule([6, 19], [[0, 0, 0], [0, 0, 2.0]], name="CK")  # potassium: no EDM bond lengths
    with pytest.raises(ValueError, match=r"write_sdf: molecule 0 \('CK'\): cannot infer bonds"):
        write_sdf(path, odd)
    assert not path.exists() and _no_temp_files(tmp_path)
