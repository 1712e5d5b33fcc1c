"""QM9 recipe: qm9pack CSVs -> cached safetensors splits (EDM sizes) with provenance, and checks.

Source: the PyPI package ``qm9pack`` (MIT; QM9 by Ramakrishnan et al. 2014, Sci. Data 1, 140022),
``pip install qm9pack``; no download beyond that. Output: ``$SCIDDIFF_DATA`` or
``~/.cache/sciddiff``, folder ``qm9/`` (see ``sciddiff.molecules._qm9`` for the layout, the split
method and how it relates to EDM's split).

Usage::

    python data_recipes/qm9.py                      # build (or verify) the cache, print a summary
    python data_recipes/qm9.py --rebuild --cache-dir /data/sciddiff
    python data_recipes/qm9.py --edm-metrics 20000  # EDM metrics of 20,000 random QM9 molecules
    python data_recipes/qm9.py --edm-smiles         # cache EDM's reference SMILES of train (novelty)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from sciddiff.molecules._metrics import evaluate_molecules
from sciddiff.molecules._qm9 import SPLITS, load_qm9, load_qm9_edm_smiles, qm9_cache_dir


def _edm_metrics(splits: dict, n: int, seed: int) -> dict:
    """EDM metrics of ``n`` molecules drawn without replacement from all splits together."""
    index = [(s, i) for s, data in splits.items() for i in range(len(data))]
    if not 0 < n <= len(index):
        raise SystemExit(f"--edm-metrics must be in 1..{len(index)}, got {n}")
    pick = np.random.default_rng(seed).choice(len(index), size=n, replace=False)
    mols = [splits[index[k][0]].molecule(index[k][1]) for k in pick]
    t0 = time.perf_counter()
    metrics = evaluate_molecules(mols)
    return {"molecules": n, "sample_seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            **metrics.to_dict()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None,
                    help="cache root (default: $SCIDDIFF_DATA, else ~/.cache/sciddiff)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if the cache verifies")
    ap.add_argument("--limit", type=int, default=None, help="first K molecules only (a quick look)")
    ap.add_argument("--edm-metrics", type=int, default=0, metavar="N",
                    help="EDM stability/validity of N random molecules from all splits")
    ap.add_argument("--sample-seed", type=int, default=1, help="seed of the --edm-metrics sample")
    ap.add_argument("--edm-smiles", action="store_true", help="compute and cache EDM's train SMILES")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    splits = {}
    for i, s in enumerate(SPLITS):
        splits[s] = load_qm9(s, args.cache_dir, rebuild=args.rebuild and i == 0, limit=args.limit)
    out = qm9_cache_dir(args.cache_dir, args.limit)
    summary: dict = {
        "cache": str(out),
        "seconds": round(time.perf_counter() - t0, 1),
        "molecules": {s: len(d) for s, d in splits.items()},
        "atoms": {s: int(d.numbers.shape[0]) for s, d in splits.items()},
        "provenance": json.loads((out / "provenance.json").read_text()),
    }
    if args.edm_smiles:
        t1 = time.perf_counter()
        ref = load_qm9_edm_smiles("train", args.cache_dir, limit=args.limit)
        summary["edm_train_smiles"] = {"count": len(ref), "seconds": round(time.perf_counter() - t1, 1)}
    if args.edm_metrics:
        summary["edm_metrics"] = _edm_metrics(splits, args.edm_metrics, args.sample_seed)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
