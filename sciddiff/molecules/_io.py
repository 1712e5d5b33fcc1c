"""Molecule files: multi-frame XYZ and SD files (via RDKit), read with clear errors, written atomically.

Formats: XYZ as written by most codes (a count line, a comment line, then ``El x y z`` per atom;
extended-XYZ extra columns are ignored); SDF/MOL as defined by the MDL CTfile specification
(Dalby et al. 1992, J. Chem. Inf. Comput. Sci. 32, 244), parsed by RDKit. Positions in Angstrom.
RDKit is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._atomic import atomic_write, atomic_write_text
from ._elements import atomic_number
from ._types import Molecule

if TYPE_CHECKING:  # pragma: no cover
    from rdkit import Chem

#: Largest atomic number known to ``_elements`` (Kr); Molecule.symbols fails beyond it.
_MAX_Z = 36


class MoleculeFileError(ValueError):
    """A molecule file that cannot be read; the message names the file and the line or record."""


#: The former private writer, still imported by ``_plot``, ``_train`` and ``tests/molecules/test_io.py``.
_atomic_write = atomic_write


# ------------------------------------------------------------------------------------------------
# XYZ
def read_xyz(path: str | os.PathLike) -> list[Molecule]:
    """Read every frame of a (multi-frame) XYZ file.

    Each frame: an atom count ``N``, a comment line (kept as the molecule's ``name``), then ``N``
    lines ``El x y z [extra columns ignored]`` with ``El`` a symbol (any case) or an atomic number.
    Blank lines between frames and at the end are allowed.

    Returns:
        one ``Molecule`` per frame (``numbers [N]``, ``positions [N, 3]`` Angstrom, no charges).

    Raises:
        MoleculeFileError: ``"<file>:<line>: <problem>"`` for a bad count, a truncated frame, a
            non-numeric or non-finite coordinate, or an unknown element; also for a file with no frames.
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    mols: list[Molecule] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        mol, i = _read_xyz_frame(path, lines, i, len(mols))
        mols.append(mol)
    if not mols:
        raise MoleculeFileError(f"{path}: no molecules found (empty XYZ file)")
    return mols


def _read_xyz_frame(path: Path, lines: list[str], i: int, frame: int) -> tuple[Molecule, int]:
    """Parse the frame whose count line is ``lines[i]``; returns it and the index after it."""
    count = lines[i].strip()
    try:
        n = int(count)
    except ValueError:
        n = -1
    if n < 0:
        raise MoleculeFileError(
            f"{path}:{i + 1}: frame {frame}: expected an atom count (a non-negative integer), got {count!r}"
        )
    if i + 2 + n > len(lines):  # count line, comment line, n atom lines
        found = max(0, len(lines) - i - 2)
        raise MoleculeFileError(
            f"{path}:{len(lines)}: frame {frame} is truncated: its count line (line {i + 1}) declares "
            f"{n} atoms but the file ends after {found}"
        )
    comment = lines[i + 1].strip()
    numbers = np.empty(n, dtype=np.int64)
    positions = np.empty((n, 3), dtype=np.float64)
    for j in range(n):
        numbers[j], positions[j] = _parse_atom_line(path, lines[i + 2 + j], i + 3 + j, frame, n)
    return Molecule(numbers, positions, name=comment), i + 2 + n


def _parse_atom_line(path: Path, line: str, lineno: int, frame: int, n: int) -> tuple[int, list[float]]:
    """``El x y z`` -> (atomic number, [x, y, z]) with errors naming the file and line."""
    where = f"{path}:{lineno}"
    tokens = line.split()
    if len(tokens) < 4:
        raise MoleculeFileError(
            f"{where}: expected 'El x y z', got {line.strip()!r} (frame {frame} declares {n} atoms: "
            "is the frame truncated?)"
        )
    z = _element(tokens[0], where)
    xyz = []
    for tok in tokens[1:4]:
        try:
            v = float(tok)
        except ValueError:
            raise MoleculeFileError(f"{where}: non-numeric coordinate {tok!r}") from None
        if not math.isfinite(v):
            raise MoleculeFileError(f"{where}: coordinate {tok!r} is not finite (NaN or Inf)")
        xyz.append(v)
    return z, xyz


def _element(token: str, where: str) -> int:
    """Symbol (``"C"``, ``"cl"``) or atomic number (``"6"``) -> atomic number, clear error otherwise."""
    if token.isdigit():
        z = int(token)
        if not 1 <= z <= _MAX_Z:
            raise MoleculeFileError(f"{where}: unknown element: atomic number {z} is not in 1..{_MAX_Z}")
        return z
    try:
        return atomic_number(token, where)
    except ValueError as e:
        raise MoleculeFileError(str(e)) from None


def write_xyz(path: str | os.PathLike, mols: Molecule | Sequence[Molecule]) -> None:
    """Write molecules as a multi-frame XYZ file (readable by ``read_xyz`` and ``ase.io.read``).

    The comment line holds the molecule's name (newlines replaced by spaces); coordinates are written
    with 8 decimals (1e-8 Angstrom). Formal charges and properties are not stored (use SDF). The file
    appears atomically: a temporary file in the same directory, then ``os.replace``.
    """
    mols = _as_molecule_list(mols, "write_xyz")
    out: list[str] = []
    for k, mol in enumerate(mols):
        try:
            symbols = mol.symbols
        except ValueError as e:
            raise ValueError(f"write_xyz: molecule {k} ({mol.name!r}): {e}") from None
        out.append(str(len(mol)))
        out.append(" ".join(mol.name.split()))
        for sym, (x, y, z) in zip(symbols, mol.positions.tolist(), strict=True):
            out.append(f"{sym:<2} {x:16.8f} {y:16.8f} {z:16.8f}")
    atomic_write_text(path, "\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------------
# SDF / MOL
def read_sdf(path: str | os.PathLike, skip_invalid: bool = False) -> list[Molecule]:
    """Read every record of an SD (or MOL) file with RDKit, hydrogens and formal charges kept.

    Each record is parsed by RDKit's ``SDMolSupplier`` with ``removeHs=False, sanitize=False`` (so
    generated molecules with unusual valences still load) and needs a 3D conformer.

    Args:
        skip_invalid: skip records RDKit cannot parse, with a warning, instead of raising.

    Returns:
        one ``Molecule`` per record (``numbers [N]``, ``positions [N, 3]``, ``charges [N]``, the
        record's title as ``name`` and its SD tags as ``properties``).

    Raises:
        MoleculeFileError: naming the file and record index (and its first line) for an unparseable
            record, a record without 3D coordinates, or an element beyond Kr; also for an empty file.
    """
    from rdkit import Chem, rdBase

    from ._convert import from_rdkit

    path = Path(path)
    records = _sdf_records(_read_text(path))
    if not records:
        raise MoleculeFileError(f"{path}: no molecules found (empty SD file)")
    mols: list[Molecule] = []
    for k, (line, block) in enumerate(records):
        where = f"{path}: record {k} (line {line})"
        # One supplier per record: a malformed record cannot swallow the next one, and record
        # indices always match the ``$$$$`` separators.
        supplier = Chem.SDMolSupplier()
        with rdBase.BlockLogs():  # RDKit's log lines would duplicate (and precede) our error
            supplier.SetData(block, sanitize=False, removeHs=False)
            parsed = list(supplier)
        rd = parsed[0] if len(parsed) == 1 else None
        if rd is None:
            if skip_invalid:
                warnings.warn(f"{where}: RDKit cannot parse this record; skipped", stacklevel=2)
                continue
            raise MoleculeFileError(
                f"{where}: RDKit cannot parse this record (pass skip_invalid=True to skip it)"
            )
        try:
            mols.append(from_rdkit(rd))
        except ValueError as e:
            raise MoleculeFileError(f"{where}: {e}") from None
    if not mols:
        raise MoleculeFileError(f"{path}: no valid molecules (every record was skipped)")
    return mols


def _sdf_records(text: str) -> list[tuple[int, str]]:
    """Split an SD file into ``(first line, record text)`` per record (1-based lines); records end
    with ``$$$$``, and a lone MOL block without it is one record. Blank-only tails are dropped."""
    lines = text.splitlines()
    out, begin = [], 0
    for i, line in enumerate(lines):
        if line.startswith("$$$$"):
            out.append((begin + 1, "\n".join(lines[begin : i + 1]) + "\n"))
            begin = i + 1
    if any(line.strip() for line in lines[begin:]):
        out.append((begin + 1, "\n".join(lines[begin:]) + "\n$$$$\n"))
    return out


def write_sdf(path: str | os.PathLike, mols: Molecule | Chem.Mol | Sequence[Molecule | Chem.Mol]) -> None:
    """Write molecules to an SD file (readable by ``read_sdf``, RDKit and ``ase.io.read``).

    ``Molecule`` inputs get bonds inferred from interatomic distances with EDM's bond-length rules
    (``_bonds.to_rdkit``; Hoogeboom et al. 2022, App. B), their formal charges, title and scalar
    properties (as SD tags). RDKit molecules are written as they are (they need a conformer).
    Coordinates have 4 decimals (the format's precision). The file appears atomically.
    """
    from rdkit import Chem

    items = [mols] if isinstance(mols, (Molecule, Chem.Mol)) else list(mols)
    if not items:
        raise ValueError("write_sdf: no molecules to write")
    rd_mols = [_to_writable(m, k) for k, m in enumerate(items)]

    def write(tmp: str) -> None:
        writer = Chem.SDWriter(tmp)
        try:
            for k, rd in enumerate(rd_mols):
                try:
                    writer.write(rd)
                except Exception as e:  # RDKit raises its own types (KekulizeException, RuntimeError)
                    raise ValueError(f"write_sdf: molecule {k}: RDKit cannot write it: {e}") from None
        finally:
            writer.close()

    atomic_write(path, write)


def _to_writable(mol: Any, k: int) -> Chem.Mol:
    """A copy of ``mol`` as an RDKit Mol with a conformer and computed valences (needed to write)."""
    from rdkit import Chem

    if isinstance(mol, Molecule):
        from ._bonds import to_rdkit

        try:
            rd = Chem.RWMol(to_rdkit(mol, sanitize=False))
        except ValueError as e:
            raise ValueError(f"write_sdf: molecule {k} ({mol.name!r}): cannot infer bonds: {e}") from None
        if mol.charges is not None:
            for atom, q in zip(rd.GetAtoms(), mol.charges, strict=True):
                atom.SetFormalCharge(int(q))
        rd.SetProp("_Name", " ".join(mol.name.split()))
        for key, value in mol.properties.items():
            if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
                rd.SetProp(str(key), str(value))
        rd = rd.GetMol()
    elif isinstance(mol, Chem.Mol):
        if mol.GetNumConformers() == 0:
            raise ValueError(f"write_sdf: molecule {k} (RDKit Mol) has no conformer; embed one first")
        rd = Chem.Mol(mol)
    else:
        raise TypeError(f"write_sdf: item {k} is a {type(mol).__name__}, expected Molecule or rdkit Mol")
    rd.UpdatePropertyCache(strict=False)  # an unsanitized Mol has no implicit-H counts to write
    return rd


# ------------------------------------------------------------------------------------------------
def read_molecules(path: str | os.PathLike) -> list[Molecule]:
    """Read a molecule file by its suffix: ``.xyz``/``.extxyz`` (``read_xyz``), ``.sdf``/``.mol``
    (``read_sdf``). Returns a list of ``Molecule``; other suffixes raise ``MoleculeFileError``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".xyz", ".extxyz"):
        return read_xyz(path)
    if suffix in (".sdf", ".mol"):
        return read_sdf(path)
    raise MoleculeFileError(
        f"{path}: unknown molecule file type {path.suffix!r} (expected .xyz, .extxyz, .sdf or .mol)"
    )


def write_molecules(path: str | os.PathLike, mols: Molecule | Sequence[Molecule | Chem.Mol]) -> None:
    """Write by suffix: ``.sdf`` (``write_sdf``, bonds inferred) or ``.xyz`` (``write_xyz``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".sdf":
        write_sdf(path, mols)
    elif suffix in (".xyz", ".extxyz"):
        write_xyz(path, mols)
    else:
        raise MoleculeFileError(f"{path}: cannot write molecule file type {suffix!r} (use .sdf or .xyz)")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such molecule file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoleculeFileError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None


def _as_molecule_list(mols: Molecule | Sequence[Molecule], fn: str) -> list[Molecule]:
    items = [mols] if isinstance(mols, Molecule) else list(mols)
    if not items:
        raise ValueError(f"{fn}: no molecules to write")
    for k, m in enumerate(items):
        if not isinstance(m, Molecule):
            raise TypeError(f"{fn}: item {k} is a {type(m).__name__}, expected Molecule")
    return items
