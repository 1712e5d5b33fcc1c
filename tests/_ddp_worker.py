"""DDP worker for ``tests/test_training.py``: ``python tests/_ddp_worker.py OUTDIR [MAX_STEPS]``.

Trains a small MLP on the 2-D ring with ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``
(gloo). Lightning's ``ddp`` strategy re-runs this script for rank 1, so everything happens under
``__main__``. Each rank writes ``OUTDIR/rank<r>.json`` (world size, per-step losses, a checksum of
its final weights); rank 0 writes the checkpoint to ``OUTDIR/ckpt``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from sciddiff.core import VP
from sciddiff.testing import ring_mixture
from sciddiff.training import DiffusionModule, MLPDenoiser, fit


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main(out: Path, max_steps: int) -> None:
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    pl.seed_everything(0, verbose=False)
    data = ring_mixture(std=0.1).sample(4096, torch.Generator().manual_seed(0)).float()
    loader = DataLoader(data, batch_size=128, shuffle=True)  # Lightning adds a DistributedSampler
    process = VP(schedule="cosine")
    module = DiffusionModule(MLPDenoiser(2, 64, 2, process=process, data_std=1.4), process,
                             lr=3e-3, ema_decay=0.99)
    rec = LossRecorder()
    trainer = fit(
        module, loader, max_steps=max_steps, ckpt_dir=out / "ckpt", enable_progress_bar=False,
        trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "logger": False,
                        "enable_model_summary": False, "callbacks": [rec]},
    )
    assert trainer is not None
    checksum = float(sum(p.detach().double().abs().sum() for p in module.net.parameters()))
    report = {
        "rank": trainer.global_rank, "world_size": trainer.world_size, "losses": rec.losses,
        "step_count": module.step_count, "num_training_batches": trainer.num_training_batches,
        "checksum": checksum, "pid": os.getpid(),
    }
    with open(out / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 120)
