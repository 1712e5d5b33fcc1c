"""QM9 recipe (``_qm9``): EDM split sizes, the cache (contents checked against an independent parse of
qm9pack's CSVs, checksums, rebuild on damage), clear errors, and EDM's reference SMILES."""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from sciddiff.molecules import _qm9
from sciddiff.molecules._qm9 import (
    PROPERTIES,
    SPLIT_SIZES,
    SPLITS,
    QM9Split,
    load_qm9,
    read_qm9_csv,
    split_indices,
    split_sizes,
)

HAS_QM9PACK = importlib.util.find_spec("qm9pack") is not None
needs_qm9pack = pytest.mark.skipif(not HAS_QM9PACK, reason="qm9pack not installed (pip install qm9pack)")
LIMIT = 300
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def _csv_rows(k: int) -> list[dict[str, str]]:
    """The first ``k`` rows of qm9_part1.csv, read independently of ``_qm9``."""
    csv.field_size_limit(1 << 27)
    with open(_qm9.qm9_source_dir() / "qm9_part1.csv", newline="") as f:
        reader = csv.DictReader(f)
        return [row for _, row in zip(range(k), reader, strict=False)]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple:
    if not HAS_QM9PACK:
        pytest.skip("qm9pack not installed (pip install qm9pack)")
    cache = tmp_path_factory.mktemp("qm9_small")
    return cache, {s: load_qm9(s, cache, limit=LIMIT) for s in SPLITS}


# ------------------------------------------------------------------------------------------------
# split
def test_split_sizes():
    assert split_sizes(130_831) == SPLIT_SIZES == {"train": 100_000, "valid": 17_748, "test": 13_083}
    for n in (3, 10, 300, 5000):
        sizes = split_sizes(n)
        assert sum(sizes.values()) == n and min(sizes.values()) >= 1
        assert sizes["test"] == max(1, int(0.1 * n))
    assert split_sizes(300) == {"train": 229, "valid": 41, "test": 30}
    with pytest.raises(ValueError, match="at least 3"):
        split_sizes(2)


def test_split_indices_are_the_documented_permutation():
    n = 1000
    parts = split_indices(n)
    perm = np.random.RandomState(0).permutation(n)  # EDM's legacy draw
    sizes = split_sizes(n)
    np.testing.assert_array_equal(parts["train"], np.sort(perm[: sizes["train"]]))
    np.testing.assert_array_equal(parts["test"], np.sort(perm[n - sizes["test"] :]))
    allidx = np.concatenate(list(parts.values()))
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    assert all((np.diff(p) > 0).all() for p in parts.values())
    assert not np.array_equal(split_indices(n, seed=1)["train"], parts["train"])


# ------------------------------------------------------------------------------------------------
# cache contents
def test_small_cache_layout(small):
    _, splits = small
    assert {s: len(d) for s, d in splits.items()} == split_sizes(LIMIT)
    for s, d in splits.items():
        assert isinstance(d, QM9Split)
        assert d.numbers.dtype == torch.int64 and d.positions.dtype == torch.float32
        assert d.ptr.dtype == torch.int64 and d.ptr[0] == 0 and d.ptr[-1] == d.numbers.shape[0]
        assert d.positions.shape == (d.numbers.shape[0], 3)
        assert torch.equal(d.num_atoms(), d.ptr[1:] - d.ptr[:-1]) and (d.num_atoms() > 0).all()
        assert list(d.properties) == list(PROPERTIES)
        assert all(v.dtype == torch.float64 and v.shape == (len(d),) for v in d.properties.values())
        assert d.units["U0"] == "Ha" and d.units["mu"] == "D" and d.units["positions"] == "Angstrom"
        assert len(d.smiles) == len(d)
        assert d.name == f"qm9/{s}"


def test_small_cache_matches_independent_csv_parse(small):
    """Every molecule equals its CSV row parsed with ``ast.literal_eval`` (the reference parser)."""
    _, splits = small
    rows = {int(r["Index"]): r for r in _csv_rows(LIMIT)}
    seen = []
    for d in splits.values():
        for i in range(len(d)):
            m = d.molecule(i)
            row = rows[int(m.properties["index"])]
            seen.append(int(row["Index"]))
            assert m.numbers.tolist() == [Z[e] for e in ast.literal_eval(row["Elements"])]
            xyz = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float32).astype(np.float64)
            np.testing.assert_array_equal(m.positions, xyz)
            assert m.properties["U0"] == float(row["InternalEnergy_0K_au"])
            assert m.properties["Cv"] == float(row["Heatcapacity_Cv_cal_mol_K"])
            assert m.properties["smiles"] == row["SMILES"] == d.smiles[i]
            assert m.name == f"gdb_{row['Index']}"
    assert sorted(seen) == sorted(rows)  # the splits partition the rows


def test_molecule_index_errors(small):
    d = small[1]["test"]
    assert d.molecule(-1).name == d.molecule(len(d) - 1).name
    with pytest.raises(IndexError, match="out of range"):
        d.molecule(len(d))


def test_provenance_and_checksums(small):
    cache, _ = small
    out = cache / f"qm9_first{LIMIT}"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["limit"] == LIMIT and prov["num_molecules"] == LIMIT
    assert prov["split_sizes"] == split_sizes(LIMIT)
    assert prov["source"]["package"] == "qm9pack" and prov["source"]["version"] != "unknown"
    assert set(prov["source"]["files"]) == set(_qm9.SOURCE_FILES)
    assert len(prov["files"]) == 6
    for name, digest in prov["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    src = _qm9.qm9_source_dir() / "qm9_part3.csv"
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert prov["source"]["files"]["qm9_part3.csv"] == h.hexdigest()


# ------------------------------------------------------------------------------------------------
# rebuild, errors
@needs_qm9pack
def test_damaged_or_stale_cache_is_rebuilt(tmp_path):
    first = load_qm9("train", tmp_path, limit=30)
    # the loaded tensors map the cache file; damaging it in place (not as the cache writes: by
    # replacing) would show through, so keep copies to compare with
    first_pos, first_cv = first.positions.clone(), first.properties["Cv"].clone()
    out = tmp_path / "qm9_first30"
    st = out / "train.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the last tensor's data: the header still parses
    st.write_bytes(bytes(raw))
    again = load_qm9("train", tmp_path, limit=30)
    assert torch.equal(again.positions, first_pos)
    assert torch.equal(again.properties["Cv"], first_cv)
    prov = json.loads((out / "provenance.json").read_text())
    prov["seed"] = 5  # settings changed: rebuild rather than trust
    (out / "provenance.json").write_text(json.dumps(prov))
    load_qm9("valid", tmp_path, limit=30)
    assert json.loads((out / "provenance.json").read_text())["seed"] == 0
    (out / "test.smiles.txt").unlink()
    assert len(load_qm9("test", tmp_path, limit=30).smiles) == split_sizes(30)["test"]
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


@needs_qm9pack
def test_cache_serves_without_qm9pack(tmp_path, monkeypatch):
    load_qm9("valid", tmp_path, limit=20)
    real = importlib.util.find_spec
    monkeypatch.setattr(_qm9.importlib.util, "find_spec",
                        lambda name, *a: None if name == "qm9pack" else real(name, *a))
    assert len(load_qm9("valid", tmp_path, limit=20)) == split_sizes(20)["valid"]
    with pytest.raises(ImportError, match="pip install qm9pack"):
        load_qm9("valid", tmp_path, rebuild=True, limit=20)
    with pytest.raises(ImportError, match="pip install qm9pack"):
        _qm9.qm9_source_dir()


def test_bad_split_and_limit(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_qm9("validation", tmp_path)
    with pytest.raises(ValueError, match="limit must be >= 3"):
        _qm9.build_qm9(tmp_path, limit=2)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SCIDDIFF_DATA", str(tmp_path))
    assert _qm9.qm9_cache_dir() == tmp_path / "qm9"
    assert _qm9.qm9_cache_dir(limit=7) == tmp_path / "qm9_first7"
    assert _qm9.qm9_cache_dir(tmp_path / "x") == tmp_path / "x" / "qm9"
    monkeypatch.delenv("SCIDDIFF_DATA")
    assert _qm9.qm9_cache_dir().parts[-3:] == (".cache", "sciddiff", "qm9")


@needs_qm9pack
@pytest.mark.parametrize(
    "column,value,message",
    [
        ("XYZ_Ang", "[[0.,1.,x]]", r"qm9_part2.csv:3: column XYZ_Ang: not a list literal"),
        ("Elements", "['C','Xx']", r"qm9_part2.csv:3: column Elements: unknown element 'Xx'"),
        ("N_atoms", "7", r"qm9_part2.csv:3: N_atoms=7 but"),
        ("InternalEnergy_0K_au", "n/a", r"qm9_part2.csv:3: column InternalEnergy_0K_au \(U0\)"),
    ],
)
def test_bad_rows_name_file_line_and_column(tmp_path, column, value, message):
    rows = _csv_rows(3)
    for name in _qm9.SOURCE_FILES:
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for k, row in enumerate(rows[:2]):
                w.writerow(row | ({column: value} if name == "qm9_part2.csv" and k == 1 else {}))
    assert len(read_qm9_csv(tmp_path, limit=3).ptr) == 4  # the damage is past the limit
    with pytest.raises(ValueError, match=message):
        read_qm9_csv(tmp_path)


@needs_qm9pack
def test_missing_column(tmp_path):
    for name in _qm9.SOURCE_FILES:
        shutil.copyfile(_qm9.qm9_source_dir() / "qm9_polarizability.csv", tmp_path / name)
    with pytest.raises(ValueError, match=r"qm9_part1.csv:1: missing column"):
        read_qm9_csv(tmp_path)


# ------------------------------------------------------------------------------------------------
# EDM reference SMILES, novelty
def test_edm_reference_smiles_give_zero_novelty_on_train(small):
    pytest.importorskip("rdkit")
    from sciddiff.molecules._metrics import evaluate_molecules

    cache, splits = small
    ref = _qm9.load_qm9_edm_smiles("train", cache, limit=LIMIT)
    train = [splits["train"].molecule(i) for i in range(len(splits["train"]))]
    r = evaluate_molecules(train, train_smiles=ref)
    assert len(ref) == round(r.validity * len(train))  # EDM keeps the sanitizable ones
    assert r.novelty == 0.0
    assert sum("[H]" in s for s in ref) > 0.9 * len(ref)  # explicit-H SMILES, as EDM's
    assert _qm9.load_qm9_edm_smiles("train", cache, limit=LIMIT) == ref  # from the cache
    test = [splits["test"].molecule(i) for i in range(len(splits["test"]))]
    assert evaluate_molecules(test, train_smiles=ref).novelty > 0.5


# ------------------------------------------------------------------------------------------------
# the full dataset (built once per session; test_metrics shares the folder)
@needs_qm9pack
def test_full_build_has_edm_sizes(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "sciddiff_qm9_shared"
    splits = {s: load_qm9(s, cache) for s in SPLITS}
    assert {s: len(d) for s, d in splits.items()} == SPLIT_SIZES
    ids = np.concatenate([d.properties["index"].numpy() for d in splits.values()])
    assert len(np.unique(ids)) == 130_831 and ids.min() == 1 and ids.max() == 133_885
    for d in splits.values():
        assert set(torch.unique(d.numbers).tolist()) <= {1, 6, 7, 8, 9}
        assert 1 <= int(d.num_atoms().min()) and int(d.num_atoms().max()) <= 29
    methane = [d for d in splits.values() if (d.properties["index"] == 1).any()][0]
    i = int(torch.nonzero(methane.properties["index"] == 1)[0])
    m = methane.molecule(i)
    assert m.numbers.tolist() == [6, 1, 1, 1, 1] and m.properties["U0"] == -40.47893
