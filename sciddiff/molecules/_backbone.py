"""Input handling shared by the molecule backbones (``EGNNDenoiser``, ``E3Denoiser``).

Both read a State with a flat ``"pos" [N, 3]`` field (and ``"h" [N, h_dim]`` on the same batch
index) and build EDM's node features ``[h, t * time_scale]`` (Hoogeboom et al. 2022, App. B: a
constant ones column when there are no atom features, the diffusion time appended per atom).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import State


def node_inputs(x: State, t: Tensor, *, owner: str, h_dim: int, time_conditioning: bool, time_scale: float,
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Validated ``(pos [N, 3], node features [N, max(h_dim, 1) + time_conditioning], batch [N])``.

    ``t`` is ``[B]`` or a scalar (broadcast to the ``B = x.num_systems`` systems); ``dtype`` is the
    network's, which ``pos`` must match. Errors are ``ValueError`` / ``TypeError`` naming ``owner``.
    """
    expected = {"pos", "h"} if h_dim else {"pos"}
    if set(x.keys()) != expected:
        raise ValueError(f"{owner}: expected fields {sorted(expected)}, got {sorted(x.keys())}")
    pos = x["pos"]
    if "pos" not in x.batch or pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"{owner}: 'pos' must be a flat field [N, 3], got {tuple(pos.shape)}")
    if pos.dtype != dtype:
        raise TypeError(f"{owner}: 'pos' is {pos.dtype} but the network is {dtype}; "
                        "convert one of them (net.to(dtype) or state.to(dtype))")
    batch = x.batch["pos"]
    if h_dim:
        h = x["h"]
        if "h" not in x.batch or h.shape != (pos.shape[0], h_dim):
            raise ValueError(f"{owner}: 'h' must be a flat field [{pos.shape[0]}, {h_dim}], "
                             f"got {tuple(h.shape)}")
        if x.batch["h"] is not batch and not torch.equal(x.batch["h"], batch):
            raise ValueError(f"{owner}: 'pos' and 'h' must share one batch index")
        feats = [h.to(pos.dtype)]
    else:
        feats = [pos.new_ones(pos.shape[0], 1)]  # EDM's constant feature when there are no atom types
    if time_conditioning:
        t = torch.as_tensor(t, device=pos.device)
        t = t.expand(x.num_systems) if t.ndim == 0 else t
        if t.shape != (x.num_systems,):
            raise ValueError(f"{owner}: t must have shape [{x.num_systems}], got {tuple(t.shape)}")
        feats.append((t.to(pos.dtype) * time_scale)[batch, None])
    return pos, torch.cat(feats, dim=1), batch
