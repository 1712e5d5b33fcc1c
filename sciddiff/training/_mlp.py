"""A small MLP denoiser for low-dimensional dense data (toy problems, tests, tabular data)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core import GaussianProcess, State

TimeEmbedding = Literal["fourier", "sinusoidal", "none"]


class MLPDenoiser(nn.Module):
    """``net(x: State, t: Tensor[B]) -> State`` for one dense field ``x [B, dim]``.

    Time input (the scalar ``c [B]`` the network sees):

    - with ``process``: ``c = log(sigma(t) / alpha(t)) / 4``, clamped to ``[-5, 5]`` (i.e.
      ``log s`` in ``[-20, 20]``). This is EDM's ``c_noise`` (Karras et al. 2022, Table 1) and
      minus an eighth of the log-SNR, so one network works for every process: VP in discrete
      (integer t in ``[0, N-1]``) or continuous time, VE, EDM and the linear interpolant (whose
      ``alpha = 0`` end gives ``+inf``, clamped). The input is also scaled to unit variance,
      ``x / sqrt(alpha^2 data_std^2 + sigma^2)`` (EDM's ``c_in``), so raw EDM/VE inputs of
      size ``sigma_max`` do not saturate the network;
    - with ``time_fn``: ``c = time_fn(t)`` and no input scaling;
    - with neither: ``c = t`` as given. Use this inside ``EDMPrecond``, which already passes
      ``c_noise = log(sigma/alpha) / 4`` and scales the input.

    Architecture: ``h = SiLU(Linear(x_in) + Linear(emb(c)))``, then ``layers - 1`` times
    ``(Linear, SiLU)``, then ``Linear -> [B, dim]``. Separate input layers for ``x`` and the time
    embedding keep the data weights at their fan-in-``dim`` initialisation scale (concatenating
    ``x`` with a wide embedding made them tiny, and training under ``EDMPrecond`` then stalled).
    ``emb`` is the ``time_embedding``: ``"fourier"`` (random Fourier features with fixed Gaussian
    frequencies, Tancik et al. 2020; Song et al. 2021's ``GaussianFourierProjection``),
    ``"sinusoidal"`` (frequencies geometric in [0.25, 64] per unit ``c``, as Vaswani et al. 2017)
    or ``"none"`` (``c`` itself).
    The output is in whatever parameterization the ``Model`` wrapping it declares (eps, x0, v,
    score, velocity).

    Args:
        dim: data dimension d.
        hidden: width of the hidden layers.
        layers: number of hidden layers (>= 1).
        time_embedding: see above.
        process: the Gaussian process (enables the ``log(sigma/alpha)`` input and input scaling).
        time_fn: a callable ``t [B] -> c [B]`` (exclusive with ``process``).
        data_std: data standard deviation used by the input scaling.
        embed_dim: size of the time embedding (even).
        fourier_scale: std of the Fourier frequencies (in units of ``c``).
        field: name of the State field.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        layers: int = 3,
        time_embedding: TimeEmbedding = "fourier",
        *,
        process: GaussianProcess | None = None,
        time_fn: Callable[[Tensor], Tensor] | None = None,
        data_std: float = 1.0,
        embed_dim: int = 32,
        fourier_scale: float = 4.0,
        field: str = "x",
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError("MLPDenoiser: dim, hidden and layers must be positive")
        if time_embedding not in ("fourier", "sinusoidal", "none"):
            raise ValueError(f"MLPDenoiser: unknown time_embedding {time_embedding!r}")
        if process is not None and time_fn is not None:
            raise ValueError("MLPDenoiser: give process or time_fn, not both")
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError("MLPDenoiser: embed_dim must be even and >= 2")
        if data_std <= 0:
            raise ValueError("MLPDenoiser: data_std must be positive")
        self.dim, self.hidden, self.layers = dim, hidden, layers
        self.time_embedding, self.embed_dim, self.fourier_scale = time_embedding, embed_dim, fourier_scale
        self.process, self.time_fn, self.data_std, self.field = process, time_fn, float(data_std), field
        half = embed_dim // 2
        if time_embedding == "fourier":
            g = torch.Generator().manual_seed(0)  # fixed: does not touch the global RNG
            freqs = torch.randn(half, generator=g) * fourier_scale
        else:
            freqs = torch.exp(torch.linspace(math.log(0.25), math.log(64.0), half))
        self.register_buffer("freqs", freqs)
        emb_out = 1 if time_embedding == "none" else embed_dim
        self.x_in = nn.Linear(dim, hidden)
        self.t_in = nn.Linear(emb_out, hidden)
        mods: list[nn.Module] = [nn.SiLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), nn.SiLU()]
        mods.append(nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(*mods)

    @property
    def config(self) -> dict[str, Any] | None:
        """Constructor kwargs as JSON (None where a ``time_fn`` makes the net unserialisable)."""
        if self.time_fn is not None:
            return None
        from ._checkpoint import process_config

        return {
            "dim": self.dim, "hidden": self.hidden, "layers": self.layers,
            "time_embedding": self.time_embedding, "embed_dim": self.embed_dim,
            "fourier_scale": self.fourier_scale, "data_std": self.data_std, "field": self.field,
            "process": process_config(self.process) if self.process is not None else None,
        }

    def time_feature(self, t: Tensor) -> Tensor:
        """The scalar time input ``c [B]`` (float64 for the process path)."""
        if self.process is not None:
            tt = t.to(torch.float64)
            log_s = torch.log(self.process.sigma(tt)) - torch.log(self.process.alpha(tt))
            return log_s.clamp(-20.0, 20.0) / 4
        if self.time_fn is not None:
            return self.time_fn(t)
        return t

    def embed(self, c: Tensor) -> Tensor:
        """``c [B] -> [B, embed_dim]`` (or ``[B, 1]`` for ``"none"``)."""
        c = c.to(self.freqs.dtype)
        if self.time_embedding == "none":
            return c[:, None]
        arg = c[:, None] * self.freqs[None]
        if self.time_embedding == "fourier":
            arg = 2 * math.pi * arg
        return torch.cat([arg.sin(), arg.cos()], dim=1)

    def forward(self, x: State, t: Tensor) -> State:
        v = x[self.field]
        if v.ndim != 2 or v.shape[1] != self.dim or self.field in x.batch:
            raise ValueError(
                f"MLPDenoiser: expected a dense field {self.field!r} of shape [B, {self.dim}], "
                f"got {tuple(v.shape)}"
            )
        B = v.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        h = v
        if self.process is not None:
            tt = t.to(torch.float64)
            a, s = self.process.alpha(tt), self.process.sigma(tt)
            c_in = torch.rsqrt(a**2 * self.data_std**2 + s**2).to(v.dtype)
            h = v * c_in[:, None]
        c = self.time_feature(t)
        emb = self.embed(c).to(h.dtype)
        out = self.mlp(self.x_in(h) + self.t_in(emb))
        return x.replace(**{self.field: out.to(v.dtype)})
