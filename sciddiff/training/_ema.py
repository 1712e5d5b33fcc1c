"""Exponential moving average (EMA) of network weights.

Sampling from an EMA of the weights rather than the last iterate is standard for diffusion models
(Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative Models", Sec. 3.5;
Ho et al. 2020; Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3, which studies the EMA length). After update ``n`` (0-based) with parameters
``p_n``::

    d_n = min(decay, (1 + n) / (10 + n))      if warmup (TensorFlow's ``num_updates`` rule)
    d_n = decay                               otherwise
    shadow <- d_n * shadow + (1 - d_n) * p_n

The warmup keeps the average from being dominated by the random initialisation early on.
Pure torch: no Lightning import here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copies of a network's floating-point parameters.

    Args:
        net: the network whose ``named_parameters()`` are averaged (buffers are not averaged:
            ``copy_to`` leaves them as they are in the target).
        decay: the asymptotic decay ``d`` in ``[0, 1)``; the EMA length is ~``1 / (1 - d)`` updates.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` for update ``n``.

    Shapes: each shadow tensor has its parameter's shape and dtype (float32 parameters keep a
    float32 shadow).
    """

    def __init__(self, net: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in _float_params(net)
        }

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """``shadow <- d * shadow + (1 - d) * param`` for every tracked parameter."""
        d = self.current_decay()
        for name, p in _float_params(net):
            s = self.shadow[name]
            if s.device != p.device:
                s = self.shadow[name] = s.to(p.device)
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> None:
        """Load the shadow weights into ``net`` (same architecture), in place."""
        params = dict(net.named_parameters())
        missing = set(self.shadow) - set(params)
        if missing:
            raise KeyError(f"EMA.copy_to: network lacks parameters {sorted(missing)[:5]}")
        for name, s in self.shadow.items():
            params[name].copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow tensors by parameter name (``num_updates`` is kept separately)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, shadow: dict[str, Tensor], num_updates: int) -> None:
        if set(shadow) != set(self.shadow):
            extra, missing = set(shadow) - set(self.shadow), set(self.shadow) - set(shadow)
            raise KeyError(
                f"EMA.load_state_dict: unexpected {sorted(extra)[:5]}, missing {sorted(missing)[:5]}"
            )
        for name, s in shadow.items():
            self.shadow[name].copy_(s)
        self.num_updates = int(num_updates)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, warmup={self.warmup}, num_updates={self.num_updates})"


def _float_params(net: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, p in net.named_parameters():
        if p.is_floating_point():
            yield name, p
