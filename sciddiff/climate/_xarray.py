"""The xarray front end of the climate downscaler: ``downscale``, the ``.sciddiff`` accessor, dask,
and ``downscale_file`` (file to file, through ``_files``' atomic NetCDF / Zarr input and output).

``downscale(obj, factor, members)`` turns a coarse ``xr.DataArray`` or ``xr.Dataset`` into an
ensemble at ``factor`` times the resolution with a tensor-level model (``Downscaler.predict``; the
bundled one by default). Conventions (decided here; the model sees ``[B, C, h, w]`` tensors):

- Spatial dims are ``lat``/``lon`` (also ``latitude``/``longitude``, ``rlat``/``rlon``) or ``y``/``x``,
  or dims whose coordinate has a CF ``axis`` (``Y``/``X``) or ``standard_name``; every other dim
  (``time``, ``level``, ...) is a batch dim, and dask chunks follow those dims.
- Fine cell centres subdivide each coarse cell evenly around its centre (`fine_coordinate`), so
  block-mean coarsening of the fine coordinates gives back the coarse ones exactly (also for
  descending latitudes and uneven grids); coordinate attrs are kept (``bounds`` dropped).
- Large grids can be processed in overlapping windows (``patch``, ``overlap``; `patchwise`),
  wrapping around in longitude when the grid spans 360 degrees.
- The output has dims ``(*batch dims, "member", y, x)``; in ``mode="regression"`` (the model's
  deterministic conditional mean) there is no ``member`` dim.
- Units are checked against the model's: K and degC are converted (with a warning) for the model
  and the result converted back, so the output keeps the input's units and attributes.
- NaNs raise a ``ValueError`` naming the variable and position; ``missing="mask"`` fills them with
  the field's mean for the model and sets the fine cells of missing coarse cells back to NaN.
- Randomness: each sample (one point of the batch dims) draws from its own generator, seeded from
  ``(seed, flat index of the sample)`` (``numpy.random.SeedSequence``), so the result does not
  depend on batching or on dask chunking: lazy equals eager exactly. Without a ``seed`` a fresh one
  is drawn and recorded in the ``history`` attribute.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import xarray as xr

from ._data import _X_NAMES, _Y_NAMES, _temperature_unit, is_periodic_lon, spatial_dims
from ._files import _format_of, read_dataset, write_dataset
from ._patches import PatchWindow, check_tiling, patchwise

Mode = Literal["diffusion", "regression"]
Missing = Literal["raise", "mask"]

MEMBER_DIM = "member"
_CHANNEL_DIM = "__sciddiff_channel__"
#: Encoding keys that stay meaningful on a new (fine, ensemble) grid; shape-bound ones are dropped.
_KEEP_ENCODING = ("dtype", "_FillValue", "missing_value", "scale_factor", "add_offset", "zlib",
                  "complevel", "shuffle", "compression", "units", "calendar")


# ------------------------------------------------------------------------------------------------
# grids, units, variables
def grid_dims(da: xr.DataArray) -> tuple[str, str]:
    """The ``(y, x)`` dim names of ``da``: ``_data.spatial_dims`` (by name: lat/lon, latitude/longitude,
    rlat/rlon, grid_latitude/grid_longitude, y/x; or by the CF ``axis`` / ``standard_name`` of the
    dim's coordinate), with an error that points to ``downscale``'s ``spatial_dims=`` argument."""
    try:
        return spatial_dims(da)
    except ValueError:
        raise ValueError(f"variable {da.name!r} with dims {tuple(da.dims)}: cannot tell its spatial dims "
                         f"(need exactly one of {_Y_NAMES} and one of {_X_NAMES}, or coordinates with "
                         "CF axis='Y'/'X'); pass spatial_dims=(y_dim, x_dim)") from None


def fine_coordinate(coarse: np.ndarray, factor: int, name: str = "coordinate") -> np.ndarray:
    """Fine cell centres ``[n * factor]`` inside coarse cells with centres ``coarse [n]``.

    Each coarse cell of width ``d_i`` is cut into ``factor`` equal parts centred on ``c_i``:
    ``c_i + (k - (factor - 1) / 2) d_i / factor``, so the block mean of the result is ``c_i`` exactly
    (block-mean coarsening of a cell-centred grid). ``d_i`` is the spacing to the nearer neighbour
    (signed): on a uniform grid the grid spacing; on an uneven one the fine cells stay inside the
    midpoints to the neighbours, so the result is strictly monotone.
    """
    c = np.asarray(coarse, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise ValueError(f"{name}: need a 1-D coordinate with at least 2 values to refine, "
                         f"got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name}: coordinate values must be finite")
    step = np.diff(c)
    if not (np.all(step > 0) or np.all(step < 0)):
        raise ValueError(f"{name}: coordinate values must be strictly monotonic")
    gaps = np.abs(step)
    d = np.sign(step[0]) * np.minimum(np.r_[gaps[0], gaps], np.r_[gaps, gaps[-1]])
    offsets = (np.arange(factor) - (factor - 1) / 2) / factor
    return (c[:, None] + d[:, None] * offsets[None, :]).reshape(-1)


def _unit_offset(var: str, units: str | None, model_units: str | None) -> float:
    """The additive offset taking ``var`` from its ``units`` to the model's (K <-> degC only)."""
    if model_units is None or units == model_units:
        return 0.0
    if units is None:
        warnings.warn(f"variable {var!r} has no 'units' attribute; assuming the model's units "
                      f"{model_units!r}", stacklevel=4)
        return 0.0
    # the spellings ``check_units`` knows (K, degC, degF); only the additive K <-> degC is converted
    have, want = _temperature_unit(units), _temperature_unit(model_units)
    if have is not None and have == want:
        return 0.0
    if {have, want} == {"K", "degC"}:
        offset = 273.15 if have == "degC" else -273.15
        warnings.warn(f"variable {var!r}: units {units!r} converted to the model's {model_units!r} "
                      f"({offset:+.2f}) for the model, and back for the output", stacklevel=4)
        return offset
    raise ValueError(f"variable {var!r} has units {units!r} but the model expects {model_units!r}; "
                     "only K <-> degC is converted")


def _model_units(model: Any) -> list[str | None]:
    """The model's units, one per variable (``units`` may be a str, sequence or mapping)."""
    variables = list(getattr(model, "variables", ()) or ())
    units = getattr(model, "units", None)
    if isinstance(units, str) or units is None:
        return [units] * max(len(variables), 1)
    if isinstance(units, dict):
        return [units.get(v) for v in variables]
    return list(units)


def _select(obj: xr.Dataset | xr.DataArray, var: str | Sequence[str] | None, model: Any) -> list[str]:
    """Names of the dataset variables fed to the model's channels, in the model's order."""
    expected = list(getattr(model, "variables", ()) or ())
    n_channels = max(len(expected), 1)
    if isinstance(obj, xr.DataArray):
        if n_channels != 1:
            raise ValueError(f"the model takes {n_channels} variables {expected}; "
                             "pass a Dataset holding them")
        return [obj.name if obj.name is not None else "data"]
    names = [var] if isinstance(var, str) else list(var) if var is not None else None
    if names is None:
        if expected and all(v in obj.data_vars for v in expected):
            names = expected
        else:
            gridded = [str(v) for v, da in obj.data_vars.items() if da.ndim >= 2]
            if n_channels == 1 and len(gridded) == 1:
                names = gridded
            else:
                raise ValueError(f"dataset variables {list(map(str, obj.data_vars))}: cannot tell which to "
                                 f"downscale (the model expects {expected}); pass var=")
    missing = [v for v in names if v not in obj.data_vars]
    if missing:
        raise ValueError(f"variable(s) {missing} not in the dataset "
                         f"(it has {list(map(str, obj.data_vars))})")
    if len(names) != n_channels:
        raise ValueError(f"var={names} gives {len(names)} variables but the model takes "
                         f"{n_channels}: {expected}")
    return names


def _is_periodic(lon: np.ndarray | None, name: str) -> bool:
    """``_data.is_periodic_lon`` (``n * spacing`` is 360 within half a cell), where a dim named ``x``
    also counts as a longitude (``coarsen`` and ``interpolate`` do not wrap ``x``)."""
    return lon is not None and is_periodic_lon(lon, "lon" if name.lower() == "x" else name)


# ------------------------------------------------------------------------------------------------
# the per-block computation (runs eagerly, or inside dask tasks)
@dataclass(frozen=True)
class _Job:
    """Everything a block needs; picklable, so dask (threads or processes) can ship it."""

    model: Any
    names: tuple[str, ...]
    batch_dims: tuple[str, ...]
    batch_shape: tuple[int, ...]
    offsets: tuple[float, ...]
    factor: int
    members: int
    mode: str
    seed: int
    predict_kw: dict = field(default_factory=dict)
    static: torch.Tensor | None = None
    patch: int | tuple[int, int] | None = None
    overlap: int | tuple[int, int] = 4
    periodic: bool = False
    conserve: bool = False
    missing: str = "raise"
    batch_size: int = 16
    progress: bool = False


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit torch seed for sample ``index`` of a run seeded with ``seed`` (``SeedSequence``)."""
    hi, lo = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def _where(job: _Job, flat: int) -> str:
    """``"time=3, level=1"``: a sample's position in the batch dims, for error messages."""
    if not job.batch_dims:
        return "the field"
    pos = np.unravel_index(int(flat), job.batch_shape)
    return ", ".join(f"{d}={int(i)}" for d, i in zip(job.batch_dims, pos, strict=True))


def _check_nan(job: _Job, x: np.ndarray, idx: np.ndarray) -> None:
    """Raise naming the variable and the first sample with NaNs (``x [n, C, h, w]``)."""
    bad = np.isnan(x).any(axis=(2, 3))
    if bad.any():
        i, c = np.argwhere(bad)[0]
        count = int(np.isnan(x[:, c]).sum())
        raise ValueError(f"variable {job.names[c]!r} has {count} missing (NaN) values, first at "
                         f"{_where(job, idx[i])}; pass missing='mask' to downscale around them")


def _predict(job: _Job, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Model call on ``x [b, C, h, w]`` (model units) -> ``[b, M, C, H, W]``, patch-wise if asked."""
    kw = dict(members=job.members, mode=job.mode, generator=generator, **job.predict_kw)
    meta = getattr(job.model, "meta", None)
    if meta is not None and bool(meta.periodic_lon) != job.periodic:
        kw["periodic_lon"] = job.periodic  # the input grid, not the training grid, decides the wrap
    if job.patch is None:
        return job.model.predict(x, job.static, conserve=job.conserve, **kw)

    def fn(xp: torch.Tensor, win: PatchWindow) -> torch.Tensor:
        st = None if job.static is None else job.static[..., win.fine_rows(), :][..., win.fine_cols()]
        return job.model.predict(xp, st, conserve=False, **kw)

    y = patchwise(fn, x, job.factor, job.patch, job.overlap, periodic=job.periodic)
    if job.conserve:  # the blend mixes windows inside coarse cells: project the blended field
        from ._model import conserve_projection

        y = conserve_projection(y, x[:, None].to(y.dtype), job.factor)
    return y


def _run_samples(job: _Job, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Downscale samples ``x [n, C, h, w]`` with flat indices ``idx [n]`` -> ``[n, M, C, H, W]``
    (the model sees ``x``'s dtype; float64 here only for the unit offsets and the NaN fill)."""
    nan = np.isnan(x)
    if job.missing == "raise":
        _check_nan(job, x, idx)
    elif nan.any():  # fill with the field mean (0 if all missing), restore NaN below
        count = (~nan).sum(axis=(2, 3), keepdims=True)
        mean = np.where(nan, 0.0, x).sum(axis=(2, 3), keepdims=True) / np.maximum(count, 1)
        x = np.where(nan, mean, x).astype(x.dtype)
    offsets = np.asarray(job.offsets, dtype=np.float64)[None, :, None, None]
    xt = torch.as_tensor((x.astype(np.float64) + offsets).astype(x.dtype))
    if job.mode == "regression":  # deterministic: batch freely
        groups = [np.arange(s, min(s + job.batch_size, len(x))) for s in range(0, len(x), job.batch_size)]
    else:  # one generator per sample: results independent of batching and chunking
        groups = [np.array([i]) for i in range(len(x))]
    outs = []
    with torch.no_grad():
        for g in _progress(groups, job.progress):
            gen = None
            if job.mode != "regression":
                gen = torch.Generator().manual_seed(sample_seed(job.seed, int(idx[g[0]])))
            outs.append(_predict(job, xt[g], gen).double().numpy())
    y = np.concatenate(outs, axis=0) - offsets[:, None]
    if nan.any():
        f = job.factor
        y[np.broadcast_to(nan.repeat(f, axis=2).repeat(f, axis=3)[:, None], y.shape)] = np.nan
    return y


def _progress(items: list, show: bool):
    """Wrap ``items`` in a tqdm bar when ``show`` (tqdm comes with lightning)."""
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="downscale", unit="sample")


def _block(data: np.ndarray, index: np.ndarray, *, job: _Job) -> np.ndarray:
    """``apply_ufunc`` kernel: ``data [..., C, h, w]``, ``index [...]`` -> ``[..., M, C, H, W]``."""
    lead = data.shape[:-3]
    dtype = data.dtype if data.dtype.kind == "f" else np.dtype(np.float32)
    x = np.asarray(data, dtype=dtype).reshape(-1, *data.shape[-3:])
    idx = np.broadcast_to(index, lead).reshape(-1)
    if x.shape[0] == 0:
        m, (c, h, w) = 1 if job.mode == "regression" else job.members, data.shape[-3:]
        return np.zeros((*lead, m, c, h * job.factor, w * job.factor), dtype)
    y = _run_samples(job, x, idx)
    return y.reshape(*lead, *y.shape[1:]).astype(dtype)


# ------------------------------------------------------------------------------------------------
# the public function and accessor
@functools.cache
def _bundled_model() -> Any:
    """The bundled downscaler (loaded once per process)."""
    from ._model import load_downscaler

    return load_downscaler(None)


def _static(model: Any, lat: np.ndarray | None, lon: np.ndarray | None,
            names: tuple[str, str]) -> torch.Tensor | None:
    """Static fields ``[1, S, H, W]`` of the fine grid (``static_features`` of ``lat [H]``, ``lon [W]``
    in degrees), or ``None`` for a model without static channels.

    A model may bring its own ``static_features(lat, lon)`` method; a ``Downscaler`` uses the
    module's with its ``meta.frequencies``. Latitudes are clipped to [-90, 90] for the features
    (the fine centres of a cell centred on a pole overhang it).
    """
    own = getattr(model, "static_features", None)
    meta = getattr(model, "meta", None)
    if own is None and (meta is None or not getattr(meta, "static_channels", 0)):
        return None
    if lat is None or lon is None:
        raise ValueError(f"the model needs static fields built from latitude/longitude, but the grid dims "
                         f"{names} have no coordinate values")
    lat = np.clip(lat, -90.0, 90.0)
    if own is not None:
        return own(torch.as_tensor(lat), torch.as_tensor(lon))[None].float()
    if getattr(meta, "static_extra", ()):
        raise ValueError(f"the model needs extra static fields {list(meta.static_extra)} that downscale "
                         "cannot build from the grid; call Downscaler.predict with them directly")
    from ._model import static_features

    return static_features(lat, lon, frequencies=meta.frequencies)[None]


def _model_label(model: Any) -> str:
    """A short description of the model for the history attribute."""
    name = getattr(model, "name", None)
    if name:
        return str(name)
    variables = list(getattr(model, "variables", ()) or ())
    return f"{type(model).__name__}(variables={variables}, factor={getattr(model, 'factor', '?')})"


def _history(obj: xr.Dataset | xr.DataArray, line: str) -> str:
    """Prepend a timestamped line to the CF ``history`` attribute (newest first, as NCO does)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = obj.attrs.get("history")
    return f"{stamp} {line}" + (f"\n{old}" if old else "")


def _check_options(factor: int | None, members: int, mode: str, missing: str, batch_size: int,
                   model: Any) -> int:
    """Validate the scalar options; return the factor."""
    if mode not in get_args(Mode):
        raise ValueError(f"mode must be one of {get_args(Mode)}, got {mode!r}")
    if missing not in get_args(Missing):
        raise ValueError(f"missing must be one of {get_args(Missing)}, got {missing!r}")
    for name, value in (("members", members), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    model_factor = int(model.factor)
    if factor is not None and factor != model_factor:
        raise ValueError(f"factor={factor} does not match the model's factor {model_factor} "
                         f"({_model_label(model)}); use a model trained for x{factor}")
    return model_factor


def downscale(
    obj: xr.Dataset | xr.DataArray,
    factor: int | None = 4,
    members: int = 16,
    *,
    var: str | Sequence[str] | None = None,
    model: Any = None,
    mode: Mode = "diffusion",
    sampler: str | None = None,
    nfe: int | None = None,
    seed: int | None = None,
    conserve: bool = False,
    patch: int | tuple[int, int] | None = None,
    overlap: int | tuple[int, int] = 4,
    batch_size: int = 16,
    missing: Missing = "raise",
    spatial_dims: tuple[str, str] | None = None,
    progress: bool = False,
) -> xr.Dataset | xr.DataArray:
    """Downscale a coarse field by ``factor`` into a ``members``-member ensemble (same type as ``obj``).

    Coarse ``[*batch, C, h, w]`` -> fine ``[*batch, member, C, h f, w f]`` through
    ``model.predict`` (CorrDiff-style regression + residual diffusion, Mardani et al. 2023; default:
    the bundled model). ``factor=None`` takes the model's. ``var`` names the dataset variables for
    the model's channels (default: the model's variable names, or the only gridded variable).
    ``sampler``/``nfe`` pass through to the model; ``conserve`` makes block means equal the coarse
    input; ``patch``/``overlap`` (coarse cells) tile large grids (see ``_patches``; periodic in
    longitude when the grid spans 360 degrees); ``batch_size`` samples per call in regression mode;
    ``progress`` shows a bar (eager input; use dask's diagnostics for lazy input).
    Dask-backed input stays lazy (chunks over the batch dims). See the module docstring for
    coordinates, units, missing values, seeding and the output layout.
    """
    model = _bundled_model() if model is None else model
    factor = _check_options(factor, members, mode, missing, batch_size, model)
    if patch is not None:
        check_tiling(patch, overlap)
        meta = getattr(model, "meta", None)
        if getattr(meta, "mean_model", "unet") == "local_linear":
            raise ValueError("downscale: patch= needs a model that runs on any grid; this model's mean is a "
                             "local linear map tied to its training grid "
                             f"{meta.domain.get('shape')} (mean_model='local_linear'): drop patch=")
    names = _select(obj, var, model)
    arrays = [obj] if isinstance(obj, xr.DataArray) else [obj[v] for v in names]
    ydim, xdim = spatial_dims or grid_dims(arrays[0])
    for a in arrays:
        if ydim not in a.dims or xdim not in a.dims:
            raise ValueError(f"variable {a.name!r} with dims {tuple(a.dims)} lacks spatial dim(s) "
                             f"{ydim!r}, {xdim!r}")
    units = _model_units(model)
    units = units if len(units) == len(names) else units[:1] * len(names)
    offsets = tuple(_unit_offset(n, a.attrs.get("units"), u)
                    for n, a, u in zip(names, arrays, units, strict=True))
    seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else int(seed)
    coarse = {d: obj[d].values if d in obj.coords else None for d in (ydim, xdim)}
    fine = {d: None if c is None else fine_coordinate(c, factor, d) for d, c in coarse.items()}
    stacked, index = _stack(arrays, ydim, xdim)
    batch_dims = tuple(str(d) for d in index.dims)
    job = _Job(model, tuple(map(str, names)), batch_dims, index.shape, offsets, factor, members, mode, seed,
               {k: v for k, v in (("sampler", sampler), ("nfe", nfe)) if v is not None},
               _static(model, fine[ydim], fine[xdim], (ydim, xdim)), patch, overlap,
               _is_periodic(coarse[xdim], xdim), conserve, missing, batch_size, progress)
    out = _apply(job, stacked, index, ydim, xdim)
    out = _fine_coords(out, obj, fine)
    if mode == "regression":
        out = out.isel({MEMBER_DIM: 0}, drop=True)
    line = (f"sciddiff.climate.downscale(factor={factor}, members={members}, mode={mode!r}, "
            f"sampler={sampler!r}, nfe={nfe}, seed={seed}, conserve={conserve}, patch={patch}, "
            f"overlap={overlap}, missing={missing!r}) with model {_model_label(model)}")
    return _assemble(obj, out, names, line)


def _stack(arrays: list[xr.DataArray], ydim: str, xdim: str) -> tuple[xr.DataArray, xr.DataArray]:
    """Variables -> one array with a channel dim (spatial coords dropped; dask: whole spatial and
    channel chunks), and the flat sample index ``[*batch dims]`` (chunked like the data)."""
    stacked = xr.concat(arrays, dim=_CHANNEL_DIM, coords="minimal", compat="override", join="exact")
    stacked = stacked.drop_vars([c for c in stacked.coords if set(stacked[c].dims) & {ydim, xdim}])
    batch_dims = [d for d in stacked.dims if d not in (_CHANNEL_DIM, ydim, xdim)]
    shape = tuple(stacked.sizes[d] for d in batch_dims)
    index = xr.DataArray(np.arange(int(np.prod(shape))).reshape(shape), dims=batch_dims)
    if stacked.chunks is not None:
        stacked = stacked.chunk({_CHANNEL_DIM: -1, ydim: -1, xdim: -1})
        index = index.chunk({d: stacked.chunksizes[d] for d in batch_dims})
    return stacked, index


def _apply(job: _Job, stacked: xr.DataArray, index: xr.DataArray, ydim: str, xdim: str) -> xr.DataArray:
    """Run `_block` through ``xr.apply_ufunc``: eagerly on numpy data, lazily per dask chunk."""
    f = job.factor
    m = 1 if job.mode == "regression" else job.members
    return xr.apply_ufunc(
        functools.partial(_block, job=job), stacked, index,
        input_core_dims=[[_CHANNEL_DIM, ydim, xdim], []],
        output_core_dims=[[MEMBER_DIM, _CHANNEL_DIM, ydim, xdim]],
        exclude_dims={ydim, xdim}, dask="parallelized",
        output_dtypes=[stacked.dtype if stacked.dtype.kind == "f" else np.float32],
        dask_gufunc_kwargs={"output_sizes": {MEMBER_DIM: m, ydim: stacked.sizes[ydim] * f,
                                             xdim: stacked.sizes[xdim] * f}},
        keep_attrs=False,
    )


def _fine_coords(out: xr.DataArray, obj: xr.Dataset | xr.DataArray, fine: dict) -> xr.DataArray:
    """Attach the fine spatial coordinates (with the coarse ones' attrs) and the member coordinate."""
    for d, values in fine.items():
        if values is not None:
            src = obj[d]
            dtype = src.dtype if src.dtype.kind == "f" else np.float64
            attrs = {k: v for k, v in src.attrs.items() if k != "bounds"}  # bounds are not refined
            out = out.assign_coords({d: xr.Variable(d, values.astype(dtype), attrs)})
            out[d].encoding = _encoding(src.encoding)
    member = xr.Variable(MEMBER_DIM, np.arange(out.sizes[MEMBER_DIM]), {"long_name": "ensemble member"})
    return out.assign_coords({MEMBER_DIM: member})


def _encoding(enc: dict) -> dict:
    """The encoding keys that still make sense on the fine ensemble grid."""
    return {k: v for k, v in enc.items() if k in _KEEP_ENCODING}


def _assemble(obj: xr.Dataset | xr.DataArray, out: xr.DataArray, names: list, line: str):
    """Split the channel dim back into variables with their attrs and encodings; add history."""
    pieces = {}
    for c, name in enumerate(names):
        src = obj if isinstance(obj, xr.DataArray) else obj[name]
        da = out.isel({_CHANNEL_DIM: c}, drop=True)
        da.name = src.name
        da.attrs, da.encoding = dict(src.attrs), _encoding(src.encoding)
        pieces[name] = da
    if isinstance(obj, xr.DataArray):
        da = pieces[names[0]]
        da.attrs["history"] = _history(obj, line)
        return da
    ds = xr.Dataset(pieces, attrs=dict(obj.attrs))
    ydim, xdim = out.dims[-2:]
    for v, da in obj.data_vars.items():  # variables off the spatial grid ride along unchanged
        if v not in pieces and ydim not in da.dims and xdim not in da.dims:
            ds[v] = da
    ds.attrs["history"] = _history(obj, line)
    return ds


@xr.register_dataset_accessor("sciddiff")
@xr.register_dataarray_accessor("sciddiff")
class SciddiffAccessor:
    """``ds.sciddiff.downscale(factor=4, members=16)``: `downscale` as a method of xarray objects."""

    def __init__(self, obj: xr.Dataset | xr.DataArray) -> None:
        self._obj = obj

    def downscale(self, factor: int | None = 4, members: int = 16,
                  **kwargs: Any) -> xr.Dataset | xr.DataArray:
        """`downscale` applied to this object; see it for the options."""
        return downscale(self._obj, factor, members, **kwargs)

    def to_file(self, path: str | os.PathLike) -> Path:
        """`write_dataset` of this object (NetCDF or Zarr, atomically)."""
        return write_dataset(self._obj, path)


# ------------------------------------------------------------------------------------------------
# files
def downscale_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    var: str | Sequence[str] | None = None,
    factor: int | None = 4,
    members: int = 16,
    chunks: dict[Hashable, int] | None = None,
    **kwargs: Any,
) -> Path:
    """Read ``in_path``, `downscale` it, write ``out_path`` atomically (NetCDF or Zarr by suffix).

    What ``sciddiff downscale IN.nc -o OUT.nc --var t2m --factor 4 --members 8`` runs. ``chunks``
    (e.g. ``{"time": 24}``) processes the file lazily chunk by chunk with dask; ``kwargs`` go to
    `downscale`. Returns the output path.
    """
    _format_of(Path(out_path))  # fail before the expensive part
    ds = read_dataset(in_path, chunks=chunks)
    out = downscale(ds, factor, members, var=var, **kwargs)
    return write_dataset(out, out_path)
