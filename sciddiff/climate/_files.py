"""Atomic NetCDF / Zarr input and output for the climate adapter: ``read_dataset`` (format by
suffix or content, clear errors naming the file) and ``write_dataset`` (temp file then rename;
Zarr written by a joinable dask pool so no worker outlives the write)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import dask
import dask.threaded
import xarray as xr

from .._atomic import atomic_write

Format = Literal["netcdf", "zarr"]
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")
_NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF\r\n\x1a\n")


def _format_of(path: Path) -> Format:
    """``"netcdf"`` or ``"zarr"`` from the suffix; ``ValueError`` naming the path otherwise."""
    suffix = path.suffix.lower()
    if suffix in _NETCDF_SUFFIXES:
        return "netcdf"
    if suffix == ".zarr":
        return "zarr"
    raise ValueError(f"{path}: unknown output format {suffix!r}; use one of {_NETCDF_SUFFIXES} or .zarr")


def _zarr_ready(ds: xr.Dataset) -> xr.Dataset:
    """Zarr needs regular dask chunks and no stale chunk encodings (e.g. from a NetCDF source)."""
    ds = ds.copy()
    for v in ds.variables.values():
        for k in ("chunks", "preferred_chunks", "shards", "chunksizes"):
            v.encoding.pop(k, None)
    if ds.chunks:
        ds = ds.unify_chunks()
        ds = ds.chunk({d: max(c) for d, c in ds.chunks.items()})
    return ds


def write_dataset(ds: xr.Dataset | xr.DataArray, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``ds`` to NetCDF (``.nc``) or Zarr (``.zarr``) atomically; returns the path.

    The data go to a temporary name beside ``path``, which then replaces it (``atomic_write`` for a
    file; for a Zarr directory the old store is moved aside, the new one renamed in and the old one
    deleted). On any failure the temporary output is removed and an existing ``path`` is left as it
    was, so readers never see a partial file. Dask-backed data are computed while writing.
    """
    path = Path(path)
    fmt = _format_of(path)
    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset(name=ds.name if ds.name is not None else "data")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    if fmt == "netcdf":
        def write(tmp: str) -> None:
            with _joinable_dask_pool():  # joined before atomic_write removes a failed temporary file
                ds.to_netcdf(tmp)

        return atomic_write(path, write)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with _joinable_dask_pool():
            _zarr_ready(ds).to_zarr(tmp, mode="w-", consolidated=False)
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


@contextlib.contextmanager
def _joinable_dask_pool():
    """Run dask's threaded scheduler on a private pool that is joined on exit.

    When one task fails, dask raises at once while the other tasks keep running and may reopen or
    re-create the temporary output after it was deleted; joining the pool (queued tasks cancelled)
    before the cleanup prevents that. Other schedulers (e.g. a distributed ``Client``) are left
    alone; for them `_remove` retries instead.
    """
    sched = dask.base.get_scheduler()
    if sched is not None and sched is not dask.threaded.get:
        yield
        return
    workers = dask.config.get("num_workers", None) or os.cpu_count() or 1
    pool = ThreadPoolExecutor(workers)
    try:
        with dask.config.set(pool=pool):
            yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _replace(tmp: Path, path: Path) -> None:
    """Move the Zarr store ``tmp`` to ``path`` (an existing directory aside first, since rename cannot
    replace one)."""
    if tmp.is_dir() and (path.exists() or path.is_symlink()):
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(p: Path) -> None:
    """Delete a file or directory tree if present. After a failed dask write, tasks still running in
    other threads may add chunks to a Zarr directory while it is deleted: retry for up to ~2 s."""
    for _ in range(40):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
        if not (p.exists() or p.is_symlink()):
            return
        time.sleep(0.05)


def _detect(path: Path) -> Format:
    """The format of an existing ``path`` by content: NetCDF magic bytes or Zarr metadata files."""
    if path.is_dir():
        if any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zmetadata", ".zarray")):
            return "zarr"
        raise ValueError(f"{path}: a directory but not a Zarr store (no zarr.json or .zgroup)")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if any(head.startswith(m) for m in _NETCDF_MAGIC):
        return "netcdf"
    raise ValueError(f"{path}: not a NetCDF (classic or HDF5-based) file or Zarr store "
                     f"(starts with {head[:8]!r})")


def _consolidated(path: Path) -> bool:
    """Whether a Zarr store has consolidated metadata (v2 ``.zmetadata``, v3 in ``zarr.json``)."""
    if (path / ".zmetadata").exists():
        return True
    try:
        doc = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and bool(doc.get("consolidated_metadata"))


def read_dataset(path: str | os.PathLike, *, chunks: dict | str | None = None) -> xr.Dataset:
    """Read a NetCDF file or Zarr store. ``chunks=None`` loads it into memory (and closes the
    file); otherwise returns a lazy dask-backed dataset with these chunks (e.g. ``{"time": 24}``).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the path for anything
    that is not NetCDF/Zarr or cannot be decoded.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or Zarr store")
    fmt = _detect(path)
    try:
        if fmt == "zarr":
            ds = xr.open_zarr(path, chunks=chunks, consolidated=_consolidated(path))
        else:
            ds = xr.open_dataset(path, chunks=chunks)
        if chunks is None:
            with ds:
                ds = ds.load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: could not be read as {fmt}: {e}") from e
    return ds
