"""A time-boxed GPU session for the molecule generator, as one script (made for a lent GPU).

Phases, each guarded so that a failure in one still returns the others' results:
1. backbone throughput (``run_throughput`` on the GPU, EDM-size);
2. EDM-size EGNN (``configs/edm.json``, the faster layout from phase 1) trained for the time left,
   with EMA snapshots after 60, 150 and 270 s of training (the budget curve);
3. sampling on the GPU: 10,000 molecules (ddpm, 100 NFE) and 1,000 per sampler and NFE, plus 1,000
   per snapshot, saved as npz (``numbers``, ``positions``, ``ptr``) for evaluation elsewhere
   (RDKit need not be on the GPU machine);
4. everything packed into ``$OUT`` as tar chunks of at most 15 MB (``ckpt.tar.NN``, ``res.tar.NN``).

Run: ``OUT=DIR BUDGET=555 python benchmarks/molecules_gpu.py`` (``SMOKE=1``: a tiny CPU run;
``LR``, ``BATCH``: optimiser settings, default 3e-4 and 256; ``SLIM_QM9=DIR``: build the QM9 cache
from a compact copy of the train split, for machines without qm9pack). Evaluate the samples with
``evaluate_molecules`` (see ``benchmarks/RESULTS.md``).
"""
import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()
SMOKE = os.environ.get("SMOKE") == "1"
BUDGET = float(os.environ.get("BUDGET", "530"))
if not os.environ.get("OUT"):
    sys.exit("molecules_gpu.py: set OUT to the folder for the results (see the module docstring)")
OUT = Path(os.environ["OUT"])
OUT.mkdir(parents=True, exist_ok=True)
WORK = Path(os.environ.get("WORK", "/tmp/gpurun"))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACK = WORK / "pack"
PACK.mkdir(parents=True, exist_ok=True)
LOG = PACK / "log.txt"


def log(*a):
    msg = f"[{time.perf_counter() - T0:7.1f}s] " + " ".join(str(x) for x in a)
    print(msg, flush=True)
    with open(LOG, "a") as f:
        f.write(msg + "\n")


def left():
    return BUDGET - (time.perf_counter() - T0)


def guarded(name):
    def deco(fn):
        def run(*a, **k):
            log(f"--- {name} (left {left():.0f}s)")
            try:
                return fn(*a, **k)
            except Exception:
                log(f"FAILED {name}:\n" + traceback.format_exc())
                return None
            finally:
                log(f"--- {name} done (left {left():.0f}s)")
        return run
    return deco


import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
log("torch", torch.__version__, "device", DEVICE,
    torch.cuda.get_device_name(0) if DEVICE == "cuda" else "", "cpus", os.cpu_count())


@guarded("bench")
def bench():
    from benchmarks.molecules import run_throughput
    kw = dict(batch=8, hidden=16, layers=2) if SMOKE else {}
    recs = run_throughput(PACK / "bench", quick=SMOKE, device=DEVICE, **kw)
    for r in recs:
        log(json.dumps({k: r[k] for k in r if k in ("backbone", "impl", "step_seconds", "forward_seconds",
                                                      "train_mol_per_s", "forward_mol_per_s", "params")}))
    egnn = [r for r in recs if r["backbone"] == "egnn"]
    best = min(egnn, key=lambda r: r["step_seconds"])
    return best["impl"]


@guarded("data")
def data(cache_root: Path):
    """The QM9 train cache under ``cache_root`` from ``$SLIM_QM9`` (``train_slim.safetensors`` with
    uint8 numbers, ``train.smiles.txt``, ``provenance.json``)."""
    from safetensors.torch import load_file, save_file
    src = Path(os.environ["SLIM_QM9"])
    d = cache_root / "qm9"
    d.mkdir(parents=True, exist_ok=True)
    t = load_file(str(src / "train_slim.safetensors"))
    save_file({"numbers": t["numbers"].long(), "positions": t["positions"], "ptr": t["ptr"]},
              str(d / "train.safetensors"))
    shutil.copy(src / "train.smiles.txt", d / "train.smiles.txt")
    prov = json.loads((src / "provenance.json").read_text())
    for name in ("train.safetensors", "train.smiles.txt"):
        prov["files"][name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    (d / "provenance.json").write_text(json.dumps(prov))
    return True


class Snapshots:
    """Saves EMA+raw weights (no optimizer) at given wall times after training starts."""

    def __init__(self, root: Path, at: list[float]):
        import pytorch_lightning as pl

        outer = self

        class CB(pl.Callback):
            def on_train_start(self, trainer, module):
                outer.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, idx):
                if outer.at and time.perf_counter() - outer.t0 >= outer.at[0]:
                    from sciddiff.training import save_checkpoint
                    at = outer.at.pop(0)
                    d = outer.root / f"snap{int(at)}"
                    save_checkpoint(d, module, include_optimizer=False, include_rng=False)
                    outer.saved.append((d, int(module.step_count), time.perf_counter() - outer.t0))
                    log(f"snapshot {d.name}: step {module.step_count}")

        self.root, self.at, self.saved, self.t0 = root, list(at), [], time.perf_counter()
        self.callback = CB()


@guarded("train")
def train(impl: str, cache_root: Path | None, run_dir: Path, seconds: float, snaps: Snapshots):
    from sciddiff.molecules import MoleculeTrainConfig, train_molecules
    cfg = json.loads((REPO / "sciddiff/molecules/configs/edm.json").read_text())
    cfg["backbone_kwargs"]["impl"] = impl
    cfg.update(lr=float(os.environ.get("LR", "3e-4")), warmup_steps=500,
               batch_size=int(os.environ.get("BATCH", "256")), max_steps=10_000_000,
               checkpoint_every=2000, log_every=100, val_every=None, num_workers=6,
               cache_dir=str(cache_root) if cache_root else None, sampler="ddpm", nfe=100)
    if SMOKE:
        cfg["backbone_kwargs"].update(hidden=16, layers=2)
        cfg.update(batch_size=16, num_workers=0, log_every=5)
    config = MoleculeTrainConfig.from_dict(cfg)
    log("config", json.dumps(config.to_dict()))
    tk = {"max_time": {"seconds": int(seconds)}, "callbacks": [snaps.callback]}
    if DEVICE == "cuda":
        tk.update(accelerator="gpu", devices=1)
    else:
        tk.update(accelerator="cpu")
    train_molecules(config, run_dir, resume=False, progress=False, trainer_kwargs=tk)
    info = json.loads((run_dir / "molecule.json").read_text())
    log("trained", json.dumps(info["training"]))
    return info


def flush(name: str, folder: Path, chunk: int = 15 * 1024 * 1024):
    """Tar ``folder`` into OUT as ``name.tar.NN`` chunks (old chunks of that name removed first)."""
    tar = WORK / f"{name}.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(folder, arcname=folder.name)
    data_bytes = tar.read_bytes()
    for old in OUT.glob(f"{name}.tar.*"):
        old.unlink()
    for i in range(0, len(data_bytes), chunk):
        (OUT / f"{name}.tar.{i // chunk:02d}").write_bytes(data_bytes[i:i + chunk])
    shutil.copy(LOG, OUT / "log.txt")
    log(f"flushed {name}: {len(data_bytes) / 1e6:.1f} MB")


def save_samples(mols, path: Path):
    import numpy as np
    nums = np.concatenate([np.asarray(m.numbers) for m in mols]).astype(np.uint8)
    pos = np.concatenate([np.asarray(m.positions, dtype=np.float32) for m in mols])
    ptr = np.cumsum([0] + [len(m.numbers) for m in mols]).astype(np.int64)
    np.savez_compressed(path, numbers=nums, positions=pos, ptr=ptr)


@guarded("sample")
def sample(ckpt: Path, tag: str, runs: list[tuple[str, int, int]]):
    from sciddiff.molecules import load_generator, sample_molecules
    gen = load_generator(ckpt, device=DEVICE)
    times = {}
    chunk = 2500
    for sampler, nfe, n in runs:
        for i in range(0, n, chunk):
            if left() < 12:
                log("skip", sampler, nfe, n, i, "(time)")
                break
            t = time.perf_counter()
            mols = sample_molecules(min(chunk, n - i), checkpoint=gen, sampler=sampler, nfe=nfe,
                                    seed=1 + i // chunk, batch_size=chunk, device=DEVICE)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            name = f"{tag}_{sampler}_{nfe}_{n}_part{i // chunk}"
            save_samples(mols, PACK / "samples" / f"{name}.npz")
            times[name] = dt
            log(f"sampled {name} in {dt:.1f}s")
            with open(PACK / "samples" / f"times_{tag}.json", "w") as f:
                json.dump(times, f)
        flush("res", PACK)


def main():
    (PACK / "samples").mkdir(exist_ok=True)
    cache_root, run_dir = WORK / "cache", WORK / "run"
    impl = bench() or "sparse"
    log("impl", impl)
    if os.environ.get("SLIM_QM9"):
        ok = data(cache_root)
    else:  # the default cache (built from qm9pack on first use)
        cache_root, ok = None, True
    final_reserve = 25 if SMOKE else 75  # final sampling + packing
    snap_at = [10.0, 20.0] if SMOKE else [60.0, 150.0, 270.0]
    train_s = max(30.0, left() - final_reserve - 4 * len(snap_at) - 20)
    log(f"training for {train_s:.0f}s")
    snaps = Snapshots(WORK, [a for a in snap_at if a < train_s - 10])
    info = train(impl, cache_root, run_dir, train_s, snaps) if ok else None
    if run_dir.is_dir():
        ck = WORK / "run_out"
        ck.mkdir(exist_ok=True)
        for name in ("model.safetensors", "state.json", "molecule.json", "config.json", "history.json"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, ck / name)
        flush("ckpt", ck)
    n_big = 200 if SMOKE else 10_000
    n_small = 50 if SMOKE else 1000
    if info is not None:
        sample(run_dir, "final", [("ddpm", 100, n_big)]
               + [(s, k, n_small) for s in ("ddpm", "dpmpp_2m", "unipc") for k in (25, 50, 100)])
    for d, step, wall in snaps.saved:
        shutil.copy(run_dir / "molecule.json", d / "molecule.json")
        shutil.copy(run_dir / "config.json", d / "config.json")
        sample(d, f"snap{step}", [("ddpm", 100, n_small)])
        with open(PACK / "samples" / f"snapinfo_{step}.json", "w") as f:
            json.dump({"step": step, "wall_s": wall}, f)


try:
    main()
except Exception:
    log("MAIN FAILED:\n" + traceback.format_exc())
finally:
    flush("res", PACK)
    print(f"done in {time.perf_counter() - T0:.0f}s", flush=True)
