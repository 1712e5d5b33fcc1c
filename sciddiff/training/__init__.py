"""Training: a PyTorch-Lightning module over the engine's losses, EMA, safetensors checkpoints.

Needs ``pytorch-lightning`` (``pip install sciddiff[train]``); the engine core never imports it.

Public API::

    DiffusionModule(net, process, param="eps", *, weighting, time, coupling, lr, weight_decay,
                    warmup_steps, ema_decay, ...)          # a pl.LightningModule
    fit(module, dataloader, *, max_steps, ckpt_dir=None, resume=True, ...)  # resumable training
    save_checkpoint(dir, module) / load_checkpoint(dir) -> Checkpoint
    export_checkpoint(src, dst, dtype="float16")         # inference-only (EMA weights, no optimizer)
    SafetensorsCheckpoint(dirpath, every_n_steps)          # a pl.Callback
    EMA(net, decay=0.999, warmup=True)
    MLPDenoiser(dim, hidden=128, layers=3, time_embedding="fourier", *, process=None, ...)
"""

from ._checkpoint import (
    Checkpoint,
    SafetensorsCheckpoint,
    export_checkpoint,
    fit,
    has_checkpoint,
    load_checkpoint,
    network_config,
    network_from_config,
    process_config,
    process_from_config,
    save_checkpoint,
)
from ._ema import EMA
from ._mlp import MLPDenoiser
from ._module import DiffusionModule

__all__ = [
    "Checkpoint", "SafetensorsCheckpoint", "export_checkpoint", "fit", "has_checkpoint", "load_checkpoint",
    "network_config", "network_from_config", "process_config", "process_from_config", "save_checkpoint",
    "EMA", "MLPDenoiser", "DiffusionModule",
]
