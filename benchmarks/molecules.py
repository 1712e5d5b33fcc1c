"""Throughput of the molecule backbones against EDM's published EGNN.

Rows: ``EGNNDenoiser`` (``impl="sparse"`` and ``"dense"``), ``E3Denoiser`` and a faithful re-write
of EDM's own code (``_edm_reference.py``), all at EDM's QM9 size where the architecture has one:
9 layers, 256 hidden features (EGNN: 1 GCL per block, attention, tanh; e3nn: 9 layers with
256-dimensional hidden irreps ``128x0e + 32x0o + 16x1o + 16x1e``, l <= 2). Input: a batch of 64
molecules, sizes drawn from QM9's histogram of atom counts (``QM9_SIZES``, 130,831 molecules of
``qm9pack``), random positions and atom types, float32.

Measured, per backbone and thread count: a training step (forward, MSE loss, backward, Adam step)
and a forward pass under ``torch.no_grad``; the median over ``repeats`` timed runs after one
warm-up (quick: 2 runs, full: 5). Wall time (``time.perf_counter``) is what the records report;
process CPU time is kept alongside, since on a shared machine the wall time also counts waiting
for a core (the CPU time ratio then says more about the code).

EDM's figures quoted for this machine class (2 cores): 19.7 s per training step (3.3 molecules/s)
and 5.1 s per forward of 64 molecules (12.5 molecules/s). Ratios are reported against those and
against the re-write measured in the same run, at the same thread count.

Python: ``run_throughput(out, quick=True, device="cpu", threads=None) -> list[dict]``; writes
``molecules_throughput.json`` and ``molecules_throughput.md`` into ``out``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sciddiff._atomic import atomic_write_text
from sciddiff.core import State, ZeroCoM
from sciddiff.molecules._e3nn import E3Denoiser
from sciddiff.molecules._egnn import EGNNDenoiser, full_edges

from . import _edm_reference as edm
from ._common import fmt, hardware_line, md_table

#: Number of QM9 molecules with n atoms (H included), counted over qm9pack's 130,831 molecules.
QM9_SIZES: dict[int, int] = {
    3: 2, 4: 4, 5: 5, 6: 12, 7: 20, 8: 65, 9: 172, 10: 483, 11: 1053, 12: 2189, 13: 4027, 14: 6758,
    15: 10216, 16: 13824, 17: 16969, 18: 17442, 19: 18146, 20: 12403, 21: 13166, 22: 4428, 23: 6362,
    24: 712, 25: 1923, 26: 59, 27: 356, 29: 35,
}
EDM_QUOTED = {"step_seconds": 19.7, "forward_seconds": 5.1}  # EDM's code, 64 molecules, 2 cores
BATCH = 64
HIDDEN, LAYERS = 256, 9
E3_IRREPS = "128x0e + 32x0o + 16x1o + 16x1e"
BACKBONES = (("egnn", "sparse"), ("egnn", "dense"), ("e3nn", "sparse"), ("edm-reference", "padded"))


def draw_sizes(n: int, seed: int = 0) -> list[int]:
    """``n`` molecule sizes drawn from ``QM9_SIZES``."""
    sizes = torch.tensor(list(QM9_SIZES))
    p = torch.tensor(list(QM9_SIZES.values()), dtype=torch.float64)
    idx = torch.multinomial(p / p.sum(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return sizes[idx].tolist()


def make_batch(sizes: Sequence[int], device: str = "cpu", seed: int = 0) -> tuple[State, torch.Tensor]:
    """A molecule State (``pos`` with zero CoM, one-hot ``h`` over 5 types) and times ``t [B]``."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = batch.shape[0]
    pos = torch.randn(n, 3, generator=g) * 1.5
    h = torch.nn.functional.one_hot(torch.randint(0, 5, (n,), generator=g), 5).float()
    s = State({"pos": pos, "h": h}, {"pos": batch, "h": batch}, len(sizes), {"pos": ZeroCoM()}).project()
    return s.to(device), torch.rand(len(sizes), generator=g).to(device)


def _build(backbone: str, impl: str, hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if backbone == "e3nn":
        return E3Denoiser(hidden_irreps=E3_IRREPS, layers=layers)
    net = EGNNDenoiser(hidden=hidden, layers=layers, impl="sparse" if backbone != "egnn" else impl)
    return edm.from_denoiser(net) if backbone == "edm-reference" else net


def _closures(backbone: str, net: torch.nn.Module, s: State, t: torch.Tensor
              ) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(train_step, forward)`` closures; EDM's padded inputs are prepared outside the timing, as
    its data loader does."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    if backbone == "edm-reference":
        args = edm.to_edm_batch(s.to("cpu"), t.cpu())
        args = tuple(a.to(s.device) for a in args)
        mask = args[2]

        def run():
            return net(*args)

        def loss_of(out):
            return (out.square() * mask).sum() / mask.sum()
    else:
        def run():
            return net(s, t)

        def loss_of(out):
            return out["pos"].square().mean() + out["h"].square().mean()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(run()).backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            run()

    return step, forward


def _time(fn: Callable[[], None], repeats: int, device: str) -> tuple[float, float]:
    """Median wall and CPU seconds of ``repeats`` calls after one warm-up."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure(backbone: str, impl: str, s: State, t: torch.Tensor, *, device: str, threads: int,
            repeats: int, hidden: int = HIDDEN, layers: int = LAYERS) -> dict[str, Any]:
    """One record: timings of a training step and a forward pass of ``backbone`` on ``s``."""
    net = _build(backbone, impl, hidden, layers).to(device)
    step, forward = _closures(backbone, net, s, t)
    step_s, step_cpu = _time(step, repeats, device)
    fwd_s, fwd_cpu = _time(forward, repeats, device)
    B = s.num_systems
    return {
        "backbone": backbone, "impl": impl, "device": device, "threads": threads,
        "step_seconds": step_s, "forward_seconds": fwd_s,
        "train_mol_per_s": B / step_s, "forward_mol_per_s": B / fwd_s,
        "step_cpu_seconds": step_cpu, "forward_cpu_seconds": fwd_cpu,
        "params": sum(p.numel() for p in net.parameters()), "repeats": repeats,
    }


def _add_ratios(records: list[dict[str, Any]]) -> None:
    """Speed-ups against EDM's quoted figures and the re-write at the same device and threads."""
    for r in records:
        r["step_speedup_vs_quoted"] = EDM_QUOTED["step_seconds"] / r["step_seconds"]
        r["forward_speedup_vs_quoted"] = EDM_QUOTED["forward_seconds"] / r["forward_seconds"]
        ref = next((q for q in records if q["backbone"] == "edm-reference" and q["device"] == r["device"]
                    and q["threads"] == r["threads"]), None)
        for k in ("step", "forward"):
            r[f"{k}_speedup_vs_reference"] = ref[f"{k}_seconds"] / r[f"{k}_seconds"] if ref else None
            r[f"{k}_cpu_speedup_vs_reference"] = (ref[f"{k}_cpu_seconds"] / r[f"{k}_cpu_seconds"]
                                                   if ref else None)


def run_throughput(out: Path, *, quick: bool, device: str = "cpu", threads: int | Sequence[int] | None = None,
                   backbones: Sequence[tuple[str, str]] = BACKBONES, batch: int = BATCH, hidden: int = HIDDEN,
                   layers: int = LAYERS) -> list[dict[str, Any]]:
    """Time every backbone; write ``molecules_throughput.{json,md}`` into ``out``; return the records.

    Args:
        quick: 2 timed repeats instead of 5.
        device: ``"cpu"`` or a CUDA device.
        threads: torch intra-op threads; an int, a list, or None for 1 and 2 on CPU (the current
            setting on CUDA).
        backbones: ``(backbone, impl)`` rows to run (default: all of ``BACKBONES``).
        batch, hidden, layers: problem size (defaults: EDM's; smaller for smoke tests).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = 2 if quick else 5
    if threads is None:
        threads = sorted({1, min(2, os.cpu_count() or 1)}) if device == "cpu" else [torch.get_num_threads()]
    thread_list = [threads] if isinstance(threads, int) else list(threads)
    for name, v in (("batch", batch), ("hidden", hidden), ("layers", layers)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"run_throughput: {name} must be a positive integer, got {v!r}")
    known = {"egnn": ("sparse", "dense"), "e3nn": ("sparse",), "edm-reference": ("padded",)}
    for backbone, impl in backbones:
        if impl not in known.get(backbone, ()):
            raise ValueError(f"run_throughput: unknown row ({backbone!r}, {impl!r}); known: {known}")
    sizes = draw_sizes(batch)
    s, t = make_batch(sizes, device)
    edges = int(full_edges(s.batch["pos"].cpu(), batch)[0].shape[0])
    before = torch.get_num_threads()
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    records = []
    try:
        for n in thread_list:
            torch.set_num_threads(n)
            for backbone, impl in backbones:
                records.append(measure(backbone, impl, s, t, device=device, threads=n, repeats=repeats,
                                       hidden=hidden, layers=layers))
    finally:
        torch.set_num_threads(before)
    _add_ratios(records)
    meta = {
        "hardware": hardware_line(), "device": device, "quick": quick, "batch": batch, "atoms": sum(sizes),
        "edges": edges, "padded_edges": batch * max(sizes) ** 2, "mean_atoms": sum(sizes) / batch,
        "max_atoms": max(sizes), "hidden": hidden, "layers": layers, "e3nn_irreps": E3_IRREPS,
        "edm_quoted": EDM_QUOTED, "load_average_at_start": load, "repeats": repeats,
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_text(out / "molecules_throughput.json",
                      json.dumps({"meta": meta, "records": records}, indent=1))
    atomic_write_text(out / "molecules_throughput.md", markdown(records, meta))
    return records


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report: one table of timings and speed-ups."""
    L = ["# Molecule backbones: throughput", "", f"Hardware: {meta['hardware']}", "",
         f"Device {meta['device']}; batch of {meta['batch']} QM9-sized molecules ({meta['atoms']} atoms, "
         f"mean {meta['mean_atoms']:.1f}, max {meta['max_atoms']}; {meta['edges']} directed edges, "
         f"{meta['padded_edges']} in EDM's padded layout); {meta['layers']} layers x {meta['hidden']} "
         f"hidden (e3nn: `{meta['e3nn_irreps']}`); float32. Median of {meta['repeats']} "
         "timed runs after a warm-up. Load average at start: "
         f"{fmt(meta['load_average_at_start'])} (on a shared machine the wall time includes waiting for "
         "a core; the CPU-time ratio is the steadier comparison).", "",
         f"EDM quoted (its code, 2 cores): {EDM_QUOTED['step_seconds']} s per training step, "
         f"{EDM_QUOTED['forward_seconds']} s per forward of 64 molecules. `x quoted`: that time / ours; "
         "`x ref`: the EDM re-write measured here at the same thread count / ours (wall; CPU in "
         "parentheses).", ""]
    rows = []
    for r in records:
        def ratio(k: str, r: dict[str, Any] = r) -> str:
            a, c = r[f"{k}_speedup_vs_reference"], r[f"{k}_cpu_speedup_vs_reference"]
            return "-" if a is None else f"{fmt(a)} ({fmt(c)})"
        rows.append([r["backbone"], r["impl"], str(r["threads"]), f"{r['params']:,}",
                     fmt(r["step_seconds"]), fmt(r["train_mol_per_s"]), fmt(r["step_speedup_vs_quoted"]),
                     ratio("step"), fmt(r["forward_seconds"]), fmt(r["forward_mol_per_s"]),
                     fmt(r["forward_speedup_vs_quoted"]), ratio("forward")])
    L.append(md_table(["backbone", "layout", "threads", "params", "step s", "train mol/s", "x quoted",
                       "x ref", "forward s", "fwd mol/s", "x quoted", "x ref"], rows,
                      ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"]))
    L += ["", f"Total wall time {meta['wall_seconds']:.0f} s.", ""]
    return "\n".join(L)


QUALITY_NFES = (25, 50, 100)
QUALITY_SAMPLERS = ("dpmpp_2m", "unipc", "heun")


def run_quality(out: Path, n: int, *, checkpoint: str | None = None, nfes: Sequence[int] = QUALITY_NFES,
                samplers: Sequence[str] = QUALITY_SAMPLERS, seed: int = 0, device: str = "cpu",
                train_smiles: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Sample ``n`` molecules from the model (default: bundled) for every (sampler, NFE), evaluate
    them with EDM's metrics (and novelty where ``train_smiles`` is given); write
    ``molecules_quality.{json,md}``. The same seed, hence the same atom counts, for every row."""
    from sciddiff.molecules import evaluate_molecules, load_generator, sample_molecules

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = load_generator(checkpoint, device=device)
    records = []
    for sampler in samplers:
        for nfe in nfes:
            t0 = time.perf_counter()
            mols = sample_molecules(n, checkpoint=gen, sampler=sampler, nfe=nfe, seed=seed, device=device)
            secs = time.perf_counter() - t0
            m = evaluate_molecules(mols, train_smiles=train_smiles).to_dict()
            records.append({"sampler": sampler, "nfe": nfe, "seconds": secs, **m})
    meta = {"hardware": hardware_line(), "device": device, "n": n, "seed": seed,
            "checkpoint": str(checkpoint or "bundled"), "training": gen.info.get("training")}
    atomic_write_text(out / "molecules_quality.json",
                      json.dumps({"meta": meta, "records": records}, indent=1))
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    rows = [[r["sampler"], str(r["nfe"]), pct(r["atom_stability"]), pct(r["molecule_stability"]),
             pct(r["validity"]), pct(r["valid_unique"]), pct(r["novelty"]), f"{r['seconds']:.0f}"]
            for r in records]
    text = "\n".join([
        "# Molecule generator: quality (EDM metrics, %)", "", f"Hardware: {meta['hardware']}", "",
        f"{n} molecules per row from {meta['checkpoint']} (seed {seed}).", "",
        md_table(["sampler", "NFE", "atom stab.", "mol. stab.", "valid", "valid x unique", "novel", "s"],
                 rows, ["l", "r", "r", "r", "r", "r", "r", "r"]), ""])
    atomic_write_text(out / "molecules_quality.md", text)
    return records


def run(out: Path, *, quick: bool, device: str = "cpu", threads: int | Sequence[int] | None = None,
        quality: int = 0) -> None:
    """``sciddiff bench molecules``: throughput, then (``quality > 0``) the bundled model's quality."""
    run_throughput(out, quick=quick, device=device, threads=threads)
    if quality:
        run_quality(out, quality, device=device)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, nargs="*")
    a = p.parse_args()
    for rec in run_throughput(a.out, quick=a.quick, device=a.device, threads=a.threads or None):
        print(json.dumps(rec))
